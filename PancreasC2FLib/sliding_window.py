"""Sliding-window inference as in Sec. 4.1 of Zhu et al. 2018.

Along an axis of size S with window w, ``floor(S / w) + n`` windows are spread evenly so the first
starts at 0 and the last ends at the border (duplicates dropped). Foreground probabilities are
averaged over overlaps. Volumes smaller than a window are padded and cropped back.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .errors import Cancelled

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


def coverage_counts(shape: tuple[int, int, int], window: tuple[int, int, int], n: int) -> np.ndarray:
    """How many windows cover each voxel; the grid is separable, so it is an outer product."""
    counts = []
    for s, w in zip(shape, window):
        c = np.zeros(max(s, w), np.float32)
        for start in window_starts(s, w, n):
            c[start : start + w] += 1
        counts.append(c[:s])
    return counts[0][:, None, None] * counts[1][None, :, None] * counts[2][None, None, :]


@dataclass
class InferenceSettings:
    """How windows are computed; none of these change the result beyond float rounding."""

    device: torch.device = torch.device("cpu")
    batch_size: int = 2
    amp: bool = True  # autocast to bfloat16/float16 on CUDA only
    channels_last: bool = False
    cancel: threading.Event | None = None


def _batches(corners: list, size: int) -> Iterator[list]:
    for i in range(0, len(corners), size):
        yield corners[i : i + size]


def predict_foreground(
    net: torch.nn.Module,
    volume: np.ndarray,
    window: tuple[int, int, int],
    n: int,
    settings: InferenceSettings,
    progress: ProgressFn | None = None,
) -> np.ndarray:
    """Average foreground probability (float32, same shape as ``volume``) over all windows.

    ``volume`` is already normalised (float32, z/y/x). Stitching happens on the CPU in float32 so
    that only one window batch lives on the accelerator.
    """
    shape = tuple(volume.shape)
    padded_shape = tuple(max(s, w) for s, w in zip(shape, window))
    if padded_shape != shape:
        pad = [(0, p - s) for p, s in zip(padded_shape, shape)]
        volume = np.pad(volume, pad, mode="constant", constant_values=float(volume.min()))
    corners = window_grid(padded_shape, window, n)
    accum = np.zeros(padded_shape, np.float32)
    device = settings.device
    use_amp = settings.amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    memory_format = torch.channels_last_3d if settings.channels_last else torch.contiguous_format
    src = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))
    wz, wy, wx = window
    done = 0
    net.eval()
    with torch.inference_mode():
        for batch in _batches(corners, max(1, settings.batch_size)):
            if settings.cancel is not None and settings.cancel.is_set():
                raise Cancelled("cancelled")
            x = torch.stack([src[z : z + wz, y : y + wy, x0 : x0 + wx] for z, y, x0 in batch])[:, None]
            x = x.to(device, non_blocking=True).contiguous(memory_format=memory_format)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                logits = net(x)
            prob = torch.softmax(logits.float(), dim=1)[:, 1].cpu().numpy()
            for (z, y, x0), p in zip(batch, prob):
                accum[z : z + wz, y : y + wy, x0 : x0 + wx] += p
            done += len(batch)
            if progress is not None:
                progress(done, len(corners))
    accum /= coverage_counts(padded_shape, window, n)
    return accum[: shape[0], : shape[1], : shape[2]]
