"""Small demo bundles of the other four pipelines (``PancreasC2FLib/models/demo-roth-cascade``,
``demo-zhao-two-stage``, ``demo-yu-rstn``, ``demo-fang-ggpfn``), versions 3 to 6:

    python -m Training.demo_variants [--pipelines roth-cascade zhao-two-stage yu-rstn fang-ggpfn] \
        [--time-limit-min 24] [--init-from FOLDER] [--stages STAGE] [--set KEY=VALUE] [--export-only] \
        [--train-cases N --data-dir DIR] [--generator-version 3 --data-dir DIR] [--seed K]
    python -m Training.pipelines_table --real ../shared/real-ct     # the side-by-side table

Synthetic CTs of generator version 2 only (the data of the shipped ResDSN model, ``Training/demo.py:
REALISM``: its first 16 training and 2 validation seeds), written once as NIfTI, and a CPU time
budget per stage, so these networks are small (width 8) and work on fixed grids instead of the
papers' factors (which assume one scanner resolution, while the synthetic scans range from 0.6 to
5 mm): Roth's "half resolution" becomes 4 mm (stage 1) and 2 mm (stage 2), Zhao's decimation by
R = 4 becomes 4 mm (stage 1) with the fine stage at 1.5 mm; RSTN and GGPFN train the axial view
only, on slices resampled to 2 mm (their papers: the input grid). Roth's stage-2 candidate regions
for training come from the trained stage 1, as in the paper (``--gt-c2``: the ground truth dilated
by r instead). Version 2 of Roth and Zhao was fine-tuned from version 1 (trained from scratch on
generator-version-1 cases) with ``--init-from`` a copy of the version-1 bundles; GGPFN (now on the
2-mm grid) and RSTN were trained from scratch. Version 3 continued those runs (``--stages``,
``--scale``, a longer ``--time-limit-min``; RSTN with ``--set init=RUN`` and its new loss
settings); version 4 continued Roth's and Zhao's again; version 5 is Roth's with more overlapping
stage-2 tiles (a recipe's ``inference`` settings go into the bundle); version 6 is Roth's stage 2
fine-tuned again from version 5 (``--init-from`` a copy of it, ``--stages stage2``: stage 1 is taken
over from that bundle). Each bundle's
``training.history`` says how. The Roth, Zhao and GGPFN last-stage thresholds are chosen on the
validation cases. Everything else
(losses, samplers, boxes, dilation, voting, saliency rounds, phases) is the papers'; the departures
are listed in docs/pipelines_table.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

from PancreasC2FLib.errors import InputError
from PancreasC2FLib.io.bundle import is_bundle
from PancreasC2FLib.synthetic.case import GENERATOR_VERSIONS

from .datasets import DatasetError, open_dataset
from .train import StageJob, prepare_cases_for_stages, setting_values, train_stage
from .trainer import TrainConfig

MODELS = Path(__file__).resolve().parent.parent / "PancreasC2FLib" / "models"
PREPROCESSING = {"clip": [-100.0, 240.0], "normalize": "fixed"}
# (first seed, count): the first 12 training and 2 validation cases of the ResDSN demo, and its
# held-out evaluation seeds. Cases are written once as NIfTI pairs (DATA_DIR/<part>/images|labels):
# reading them back is much faster than generating them again for every stage.
# Validation: the last VAL_COUNT cases of the folder (the 5000xx seeds sort after the 001xxx ones).
# Version 2 (real-CT realism draws, the shipped ResDSN model's data): the first 16 training and 2
# validation seeds of the ResDSN realism recipe (``Training/demo.py: REALISM``), so that the five
# pipelines are compared on the same data; held-out seeds as for every demo.
GENERATOR_VERSION = 2
PARTS = {"trainval": [(3000, 16), (510000, 2)], "test": [(900000, 10)]}
VAL_COUNT = 2
# lr 0.01 as the ResDSN realism fine-tuning (``--init-from``: the version-1 demo weights); the
# intensity augmentation is the one that moved the ResDSN model on real CT.
TRAIN = {"batch": 4, "effective_batch": 4, "lr": 0.01, "augment": "flip+intensity", "validate_every": 100, "checkpoint_every": 100, "validation_windows": 8, "seed": 0, "validate_cases_every": 0}
# The last stage's threshold of Roth (whose weighted loss, Eq. 3-4, biases the probabilities), Zhao
# and GGPFN is chosen on the validation cases (``calibrate``), as for the ResDSN demo. RSTN keeps
# 0.5: its threshold also steers the fine rounds, and a sweep would rerun them all per value.
CALIBRATION_THRESHOLDS = [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95]
# 1: generator-version-1 cases; 2: generator version 2; 3: longer runs (issue 15, round 3); 4: round 4;
# 5: round 5 (Roth's overlapping stage-2 tiles); 6: round 8 (Roth's stage 2 fine-tuned from version 5;
# rounds 6 and 7 shipped nothing).
# A bundle keeps the version it was exported with: a model not retrained in a round keeps its number.
BUNDLE_VERSION = "6"
WEIGHTS_DTYPE = "float16"  # half-size bundles (a few MB each); inference casts back to float32
LICENSE = "Apache-2.0 (weights); training label maps CC BY 4.0"
DATA_CREDIT = "synthetic images generated from TotalSegmentator subjects s0327 and s0328 (Wasserthal et al., Radiology: AI 2023, CC BY 4.0)"

DEMOS = {
    "roth-cascade": {
        "name": "demo-roth-cascade",
        "calibrate": "stage2",
        "stages": {
            "stage1": {"settings": {"window": [40, 40, 40], "n": 0, "spacing": [4.0, 4.0, 4.0], "threshold": 0.5, "body_threshold_hu": -500.0, "dilation_radius": 3, "foreground_fraction": 0.5}, "network_args": {"width": 8, "levels": 4}, "iterations": 4000},
            "stage2": {"settings": {"window": [32, 32, 32], "n": 1, "spacing": [2.0, 2.0, 2.0], "threshold": 0.5, "dilation_radius": 3, "foreground_fraction": 0.5, "stage1": None, "stage1_grid": {"spacing": [4.0, 4.0, 4.0]}}, "network_args": {"width": 8, "levels": 4}, "iterations": 4000},
        },
        "description": (
            "Demonstration weights trained on synthetic CT only. Cascaded 3D U-Nets after Roth et al. 2018 (width 8: "
            "stage 1 at 4 mm inside the body mask, stage 2 at 2 mm inside the stage-1 mask dilated by 3 voxels). "
            "For trying the software, not for clinical or research use."
        ),
        # Island removal on the final mask (the paper has none: --preset paper turns it off). On the
        # 2 validation cases, half of the false positives lay 10-35 mm or more from the pancreas,
        # in islands of their own: removing islands under 0.2 of the largest moved the DSC at
        # threshold 0.9 from 68.8 to 73.2 %. Stage 1 keeps its islands (C2 is meant to be wide).
        "postprocess": {"min_island_fraction": 0.2, "coarse_min_island_fraction": 0.0},
        # Overlapping tiles (the paper's Eq. 5 averages them; its own setting is 4 tiles per voxel):
        # the stage-2 network was trained on windows placed around the pancreas, and tiles that cut
        # it at their edge miss parts of it. Tiles per voxel chosen on the 2 validation cases with
        # version 4 (threshold 0.5): n = 1 (8 tiles for a typical region): 78.9 %, n = 3: 82.1 %,
        # n = 4: 82.4 %, coverage 8 (n = 5 there): 83.8 %, at 4-6 times the time of n = 1 on a CPU.
        "inference": {"stage2": {"coverage": 8}},
        "history": (
            "Fine-tuned from version 1 (--init-from): both stages 24 minutes each on a shared 2-core CPU, then stage 2 "
            "continued to 44 minutes (--stages stage2 --time-limit-min 44): version 2. Version 3: stage 2 continued "
            "to 80 minutes (--stages stage2 --time-limit-min 80); island removal 0.2 on the final mask. Version 4: "
            "stage 2 continued to the end of its 4000 iterations (--stages stage2 --time-limit-min 130: 127 minutes). "
            "Version 5: the same weights, stage-2 tiles at 8 per voxel (coverage 8) and the threshold chosen again (--export-only). "
            "Version 6: stage 2 alone fine-tuned from version 5's weights on candidate regions of version 5's stage 1, which is "
            "taken over unchanged (--init-from a folder holding a copy of version 5, --stages stage2 --time-limit-min 75: a fresh "
            "4000-iteration schedule, 48 minutes on two threads beside other runs), then the threshold chosen again (--export-only)."
        ),
        "method": "Roth et al., 'An application of cascaded 3D fully convolutional networks for medical image segmentation', CMIG 2018",
    },
    "zhao-two-stage": {
        "name": "demo-zhao-two-stage",
        "calibrate": "stage2",
        "stages": {
            "stage1": {"settings": {"window": [40, 40, 40], "n": 0, "spacing": [4.0, 4.0, 4.0], "threshold": 0.5, "low_margin": 2, "foreground_fraction": 0.5, "centre_lambda": 1.0, "centre_hold_epochs": 50, "centre_decay_epochs": 50}, "network_args": {"width": 8, "levels": 4}, "iterations": 4000},
            "stage2": {"settings": {"window": [48, 48, 48], "n": 1, "spacing": [1.5, 1.5, 1.5], "threshold": 0.5, "margin": 10, "centre_lambda": 1.0, "centre_hold_epochs": 50, "centre_decay_epochs": 50}, "network_args": {"width": 8, "levels": 4}, "iterations": 4000},
        },
        "description": (
            "Demonstration weights trained on synthetic CT only. Two-stage 3D U-Net after Zhao et al. 2019 (width 8: "
            "stage 1 at 4 mm on the whole CT, fine stage at 1.5 mm on two boxes, 2-of-3 majority vote). "
            "For trying the software, not for clinical or research use."
        ),
        # Island removal as in demo-synthetic (the paper has none: --preset paper turns it off). On
        # the 2 validation cases it moved the whole-case DSC from 65.3 / 76.1 % to 67.9 / 87.6 %:
        # a stage-1 island far from the pancreas widens the boxes into regions the fine network
        # never saw in training (it trains on the ground-truth box + 10 voxels).
        "postprocess": {"min_island_fraction": 0.2, "coarse_min_island_fraction": 0.2},
        "history": (
            "Fine-tuned from version 1 (--init-from): both stages 24 minutes each on a shared 2-core CPU, then stage 2 "
            "continued to 44 minutes (--stages stage2 --time-limit-min 44): version 2. Version 3: stage 1 continued to "
            "70 minutes (--stages stage1 --time-limit-min 70, 813 iterations) and stage 2 to 90 minutes "
            "(--stages stage2 --time-limit-min 90, 673 iterations), side by side. Version 4: stage 1 continued to 140 "
            "minutes (--stages stage1 --time-limit-min 140, 2137 iterations) and stage 2 to 165 minutes (--stages stage2 "
            "--time-limit-min 165, 1434 iterations), side by side."
        ),
        "method": "Zhao et al., 'Fully automated pancreas segmentation with two-stage 3D convolutional neural networks', MICCAI 2019",
    },
    "yu-rstn": {
        "name": "demo-yu-rstn",
        # The paper names no augmentation. The shared flip + intensity augmentation, tried on the
        # round-4 run (docs/pipelines_table.md), lowered both the synthetic and the real-CT DSC.
        "train": {"augment": "none"},
        # Half the slices without pancreas: the test covers every slice. dsc_over "batch" and
        # coarse_bce_weight (docs/pipelines_table.md, yu-rstn): with Eq. 2 alone the coarse
        # network stayed at a near-uniform probability (every held-out case 0-8 %).
        # 2 mm slices (about 220 x 220 for these scans instead of 512 x 512): 0.95 s per iteration
        # on one CPU thread (measured with two other trainings on two cores), so 2000 iterations
        # fit 35 minutes; on the input grid 691 iterations took 43 minutes.
        "stages": {
            "axial": {"settings": {"spacing": [2.0, 2.0, 2.0], "foreground_fraction": 0.5, "dsc_over": "batch", "coarse_bce_weight": 1.0, "margin": 20, "max_rounds": 10, "stop_dsc": 0.95}, "network_args": {"width": 8, "levels": 4}, "iterations": 3000},
        },
        "description": (
            "Demonstration weights trained on synthetic CT only. Recurrent saliency transformation network after Yu et al. 2018 "
            "(axial view only; 2D U-Nets of width 8 instead of FCN-8s, on slices resampled to 2 mm instead of the input grid, "
            "up to 10 fine rounds stopping at inter-round DSC > 0.95; the mask is returned on the input grid; trained with "
            "Eq. 2's DSC over the batch plus a class-balanced BCE on the coarse term). For trying the software, not for clinical or research use."
        ),
        "history": (
            "On a shared 2-core CPU, from scratch with the paper's per-slice DSC (Eq. 2): 2000 iterations (33 minutes) with "
            "foreground_fraction 1.0, then to 3000 with 0.5 (--scale 1.5 --time-limit-min 58; version 2, not shipped: its "
            "coarse network never learned). Version 3 continued from that run: 2389 iterations (50 minutes) with dsc_over "
            "batch (--set init=RUN --set coarse_bce_weight=0 --scale 0.8334 --time-limit-min 50), then 2000 iterations "
            "(33 minutes) with coarse_bce_weight 1 as well (--set init=RUN2 --scale 0.6667 --time-limit-min 38)."
        ),
        "method": "Yu et al., 'Recurrent saliency transformation network: incorporating multi-stage visual cues for small organ segmentation', CVPR 2018",
    },
    "fang-ggpfn": {
        "name": "demo-fang-ggpfn",
        # CPU-sized (docs/pipelines_table.md, GGPFN): the case resampled to 2 mm (190-250 px
        # slices, one 256 px patch per slice at test time), and BCE + batch Dice (dice_weight),
        # since the paper's plain BCE left the pancreas' probabilities near 0.2 after a short run.
        # Measured: about 0.03 s (global phase) and 0.17 s (fusion, joint) of CPU per iteration on
        # one thread, so 8000 iterations take about 17 minutes on an idle thread and fit 35 minutes
        # beside another training (the phases follow the iteration count); inference about 1 GMAC
        # per 2-mm slice.
        "calibrate": "ggpfn",
        "calibrate_thresholds": [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8],
        "train": {"augment": "none"},  # flips would remove the global branch's cue of where the pancreas sits
        "stages": {
            "ggpfn": {"settings": {"spacing": [2.0, 2.0, 2.0], "patch": [64, 64], "overlap": 16, "whole_slice": True, "box_fraction": 0.5, "dice_weight": 1.0}, "network_args": {"views": ["axial"], "width": 8, "convs": [1, 1, 1, 1], "global_width": 8, "global_convs": [1, 1, 1, 1, 1], "global_size": [96, 96]}, "iterations": 8000},
        },
        "description": (
            "Demonstration weights trained on synthetic CT only. Globally guided progressive fusion network after Fang et al. 2019 "
            "(axial view only, on the CT resampled to 2 mm; widths 8, T = 4 fusion convolutions (9 slices), 64 x 64 training patches, "
            "96 x 96 global input, BCE + Dice loss). For trying the software, not for clinical or research use."
        ),
        "history": (
            "From scratch on a shared 2-core CPU: 8000 iterations (20 minutes), then continued to 19000 of 20000 "
            "iterations (--scale 2.5 --time-limit-min 60: the phases and the learning rate follow the new count, "
            "so it resumed in the fusion phase at a learning rate of 0.006)."
        ),
        "method": "Fang et al., 'Globally guided progressive fusion network for 3D pancreas segmentation', MICCAI 2019",
    },
}


def parts(train_cases: int | None = None) -> dict:
    """``PARTS`` with ``train_cases`` training seeds from 3000 on (``--train-cases``; the
    validation and held-out seeds stay)."""
    if not train_cases:
        return PARTS
    return {**PARTS, "trainval": [(PARTS["trainval"][0][0], int(train_cases)), *PARTS["trainval"][1:]]}


def export_cases(data_dir: Path, part: str, count: int | None = None, log=print, workers: int = 1, train_cases: int | None = None, version: int = GENERATOR_VERSION) -> tuple[str, str]:
    """Synthetic cases of ``part`` (of generator ``version``) as NIfTI pairs (skips those already
    written), ``workers`` processes at a time; (images, labels). ``train_cases``: see ``parts``."""
    from concurrent.futures import ProcessPoolExecutor

    images, labels = data_dir / part / "images", data_dir / part / "labels"
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    seeds = [s for first, n in parts(train_cases)[part] for s in range(first, first + n)][:count]
    todo = [s for s in seeds if not (labels / f"synthetic_{s:06d}.nii.gz").is_file()]
    if workers > 1 and len(todo) > 1:
        with ProcessPoolExecutor(workers) as pool:
            for name in pool.map(_write_case, todo, [images] * len(todo), [labels] * len(todo), [version] * len(todo)):
                log(f"  wrote {part}/{name}")
    else:
        for seed in todo:
            log(f"  wrote {part}/{_write_case(seed, images, labels, version)}")
    return str(images), str(labels)


def _write_case(seed: int, images: Path, labels: Path, version: int = GENERATOR_VERSION) -> str:
    import SimpleITK as sitk

    from PancreasC2FLib.synthetic import generate_case

    name = f"synthetic_{seed:06d}.nii.gz"
    case = generate_case(seed, version=version)
    sitk.WriteImage(case.image, str(images / name), True)
    sitk.WriteImage(case.label, str(labels / name), True)  # the label last: it marks the pair complete
    return name


def jobs_for(pipeline: str, work: Path, data_dir: Path, cache: str, threads: int | None, scale: float, stage1_c2: bool = True, init_from: Path | None = None) -> dict[str, StageJob]:
    """One ``StageJob`` per stage; with ``init_from`` (a folder of bundles) each stage starts from
    the weights of the bundle of the same name there, when it has one."""
    jobs = {}
    start = init_from / DEMOS[pipeline]["name"] if init_from else None
    if start is not None and not is_bundle(start):
        start = None
    for stage, spec in DEMOS[pipeline]["stages"].items():
        cfg = TrainConfig(iterations=max(1, int(spec["iterations"] * scale)), threads=threads, device="cpu", **{**TRAIN, **DEMOS[pipeline].get("train", {})})
        cfg.checkpoint_every = min(cfg.checkpoint_every, cfg.iterations)
        cfg.validate_every = min(cfg.validate_every, cfg.iterations)
        settings = copy.deepcopy(spec["settings"])
        if stage1_c2 and "stage1" in settings:
            settings["stage1"] = str(work / pipeline / "stage1")
        jobs[stage] = StageJob(
            stage=stage, data=str(data_dir / "trainval" / "images"), labels=str(data_dir / "trainval" / "labels"), val_count=VAL_COUNT,
            out=str(work / pipeline / stage), pipeline=pipeline, settings=settings,
            network_args=dict(spec["network_args"]), preprocessing=dict(PREPROCESSING), cache=cache, resume=True, config=cfg,
            init_from=str(start) if start else None,
        )
    return jobs


def stage_source(job: StageJob) -> Path:
    """A stage's checkpoint in WORK or, when it has none, the ``--init-from`` bundle it would have
    started from (fine-tuning only the other stages: e.g. Roth's stage 2 from a shipped model)."""
    from .variants import checkpoint_file

    try:
        return checkpoint_file(job.out)
    except DatasetError:
        if job.init_from:
            return Path(job.init_from)
        raise


def untrained_stage1_from_init(jobs: dict[str, StageJob], stages: list[str] | None) -> None:
    """Roth's stage 2 trained alone (``--stages stage2``) with no stage-1 run in WORK: its
    candidate regions come from the ``--init-from`` bundle's stage 1, as the exported bundle's will."""
    first = jobs.get("stage1")
    if not stages or first is None or "stage1" in stages or first.init_from is None:
        return
    if stage_source(first) == Path(first.init_from):
        for job in jobs.values():
            if job.settings.get("stage1") == first.out:
                job.settings["stage1"] = first.init_from


def apply_settings(jobs: dict[str, StageJob], settings: dict, stages: list[str] | None = None) -> None:
    """``--set``: the settings go to the stages trained (``stages``, or all of them)."""
    for stage, job in jobs.items():
        if not stages or stage in stages:
            job.settings.update(settings)


def prepare_data(all_jobs: list[StageJob], workers: int = 2, log=print) -> None:
    """Read each case once and prepare it for every stage that does not need a trained network."""
    jobs = [j for j in all_jobs if not j.settings.get("stage1")]
    prepare_cases_for_stages(open_dataset(jobs[0].data, jobs[0].labels), jobs, workers, log)


def export_overrides(demo: dict, thresholds: dict[str, float] | None = None) -> dict | None:
    """The bundle's inference settings that differ from training's: the recipe's ``inference``
    (e.g. Roth's stage-2 tiles per voxel) and the thresholds chosen on the validation cases."""
    out = copy.deepcopy(demo.get("inference") or {})
    for stage, threshold in (thresholds or {}).items():
        out[stage] = {**out.get(stage, {}), "threshold": threshold}
    return out or None


def train_pipeline(pipeline: str, jobs: dict[str, StageJob], out: Path, work: Path, train: bool | set = True, log=print, command: str = "python -m Training.demo_variants", train_cases: int | None = None, generator_version: int = GENERATOR_VERSION):
    """Train the stages (``train``: all, none, or a set of stage names; the others' checkpoints
    are reused), choose the calibrated stage's threshold on the validation cases, export the
    bundle to ``out``."""
    from .calibrate import sweep
    from .export import export_bundle

    for stage, job in jobs.items():
        if train is True or (isinstance(train, set) and stage in train):
            train_stage(job, log)
    demo = DEMOS[pipeline]
    checkpoints = {stage: stage_source(job) for stage, job in jobs.items()}
    training = {
        "command": command,
        "recipe": "Training/demo_variants.py",
        **({"history": demo["history"]} if demo.get("history") else {}),
        "data": f"synthetic generator version {generator_version}, seeds " + ", ".join(f"{first}-{first + n - 1}" for first, n in parts(train_cases)["trainval"]) + f" (the last {VAL_COUNT} for validation), written as NIfTI by the command",
    }
    overrides = export_overrides(demo)
    stage = demo.get("calibrate")
    if stage:
        job = next(iter(jobs.values()))
        provisional = export_bundle(checkpoints, work / pipeline / "uncalibrated", demo["name"], BUNDLE_VERSION, weights_dtype=WEIGHTS_DTYPE, stage_overrides=overrides, postprocess=demo.get("postprocess"))
        validation = open_dataset(job.data, job.labels)[-job.val_count:]
        log(f"choosing the {stage} threshold on {len(validation)} validation case(s) ...")
        result = sweep(str(provisional.path), stage, demo.get("calibrate_thresholds", CALIBRATION_THRESHOLDS), validation, threads=job.config.threads, log=log)
        overrides = export_overrides(demo, {stage: result["best"]})
        training["threshold"] = f"{stage} {result['best']:g}, the best mean DSC on the validation cases ({', '.join(f'{t:g}: {100 * d:.1f}%' for t, d in result['mean_dsc'].items())})"
    bundle = export_bundle(
        checkpoints, out, demo["name"], BUNDLE_VERSION, demo["description"], LICENSE, f"Trained with PancreasC2F on {DATA_CREDIT}. Method: {demo['method']}.",
        extra_training=training, stage_overrides=overrides, weights_dtype=WEIGHTS_DTYPE, postprocess=demo.get("postprocess"),
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
    p.add_argument("--data-dir", default="runs/demo-variants/data-v2", help="where the synthetic cases are written as NIfTI")
    p.add_argument("--train-cases", type=int, metavar="N", help="training cases (seeds 3000 on; default 16, the shipped demos'); give a --data-dir of its own: every case there is used")
    p.add_argument("--generator-version", type=int, default=GENERATOR_VERSION, choices=GENERATOR_VERSIONS, help=f"synthetic generator version of the training cases (default {GENERATOR_VERSION}, the shipped demos'; 3 adds atrophic pancreases); give a --data-dir of its own")
    p.add_argument("--init-from", metavar="FOLDER", help="a folder of bundles (e.g. a copy of the version-1 demos): each stage starts from the weights of the bundle of the same name there, when it has one")
    p.add_argument("--scale", type=float, default=1.0, help="multiply the iterations")
    p.add_argument("--seed", type=int, help=f"training seed (default {TRAIN['seed']}): repeat a run to see how much its figures vary")
    p.add_argument("--time-limit-min", type=float, help="stop each stage after this many minutes (the last checkpoint is exported)")
    p.add_argument("--gt-c2", action="store_true", help="Roth stage 2: the dilated ground truth as candidate region instead of the trained stage 1's (faster)")
    p.add_argument("--prepare-only", action="store_true", help="only write and prepare the data")
    p.add_argument("--stages", nargs="+", metavar="STAGE", help="train only these stages (e.g. stage2, continuing its run with --time-limit-min); the others' checkpoints are reused")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a stage setting (VALUE in JSON, or a path) for the stages trained, e.g. yu-rstn: --set init=RUN to continue from another run")
    p.add_argument("--export-only", action="store_true", help="no training: calibrate and export the checkpoints in WORK")
    p.add_argument("--export-test", type=int, metavar="N", help="only write the first N held-out cases (DATA_DIR/test) for 'python -m Training evaluate'")
    a = p.parse_args(argv)
    try:
        overrides = setting_values(a.set)  # a malformed --set fails before any data is written
    except InputError as exc:
        p.error(str(exc))  # one line and exit code 2, like any other bad argument
    work, data_dir = Path(a.work), Path(a.data_dir)
    if a.export_test:
        print(export_cases(data_dir, "test", a.export_test, workers=a.workers))
        return 0
    if a.train_cases is not None and a.train_cases < 1:
        p.error("--train-cases must be at least 1")
    if a.generator_version != GENERATOR_VERSION and a.data_dir == p.get_default("data_dir"):
        p.error(f"--generator-version {a.generator_version}: give a --data-dir of its own (the default holds version {GENERATOR_VERSION}'s cases)")
    export_cases(data_dir, "trainval", workers=a.workers, train_cases=a.train_cases, version=a.generator_version)
    init_from = Path(a.init_from) if a.init_from else None
    if init_from is not None and not init_from.is_dir():
        p.error(f"--init-from {a.init_from}: not a folder")
    jobs = {pl: jobs_for(pl, work, data_dir, a.cache, a.threads, a.scale, not a.gt_c2, init_from) for pl in a.pipelines}
    for js in jobs.values():
        for j in js.values():
            j.config.time_limit_min = a.time_limit_min
            if a.seed is not None:
                j.config.seed = a.seed
        untrained_stage1_from_init(js, a.stages)
        apply_settings(js, overrides, a.stages)
    prepare_data([j for js in jobs.values() for j in js.values()], a.workers)
    if a.prepare_only:
        return 0
    for pl, js in jobs.items():
        command = "python -m Training.demo_variants " + " ".join(argv if argv is not None else sys.argv[1:])
        train_pipeline(pl, js, Path(a.models) / DEMOS[pl]["name"], work, train=False if a.export_only else (set(a.stages) if a.stages else True), command=command, train_cases=a.train_cases, generator_version=a.generator_version)
    print(json.dumps({pl: DEMOS[pl]["name"] for pl in jobs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
