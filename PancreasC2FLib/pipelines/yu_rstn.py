"""Yu et al. 2018, "Recurrent Saliency Transformation Network" (RSTN), at test time:

    per view (coronal, sagittal, axial), on every slice with its two neighbours as channels:
      coarse 2D network on the whole slice -> score map Z^C
    views averaged -> P^0, mask M^0 = P^0 >= 0.5          (find_region: box of M^0 + margin_mm)
    round r = 1..T (T = 10), per view and slice whose previous mask is not empty:
      X^F = Crop[X (x) g(P^{r-1}); M^{r-1}]               (Eq. 1: saliency multiplies the input,
                                                            then the crop: box of the thresholded
                                                            map + K pixels)
      fine 2D network on X^F, put back into the slice
    views averaged -> P^r, M^r; stop when DSC(M^r, M^{r-1}) > t (t = 0.95).

An ensemble bundle (``python -m Training ensemble``: runs of one recipe, e.g. folds or seeds)
averages its members' probabilities wherever the views are averaged: in P^0 and in every P^r, so
all members refine one shared mask.

Training (``RSTNJoint.forward``) runs coarse -> saliency -> crop -> fine once per slice, the crop
taken from the ground truth (paper: "we use the ground-truth segmentation mask during image
cropping"), and minimises lambda * L_DSC(coarse) + (1 - lambda) * L_DSC(fine), lambda = 1/3
(Eq. 2; Training/losses_rstn_ggpfn.py).

Deviations from the paper, all deliberate:
- The 2D networks are a compact U-Net (``UNet2D``: same-padded conv/BN/ReLU blocks, max pooling,
  transposed-convolution upsampling, concatenated skips) trained from scratch, not FCN-8s with
  ImageNet weights (a 130 M-parameter network per view and stage cannot run on a CPU in Slicer).
- Each network predicts the central slice of its 3-slice input (one sigmoid channel), not all three
  slices: every slice is still predicted once per view.
- The saliency transformation takes the (one-channel) score map and gives one weight map per input
  channel; default two stacked 5x5 layers with a ReLU between them (the paper's best setting).
  In the test rounds it sees the previous round's averaged probability and the crop uses the
  thresholded mask.
- The rounds run inside the region's box: only its slices are refined and nothing outside it is
  labelled, so a user ROI limits the result to the ROI. The crops themselves are not clipped to the
  box: each keeps its K pixels around the previous mask on the whole slice, as in training (clipped
  crops, with less context than the network was trained on, lost up to 60 % of the pancreas).
- Grid: with the stages' ``spacing`` (x, y, z mm) the networks work on the case resampled to that
  spacing (``Pipeline.stage_input``, the same preparation as training's), e.g. 2 mm slices of about
  190 x 190 voxels instead of 512 x 512, so K (``margin``) counts pixels of that grid; the final
  probability is resampled back (trilinear, then thresholded) and the mask lands on the exact input
  grid. Null or absent (the paper's way): the networks work on the input grid (native 512 x 512
  slices), no resampling.

Bundle (``model.json``): ``pipeline: "yu-rstn"``, stages ``coarse`` and ``fine``. Each stage's
network is one ``RSTNStage`` (arch ``rstn-stage``) holding a ``UNet2D`` per view (and, for the fine
stage, a ``SaliencyTransform`` per view). Stage settings: coarse ``views`` (default all three of the
network; e.g. ``["axial"]`` for speed), ``threshold`` (0.5), ``batch`` (slices per forward pass);
fine ``margin`` (K pixels, default 20), ``max_rounds`` (T, 10), ``stop_dsc`` (t, 0.95),
``threshold``, ``margin_mm`` (around the coarse mask for the region box, default 20), ``batch``.
Both stages: ``spacing`` (the grid the networks were trained on; null = the input grid; coarse and
fine must agree).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import EmptyCoarseResult, InputError, ModelError
from ..io.roi import roi_to_box
from ..networks.ensemble import members_of
from ..networks.rstn import VIEW_AXES, _neighbours, _pad_to, _round_up, box_to_view, crop_box_2d, fine_on_crops, to_view
from ..processing.geometry import Box, box_is_empty, box_on_grid, box_slices, expand_box, mask_box
from ..processing.postprocess import dice, remove_small_components
from ..processing.preprocessing import resample_array
from ..processing.quality import MemberAgreement
from .base import Case, Pipeline, Region, Result, _check_cancel, register_pipeline

# --- the recurrent rounds ----------------------------------------------------------------------

@dataclass
class Rounds:
    mask: np.ndarray  # the last round's binary mask
    prob: np.ndarray  # its probability
    rounds: int  # fine rounds run
    inter_dsc: list[float]  # DSC(M^r, M^{r-1}) after each round
    converged: bool


def recurrent_rounds(prob0: np.ndarray, fine_round: Callable[[np.ndarray, np.ndarray], np.ndarray], max_rounds: int = 10, stop_dsc: float = 0.95, threshold: float = 0.5) -> Rounds:
    """The testing iteration: up to ``max_rounds`` calls ``prob = fine_round(prev_prob, prev_mask)``,
    stopping as soon as the inter-iteration DSC (between consecutive masks, the first against the
    coarse mask) is higher than ``stop_dsc``."""
    prob = prob0
    mask = (prob0 >= threshold).astype(np.uint8)
    history: list[float] = []
    for _ in range(int(max_rounds)):
        new_prob = fine_round(prob, mask)
        new_mask = (new_prob >= threshold).astype(np.uint8)
        history.append(dice(new_mask, mask))
        prob, mask = new_prob, new_mask
        if history[-1] > stop_dsc:
            return Rounds(mask, prob, len(history), history, True)
    return Rounds(mask, prob, len(history), history, False)


@dataclass
class Grid:
    """The grid the networks work on: the input grid (stage setting ``spacing`` null) or the case
    resampled to ``spacing``. Boxes and maps go between it and the input grid here, and only here."""

    native_shape: tuple[int, int, int]  # the input grid (canonical z, y, x)
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]  # of this grid, z, y, x mm
    volume: torch.Tensor | None = None  # the normalised case on this grid (``RSTN.grid``)

    def box_from_input(self, box: Box) -> Box:
        """The smallest box of this grid covering ``box`` of the input grid (voxel edges aligned,
        as ``resample_array`` keeps the extent); the same box on the input grid."""
        return box_on_grid(box, self.native_shape, self.shape)

    def to_input(self, array: np.ndarray, mode: str) -> np.ndarray:
        """A map of this grid on the input grid ("nearest" for masks, "trilinear" for probabilities)."""
        return resample_array(array, self.native_shape, mode)


@dataclass
class RSTNRegion(Region):
    """A region that also keeps the coarse (three-view) probability, the first round's saliency
    input, on the networks' grid."""

    coarse_prob: np.ndarray | None = None  # float32 on ``grid``, zero outside ``box`` for a user ROI
    grid: Grid | None = None  # the networks' grid (with the resampled case), reused by ``segment_region``


@register_pipeline
class RSTN(Pipeline):
    """Coarse 2D networks over three views, then recurrent saliency-guided fine rounds."""

    name = "yu-rstn"
    stages = ("coarse", "fine")

    @classmethod
    def paper_settings(cls, bundle) -> dict:
        """Testing phase: the three views (here: all the model has), at most T = 10 rounds, stop
        at inter-iteration DSC > t = 0.95, crop margin K = 20; no post-processing."""
        views = list(members_of(bundle.networks["coarse"])[0].views)
        return {"stages": {"coarse": {"views": views}, "fine": {"margin": 20, "max_rounds": 10, "stop_dsc": 0.95}}, "postprocess": {"min_island_fraction": 0.0}}

    def _default_batch(self) -> int:
        return 16 if self.device.type == "cuda" else 4

    volumetric_networks = False  # 2D decoders: no channels-last-3d

    def views(self) -> list[str]:
        have = list(members_of(self.bundle.networks["coarse"])[0].views)
        wanted = self.stage_config("coarse").get("views") or have
        missing = [v for v in wanted if v not in have or v not in members_of(self.bundle.networks["fine"])[0].views]
        if missing:
            raise InputError(f"this model has no network for the view(s) {missing}; it has {have}")
        return list(wanted)

    def _batch(self, stage: str) -> int:
        return max(1, int(self.stage_config(stage).get("batch") or self.inference.batch_size))

    def spacing(self) -> list | None:
        """The stages' ``spacing`` (x, y, z mm), None for the input grid."""
        coarse, fine = self.stage_config("coarse").get("spacing"), self.stage_config("fine").get("spacing")
        if fine is not None and (coarse is None or [float(v) for v in coarse] != [float(v) for v in fine]):
            raise ModelError(f"model.json: the coarse and fine stages of yu-rstn work on one grid; 'spacing' is {coarse!r} and {fine!r}")
        return list(coarse) if coarse is not None else None

    def grid(self, case: Case) -> Grid:
        """The networks' grid for ``case`` with the case normalised (and resampled) on it, as
        training prepared its slices (``Pipeline.stage_input``)."""
        spacing = self.spacing()
        x, _ = self.stage_input(case, None, spacing)
        grid_spacing = case.spacing if spacing is None else tuple(float(v) for v in spacing[::-1])
        return Grid(tuple(case.shape), tuple(x.shape), tuple(grid_spacing), torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))

    def _grid_of(self, case: Case, region: Region) -> Grid:
        grid = getattr(region, "grid", None)
        if grid is None or grid.volume is None or grid.native_shape != case.shape:
            grid = self.grid(case)
        return grid

    # --- coarse ----------------------------------------------------------------------------

    def coarse_prob(self, grid: Grid, box: Box | None = None, progress=None, cancel=None, agreement: MemberAgreement | None = None) -> np.ndarray:
        """Z^C averaged over the views and an ensemble's members (float32 on ``grid``). With
        ``box`` (of the grid) only the slices crossing it are computed (whole slices, as the
        coarse networks were trained) and the result is zero outside it. With ``agreement`` the
        members' own maps are compared: the coarse stage is where an ensemble's members work
        independently (the fine rounds all refine one shared mask, so they agree by design)."""
        vol = grid.volume
        whole = ((0, grid.shape[0]), (0, grid.shape[1]), (0, grid.shape[2]))
        box = box or whole
        views = self.views()
        stages = members_of(self.net("coarse"))
        total = np.zeros(grid.shape, np.float32)
        own = [np.zeros(grid.shape, np.float32) for _ in stages] if agreement is not None and len(stages) > 1 else []
        m = stages[0].size_multiple
        for k, view in enumerate(views):
            v = vol.permute(*VIEW_AXES[view])
            (s0, s1), (y0, y1), (x0, x1) = box_to_view(box, view)
            h, w = v.shape[1:]
            size = (_round_up(h, m), _round_up(w, m))
            low = float(v.min()) if v.numel() else 0.0
            out = to_view(total, view)
            idx = list(range(s0, s1))
            bs = self._batch("coarse")
            for b in range(0, len(idx), bs):
                _check_cancel(cancel)
                chunk = idx[b : b + bs]
                x = _pad_to(_neighbours(v, chunk), size, low).to(self.device)
                with torch.inference_mode():
                    ps = [torch.sigmoid(s(x, view))[:, 0, :h, :w].float().cpu().numpy() for s in stages]
                rows = slice(s0 + b, s0 + b + len(chunk))
                out[rows, y0:y1, x0:x1] += (sum(ps) / len(stages))[:, y0:y1, x0:x1]
                for o, p in zip(own, ps):
                    to_view(o, view)[rows, y0:y1, x0:x1] += p[:, y0:y1, x0:x1]
                if progress:
                    progress("coarse", (k + (b + len(chunk)) / max(1, len(idx))) / len(views), f"coarse: {view} slice {b + len(chunk)}/{len(idx)}")
        total /= len(views)
        if own:
            agreement.add([o[box_slices(box)] / len(views) for o in own])
        return total

    def find_region(self, case, progress=None, cancel=None) -> Region:
        t0 = time.perf_counter()
        cfg = self.stage_config("coarse")
        grid = self.grid(case)
        agreement = self.member_agreement("coarse")
        prob = self.coarse_prob(grid, None, progress, cancel, agreement)
        mask = (prob >= float(cfg.get("threshold", 0.5))).astype(np.uint8)
        min_fraction = float(self.config["postprocess"].get("coarse_min_island_fraction", 0.0))
        if min_fraction > 0:
            mask = remove_small_components(mask, min_fraction)
            prob = prob * mask  # the dropped islands do not seed the fine rounds either
        full_mask = grid.to_input(mask, "nearest")
        box = mask_box(full_mask)
        if box is None:
            raise EmptyCoarseResult("the coarse networks found no pancreas in this scan; give a region with --roi (or draw the ROI in Slicer)")
        box = expand_box(box, float(self.stage_config("fine").get("margin_mm", 20.0)), case.spacing, case.shape)
        region = RSTNRegion(box, "coarse", coarse_mask=full_mask, coarse_prob=prob, grid=grid, extra={"views": self.views(), "grid": list(grid.shape)})
        self.note_agreement(region, agreement)
        region.timings["coarse_s"] = round(time.perf_counter() - t0, 3)
        return region

    def region_from_roi(self, case: Case, roi: dict, previous: Region | None = None) -> Region:
        """The user's box; a ``previous`` coarse result is reused inside it (else the coarse
        networks run on the slices crossing the box)."""
        box, warnings = roi_to_box(case.image, case.orientation, roi)
        region = RSTNRegion(box, "roi", warnings=warnings, extra={"views": self.views()})
        if isinstance(previous, RSTNRegion) and previous.coarse_prob is not None and previous.grid is not None:
            grid = previous.grid
            inside = np.zeros(grid.shape, bool)
            inside[box_slices(grid.box_from_input(box))] = True
            region.coarse_prob = np.where(inside, previous.coarse_prob, 0).astype(np.float32)
            region.grid = grid
            if "member_agreement_dsc" in previous.extra:  # the coarse maps it comes from
                region.extra["member_agreement_dsc"] = previous.extra["member_agreement_dsc"]
        return region

    # --- fine rounds -----------------------------------------------------------------------

    def fine_round(self, grid: Grid, box: Box, prev_prob: np.ndarray, prev_mask: np.ndarray, cancel=None) -> np.ndarray:
        """One round on ``grid``: per view and slice of ``box`` (of the grid) whose previous mask
        is not empty there, the saliency-weighted crop through the fine network; views (and an
        ensemble's members) averaged; zero outside ``box``."""
        cfg = self.stage_config("fine")
        margin = int(cfg.get("margin", 20))  # the threshold is applied by the caller
        stages = members_of(self.net("fine"))
        views = self.views()
        total = np.zeros(grid.shape, np.float32)
        for view in views:
            v = grid.volume.permute(*VIEW_AXES[view])
            pv, mv, out = to_view(prev_prob, view), to_view(prev_mask, view), to_view(total, view)
            s0, s1 = box_to_view(box, view)[0]
            # K pixels around the mask on the whole slice, as trained; the result is cut to the box below
            todo = [(i, crop_box_2d(mv[i], margin, 0.5)) for i in range(s0, s1)]
            todo = [(i, b) for i, b in todo if b is not None]  # empty previous mask: no fine pass
            bs = self._batch("fine")
            for k in range(0, len(todo), bs):
                _check_cancel(cancel)
                chunk = todo[k : k + bs]
                idx = [i for i, _ in chunk]
                x = _neighbours(v, idx).to(self.device)
                score = torch.from_numpy(np.ascontiguousarray(pv[idx]))[:, None].to(self.device)
                with torch.inference_mode():
                    boxes = [b for _, b in chunk]
                    p = sum(fine_on_crops(s.nets[view], s.saliency[view], x, score, boxes)[:, 0].float() for s in stages) / len(stages)
                out[idx] += p.cpu().numpy()
        total /= len(views)
        inside = np.zeros(grid.shape, bool)
        inside[box_slices(box)] = True
        total[~inside] = 0
        return total

    def segment_region(self, case, region, progress=None, cancel=None) -> Result:
        t0 = time.perf_counter()
        if box_is_empty(region.box):
            raise InputError("the region is empty")
        cfg = self.stage_config("fine")
        threshold = float(cfg.get("threshold", 0.5))
        grid = self._grid_of(case, region)
        box = grid.box_from_input(region.box)
        prob0 = getattr(region, "coarse_prob", None)
        if prob0 is None or prob0.shape != grid.shape:
            agreement = self.member_agreement("coarse")
            prob0 = self.coarse_prob(grid, box, progress, cancel, agreement)
            self.note_agreement(region, agreement)
        inside = np.zeros(grid.shape, bool)
        inside[box_slices(box)] = True
        prob0 = np.where(inside, prob0, 0).astype(np.float32)
        max_rounds = int(cfg.get("max_rounds", 10))
        done = [0]

        def step(prev_prob, prev_mask):
            done[0] += 1
            if progress:
                progress("fine", (done[0] - 1) / max(1, max_rounds), f"fine: round {done[0]} (at most {max_rounds})")
            return self.fine_round(grid, box, prev_prob, prev_mask, cancel)

        rounds = recurrent_rounds(prob0, step, max_rounds, float(cfg.get("stop_dsc", 0.95)), threshold)
        _check_cancel(cancel)
        if grid.shape == grid.native_shape:
            mask = rounds.mask
        else:  # the last round's probability on the input grid, then the threshold, inside the region
            mask = np.zeros(case.shape, np.uint8)
            sl = box_slices(region.box)
            mask[sl] = grid.to_input(rounds.prob, "trilinear")[sl] >= threshold
        min_fraction = float(self.config["postprocess"].get("min_island_fraction", 0.0))
        if min_fraction > 0:
            mask = remove_small_components(mask, min_fraction)
        warnings = []
        if not (prob0 >= threshold).any():
            warnings.append("the coarse networks found nothing in the region: no fine round could run")
        elif not rounds.converged:
            warnings.append(f"the fine rounds did not converge in {rounds.rounds} rounds (last inter-iteration DSC {rounds.inter_dsc[-1]:.3f})")
        region.extra.update({"rounds": rounds.rounds, "inter_dsc": [round(d, 4) for d in rounds.inter_dsc], "converged": rounds.converged, "grid": list(grid.shape)})
        timings = dict(region.timings)
        timings["fine_s"] = round(time.perf_counter() - t0, 3)
        if progress:
            progress("fine", 1.0, "done")
        result = self.finish(case, region, mask, timings)
        result.warnings.extend(warnings)
        return result
