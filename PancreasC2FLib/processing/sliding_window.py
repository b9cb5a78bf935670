"""Sliding-window inference as in Sec. 4.1 of Zhu et al. 2018.

Along an axis of size S with window w, ``floor(S / w) + n`` windows are spread evenly so the first
starts at 0 and the last ends at the border (duplicates dropped). Foreground probabilities are
averaged over overlaps. Volumes smaller than a window are padded and cropped back.
"""

from __future__ import annotations

import copy
import itertools
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from ..errors import Cancelled

ProgressFn = Callable[[int, int], None]


def window_starts(size: int, window: int, n: int) -> list[int]:
    """Start offsets along one axis (the paper's (floor(S/w) + n) windows, evenly spread)."""
    if size <= window:
        return [0]
    # The paper's count; never fewer than full coverage needs (matters only for n = 0).
    count = max(size // window + max(n, 0), -(-size // window))
    starts = np.round(np.linspace(0, size - window, count)).astype(int)
    return sorted(set(int(s) for s in starts))


def window_grid(shape: tuple[int, int, int], window: tuple[int, int, int], n: int) -> list[tuple[int, int, int]]:
    """All window corners for a volume; padded axes (size < window) get one window at 0."""
    per_axis = [window_starts(s, w, n) for s, w in zip(shape, window)]
    return list(itertools.product(*per_axis))


def window_count(shape: tuple[int, int, int], window: tuple[int, int, int], n: int) -> int:
    return int(np.prod([len(window_starts(s, w, n)) for s, w in zip(shape, window)]))


def _axis_counts(shape: tuple[int, int, int], window: tuple[int, int, int], n: int) -> list[np.ndarray]:
    """Per axis, how many windows cover each index."""
    counts = []
    for s, w in zip(shape, window):
        c = np.zeros(max(s, w), np.float32)
        for start in window_starts(s, w, n):
            c[start : start + w] += 1
        counts.append(c[:s])
    return counts


def coverage_counts(shape: tuple[int, int, int], window: tuple[int, int, int], n: int) -> np.ndarray:
    """How many windows cover each voxel; the grid is separable, so it is an outer product."""
    cz, cy, cx = _axis_counts(shape, window, n)
    return cz[:, None, None] * cy[None, :, None] * cx[None, None, :]


def n_for_coverage(shape: tuple[int, int, int], window: tuple[int, int, int], coverage: float, max_n: int = 100) -> int:
    """The smallest n whose windows cover each voxel ``coverage`` times on average (Roth et al.
    2018: overlapping tiles with "a 4x higher sampling rate of each voxel"); a volume too small for
    that gets the n beyond which the grid no longer changes."""
    for n in range(max_n + 1):
        if float(np.prod([c.mean() for c in _axis_counts(shape, window, n)])) >= coverage - 1e-9:
            return n
        if all(len(window_starts(s, w, n)) >= max(1, s - w + 1) for s, w in zip(shape, window)):
            return n  # every position along every axis is used already
    return max_n


@dataclass
class InferenceSettings:
    """How windows are computed; none of these change the result beyond float rounding.

    Fast paths (``pancreas-c2f benchmark --ablation`` times each one, docs/benchmark.md): BatchNorm
    folded into the convolutions, channels-last 3D (the pipeline turns it on for CPU and CUDA),
    several windows per forward pass, autocast on CUDA, the sums kept on the GPU when it has room.
    ``plain()`` turns them all off: the reference the fast paths are tested against.
    """

    device: torch.device = torch.device("cpu")
    batch_size: int = 2
    amp: bool = True  # autocast to bfloat16/float16 on CUDA only
    channels_last: bool = False
    cancel: threading.Event | None = None
    fold_batchnorm: bool = True  # eval-mode BatchNorm folded into the preceding convolution
    stitch_device: str = "auto"  # "auto": on the GPU when its free memory allows, else "cpu"

    @classmethod
    def plain(cls, device: torch.device = torch.device("cpu")) -> "InferenceSettings":
        """No fast path: one window at a time, contiguous tensors, BatchNorm as trained, no AMP."""
        return cls(device=device, batch_size=1, amp=False, channels_last=False, fold_batchnorm=False, stitch_device="cpu")


_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _conv_bn_pairs(net: nn.Module) -> Iterator[tuple[nn.Sequential, int]]:
    for seq in net.modules():
        if isinstance(seq, nn.Sequential):
            for i in range(len(seq) - 1):
                conv, bn = seq[i], seq[i + 1]
                if isinstance(conv, _CONV_TYPES) and isinstance(bn, _BN_TYPES) and bn.track_running_stats and bn.running_mean is not None:
                    yield seq, i


def fold_batchnorm(net: nn.Module) -> nn.Module:
    """A copy of ``net`` (in eval mode) with every ``Conv -> BatchNorm`` pair inside an
    ``nn.Sequential`` replaced by one convolution (the BatchNorm becomes ``nn.Identity``).

    Exact up to float rounding in eval mode; networks built otherwise are returned as a plain copy.
    The tensors that folding replaces are not copied (the original network is left untouched).
    """
    replaced = {}
    for seq, i in _conv_bn_pairs(net):
        for t in (*seq[i].parameters(recurse=False), *seq[i + 1].parameters(recurse=False), *seq[i + 1].buffers(recurse=False)):
            replaced[id(t)] = t
    folded = copy.deepcopy(net, memo=dict(replaced)).eval()
    with torch.no_grad():
        for seq, i in list(_conv_bn_pairs(folded)):
            conv, bn = seq[i], seq[i + 1]
            conv.weight, conv.bias = fuse_conv_bn_weights(
                conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias,
                transpose=isinstance(conv, nn.modules.conv._ConvTransposeNd),
            )
            seq[i + 1] = nn.Identity()
    return folded


def prepare_network(net: nn.Module, settings: InferenceSettings) -> nn.Module:
    """The network as inference runs it: eval mode, BatchNorm folded (on a copy, so the bundle's
    network is untouched), on ``settings.device``, channels-last 3D when asked for."""
    net = fold_batchnorm(net) if settings.fold_batchnorm else net.eval()
    net = net.to(settings.device)
    if settings.channels_last:
        net = net.to(memory_format=torch.channels_last_3d)
    return net


def _batches(corners: list, size: int) -> Iterator[list]:
    for i in range(0, len(corners), size):
        yield corners[i : i + size]


def _stitch_device(settings: InferenceSettings, shape: tuple[int, int, int]) -> torch.device:
    """Where the volume and the probability sums live: the GPU when it has room for both (8 bytes
    a voxel, with half the free memory left for the network), else the CPU."""
    device = settings.device
    if device.type != "cuda" or settings.stitch_device == "cpu":
        return torch.device("cpu")
    if settings.stitch_device == "auto":
        free, _ = torch.cuda.mem_get_info(device)
        if 8 * int(np.prod(shape)) > free // 2:
            return torch.device("cpu")
    return device


def predict_foreground(
    net: torch.nn.Module,
    volume: np.ndarray,
    window: tuple[int, int, int],
    n: int,
    settings: InferenceSettings,
    progress: ProgressFn | None = None,
    corners: list[tuple[int, int, int]] | None = None,
) -> np.ndarray:
    """Average foreground probability (float32, same shape as ``volume``) over all windows.

    ``volume`` is already normalised (float32, z/y/x); ``net`` is used as given (see
    ``prepare_network``). The sums are kept on the GPU when it has room and on the CPU otherwise,
    falling back to the CPU if the GPU runs out of memory. ``corners`` restricts the run to some
    of the grid's windows (benchmarks time a sample): the sums then come back undivided.
    """
    shape = tuple(volume.shape)
    padded_shape = tuple(max(s, w) for s, w in zip(shape, window))
    if padded_shape != shape:
        pad = [(0, p - s) for p, s in zip(padded_shape, shape)]
        volume = np.pad(volume, pad, mode="constant", constant_values=float(volume.min()))
    all_corners = corners is None
    if all_corners:
        corners = window_grid(padded_shape, window, n)
    device = settings.device
    use_amp = settings.amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    memory_format = torch.channels_last_3d if settings.channels_last else torch.contiguous_format
    src = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))
    stitch = _stitch_device(settings, padded_shape)
    try:
        accum = torch.zeros(padded_shape, dtype=torch.float32, device=stitch)
        src = src.to(stitch)  # windows are then cut on the GPU: no copy per batch
    except torch.cuda.OutOfMemoryError:
        accum = torch.zeros(padded_shape, dtype=torch.float32)
        src = src.cpu()
    wz, wy, wx = window

    def foreground(batch) -> torch.Tensor:
        x = torch.stack([src[z : z + wz, y : y + wy, x0 : x0 + wx] for z, y, x0 in batch])[:, None]
        x = x.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
            logits = net(x)
        return torch.softmax(logits.float(), dim=1)[:, 1]

    done = 0
    net.eval()
    with torch.inference_mode():
        for batch in _batches(corners, max(1, settings.batch_size)):
            if settings.cancel is not None and settings.cancel.is_set():
                raise Cancelled("cancelled")
            try:
                prob = foreground(batch)
            except torch.cuda.OutOfMemoryError:
                if accum.device.type == "cpu":
                    raise  # the caller halves the batch or moves to the CPU
                accum, src = accum.cpu(), src.cpu()  # stitch on the CPU from here on
                torch.cuda.empty_cache()
                prob = foreground(batch)
            prob = prob.to(accum.device)
            for (z, y, x0), p in zip(batch, prob):
                accum[z : z + wz, y : y + wy, x0 : x0 + wx] += p
            done += len(batch)
            if progress is not None:
                progress(done, len(corners))
        if all_corners:
            # The coverage is an outer product of per-axis counts: divide axis by axis in place.
            for axis, c in enumerate(_axis_counts(padded_shape, window, n)):
                view = [1, 1, 1]
                view[axis] = -1
                accum /= torch.from_numpy(c).to(accum.device).view(view)
    return accum[: shape[0], : shape[1], : shape[2]].cpu().numpy()
