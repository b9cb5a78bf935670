"""The shipped demo weights (``PancreasC2FLib/models/demo-synthetic``) in one command:

    python -m Training train-demo

Synthetic CTs only (no patient data can be shipped): random contrast phase, in-plane spacing
0.6-1.0 mm, slices 0.625-5 mm, LPS/RAS/oblique orientation, deformed anatomy. Small networks
that train on a 2-core CPU in about an hour, so each stage works at a fixed spacing: the coarse
stage sees the whole abdomen at 4 mm, the fine stage the pancreas box at 1.5 mm. Intensities use
the "fixed" normalisation (the clip window mapped to [-1, 1]), which does not depend on how much
air, table or lung a scan's field of view contains, unlike the paper's per-case z-score.

Training seeds 1000-1047, validation seeds 500000-500003, evaluation seeds 900000-900007: the
evaluation cases are never seen in training.

``--recipe realism`` (``REALISM``): the shipped model since generator version 2. It fine-tunes
the version-1 weights on version-2 synthetic CT (real-CT realism draws: soft tissues that overlap,
SynthSeg-randomised intensities, fields of view into the pelvis, resampled 1.2-3 mm archives)
with nnU-Net-style intensity augmentation, because the version-1 model did not find the pancreas
in real CT (Training/README.md, "Real CT"). Training seeds 3000-3023, validation 510000-510003.
"""

from __future__ import annotations

import copy
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from .datasets import open_dataset
from .trainer import FINAL_CHECKPOINT, TrainConfig, Trainer
from .train import StageJob, prepare_cases_for_stages, train_stage

DEMO = {
    "recipe": "demo",
    "name": "demo-synthetic",
    "version": "1",
    "data": "synthetic:48:1000",
    "val_data": "synthetic:4:500000",
    "test_data": "synthetic:8:900000",
    "preprocessing": {"clip": [-100.0, 240.0], "normalize": "fixed"},
    "stages": {
        "coarse": {
            "settings": {"window": [40, 40, 40], "n": 6, "spacing": [4.0, 4.0, 4.0], "threshold": 0.5, "foreground_fraction": 0.8, "class_weights": [1.0, 10.0]},
            "network_args": {"width": 8},
            "iterations": 3000,
            "time_limit_min": 32,
            "threads": 1,
        },
        "fine": {
            "settings": {"window": [48, 48, 48], "n": 12, "spacing": [1.5, 1.5, 1.5], "margin_mm": 20.0, "threshold": 0.5, "margin_jitter": [0.0, 2.0], "foreground_centred": 0.5},
            "network_args": {"width": 8},
            "iterations": 2000,
            "time_limit_min": 65,
            "threads": 1,  # both cores once the coarse stage is done (SideBySideTrainer)
        },
    },
    # Everything else is the paper's recipe, except the batch (8 instead of 16: more, smaller
    # steps for a fixed budget of windows) and the augmentation (see README).
    # validate_cases_every 0: the shipped weights were made without whole-case validation (it
    # would cost about 15 s per checkpoint here) and are the final checkpoints.
    "train": {"batch": 8, "effective_batch": 8, "lr": 0.02, "augment": "flip", "validate_every": 100, "checkpoint_every": 100, "validation_windows": 32, "seed": 0, "validate_cases_every": 0},
    "description": (
        "Demonstration weights trained on synthetic CT only (SynthSeg-style images rendered from two "
        "TotalSegmentator label maps). Small ResDSN networks (width 8; coarse at 4 mm, fine at 1.5 mm). "
        "For trying the software, not for clinical or research use; accuracy on real scans is not validated."
    ),
    "license": "Apache-2.0 (weights); training label maps CC BY 4.0",
    # How the shipped weights were made, when that differs from a clean run of train-demo.
    "history": (
        "Shared 2-core CPU. Started as train-demo with lr 0.01, 48^3 coarse windows, 50% forced coarse windows, no "
        "foreground-centred fine windows; resumed at iteration 500 with lr 0.02 / 80% / 50%; the fine stage was resumed "
        "again at iteration 900 with 'train' (see stages.fine.command) and the coarse stage retrained from scratch with "
        "40^3 windows and class weights 1:10 (stages.coarse.command); coarse threshold 0.7 chosen on the 4 validation "
        "cases (export --set coarse.threshold=0.7), fine threshold 0.4 likewise (--set fine.threshold=0.4). Details: Training/README.md."
    ),
    "attribution": (
        "Trained with PancreasC2F on synthetic images generated from TotalSegmentator subjects s0327 and s0328 "
        "(Wasserthal et al., Radiology: AI 2023, CC BY 4.0). Method: Zhu et al., 3DV 2018, "
        "'A 3D Coarse-to-Fine Framework for Volumetric Medical Image Segmentation'."
    ),
}


# Fine-tuning of DEMO's weights for real CT (see the module docstring). Thresholds are chosen
# afterwards on the validation cases with `python -m Training calibrate` (never on real CT).
REALISM = {
    **DEMO,
    "recipe": "realism",
    "version": "2",
    "data": "synthetic:24:3000",
    "val_data": "synthetic:4:510000",
    # version 1's bundle (sha256 d3c34bdf3c3a..., recorded in version 2's model.json): made by
    # `train-demo` from scratch, or taken from the git history; given with --init-from
    "init_from": None,
    "stages": {
        "coarse": {**DEMO["stages"]["coarse"], "iterations": 1500, "time_limit_min": 55,
                   "settings": {**DEMO["stages"]["coarse"]["settings"], "foreground_fraction": 0.5, "class_weights": [1.0, 5.0]}},
        "fine": {**DEMO["stages"]["fine"], "iterations": 1500, "time_limit_min": 55},
    },
    "train": {**DEMO["train"], "lr": 0.01, "augment": "flip+intensity"},
    "description": (
        "Demonstration weights trained on synthetic CT only (SynthSeg-style images rendered from two "
        "TotalSegmentator label maps, generator version 2 with real-CT realism draws). Small ResDSN networks "
        "(width 8; coarse at 4 mm, fine at 1.5 mm). For trying the software, not for clinical or research use; "
        "checked on one real non-contrast CT only (model card in model.json and README)."
    ),
    "history": (
        "Fine-tuned from demo-synthetic version 1 (trained as described in its own history) with "
        "`python -m Training train-demo --recipe realism` on a shared 2-core CPU; thresholds chosen on the "
        "4 synthetic validation cases with `python -m Training calibrate`. Details: Training/README.md."
    ),
}
RECIPES = {"demo": DEMO, "realism": REALISM}


class SideBySideTrainer(Trainer):
    """Starts with one thread (two busy processes on two cores: more threads than cores makes
    PyTorch's CPU kernels far slower) and takes ``boost_threads`` once every other stage of the
    same training folder has written its final checkpoint."""

    boost_threads = 2

    def on_iteration_end(self, logs: dict) -> None:
        super().on_iteration_end(logs)
        if not getattr(self, "_boosted", False) and self.iteration % 10 == 0:
            others = [d for d in self.out.parent.iterdir() if d.is_dir() and d != self.out and (d / "config.json").is_file()]
            if others and all((d / FINAL_CHECKPOINT).is_file() for d in others):
                torch.set_num_threads(self.boost_threads)
                self._boosted = True


def demo_jobs(work: str | Path, cache: str, threads: int | None = 2, scale: float = 1.0, demo: dict = DEMO) -> dict[str, StageJob]:
    """One ``StageJob`` per stage; ``scale`` multiplies the iterations (for quick trials)."""
    work = Path(work)
    jobs = {}
    for stage, spec in demo["stages"].items():
        cfg = TrainConfig(iterations=max(1, int(spec["iterations"] * scale)), time_limit_min=spec["time_limit_min"] * scale, threads=threads, device="cpu", **demo["train"])
        cfg.checkpoint_every = min(cfg.checkpoint_every, cfg.iterations)
        cfg.validate_every = min(cfg.validate_every, cfg.iterations)
        jobs[stage] = StageJob(
            stage=stage,
            data=demo["data"],
            val_data=demo["val_data"],
            out=str(work / stage),
            settings=copy.deepcopy(spec["settings"]),
            network_args=dict(spec["network_args"]),
            preprocessing=dict(demo["preprocessing"]),
            cache=cache,
            resume=True,
            init_from=demo.get("init_from"),
            config=cfg,
        )
    return jobs


def prepare_demo_data(jobs: dict[str, StageJob], workers: int = 2, log=print) -> None:
    """Generate each synthetic case once and prepare it for both stages."""
    any_job = next(iter(jobs.values()))
    prepare_cases_for_stages(open_dataset(any_job.data) + open_dataset(any_job.val_data), list(jobs.values()), workers, log)


def train_demo(
    work: str | Path,
    out: str | Path,
    cache: str,
    workers: int = 2,
    threads: int | None = 2,
    scale: float = 1.0,
    evaluate_cases: int | None = None,
    parallel: bool = True,
    train: bool = True,
    stage_overrides: dict | None = None,
    log=print,
    demo: dict = DEMO,
) -> dict:
    """Data, both stages, the bundle, and its evaluation on held-out synthetic cases
    (``train=False``: only export WORK/<stage>/final.pt and evaluate)."""
    from .evaluate import evaluate
    from .export import export_bundle

    jobs = demo_jobs(work, cache, threads, scale, demo)
    results = {}
    if not train:
        pass
    elif parallel and len(jobs) > 1:
        prepare_demo_data(jobs, workers, log)
        # One process per stage, side by side (threads per stage from DEMO).
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=len(jobs), mp_context=ctx) as pool:
            futures = {}
            for stage, job in jobs.items():
                job.config.threads = demo["stages"][stage].get("threads", job.config.threads)
                futures[stage] = pool.submit(train_stage, job, print, SideBySideTrainer)
            results = {stage: f.result() for stage, f in futures.items()}
    else:
        prepare_demo_data(jobs, workers, log)
        for stage, job in jobs.items():
            results[stage] = train_stage(job, log)
    bundle = export_bundle(
        {stage: Path(job.out) for stage, job in jobs.items()},
        out,
        demo["name"],
        demo["version"],
        demo["description"],
        demo["license"],
        demo["attribution"],
        extra_training={"command": "python -m Training train-demo" + ("" if demo["recipe"] == "demo" else f" --recipe {demo['recipe']} --init-from {demo['init_from']}"), "recipe": "Training/demo.py", "history": demo["history"]},
        stage_overrides=stage_overrides,
    )
    log(f"bundle written to {bundle.path} (sha256 {bundle.sha256[:16]})")
    test = open_dataset(demo["test_data"])
    if evaluate_cases is not None:
        test = test[:evaluate_cases]
    if test:
        results["evaluation"] = evaluate(bundle.path, test, Path(work) / "evaluation", device="cpu", threads=threads, log=log)["summary"]
    return results
