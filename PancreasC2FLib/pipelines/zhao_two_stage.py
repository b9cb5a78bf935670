"""Zhao et al. 2019, "Fully automated pancreas segmentation with two-stage 3D CNNs" (Sec. 2.2.2,
Fig. 2), at test time:

    stage 1: 3D U-Net on the whole CT decimated by R (paper R = 4) -> low-resolution mask M
    box 1: bounding box of M + 2 voxels (of the low grid), scaled by R to the input grid
    box 2: bounding box of M upsampled to the input grid + 10 voxels
    stage 2: the fine 3D U-Net (input grid) on box 1 and on box 2 -> two fine masks
    result: majority vote of the two fine masks and the upsampled M (2 of 3).

Bundle stage settings: stage 1 ``downsample`` (R) or ``spacing`` (x, y, z mm: a fixed grid
instead), ``window``, ``n``, ``threshold``, ``low_margin`` (2); stage 2 ``window``, ``n``,
``threshold``, ``margin`` (10 voxels) and an optional ``downsample`` / ``spacing`` (default: the
input grid, as in the paper). The papers' losses are in ``Training/losses_variants.py``.
"""

from __future__ import annotations

import math
import time

import numpy as np

from ..errors import EmptyCoarseResult, InputError
from ..processing.geometry import Box, box_is_empty, box_slices, crop, mask_box
from ..processing.quality import MemberAgreement
from .base import Case, Pipeline, Region, Result, _check_cancel, grow_box_to, register_pipeline
from ..processing.postprocess import remove_small_components
from ..processing.preprocessing import normalize, resample_array
from ..io.roi import roi_to_box
from .roth_cascade import downsample_volume, min_native_size, stage_shape


def two_boxes(low_mask: np.ndarray, full_shape, low_margin: int = 2, up_margin: int = 10, up_mask: np.ndarray | None = None) -> tuple[Box, Box]:
    """Zhao's two candidate boxes on the input grid from the low-resolution stage-1 mask.

    Box 1: the low mask's box grown by ``low_margin`` low-grid voxels, then scaled by the grid
    ratio (R) to the input grid (outward rounding). Box 2: the box of the mask upsampled to the
    input grid (nearest; pass ``up_mask`` if it is already computed) grown by ``up_margin``
    input-grid voxels. Both clamped to the image. Raises ValueError for an empty mask."""
    full_shape = tuple(int(v) for v in full_shape)
    low_box = mask_box(low_mask)
    if low_box is None:
        raise ValueError("the low-resolution mask is empty")
    box1 = []
    for (lo, hi), s, n in zip(low_box, low_mask.shape, full_shape):
        lo, hi = max(0, lo - low_margin), min(s, hi + low_margin)
        ratio = n / s  # = R up to the rounding of the low grid
        box1.append((max(0, int(math.floor(lo * ratio + 1e-9))), min(n, int(math.ceil(hi * ratio - 1e-9)))))
    if up_mask is None:
        up_mask = resample_array(np.ascontiguousarray(low_mask, dtype=np.uint8), full_shape, "nearest")
    up_box = mask_box(up_mask)
    box2 = tuple((max(0, lo - up_margin), min(n, hi + up_margin)) for (lo, hi), n in zip(up_box, full_shape))
    return tuple(box1), box2


def majority_vote(masks) -> np.ndarray:
    """Voxels that more than half of the binary masks mark (2 of 3 for Zhao's three channels)."""
    masks = list(masks)
    if not masks:
        raise ValueError("no masks to vote")
    votes = np.zeros(np.shape(masks[0]), np.uint8)
    for m in masks:
        votes += np.asarray(m).astype(bool)
    return (votes > len(masks) // 2).astype(np.uint8)


def box_union(a: Box, b: Box) -> Box:
    return tuple((min(la, lb), max(ha, hb)) for (la, ha), (lb, hb) in zip(a, b))


@register_pipeline
class ZhaoTwoStage(Pipeline):
    """Stage-1 U-Net on the decimated CT, fine U-Net on two boxes, 2-of-3 majority vote."""

    name = "zhao-two-stage"
    stages = ("stage1", "stage2")

    @classmethod
    def paper_settings(cls, bundle) -> dict:
        """Sec. 2.2.2: margins of 2 low-grid and 10 input-grid voxels; no post-processing."""
        return {"stages": {"stage1": {"low_margin": 2}, "stage2": {"margin": 10}}, "postprocess": {"min_island_fraction": 0.0, "coarse_min_island_fraction": 0.0}}

    def coarse_low(self, case: Case, progress=None, cancel=None) -> np.ndarray:
        """The stage-1 mask on the decimated grid."""
        cfg = self.stage_config("stage1")
        x = normalize(case.hu, self.preprocessing, case.stats)
        x = downsample_volume(x, stage_shape(case.shape, case.spacing, cfg, 4))
        prob = self.predict("stage1", x, progress, cancel)
        mask = (prob >= float(cfg.get("threshold", 0.5))).astype(np.uint8)
        min_fraction = float(self.config["postprocess"].get("coarse_min_island_fraction", 0.0))
        return remove_small_components(mask, min_fraction) if min_fraction > 0 else mask

    def find_region(self, case, progress=None, cancel=None) -> Region:
        t0 = time.perf_counter()
        cfg1, cfg2 = self.stage_config("stage1"), self.stage_config("stage2")
        low = self.coarse_low(case, progress, cancel)
        if not low.any():
            raise EmptyCoarseResult("the first stage found no pancreas in this scan; give a region with --roi (or draw the ROI in Slicer)")
        up = resample_array(low, case.shape, "nearest")
        box1, box2 = two_boxes(low, case.shape, int(cfg1.get("low_margin", 2)), int(cfg2.get("margin", 10)), up_mask=up)
        region = Region(box_union(box1, box2), "coarse", coarse_mask=up, extra={"box1": box1, "box2": box2, "stage1_grid": list(low.shape)})
        region.timings["coarse_s"] = round(time.perf_counter() - t0, 3)
        return region

    def region_from_roi(self, case: Case, roi: dict, previous: Region | None = None) -> Region:
        """The user's box: the fine network runs there once (no boxes to vote over)."""
        box, warnings = roi_to_box(case.image, case.orientation, roi)
        return Region(box, "roi", warnings=warnings)

    def fine_mask(self, case: Case, box: Box, progress=None, cancel=None, agreement: MemberAgreement | None = None) -> np.ndarray:
        """The fine network inside ``box``: a uint8 mask of the box's shape."""
        cfg = self.stage_config("stage2")
        window = tuple(int(v) for v in cfg.get("window", (64, 64, 64)))
        run_box = grow_box_to(box, min_native_size(window, case.shape, case.spacing, cfg, 1), case.shape)
        region = crop(case.hu, run_box)
        native = tuple(region.shape)
        x = downsample_volume(normalize(region, self.preprocessing, case.stats), stage_shape(native, case.spacing, cfg, 1))
        prob = resample_array(self.predict("stage2", x, progress, cancel, agreement), native, "trilinear")
        inner = tuple(slice(lo - rlo, hi - rlo) for (lo, hi), (rlo, _) in zip(box, run_box))
        return (prob[inner] >= float(cfg.get("threshold", 0.5))).astype(np.uint8)

    def segment_region(self, case, region, progress=None, cancel=None) -> Result:
        t0 = time.perf_counter()
        if box_is_empty(region.box):
            raise InputError("the region is empty")
        mask = np.zeros(case.shape, np.uint8)
        agreement = self.member_agreement("stage2")
        boxes = [region.extra.get("box1"), region.extra.get("box2")]
        if region.source == "coarse" and region.coarse_mask is not None and all(b is not None for b in boxes):
            # Vote inside the union of the boxes; outside it only the coarse mask could vote.
            union = region.box
            votes = [crop(region.coarse_mask, union)]
            for b in boxes:
                _check_cancel(cancel)
                vote = np.zeros(votes[0].shape, np.uint8)
                vote[tuple(slice(lo - ulo, hi - ulo) for (lo, hi), (ulo, _) in zip(b, union))] = self.fine_mask(case, b, progress, cancel, agreement)
                votes.append(vote)
            mask[box_slices(union)] = majority_vote(votes)
        else:
            mask[box_slices(region.box)] = self.fine_mask(case, region.box, progress, cancel, agreement)
        _check_cancel(cancel)
        self.note_agreement(region, agreement)
        return self.complete(case, region, mask, t0, "stage2", progress)
