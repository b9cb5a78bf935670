"""Zhu et al. 2018, ResDSN coarse-to-fine (Sec. 3.1-3.3, Eq. 4-5):

    coarse network over the whole CT (optionally on a coarser grid) -> binary P^C
    -> box covering its foreground + margin (mm, clamped) -> Crop -> fine network inside the box
    -> DeCrop (the fine result replaces P^C inside the box) -> drop small islands.
"""

from __future__ import annotations

import time

import numpy as np

from ..errors import EmptyCoarseResult, InputError
from ..processing.geometry import Box, box_is_empty, decrop, expand_box, mask_box, touches_box_border
from ..processing.quality import MemberAgreement
from .base import Case, Pipeline, Region, Result, _check_cancel, grow_box_to, register_pipeline, remove_small_islands_in
from ..processing.postprocess import remove_small_components
from ..processing.preprocessing import resample_array


@register_pipeline
class ResDSNC2F(Pipeline):
    """Zhu et al. 2018: ResDSN coarse (n = 6) then ResDSN fine (n = 12) inside the box."""

    name = "resdsn-c2f"
    stages = ("coarse", "fine")

    @classmethod
    def paper_settings(cls, bundle) -> dict:
        """Sec. 4.1: n = 6 (coarse) and n = 12 (fine)."""
        return {"stages": {"coarse": {"n": 6}, "fine": {"n": 12}}}

    def coarse_mask(self, case: Case, progress=None, cancel=None) -> np.ndarray:
        """Binary P^C on the full canonical grid (small islands removed so that one stray
        false positive cannot stretch the box across the abdomen)."""
        cfg = self.stage_config("coarse")
        x, native = self.stage_input(case, None, cfg.get("spacing"))
        prob = self.predict("coarse", x, progress, cancel)
        mask = (prob >= float(cfg.get("threshold", 0.5))).astype(np.uint8)
        del prob
        mask = remove_small_components(mask, float(self.config["postprocess"].get("coarse_min_island_fraction", 0.2)))
        return resample_array(mask, native, "nearest")

    def find_region(self, case, progress=None, cancel=None) -> Region:
        t0 = time.perf_counter()
        mask = self.coarse_mask(case, progress, cancel)
        box = mask_box(mask)
        if box is None:
            raise EmptyCoarseResult("the coarse stage found no pancreas in this scan; give a region with --roi (or draw the ROI in Slicer)")
        box = expand_box(box, self.stage_config("fine").get("margin_mm", 20.0), case.spacing, case.shape)
        region = Region(box, "coarse", coarse_mask=mask, timings={"coarse_s": round(time.perf_counter() - t0, 3)})
        if touches_box_border(mask, ((0, case.shape[0]), (0, case.shape[1]), (0, case.shape[2])), case.shape)["touches_image_border"]:
            region.warnings.append("the coarse result touches the image border: the pancreas may be partly outside the field of view")
        return region

    def fine_mask(self, case: Case, box: Box, progress=None, cancel=None, agreement: MemberAgreement | None = None) -> np.ndarray:
        """P^F: the fine network inside ``box`` (canonical uint8 of the box's shape)."""
        cfg = self.stage_config("fine")
        x, native = self.stage_input(case, box, cfg.get("spacing"))
        prob = self.predict("fine", x, progress, cancel, agreement)
        prob = resample_array(prob, native, "trilinear")  # small crop: resampling scores here is cheap
        return (prob >= float(cfg.get("threshold", 0.5))).astype(np.uint8)

    def segment_region(self, case, region, progress=None, cancel=None) -> Result:
        t0 = time.perf_counter()
        if box_is_empty(region.box):
            raise InputError("the region is empty")
        cfg = self.stage_config("fine")
        window = tuple(int(v) for v in cfg.get("window", (64, 64, 64)))
        fine_spacing = cfg.get("spacing")
        target = tuple(float(v) for v in fine_spacing[::-1]) if fine_spacing else case.spacing
        min_vox = tuple(int(np.ceil(w * t / s)) for w, t, s in zip(window, target, case.spacing))
        # Run on a box at least one window large, but only keep what lies in the user's region.
        run_box = grow_box_to(region.box, min_vox, case.shape)
        agreement = self.member_agreement("fine")
        fine = self.fine_mask(case, run_box, progress, cancel, agreement)
        _check_cancel(cancel)
        self.note_agreement(region, agreement)
        inner = tuple(slice(lo - rlo, hi - rlo) for (lo, hi), (rlo, _) in zip(region.box, run_box))
        fine = fine[inner]
        base = region.coarse_mask if region.coarse_mask is not None else np.zeros(case.shape, np.uint8)
        mask = decrop(base, fine, region.box)  # Eq. 5
        mask = remove_small_islands_in(mask, self._nonzero_box(region), float(self.config["postprocess"].get("min_island_fraction", 0.2)))
        timings = dict(region.timings)
        timings["fine_s"] = round(time.perf_counter() - t0, 3)
        if progress:
            progress("fine", 1.0, "done")
        return self.finish(case, region, mask, timings)

    @staticmethod
    def _nonzero_box(region: Region) -> Box:
        """A box holding every voxel the C2F mask can have: the region and the coarse mask's box."""
        coarse = mask_box(region.coarse_mask) if region.coarse_mask is not None else None
        if coarse is None:
            return region.box
        return tuple((min(a, c), max(b, d)) for (a, b), (c, d) in zip(region.box, coarse))

    def fine_everywhere(self, case: Case, progress=None, cancel=None) -> np.ndarray:
        """The paper's "ResDSN Fine" baseline: the fine network over the whole volume."""
        whole = ((0, case.shape[0]), (0, case.shape[1]), (0, case.shape[2]))
        mask = self.fine_mask(case, whole, progress, cancel)
        return remove_small_components(mask, float(self.config["postprocess"].get("min_island_fraction", 0.2)))
