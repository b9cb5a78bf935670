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

from .datasets import CaseRef, DatasetError
from .splits import read_fold


def calibration_cases(cases: list[CaseRef], splits: str | None, fold: int, val_count: int, bundle_training: dict | None = None, log=print) -> list[CaseRef]:
    """The cases a threshold may be chosen on: with ``splits``, the fold's training part (its last
    ``val_count`` cases: the validation cases ``train --val-count`` kept); never a test case, of
    that fold or of the fold the bundle records it was trained on (DatasetError, exit 2)."""
    test: set[str] = set()
    if fold == "all":
        raise DatasetError("calibrate chooses one model's threshold: give one --fold, not all")
    if splits:
        part = read_fold(splits, fold)
        test |= set(part["test"])
        train = set(part["train"])
        cases = [c for c in cases if c.name in train]
        if val_count:
            cases = cases[-val_count:]
        else:
            log(f"note: choosing on all {len(cases)} training cases of fold {fold} (give --val-count N to use the validation cases train kept)")
    for stage in (bundle_training or {}).get("stages", {}).values():
        recorded = stage.get("splits")
        if recorded and stage.get("fold") is not None and Path(recorded).is_file():
            test |= set(read_fold(recorded, int(stage["fold"]))["test"])
    leaked = [c.name for c in cases if c.name in test]
    if leaked:
        raise DatasetError(f"calibrate refuses test cases ({', '.join(leaked[:5])}{' ...' if len(leaked) > 5 else ''}): a threshold chosen on them biases the evaluation; use --splits with --fold, or validation data")
    if not cases:
        raise DatasetError("no case left to calibrate on")
    return cases


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
