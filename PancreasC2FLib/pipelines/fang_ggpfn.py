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
- Networks work on the input grid, as the paper's, unless the stage sets ``spacing`` (x, y, z mm):
  then the whole case is resampled to that grid (``Pipeline.stage_input``), the views run there and
  the probabilities are resampled (trilinear) back to the input grid before thresholding, so the
  mask lands on the exact input grid. A CPU-sized choice (the demo: 2 mm); training prepares its
  volumes at the same spacing. Widths are configurable (tests use tiny ones).

Bundle: ``pipeline: "fang-ggpfn"``, stage ``ggpfn`` with one ``GGPFNViews`` network (arch
``ggpfn-views``: a ``GGPFNet`` per view). Stage settings: ``views`` (default all of the network), ``spacing`` (null: the input grid),
``view_weights`` ({view: w}, default equal; the paper uses 0.8/0.1/0.1 on MSD), ``patch`` ([h, w],
default [256, 256], or {view: [h, w]}: the paper's MSD setting), ``whole_slice`` (one patch per
slice, the paper's N = 1 at test time; the ``paper`` preset), ``overlap`` (pixels, default 64), ``threshold`` (0.5), ``margin_mm`` (20),
``batch`` (patches per forward pass). An ensemble bundle (``python -m Training ensemble``) holds
several ``ggpfn-views`` networks; each view's probability is their mean.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import EmptyCoarseResult, InputError
from ..networks.ensemble import members_of
from ..networks.ggpfn import GGPFNet, global_input, neighbour_slices
from ..networks.rstn import VIEW_AXES, box_to_view
from ..processing.geometry import Box, box_is_empty, box_on_grid, box_slices, expand_box, mask_box
from ..processing.postprocess import remove_small_components
from ..processing.preprocessing import normalize, resample_array
from ..processing.quality import MemberAgreement
from .base import Case, Pipeline, Region, Result, _check_cancel, register_pipeline


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


def view_setting(value, view: str):
    """A setting given once for all views or per view (``{"axial": [256, 256], "sagittal":
    [128, 256], ...}``: the paper's MSD patches)."""
    if isinstance(value, dict):
        if view not in value:
            raise InputError(f"the per-view setting {value} has no entry for the {view} view")
        return value[view]
    return value


@register_pipeline
class GGPFN(Pipeline):
    """End-to-end: patches of every slice with the slice's global features, views fused."""

    name = "fang-ggpfn"
    stages = ("ggpfn",)

    @classmethod
    def paper_settings(cls, bundle) -> dict:
        """Sec. 3.2: N = 1 at test time (one patch, the whole slice), all views (here: all the
        model has) with equal weights (NIH setting); no post-processing."""
        views = list(members_of(bundle.networks["ggpfn"])[0].views)
        return {"stages": {"ggpfn": {"whole_slice": True, "views": views, "view_weights": {v: 1.0 for v in views}}}, "postprocess": {"min_island_fraction": 0.0}}

    volumetric_networks = False  # 2D decoders: no channels-last-3d

    def views(self) -> list[str]:
        have = list(members_of(self.bundle.networks["ggpfn"])[0].views)
        wanted = self.stage_config("ggpfn").get("views") or have
        if any(v not in have for v in wanted):
            raise InputError(f"this model has no network for the view(s) {[v for v in wanted if v not in have]}; it has {have}")
        return list(wanted)

    def view_prob(self, net: GGPFNet, vol: torch.Tensor, box: Box, progress=None, cancel=None, view: str = "axial") -> np.ndarray:
        """One view's probability over ``box`` (view order: slices, rows, columns): a float32 array
        of the box's shape. ``vol`` is the view-ordered normalised volume."""
        cfg = self.stage_config("ggpfn")
        (s0, s1), (y0, y1), (x0, x1) = box
        n, h, w = vol.shape
        m = net.patch_multiple
        if cfg.get("whole_slice"):  # the paper's N = 1 at test time
            ph = pw = 1 << 30
        else:
            ph, pw = (int(-(-int(v) // m) * m) for v in view_setting(cfg.get("patch", (256, 256)), view))
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
                progress("ggpfn", (k + len(chunk)) / len(jobs), f"ggpfn {view}: patch {k + len(chunk)}/{len(jobs)}")
        return (acc / cnt.clamp_min(1)).numpy()

    def probability(self, case: Case, box: Box, progress=None, cancel=None, agreement: MemberAgreement | None = None) -> np.ndarray:
        """The views' weighted average over ``box`` (canonical float32 of the box's shape, on the
        input grid). With a stage ``spacing`` the views run on the case resampled to it (over the
        box's cover there) and the probabilities come back to the input grid (trilinear)."""
        spacing = self.stage_config("ggpfn").get("spacing")
        if not spacing:
            vol = normalize(case.hu, self.preprocessing, case.stats)
            return self.views_probability(vol, box, progress, cancel, agreement)
        x, native = self.stage_input(case, None, spacing)
        # one voxel more: trilinear resampling back reads the neighbours of the box's edge voxels
        low_box = box_on_grid(box, native, x.shape, pad=1)
        low = np.zeros(x.shape, np.float32)
        low[box_slices(low_box)] = self.views_probability(x, low_box, progress, cancel, agreement)
        del x
        return np.ascontiguousarray(resample_array(low, native, "trilinear")[box_slices(box)])

    def views_probability(self, volume: np.ndarray, box: Box, progress=None, cancel=None, agreement: MemberAgreement | None = None) -> np.ndarray:
        """The views' weighted average over ``box`` of a normalised canonical volume (each view's
        probability the mean of an ensemble's members; with ``agreement``, the members' own
        view-averaged maps are compared there)."""
        vol = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))
        stages = members_of(self.net("ggpfn"))
        weights = self.stage_config("ggpfn").get("view_weights") or {}
        own = [np.zeros(tuple(hi - lo for lo, hi in box), np.float32) for _ in stages]
        wsum = 0.0
        for view in self.views():
            wv = float(weights.get(view, 1.0))
            if wv <= 0:
                continue
            for o, s in zip(own, stages):
                p = self.view_prob(s.nets[view], vol.permute(*VIEW_AXES[view]), box_to_view(box, view), progress, cancel, view)
                o += wv * np.transpose(p, np.argsort(VIEW_AXES[view]))
            wsum += wv
        if wsum <= 0:
            raise InputError("the view weights leave no view to run")
        if agreement is not None and len(own) > 1:
            agreement.add([o / wsum for o in own])
        return sum(own) / (len(own) * wsum)

    def _mask(self, prob: np.ndarray) -> np.ndarray:
        return (prob >= float(self.stage_config("ggpfn").get("threshold", 0.5))).astype(np.uint8)

    def find_region(self, case, progress=None, cancel=None) -> Region:
        t0 = time.perf_counter()
        whole = ((0, case.shape[0]), (0, case.shape[1]), (0, case.shape[2]))
        agreement = self.member_agreement("ggpfn")
        mask = self._mask(self.probability(case, whole, progress, cancel, agreement))
        min_fraction = float(self.config["postprocess"].get("min_island_fraction", 0.0))
        if min_fraction > 0:
            mask = remove_small_components(mask, min_fraction)
        box = mask_box(mask)
        if box is None:
            raise EmptyCoarseResult("the network found no pancreas in this scan; give a region with --roi (or draw the ROI in Slicer)")
        box = expand_box(box, float(self.stage_config("ggpfn").get("margin_mm", 20.0)), case.spacing, case.shape)
        region = Region(box, "coarse", coarse_mask=mask, extra={"end_to_end": True, "views": self.views()})
        self.note_agreement(region, agreement)
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
            agreement = self.member_agreement("ggpfn")
            mask[box_slices(region.box)] = self._mask(self.probability(case, region.box, progress, cancel, agreement))
            self.note_agreement(region, agreement)
            min_fraction = float(self.config["postprocess"].get("min_island_fraction", 0.0))
            if min_fraction > 0:
                mask = remove_small_components(mask, min_fraction)
        _check_cancel(cancel)
        timings = dict(region.timings)
        timings["fine_s"] = round(time.perf_counter() - t0, 3)
        if progress:
            progress("ggpfn", 1.0, "done")
        return self.finish(case, region, mask, timings)
