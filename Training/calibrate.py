"""Choose a stage's probability threshold on validation cases (never on the evaluation cases).

    python -m Training calibrate --model BUNDLE --stage stage2 --data VAL_IMAGES --labels VAL_LABELS \
        --thresholds 0.3 0.5 0.7 0.9

Losses that weight the classes (Roth's Eq. 3-4, a ResDSN class weight) bias the probabilities, so
0.5 is not the best cut. The sweep runs the inference pipeline on each case; when the swept stage
is the last one, the first stage runs once per case and only the last stage is repeated; a
one-stage network (fang-ggpfn) runs once per case. The best
threshold (highest mean DSC; ties: the one nearest 0.5) is what ``export --set STAGE.threshold=T``
records in the bundle.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from PancreasC2FLib.io.bundle import load_bundle, resolve_model
from PancreasC2FLib.errors import EmptyCoarseResult
from PancreasC2FLib.pipelines import create_pipeline
from PancreasC2FLib.processing.postprocess import dice

from .datasets import CaseRef


def sweep(model: str, stage: str, thresholds: list[float], cases: list[CaseRef], device: str = "cpu", threads: int | None = None, log=print) -> dict:
    """Mean DSC per threshold of ``stage`` over ``cases``; returns {"best", "table", ...}."""
    pipe = create_pipeline(load_bundle(resolve_model(model)), device=device, threads=threads)
    if stage not in pipe.config["stages"]:
        raise ValueError(f"the model has no stage {stage!r} (it has {', '.join(pipe.config['stages'])})")
    last_only = len(pipe.stages) > 1 and stage == pipe.stages[-1]
    # One end-to-end network with no post-processing (fang-ggpfn): its mask is its thresholded
    # probability, so one pass per case serves every threshold.
    one_pass = len(pipe.stages) == 1 and hasattr(pipe, "probability") and not pipe.config["postprocess"].get("min_island_fraction")
    original = pipe.config["stages"][stage].get("threshold", 0.5)
    scores = {t: [] for t in thresholds}
    for ref in cases:
        image, label = ref.load()
        case = pipe.prepare(image)
        truth = case.orientation.to_canonical(sitk.GetArrayViewFromImage(label)) > 0
        if one_pass:  # the whole-volume probability once, thresholded per value
            prob = pipe.probability(case, tuple((0, n) for n in case.shape))
            for t in thresholds:
                scores[t].append(dice(prob >= t, truth))
            log(f"  {ref.name}: " + ", ".join(f"{t:g} {scores[t][-1]:.4f}" for t in thresholds))
            continue
        region = None
        for t in thresholds:
            pipe.config["stages"][stage]["threshold"] = float(t)
            try:
                if region is None or not last_only:
                    region = pipe.find_region(case)
                mask = pipe.segment_region(case, region).mask
            except EmptyCoarseResult:
                mask = np.zeros(case.shape, np.uint8)
            scores[t].append(dice(mask, truth))
        log(f"  {ref.name}: " + ", ".join(f"{t:g} {scores[t][-1]:.4f}" for t in thresholds))
    pipe.config["stages"][stage]["threshold"] = original
    table = {float(t): float(np.mean(v)) for t, v in scores.items()}
    best = max(table, key=lambda t: (round(table[t], 6), -abs(t - 0.5)))
    return {"stage": stage, "best": best, "mean_dsc": table, "cases": [c.name for c in cases], "bundle_threshold": original}


def write_report(result: dict, out: str | Path) -> Path:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2), encoding="utf-8")
    return path
