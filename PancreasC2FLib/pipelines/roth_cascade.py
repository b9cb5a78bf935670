"""Roth et al. 2018, "An application of cascaded 3D fully convolutional networks" (Sec. 2.2-2.4):

    body mask C1 (threshold, largest component, hole filling)
    -> stage 1: 3D U-Net at half resolution over C1, non-overlapping tiles -> argmax labels
    -> C2 = stage-1 foreground dilated by r = 3 voxels (a mask, not a box)
    -> stage 2: 3D U-Net at half resolution inside C2, overlapping tiles, probabilities averaged
       (Eq. 5), resampled back linearly, thresholded and kept only inside C2.

Labels go back to the input grid by nearest neighbour, probabilities by linear interpolation
(Sec. 2.2). The paper applies no post-processing, so the bundle's default keeps every component.

Bundle stage settings (``model.json``, ``stages.stage1`` / ``stages.stage2``): ``downsample``
(grid factor, paper 2) or ``spacing`` (x, y, z mm: a fixed grid instead), ``window`` (tile size on
that grid), ``n`` (extra tiles per axis: 0 = tiles side by side, > 0 overlapping) or ``coverage``
(tiles per voxel on average, the n chosen per region: the paper preset's 4 in stage 2), ``threshold``;
stage 1 also ``body_threshold_hu`` (default -500) and ``dilation_radius`` (voxels of the stage-1
grid, paper r = 3). The papers' losses are in ``Training/losses_variants.py``.
"""

from __future__ import annotations

import time

import numpy as np
import SimpleITK as sitk

from ..errors import EmptyCoarseResult, InputError
from ..processing.geometry import Box, box_is_empty, box_slices, crop, mask_box
from ..processing.quality import MemberAgreement
from .base import Case, Pipeline, Region, Result, _check_cancel, grow_box_to, register_pipeline
from ..processing.postprocess import keep_largest_component, remove_small_components
from ..processing.preprocessing import normalize, resample_array, resampled_shape
from ..io.roi import roi_to_box


# --- resampling by a grid factor -----------------------------------------------------------------

def scaled_shape(shape, factor) -> tuple[int, int, int]:
    """Grid size after dividing each axis by ``factor`` (a number or one per axis), at least 1."""
    factors = (factor,) * 3 if np.isscalar(factor) else tuple(factor)
    return tuple(max(1, int(round(int(s) / float(f)))) for s, f in zip(shape, factors))


def stage_shape(native_shape, spacing_zyx, cfg: dict, default_factor=1) -> tuple[int, int, int]:
    """The grid a stage works on: ``spacing`` (x, y, z mm) when the stage gives one, otherwise the
    input grid divided by ``downsample`` (the papers' factor). Training uses the same function."""
    if cfg.get("spacing"):
        target = tuple(float(v) for v in cfg["spacing"][::-1])
        return resampled_shape(native_shape, spacing_zyx, target)
    return scaled_shape(native_shape, cfg.get("downsample") or default_factor)


def min_native_size(window, native_shape, spacing_zyx, cfg: dict, default_factor=1) -> tuple[int, int, int]:
    """Input-grid voxels that one window of the stage's grid covers (per axis)."""
    grid = stage_shape(native_shape, spacing_zyx, cfg, default_factor)
    return tuple(int(np.ceil(w * n / g)) for w, n, g in zip(window, native_shape, grid))


def downsample_volume(x: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Intensities (or HU) on a stage's grid: the library's trilinear resampling (voxel edges
    aligned; for a factor of 2 each output voxel is the mean of a 2x2x2 block), as float32. The
    training data go through the same function."""
    return np.ascontiguousarray(resample_array(np.asarray(x, dtype=np.float32), tuple(int(v) for v in shape), "trilinear"), dtype=np.float32)


# --- C1: the body mask -----------------------------------------------------------------------------

def body_mask(hu: np.ndarray, threshold_hu: float = -500.0) -> np.ndarray:
    """The patient's body (uint8): voxels above ``threshold_hu``, the largest connected component
    (drops the table, clothing and noise), then holes filled slice by slice so lungs and bowel
    gas count as body even where they open onto the top or bottom of the scan."""
    mask = keep_largest_component(np.asarray(hu) > threshold_hu)
    if not mask.any():
        return mask
    filled = np.empty_like(mask)
    for z in range(mask.shape[0]):
        if mask[z].any():
            filled[z] = sitk.GetArrayFromImage(sitk.BinaryFillhole(sitk.GetImageFromArray(mask[z]), fullyConnected=False, foregroundValue=1))
        else:
            filled[z] = 0
    return filled


# --- C2: dilation by a voxel radius ------------------------------------------------------------

def dilate_mask(mask: np.ndarray, r: int) -> np.ndarray:
    """Binary dilation with a Euclidean ball of radius ``r`` voxels (every voxel within distance
    r of the mask). Works on the mask's bounding box plus r, so it costs little on large grids."""
    mask = np.asarray(mask).astype(bool)
    out = np.zeros(mask.shape, np.uint8)
    box = mask_box(mask)
    if box is None:
        return out
    r = int(r)
    if r <= 0:
        out[mask] = 1
        return out
    grown = tuple((max(0, lo - r), min(n, hi + r)) for (lo, hi), n in zip(box, mask.shape))
    sub = np.ascontiguousarray(mask[box_slices(grown)], dtype=np.uint8)
    # Pad so the distance map sees background all round (mask touching the crop border).
    padded = np.pad(sub, 1)
    dist2 = sitk.GetArrayFromImage(
        sitk.SignedMaurerDistanceMap(sitk.GetImageFromArray(padded), insideIsPositive=False, squaredDistance=True, useImageSpacing=False)
    )[1:-1, 1:-1, 1:-1]
    out[box_slices(grown)] = (dist2 <= r * r + 1e-6).astype(np.uint8)
    return out


@register_pipeline
class RothCascade(Pipeline):
    """Two 3D U-Nets: stage 1 inside the body mask, stage 2 inside the dilated stage-1 mask."""

    name = "roth-cascade"
    stages = ("stage1", "stage2")

    @classmethod
    def paper_settings(cls, bundle) -> dict:
        """Sec. 2.4: side-by-side tiles in stage 1, overlapping ones with a 4x higher sampling of
        each voxel in stage 2; Sec. 4: no post-processing."""
        return {"stages": {"stage1": {"n": 0}, "stage2": {"coverage": 4}}, "postprocess": {"min_island_fraction": 0.0, "coarse_min_island_fraction": 0.0}}

    def grid_shape(self, stage: str, native_shape, spacing_zyx) -> tuple[int, int, int]:
        return stage_shape(native_shape, spacing_zyx, self.stage_config(stage), 2)

    def low_input(self, case: Case, box: Box | None, stage: str) -> tuple[np.ndarray, tuple[int, int, int]]:
        """Normalised crop (whole volume for ``box=None``) on the stage's (half-resolution) grid."""
        region = case.hu if box is None else crop(case.hu, box)
        native = tuple(region.shape)
        x = normalize(region, self.preprocessing, case.stats)
        return downsample_volume(x, self.grid_shape(stage, native, case.spacing)), native

    def stage1_masks(self, case: Case, progress=None, cancel=None) -> dict:
        """C1, the stage-1 labels and C2, all on the stage-1 (half-resolution) grid."""
        cfg = self.stage_config("stage1")
        low_shape = self.grid_shape("stage1", case.shape, case.spacing)
        hu_low = downsample_volume(case.hu, low_shape)
        body = body_mask(hu_low, float(cfg.get("body_threshold_hu", -500.0)))
        body_box = mask_box(body)
        warnings = []
        if body_box is None:
            warnings.append("no body found above the body threshold: the first stage ran on the whole volume")
            body = np.ones(low_shape, np.uint8)
            body_box = ((0, low_shape[0]), (0, low_shape[1]), (0, low_shape[2]))
        del hu_low
        x, _ = self.low_input(case, None, "stage1")
        # Tiles only over the body's bounding box; labels only inside the body (C1).
        prob = self.predict("stage1", np.ascontiguousarray(x[box_slices(body_box)]), progress, cancel)
        del x
        labels = np.zeros(low_shape, np.uint8)
        labels[box_slices(body_box)] = prob >= float(cfg.get("threshold", 0.5))
        labels &= body
        min_fraction = float(self.config["postprocess"].get("coarse_min_island_fraction", 0.0))
        if min_fraction > 0:
            labels = remove_small_components(labels, min_fraction)
        candidate = dilate_mask(labels, int(cfg.get("dilation_radius", 3)))
        candidate &= body
        return {"body": body, "labels": labels, "candidate": candidate, "warnings": warnings}

    def find_region(self, case, progress=None, cancel=None) -> Region:
        t0 = time.perf_counter()
        low = self.stage1_masks(case, progress, cancel)
        coarse = resample_array(low["labels"], case.shape, "nearest")
        candidate = resample_array(low["candidate"], case.shape, "nearest")
        box = mask_box(candidate)
        if box is None:
            raise EmptyCoarseResult("the first stage found no pancreas in this scan; give a region with --roi (or draw the ROI in Slicer)")
        extra = {
            "body_fraction": round(float(low["body"].mean()), 4),
            "candidate_fraction": round(float(low["candidate"].mean()), 4),
            "stage1_grid": list(low["labels"].shape),
        }
        region = Region(box, "coarse", coarse_mask=coarse, candidate_mask=candidate, warnings=low["warnings"], extra=extra)
        region.timings["coarse_s"] = round(time.perf_counter() - t0, 3)
        return region

    def region_from_roi(self, case: Case, roi: dict, previous: Region | None = None) -> Region:
        """The user's box; when ``previous`` (the region the first stage found) has a candidate
        mask, stage 2 is limited to that mask inside the box."""
        box, warnings = roi_to_box(case.image, case.orientation, roi)
        region = Region(box, "roi", warnings=warnings)
        if previous is not None and previous.candidate_mask is not None:
            cand = np.zeros(case.shape, np.uint8)
            cand[box_slices(box)] = previous.candidate_mask[box_slices(box)]
            if cand.any():
                region.candidate_mask = cand
                region.coarse_mask = previous.coarse_mask
            else:
                region.warnings.append("the ROI does not overlap the first stage's candidate region: the second stage ran on the whole ROI")
        return region

    def stage2_prob(self, case: Case, box: Box, progress=None, cancel=None, agreement: MemberAgreement | None = None) -> np.ndarray:
        """Stage-2 foreground probability over ``box`` on the input grid (linear upsampling)."""
        cfg = self.stage_config("stage2")
        window = tuple(int(v) for v in cfg.get("window", (64, 64, 64)))
        # Tiles get real context around a small region instead of padding.
        run_box = grow_box_to(box, min_native_size(window, case.shape, case.spacing, cfg, 2), case.shape)
        x, native = self.low_input(case, run_box, "stage2")
        prob = self.predict("stage2", x, progress, cancel, agreement)
        del x
        prob = resample_array(prob, native, "trilinear")
        inner = tuple(slice(lo - rlo, hi - rlo) for (lo, hi), (rlo, _) in zip(box, run_box))
        return prob[inner]

    def segment_region(self, case, region, progress=None, cancel=None) -> Result:
        t0 = time.perf_counter()
        if box_is_empty(region.box):
            raise InputError("the region is empty")
        agreement = self.member_agreement("stage2")
        prob = self.stage2_prob(case, region.box, progress, cancel, agreement)
        _check_cancel(cancel)
        self.note_agreement(region, agreement)
        fine = (prob >= float(self.stage_config("stage2").get("threshold", 0.5))).astype(np.uint8)
        del prob
        if region.candidate_mask is not None:
            fine &= crop(region.candidate_mask, region.box)  # stage 2 only inside C2
        mask = np.zeros(case.shape, np.uint8)
        mask[box_slices(region.box)] = fine
        return self.complete(case, region, mask, t0, "stage2", progress)
