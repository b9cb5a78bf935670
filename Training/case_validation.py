"""Whole-case validation while training: the stage being trained runs through the inference
pipeline (``PancreasC2FLib.pipelines``, the ``fast`` preset) on the whole validation cases, which is
what users get, rather than Dice on windows. The trainer keeps the checkpoint with the best figure
as ``best.pt``, and ``export`` takes it by default.

* coarse stage: the coarse mask over the whole CT (``find_region``); nothing found scores 0;
* fine stage: ``segment_region`` inside the ground-truth box grown by the stage's margin (the
  region a perfect coarse stage would give).

Only for ``resdsn-c2f`` stages; the other pipelines keep window validation.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from PancreasC2FLib.errors import EmptyCoarseResult
from PancreasC2FLib.io.bundle import Bundle
from PancreasC2FLib.pipelines import create_pipeline
from PancreasC2FLib.pipelines.base import Region
from PancreasC2FLib.processing.geometry import expand_box, mask_box
from PancreasC2FLib.processing.postprocess import dice

from . import registry
from .catalog import recipe
from .datasets import CaseRef

SUPPORTED = {"resdsn-c2f": ("coarse", "fine")}


def supported(pipeline: str, stage: str) -> bool:
    return stage in SUPPORTED.get(pipeline, ())


class CaseValidator:
    """Mean DSC of the stage's network over whole validation cases (read once, kept in memory)."""

    def __init__(self, cases: list[CaseRef], info: dict, device: str = "cpu", preset: str = "fast"):
        self.info, self.device, self.preset = info, device, preset
        self.cases = []
        for ref in cases:
            image, label = ref.load()
            self.cases.append((ref.name, image, label))

    def _pipeline(self, net):
        """A pipeline whose stages both hold a copy of ``net`` (only the validated one runs)."""
        pipe = recipe(self.info["pipeline"])
        own = {k: v for k, v in self.info["settings"].items() if k not in registry.TRAINING_ONLY_SETTINGS}
        stages = {s: {"network": self.info["network"], **{k: v for k, v in r.settings.items() if k not in registry.TRAINING_ONLY_SETTINGS}} for s, r in pipe.stages.items()}
        stages[self.info["stage"]].update(own)
        metadata = {"name": "validation", "pipeline": pipe.name, "preprocessing": self.info["preprocessing"], "stages": stages, "postprocess": dict(pipe.postprocess), "presets": dict(pipe.presets)}
        net = copy.deepcopy(net).cpu().eval()
        bundle = Bundle(Path("."), metadata, {s: net for s in stages})
        return create_pipeline(bundle, device=self.device, preset=self.preset if self.preset in pipe.presets else "default")

    def __call__(self, net) -> dict:
        pipe = self._pipeline(net)
        stage = self.info["stage"]
        scores = []
        for _, image, label in self.cases:
            case = pipe.prepare(image)
            truth = case.orientation.to_canonical(sitk.GetArrayViewFromImage(label)) > 0
            if stage == "coarse":
                try:
                    mask = pipe.find_region(case).coarse_mask
                except EmptyCoarseResult:
                    mask = np.zeros(case.shape, np.uint8)
            else:
                box = mask_box(truth)
                margin = float(pipe.stage_config("fine").get("margin_mm", 20.0))
                mask = pipe.segment_region(case, Region(expand_box(box, margin, case.spacing, case.shape), "truth")).mask
            # check.py refuses empty labels, so the truth is never empty here: no free 1.0
            scores.append(dice(mask, truth) if truth.any() else 0.0)
        return {"case_dsc": float(np.mean(scores)) if scores else float("nan")}
