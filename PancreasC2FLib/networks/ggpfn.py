"""Fang et al. 2019, "Globally Guided Progressive Fusion Network" (GGPFN), Sec. 2 and Algorithm 1:

    per view and slice A (its 2T + 1 neighbours around it, here in every view's slicing):
      global guidance branch on the whole slice downsampled to h_g x w_g -> global feature map F
      (computed once per slice; the stack over slices is the volume's global features)
      for each overlapping in-plane patch A_k:
        progressive fusion encoder: 3D convolutions that do not pad along the slice axis, so each
        one drops the two outermost slices; with T of them only the central slice is left (E_k)
        F_k = F sampled (bilinear, sub-pixel) at the image positions of E_k's pixels
        2D decoder on [E_k, F_k] with skips from the central slices of the encoder's scales
      patch probabilities merged into the slice
    views fused by a weighted average (w_a, w_s, w_c), thresholded at 0.5.

Training loss (Eq. 2, Training/losses_rstn_ggpfn.py): BCE of the output, 1/4 of the BCE of the four
encoder scales' 1x1-conv predictions (deep supervision), alpha * BCE of F's prediction and beta *
BCE of F''s (the second-last scale of the global branch), against downsampled ground truths.
Training (samples, the paper's three-phase schedule): Training/ggpfn_training.py.

Deviations from the paper:
- The pipeline is end-to-end, so it has one stage (``ggpfn``). ``find_region`` runs the whole
  volume and returns the mask's box + ``margin_mm`` with the mask as ``coarse_mask``;
  ``segment_region`` returns that mask for such a region, and for a user ROI runs the patches
  covering the box only (result zero outside it). The global features still come from whole
  slices.
- Overlapping patches are averaged (the paper drops the peripheral overlapped pixels).
- The paper's F is h_g/32 from 4 poolings; ours has ``len(global_convs) - 1`` poolings (default
  13 convolutions in groups 2, 2, 3, 3, 3 with 4 poolings: F at h_g/16).
- Each encoder group is one residual block: its 3D convolutions plus a 1x1x1 projection of the
  group's input (central slices cropped to match), instead of separate convolution layers and
  residual blocks; slices at the volume's ends are repeated to fill the 2T + 1 neighbourhood.
- Networks work on the input grid, as the paper's; widths are configurable (tests use tiny ones).

Bundle: ``pipeline: "fang-ggpfn"``, stage ``ggpfn`` with one ``GGPFNViews`` network (arch
``ggpfn-views``: a ``GGPFNet`` per view). Stage settings: ``views`` (default all of the network),
``view_weights`` ({view: w}, default equal; the paper uses 0.8/0.1/0.1 on MSD), ``patch`` ([h, w],
default [256, 256]), ``overlap`` (pixels, default 64), ``threshold`` (0.5), ``margin_mm`` (20),
``batch`` (patches per forward pass).
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import EmptyCoarseResult, InputError
from .geometry import Box, box_is_empty, box_slices, expand_box, mask_box
from .network import register_architecture
from .pipeline import Case, Pipeline, Region, Result, _check_cancel, register_pipeline
from .postprocess import remove_small_components
from .preprocessing import normalize
from .rstn import VIEW_AXES, VIEWS, box_to_view


# --- shared by training and inference ----------------------------------------------------------

def global_input(slices: torch.Tensor, size) -> torch.Tensor:
    """A_g: whole slices (B, H, W) downsampled to ``size`` (h_g, w_g) -> (B, 1, h_g, w_g)
    (bilinear with antialiasing; training data must go through this same function)."""
    x = slices[:, None].float()
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(int(v) for v in size), mode="bilinear", align_corners=False, antialias=True)


def neighbour_slices(i: int, half: int, n: int) -> list[int]:
    """Slice i's 2T + 1 neighbourhood (``half`` = T) in a view of n slices, the volume's end
    slices repeated (Training/ggpfn_training.py builds its samples with this too)."""
    return [min(max(j, 0), n - 1) for j in range(i - half, i + half + 1)]


def sample_global(features: torch.Tensor, origin: torch.Tensor, out_hw, stride: int, slice_hw) -> torch.Tensor:
    """F_k: the global feature map of each sample's whole slice (B, C, h_F, w_F) sampled
    (bilinear, sub-pixel) at the slice positions of a local feature map's pixels.

    The local map has ``out_hw`` pixels, each covering ``stride`` x ``stride`` pixels of the patch
    whose top-left corner is at ``origin`` (B, 2: row, column) in a slice of ``slice_hw`` pixels
    ((h, w), or (B, 2) when the samples' slices differ, as in training batches).
    F covers the whole slice (pixel edges aligned), so the normalised coordinate of a slice position
    is the same in F. Positions beyond the slice (a padded patch) take F's border values."""
    oh, ow = (int(v) for v in out_hw)
    dev = features.device
    hw = torch.as_tensor(slice_hw, dtype=torch.float32).to(dev).reshape(-1, 2)
    h, w = hw[:, :1], hw[:, 1:]
    origin = origin.to(dev, torch.float32)
    cy = origin[:, :1] + stride * torch.arange(oh, device=dev, dtype=torch.float32)[None] + stride / 2.0  # pixel-centre + 0.5
    cx = origin[:, 1:] + stride * torch.arange(ow, device=dev, dtype=torch.float32)[None] + stride / 2.0
    ny, nx = 2.0 * cy / h - 1.0, 2.0 * cx / w - 1.0
    grid = torch.stack(torch.broadcast_tensors(nx[:, None, :], ny[:, :, None]), dim=-1)  # (B, oh, ow, 2) as (x, y)
    return F.grid_sample(features.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)


def _bn_relu2d(cin: int, cout: int, k: int = 3) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def _block2d(cin: int, cout: int, n: int = 2) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(n):
        layers += _bn_relu2d(cin if i == 0 else cout, cout)
    return nn.Sequential(*layers)


class FusionGroup(nn.Module):
    """``n`` 3D convolutions (3x3x3, no padding along the slices: each drops the two outermost)
    with a residual 1x1x1 projection of the input's central slices."""

    def __init__(self, cin: int, cout: int, n: int):
        super().__init__()
        if n < 1:
            raise ValueError("every fusion group needs at least one 3D convolution")
        layers: list[nn.Module] = []
        for i in range(n):
            layers += [nn.Conv3d(cin if i == 0 else cout, cout, 3, padding=(0, 1, 1), bias=False), nn.BatchNorm3d(cout), nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*layers)
        self.skip = nn.Sequential(nn.Conv3d(cin, cout, 1, bias=False), nn.BatchNorm3d(cout))
        self.n = n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.shape[2]
        return F.relu(self.body(x) + self.skip(x[:, :, self.n : s - self.n]))


def _central(x: torch.Tensor) -> torch.Tensor:
    """The central slice of a (B, C, S, H, W) feature map (the skip connections' central crop)."""
    return x[:, :, x.shape[2] // 2]


class GGPFNet(nn.Module):
    """One view's network: progressive fusion encoder (4 groups of 3D convolutions, ``convs`` per
    group, T = sum(convs), input 2T + 1 slices), global guidance branch (2D, ``global_convs`` per
    group with max pooling between groups) and a 2D decoder. Logits of the central slice."""

    def __init__(self, width: int = 16, convs=(3, 4, 4, 4), global_width: int = 16, global_convs=(2, 2, 3, 3, 3), global_size=(224, 224)):
        super().__init__()
        convs, global_convs = [int(c) for c in convs], [int(c) for c in global_convs]
        if len(convs) != 4:
            raise ValueError("the progressive fusion encoder has 4 groups")
        if len(global_convs) < 2:
            raise ValueError("the global branch needs at least 2 groups")
        self.convs, self.global_size = convs, tuple(int(v) for v in global_size)
        self.slices = 2 * sum(convs) + 1
        chans = [width * 2**g for g in range(4)]
        self.encoder = nn.ModuleList(FusionGroup(1 if g == 0 else chans[g - 1], chans[g], n) for g, n in enumerate(convs))
        self.encoder_heads = nn.ModuleList(nn.Conv2d(c, 1, 1) for c in chans)  # deep supervision P^(j)
        gchans = [global_width * min(2**g, 8) for g in range(len(global_convs))]
        self.global_groups = nn.ModuleList(_block2d(1 if g == 0 else gchans[g - 1], gchans[g], n) for g, n in enumerate(global_convs))
        self.global_head = nn.Conv2d(gchans[-1], 1, 1)  # P^f
        self.global_head2 = nn.Conv2d(gchans[-2], 1, 1)  # P^f'
        self.global_stride = 2 ** (len(global_convs) - 1)
        self.bottom = _block2d(chans[3] + gchans[-1], chans[3])
        self.up = nn.ModuleList(nn.ConvTranspose2d(chans[g + 1], chans[g], 2, stride=2) for g in (2, 1, 0))
        self.decoder = nn.ModuleList(_block2d(2 * chans[g], chans[g]) for g in (2, 1, 0))
        self.classifier = nn.Conv2d(chans[0], 1, 1)

    patch_multiple = 8  # three in-plane poolings in the encoder
    local_stride = 8

    def global_features(self, a_g: torch.Tensor, with_aux: bool = False):
        """F (and, with ``with_aux``, the logits of P^f and P^f') from A_g (B, 1, h_g, w_g)."""
        x, prev = a_g, None
        for g, block in enumerate(self.global_groups):
            if g:
                prev = x  # F': the second-last group's output
                x = F.max_pool2d(x, 2)
            x = block(x)
        if not with_aux:
            return x
        return x, self.global_head(x), self.global_head2(prev)

    def forward(self, x: torch.Tensor, global_feat: torch.Tensor, origin: torch.Tensor, slice_hw, with_aux: bool = False):
        """x: (B, 1, 2T + 1, P, P) local patches; global_feat: F of each sample's slice; origin:
        (B, 2) patch corners in the slice; logits (B, 1, P, P) of the central slice (and, with
        ``with_aux``, the logits of the four encoder scales P^(1..4))."""
        if x.shape[2] != self.slices:
            raise ValueError(f"the network takes {self.slices} slices, got {x.shape[2]}")
        feats = []
        for g, group in enumerate(self.encoder):
            if g:
                x = F.max_pool3d(x, (1, 2, 2))
            x = group(x)
            feats.append(x)
        e = _central(feats[3])
        fk = sample_global(global_feat, origin, e.shape[-2:], self.local_stride, slice_hw).to(e.dtype)
        d = self.bottom(torch.cat([e, fk], dim=1))
        for up, dec, g in zip(self.up, self.decoder, (2, 1, 0)):
            d = dec(torch.cat([_central(feats[g]), up(d)], dim=1))
        logits = self.classifier(d)
        if not with_aux:
            return logits
        return logits, [head(_central(f)) for head, f in zip(self.encoder_heads, feats)]

    def forward_train(self, x: torch.Tensor, a_g: torch.Tensor, origin: torch.Tensor, slice_hw) -> dict:
        """Everything Eq. 2 needs: ``main`` (B, 1, P, P), ``encoder`` (4 maps at 1/1..1/8),
        ``global`` (P^f, P^f' logits on F's and F''s grids); all logits."""
        feat, pf, pf2 = self.global_features(a_g, with_aux=True)
        main, enc = self.forward(x, feat, origin, slice_hw, with_aux=True)
        return {"main": main, "encoder": enc, "global": [pf, pf2]}


@register_architecture
class GGPFNViews(nn.Module):
    """A GGPFNet per view (the paper trains one model per view), as one module: one weights file."""

    arch = "ggpfn-views"

    def __init__(self, views=VIEWS, **net_args):
        super().__init__()
        views = list(views)
        if not views or any(v not in VIEWS for v in views):
            raise ValueError(f"views must be a non-empty subset of {VIEWS}")
        self.views = views
        self.nets = nn.ModuleDict({v: GGPFNet(**net_args) for v in views})

    def forward(self, x, global_feat, origin, slice_hw, view: str | None = None):
        return self.nets[view or self.views[0]](x, global_feat, origin, slice_hw)


def patch_starts(lo: int, hi: int, size: int, patch: int, overlap: int) -> list[int]:
    """Patch corners along one axis covering [lo, hi) of an axis of ``size`` (patches stay inside
    the axis when it is at least one patch long), consecutive patches overlapping by at least
    ``overlap`` pixels, spread evenly."""
    if size <= patch:
        return [0]
    first = min(max(lo, 0), size - patch)
    last = min(max(hi - patch, 0), size - patch)
    if last <= first:
        return [first]
    step = max(1, patch - max(0, overlap))
    count = -(-(last - first) // step) + 1
    return sorted(set(int(round(v)) for v in np.linspace(first, last, count)))


@register_pipeline
class GGPFN(Pipeline):
    """End-to-end: patches of every slice with the slice's global features, views fused."""

    name = "fang-ggpfn"
    stages = ("ggpfn",)

    volumetric_networks = False  # 2D decoders: no channels-last-3d

    def views(self) -> list[str]:
        have = list(self.bundle.networks["ggpfn"].views)
        wanted = self.stage_config("ggpfn").get("views") or have
        if any(v not in have for v in wanted):
            raise InputError(f"this model has no network for the view(s) {[v for v in wanted if v not in have]}; it has {have}")
        return list(wanted)

    def view_prob(self, net: GGPFNet, vol: torch.Tensor, box: Box, progress=None, cancel=None, label: str = "") -> np.ndarray:
        """One view's probability over ``box`` (view order: slices, rows, columns): a float32 array
        of the box's shape. ``vol`` is the view-ordered normalised volume."""
        cfg = self.stage_config("ggpfn")
        (s0, s1), (y0, y1), (x0, x1) = box
        n, h, w = vol.shape
        m = net.patch_multiple
        ph, pw = (int(-(-int(v) // m) * m) for v in cfg.get("patch", (256, 256)))
        ph, pw = min(ph, -(-h // m) * m), min(pw, -(-w // m) * m)  # no larger than the (rounded-up) slice
        overlap = int(cfg.get("overlap", 64))
        half = net.slices // 2
        low = float(vol.min())
        bs = max(1, int(cfg.get("batch") or self.inference.batch_size))
        ys, xs = patch_starts(y0, y1, h, ph, overlap), patch_starts(x0, x1, w, pw, overlap)
        acc = torch.zeros((s1 - s0, y1 - y0, x1 - x0))
        cnt = torch.zeros_like(acc)
        # F once per slice (Algorithm 1, lines 2-3), from the whole slice.
        feats = []
        with torch.inference_mode():
            for b in range(s0, s1, bs):
                _check_cancel(cancel)
                a_g = global_input(vol[b : min(b + bs, s1)], net.global_size).to(self.device)
                feats.append(net.global_features(a_g))
        feats = torch.cat(feats)
        jobs = [(i, py, px) for i in range(s0, s1) for py in ys for px in xs]
        for k in range(0, len(jobs), bs):
            _check_cancel(cancel)
            chunk = jobs[k : k + bs]
            xb = []
            for i, py, px in chunk:
                idx = torch.tensor(neighbour_slices(i, half, n))
                p = vol[idx, py : py + ph, px : px + pw]
                p = F.pad(p, (0, pw - p.shape[-1], 0, ph - p.shape[-2]), value=low)
                xb.append(p)
            x = torch.stack(xb)[:, None].to(self.device)
            origin = torch.tensor([[py, px] for _, py, px in chunk], dtype=torch.float32)
            g = feats[torch.tensor([i - s0 for i, _, _ in chunk])]
            with torch.inference_mode():
                prob = torch.sigmoid(net(x, g, origin, (h, w))[:, 0].float()).cpu()
            for (i, py, px), p in zip(chunk, prob):
                # The part of the patch inside the slice and the box.
                ya, yb = max(py, y0), min(py + ph, y1, h)
                xa, xb_ = max(px, x0), min(px + pw, x1, w)
                if ya < yb and xa < xb_:
                    acc[i - s0, ya - y0 : yb - y0, xa - x0 : xb_ - x0] += p[ya - py : yb - py, xa - px : xb_ - px]
                    cnt[i - s0, ya - y0 : yb - y0, xa - x0 : xb_ - x0] += 1
            if progress:
                progress("ggpfn", (k + len(chunk)) / len(jobs), f"ggpfn {label}: patch {k + len(chunk)}/{len(jobs)}")
        return (acc / cnt.clamp_min(1)).numpy()

    def probability(self, case: Case, box: Box, progress=None, cancel=None) -> np.ndarray:
        """The views' weighted average over ``box`` (canonical float32 of the box's shape)."""
        vol = torch.from_numpy(np.ascontiguousarray(normalize(case.hu, self.preprocessing, case.stats)))
        stage = self.net("ggpfn")
        weights = self.stage_config("ggpfn").get("view_weights") or {}
        total = np.zeros(tuple(hi - lo for lo, hi in box), np.float32)
        wsum = 0.0
        for view in self.views():
            wv = float(weights.get(view, 1.0))
            if wv <= 0:
                continue
            p = self.view_prob(stage.nets[view], vol.permute(*VIEW_AXES[view]), box_to_view(box, view), progress, cancel, view)
            total += wv * np.transpose(p, np.argsort(VIEW_AXES[view]))
            wsum += wv
        if wsum <= 0:
            raise InputError("the view weights leave no view to run")
        return total / wsum

    def _mask(self, prob: np.ndarray) -> np.ndarray:
        return (prob >= float(self.stage_config("ggpfn").get("threshold", 0.5))).astype(np.uint8)

    def find_region(self, case, progress=None, cancel=None) -> Region:
        t0 = time.perf_counter()
        whole = ((0, case.shape[0]), (0, case.shape[1]), (0, case.shape[2]))
        mask = self._mask(self.probability(case, whole, progress, cancel))
        min_fraction = float(self.config["postprocess"].get("min_island_fraction", 0.0))
        if min_fraction > 0:
            mask = remove_small_components(mask, min_fraction)
        box = mask_box(mask)
        if box is None:
            raise EmptyCoarseResult("the network found no pancreas in this scan; give a region with --roi (or draw the ROI in Slicer)")
        box = expand_box(box, float(self.stage_config("ggpfn").get("margin_mm", 20.0)), case.spacing, case.shape)
        region = Region(box, "coarse", coarse_mask=mask, extra={"end_to_end": True, "views": self.views()})
        region.timings["coarse_s"] = round(time.perf_counter() - t0, 3)
        return region

    def segment_region(self, case, region, progress=None, cancel=None) -> Result:
        t0 = time.perf_counter()
        if box_is_empty(region.box):
            raise InputError("the region is empty")
        if region.source == "coarse" and region.coarse_mask is not None and region.extra.get("end_to_end"):
            mask = region.coarse_mask.astype(np.uint8, copy=True)  # already the whole-volume result
        else:
            mask = np.zeros(case.shape, np.uint8)
            mask[box_slices(region.box)] = self._mask(self.probability(case, region.box, progress, cancel))
            min_fraction = float(self.config["postprocess"].get("min_island_fraction", 0.0))
            if min_fraction > 0:
                mask = remove_small_components(mask, min_fraction)
        _check_cancel(cancel)
        timings = dict(region.timings)
        timings["fine_s"] = round(time.perf_counter() - t0, 3)
        if progress:
            progress("ggpfn", 1.0, "done")
        return self.finish(case, region, mask, timings)
