"""Small demo bundles of the two other pipelines (``PancreasC2FLib/models/demo-roth-cascade`` and
``demo-zhao-two-stage``) and the three-pipeline table, in one command:

    python -m Training.demo_variants [--pipelines roth-cascade zhao-two-stage] [--scale 1]

Synthetic CTs only, the same training seeds as the ResDSN demo (``Training/demo.py``), fewer of
them, and a budget of a few CPU minutes per stage, so these networks are tiny (3D U-Net width 4)
and each stage works on a fixed grid instead of the papers' factors (which assume one scanner
resolution, while the synthetic scans range from 0.6 to 5 mm): Roth's "half resolution" becomes
4 mm (stage 1) and 2 mm (stage 2), Zhao's decimation by R = 4 becomes 4 mm (stage 1) with the fine
stage at 1.5 mm. Roth's stage-2 candidate regions for training are the ground truth dilated by
r on the stage-1 grid (the paper uses the trained stage 1's predictions: ``--stage1-c2``).
Everything else (losses, samplers, boxes, dilation, voting) is the papers'.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

from .datasets import fill_caches, open_dataset
from .train import StageJob, stage_cache, stage_settings, train_stage
from .trainer import TrainConfig

MODELS = Path(__file__).resolve().parent.parent / "PancreasC2FLib" / "models"
PREPROCESSING = {"clip": [-100.0, 240.0], "normalize": "fixed"}
DATA, VAL_DATA, TEST_DATA = "synthetic:12:1000", "synthetic:2:500000", "synthetic:10:900000"
TRAIN = {"batch": 4, "effective_batch": 4, "lr": 0.01, "augment": "flip", "validate_every": 50, "checkpoint_every": 50, "validation_windows": 8, "seed": 0}
LICENSE = "Apache-2.0 (weights); training label maps CC BY 4.0"
DATA_CREDIT = "synthetic images generated from TotalSegmentator subjects s0327 and s0328 (Wasserthal et al., Radiology: AI 2023, CC BY 4.0)"

DEMOS = {
    "roth-cascade": {
        "name": "demo-roth-cascade",
        "stages": {
            "stage1": {"settings": {"window": [48, 48, 48], "n": 0, "spacing": [4.0, 4.0, 4.0], "threshold": 0.5, "body_threshold_hu": -500.0, "dilation_radius": 3, "foreground_fraction": 0.5}, "network_args": {"width": 4, "levels": 4}, "iterations": 240},
            "stage2": {"settings": {"window": [48, 48, 48], "n": 1, "spacing": [2.0, 2.0, 2.0], "threshold": 0.5, "dilation_radius": 3, "foreground_fraction": 0.5, "stage1": None, "stage1_grid": {"spacing": [4.0, 4.0, 4.0]}}, "network_args": {"width": 4, "levels": 4}, "iterations": 240},
        },
        "description": (
            "Demonstration weights trained on synthetic CT only. Cascaded 3D U-Nets after Roth et al. 2018 (width 4: "
            "stage 1 at 4 mm inside the body mask, stage 2 at 2 mm inside the stage-1 mask dilated by 3 voxels). "
            "For trying the software, not for clinical or research use."
        ),
        "method": "Roth et al., 'An application of cascaded 3D fully convolutional networks for medical image segmentation', CMIG 2018",
    },
    "zhao-two-stage": {
        "name": "demo-zhao-two-stage",
        "stages": {
            "stage1": {"settings": {"window": [48, 48, 48], "n": 0, "spacing": [4.0, 4.0, 4.0], "threshold": 0.5, "low_margin": 2, "foreground_fraction": 0.5, "centre_lambda": 1.0, "centre_hold_epochs": 50, "centre_decay_epochs": 50}, "network_args": {"width": 4, "levels": 4}, "iterations": 240},
            "stage2": {"settings": {"window": [48, 48, 48], "n": 1, "spacing": [1.5, 1.5, 1.5], "threshold": 0.5, "margin": 10, "centre_lambda": 1.0, "centre_hold_epochs": 50, "centre_decay_epochs": 50}, "network_args": {"width": 4, "levels": 4}, "iterations": 240},
        },
        "description": (
            "Demonstration weights trained on synthetic CT only. Two-stage 3D U-Net after Zhao et al. 2019 (width 4: "
            "stage 1 at 4 mm on the whole CT, fine stage at 1.5 mm on two boxes, 2-of-3 majority vote). "
            "For trying the software, not for clinical or research use."
        ),
        "method": "Zhao et al., 'Fully automated pancreas segmentation with two-stage 3D convolutional neural networks', MICCAI 2019",
    },
}


def jobs_for(pipeline: str, work: Path, cache: str, threads: int | None, scale: float, stage1_c2: bool = False) -> dict[str, StageJob]:
    jobs = {}
    for stage, spec in DEMOS[pipeline]["stages"].items():
        cfg = TrainConfig(iterations=max(1, int(spec["iterations"] * scale)), threads=threads, device="cpu", **TRAIN)
        cfg.checkpoint_every = min(cfg.checkpoint_every, cfg.iterations)
        cfg.validate_every = min(cfg.validate_every, cfg.iterations)
        settings = copy.deepcopy(spec["settings"])
        if stage1_c2 and "stage1" in settings:
            settings["stage1"] = str(work / pipeline / "stage1")
        jobs[stage] = StageJob(
            stage=stage, data=DATA, val_data=VAL_DATA, out=str(work / pipeline / stage), pipeline=pipeline, settings=settings,
            network_args=dict(spec["network_args"]), preprocessing=dict(PREPROCESSING), cache=cache, resume=True, config=cfg,
        )
    return jobs


def prepare_data(all_jobs: list[StageJob], workers: int = 2, log=print) -> None:
    """Generate each case once and prepare it for every stage that does not need a trained network."""
    jobs = [j for j in all_jobs if not j.settings.get("stage1")]
    cases = open_dataset(DATA) + open_dataset(VAL_DATA)
    caches = [stage_cache(j, stage_settings(j)) for j in jobs]
    todo = sum(not all(c.has(x.name) for c in caches) for x in cases)
    if todo:
        log(f"generating and preparing {todo} synthetic case(s) for {len(caches)} stage(s) with {workers} worker(s) ...")
        t0, done = time.perf_counter(), [0]

        def progress(name):
            done[0] += 1
            log(f"  {done[0]}/{todo} {name} ({time.perf_counter() - t0:.0f} s)")

        fill_caches(cases, caches, workers, progress)


def train_pipeline(pipeline: str, jobs: dict[str, StageJob], out: Path, log=print):
    from .export import export_bundle

    for job in jobs.values():
        train_stage(job, log)
    demo = DEMOS[pipeline]
    bundle = export_bundle(
        {stage: Path(job.out) for stage, job in jobs.items()}, out, demo["name"], "1", demo["description"], LICENSE,
        f"Trained with PancreasC2F on {DATA_CREDIT}. Method: {demo['method']}.",
        extra_training={"command": "python -m Training.demo_variants", "recipe": "Training/demo_variants.py"},
    )
    log(f"bundle written to {bundle.path} (sha256 {bundle.sha256[:16]})")
    return bundle


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m Training.demo_variants", description=__doc__.split("\n\n")[0])
    p.add_argument("--pipelines", nargs="+", default=list(DEMOS), choices=list(DEMOS))
    p.add_argument("--work", default="runs/demo-variants")
    p.add_argument("--models", default=str(MODELS), help="folder for the bundles")
    p.add_argument("--cache", default="~/.cache/pancreas-c2f/training")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--scale", type=float, default=1.0, help="multiply the iterations")
    p.add_argument("--stage1-c2", action="store_true", help="Roth stage 2: candidate regions from the trained stage 1 (the paper) instead of the dilated ground truth")
    p.add_argument("--prepare-only", action="store_true", help="only generate and prepare the data")
    a = p.parse_args(argv)
    work = Path(a.work)
    jobs = {pl: jobs_for(pl, work, a.cache, a.threads, a.scale, a.stage1_c2) for pl in a.pipelines}
    prepare_data([j for js in jobs.values() for j in js.values()], a.workers)
    if a.prepare_only:
        return 0
    for pl, js in jobs.items():
        train_pipeline(pl, js, Path(a.models) / DEMOS[pl]["name"])
    print(json.dumps({pl: DEMOS[pl]["name"] for pl in jobs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
