"""Command line: ``python -m Training {train,evaluate,export,ensemble,splits,plan,train-demo,...} --help``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from PancreasC2FLib.errors import EXIT_CODES, InputError, PancreasC2FError
from PancreasC2FLib.processing.preprocessing import PAPER_PREPROCESSING

from .catalog import RECIPES

PROG = "python -m Training"
DEFAULT_CACHE = "~/.cache/pancreas-c2f/training"
DATA_HELP = "synthetic:N[:SEED], an MSD Task07_Pancreas folder, a NIH Pancreas-CT folder (with --labels), an image folder (with --labels) or one case's folder of ct.nii.gz + pancreas.nii.gz (e.g. ../shared/real-ct, for measuring)"


def _triple(text: str) -> list[float]:
    parts = [float(v) for v in text.replace(",", " ").split()]
    if len(parts) == 1:
        parts *= 3
    if len(parts) != 3:
        raise argparse.ArgumentTypeError("give one value or three (x y z)")
    return parts


def _fold(text: str):
    if text == "all":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("a fold number or 'all'") from None


def _spacing(text: str):
    return None if text.lower() in ("native", "none") else _triple(text)


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help=DATA_HELP)
    p.add_argument("--labels", help="label folder (NIH Pancreas-CT: label00XX.nii.gz; paired folders: same names as the images)")
    p.add_argument("--splits", help="splits JSON from 'splits'; with --fold, train (and calibrate) on that fold's training part / evaluate on its test part")
    p.add_argument("--fold", type=_fold, default=0, help="a fold of --splits, or 'all': every fold, each in a foldK sub-folder of the paths given (Training/crossval.py)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Train, evaluate and export PancreasC2F models.", epilog="exit codes: " + "; ".join(f"{k} {v}" for k, v in EXIT_CODES.items()))
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    # train ------------------------------------------------------------------------------------
    t = sub.add_parser("train", help="train one stage of a pipeline", description="Train one stage (e.g. coarse or fine). Under torchrun, processes share the batch (DistributedDataParallel).")
    t.add_argument("--pipeline", default="resdsn-c2f", choices=sorted(RECIPES))
    t.add_argument("--stage", required=True, help="a stage of the pipeline (resdsn-c2f: coarse, fine; roth-cascade, zhao-two-stage: stage1, stage2; yu-rstn: coronal, sagittal, axial, one joint coarse+fine model per view; fang-ggpfn: ggpfn)")
    _add_data_args(t)
    t.add_argument("--val-data", help="validation cases (same forms as --data)")
    t.add_argument("--val-count", type=int, default=0, help="keep the last N training cases for validation instead")
    t.add_argument("--synthetic-options", type=json.loads, default={}, metavar="JSON", help='keyword arguments of PancreasC2FLib.synthetic.generate_case for synthetic data, e.g. \'{"spacing": [2, 2, 2], "size": [96, 96, 64], "center_on_pancreas": true}\'')
    t.add_argument("--out", required=True, help="output folder (checkpoints, log.csv, curves.png)")
    t.add_argument("--cache", default=DEFAULT_CACHE, help=f"prepared-data cache (default {DEFAULT_CACHE})")
    t.add_argument("--workers", type=int, default=1, help="processes preparing the data")
    t.add_argument("--tensorboard", action="store_true", help="also log loss, learning rate and validation to OUT/tensorboard (needs: pip install tensorboard)")
    t.add_argument("--loader-threads", type=int, default=0, help="threads drawing training batches ahead of the network (0: in the loop; see Training/loader.py)")
    t.add_argument("--skip-check", action="store_true", help="train without the dataset check (python -m Training check); not recommended")
    g = t.add_argument_group("stage settings (default: the recipe's, i.e. the paper's)")
    g.add_argument("--window", type=_triple, help="window size (x y z, or one value), multiples of 8 (paper: 64)")
    g.add_argument("--spacing", type=_spacing, default=argparse.SUPPRESS, help="resample the stage input to this spacing in mm, or 'native' (paper)")
    g.add_argument("--n", type=int, help="sliding-window overlap parameter recorded for inference (paper: coarse 6, fine 12)")
    g.add_argument("--margin-mm", type=float, help="fine stage: box margin in mm (default 20)")
    g.add_argument("--foreground-fraction", type=float, help="coarse stage (and zhao-two-stage stage 1): fraction of windows forced onto the pancreas (default 0.5; the papers sample uniformly: 0)")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other stage setting, VALUE in JSON (e.g. roth-cascade stage2: --set stage1=runs/roth/stage1 for candidate regions from the trained stage 1, as in the paper; without it stage 2 trains in the ground truth dilated by r)")
    g.add_argument("--foreground-centred", type=float, help="fine stage: fraction of windows centred on a pancreas voxel (default 0, the paper)")
    g.add_argument("--class-weights", type=float, nargs=2, metavar=("BG", "FG"), help="cross-entropy class weights (default none, the paper)")
    g.add_argument("--width", type=int, default=32, help="network base width (paper: 32)")
    g.add_argument("--network-arg", action="append", default=[], metavar="KEY=JSON", help="any other argument of the stage's network, e.g. fang-ggpfn: --network-arg views='[\"axial\"]' --network-arg global_size='[128, 128]'")
    g.add_argument("--normalize", choices=("case_zscore", "fixed"), help="intensity normalisation (Zhu: case_zscore; Zhao's paper: a fixed window, i.e. fixed with --clip)")
    g.add_argument("--clip", type=float, nargs=2, metavar=("LO", "HI"), help=f"HU clip window (paper: {PAPER_PREPROCESSING['clip'][0]:g} {PAPER_PREPROCESSING['clip'][1]:g})")
    g.add_argument("--plan", help="plan.json from 'plan': its preprocessing and this stage's spacing, window and margin, where not given here")
    o = t.add_argument_group("optimisation (default: the paper's)")
    o.add_argument("--iterations", type=int, default=80_000, help="default 80,000 (Zhu; Yu's joint training); Roth trains 200,000 (stage 1) and 115,000 (stage 2); Yu's noisy-data fine-tuning 40,000 more")
    o.add_argument("--batch", type=int, default=16, help="windows per forward pass and process")
    o.add_argument("--effective-batch", type=int, default=16, help="windows per optimiser step (gradients are accumulated)")
    o.add_argument("--lr", type=float, default=0.01, help="default 0.01 (Zhu); Yu: 1e-4, its noisy-data fine-tuning 1e-6 (1/100 of training: 1e-4 on this schedule)")
    o.add_argument("--weight-decay", type=float, default=5e-4)
    o.add_argument("--momentum", type=float, default=0.9)
    o.add_argument("--augment", choices=("paper", "flip", "none", "paper+intensity", "flip+intensity"), default="paper", help="paper (default): Zhu's 90/180/270 rotations and flips (roth-cascade and zhao-two-stage too: Roth's elastic deformations are not implemented); none for yu-rstn (its paper names none) and fang-ggpfn (elastic deformations not implemented); +intensity adds nnU-Net-style brightness, contrast, gamma, noise, blur and low-resolution simulation (Training/augment.py)")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--init-from", metavar="MODEL", help="fine-tune: start from this bundle's weights for the stage (a name or folder; same network), e.g. demo-synthetic")
    o.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    o.add_argument("--no-amp", action="store_true", help="full precision on CUDA too")
    o.add_argument("--threads", type=int, help="CPU threads per process")
    o.add_argument("--checkpoint-every", type=int, default=1000)
    o.add_argument("--validate-every", type=int, default=500)
    o.add_argument("--validation-windows", type=int, default=32)
    o.add_argument("--validate-cases-every", type=int, help="run the inference pipeline (fast preset) on the whole validation cases every K iterations and keep the best as best.pt, which export takes (default: every --checkpoint-every; 0: off; resdsn-c2f stages)")
    o.add_argument("--time-limit-min", type=float, help="time budget: the learning rate decays over the iterations or these minutes of training, whichever end first, and training stops there")
    o.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint_last.pt (refused without one; a changed --iterations re-times the learning-rate decay, which is said)")
    o.add_argument("--overwrite", action="store_true", help="start afresh in an OUT that holds a run (its checkpoints, log and curves are removed); without it such an OUT is refused (exit 4)")

    # export -----------------------------------------------------------------------------------
    e = sub.add_parser("export", help="write a model bundle from stage checkpoints", description="Checkpoints (or training folders) of every stage -> a bundle folder with model.json and safetensors.")
    e.add_argument("--stage", action="append", required=True, metavar="STAGE=CHECKPOINT", help="e.g. --stage coarse=runs/coarse --stage fine=runs/fine/final.pt (yu-rstn: one per trained view, e.g. --stage axial=runs/rstn/axial); a bundle folder instead of a checkpoint takes that stage over unchanged (e.g. roth-cascade --stage stage1=models/demo-roth-cascade)")
    e.add_argument("--out", required=True, help="bundle folder")
    e.add_argument("--name", required=True)
    e.add_argument("--version", default="1")
    e.add_argument("--description", default="")
    e.add_argument("--license", default="", help="license of the weights (mind the training data's license)")
    e.add_argument("--attribution", default="", help="data and method credits")
    e.add_argument("--set", action="append", default=[], metavar="STAGE.KEY=JSON", help="change an inference setting, e.g. --set coarse.threshold=0.7 (recorded in model.json)")
    e.add_argument("--half-weights", action="store_true", help="store the weights as float16 (half the size; inference still runs in float32)")
    e.add_argument("--splits", help="with --fold all: the splits file whose folds are exported (RUN/foldK -> OUT/foldK)")
    e.add_argument("--fold", type=_fold, default=None, help="'all': export every fold")
    e.add_argument("--overwrite", action="store_true", help="replace the bundle in OUT (without it an existing, non-empty OUT is refused, exit 4)")
    e.add_argument("--training-note", action="append", default=[], metavar="KEY=TEXT", help="extra provenance under training (e.g. command=...)")

    # evaluate ---------------------------------------------------------------------------------
    v = sub.add_parser("evaluate", help="per-case DSC and time of Coarse, Fine and C2F", description="Runs the inference pipeline on labelled cases; writes cases.csv, summary.csv and summary.md (Tables 2 and 5 of the paper). With several --model (or a roth-cascade / zhao-two-stage model): the pipelines side by side on the same cases (Training/compare.py).")
    v.add_argument("--model", required=True, action="append", help="bundle folder or registered model name; repeat to compare pipelines")
    _add_data_args(v)
    v.add_argument("--out", required=True, help="output folder")
    v.add_argument("--preset", help="paper, fast or default (default: fast on CPU)")
    v.add_argument("--device", default="cpu")
    v.add_argument("--threads", type=int)
    v.add_argument("--methods", default="c2f,coarse,fine", help="comma-separated subset of c2f, coarse, fine")
    v.add_argument("--limit", type=int, help="only the first N cases")
    v.add_argument("--synthetic-options", type=json.loads, default={}, metavar="JSON", help='generate_case keywords for synthetic data, e.g. \'{"version": 1}\' for the cases of generator version 1')

    # calibrate --------------------------------------------------------------------------------
    c = sub.add_parser("calibrate", help="choose a stage's threshold on validation cases", description="Sweeps a stage's probability threshold over labelled validation cases (Training/calibrate.py) and prints the best as an export --set option.")
    c.add_argument("--model", required=True, help="bundle folder or registered model name")
    c.add_argument("--stage", required=True, help="the stage whose threshold is swept (e.g. stage2, fine)")
    c.add_argument("--thresholds", type=float, nargs="+", default=[0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    _add_data_args(c)
    c.add_argument("--val-count", type=int, default=0, help="with --splits: the last N cases of the fold's training part (what train --val-count N kept for validation)")
    c.add_argument("--limit", type=int, help="only the first N cases")
    c.add_argument("--device", default="cpu")
    c.add_argument("--threads", type=int)
    c.add_argument("--out", help="JSON report (default: print only)")

    # check ------------------------------------------------------------------------------------
    k = sub.add_parser("check", help="dataset integrity check", description="Reads every case: empty labels, labels that do not lie on their image (header mismatch), label values, spacing outliers, duplicated images, images without a label (Training/check.py). Exit 2 if any error; train runs the same check first.")
    k.add_argument("--data", required=True, help=DATA_HELP)
    k.add_argument("--labels")
    k.add_argument("--synthetic-options", type=json.loads, default={}, metavar="JSON")
    k.add_argument("--workers", type=int, default=1)
    k.add_argument("--out", help="JSON report (per case: size, spacing, label values and volume, problems)")

    # splits -----------------------------------------------------------------------------------
    s = sub.add_parser("splits", help="K-fold cross-validation splits as JSON", description="Shuffles the case names with --seed and cuts them into --folds test folds (82 cases, 4 folds: 21, 21, 20, 20).")
    s.add_argument("--data", required=True, help=DATA_HELP)
    s.add_argument("--labels")
    s.add_argument("--folds", type=int, default=4)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True, help="JSON file")

    # plan -------------------------------------------------------------------------------------
    pl = sub.add_parser("plan", help="dataset fingerprint and the stage settings it implies (as nnU-Net plans)", description="Reads every case once: image sizes and spacings, HU inside the pancreas, pancreas sizes; derives clipping, normalisation and each stage's spacing, window and margin (Training/plan.py). 'train --plan' uses them.")
    pl.add_argument("--data", required=True, help=DATA_HELP)
    pl.add_argument("--labels")
    pl.add_argument("--synthetic-options", type=json.loads, default={}, metavar="JSON", help="as for train")
    pl.add_argument("--out", required=True, help="plan JSON file")

    # ensemble -------------------------------------------------------------------------------------
    n = sub.add_parser("ensemble", help="one bundle averaging several bundles (e.g. the folds of --fold all, or seeds)", description="Bundles of one pipeline and recipe (folds, or runs with other seeds; or a folder of foldK bundles) -> one bundle whose stages average their networks' probabilities (Training/export.py: ensemble_bundle; a stage all members share stays one network); with --mean-weights, of any pipeline, one network per stage holding the mean of their weights (weight_mean_bundle: for a fine-tuned model and the model it started from). Thresholds that differ become their mean.")
    n.add_argument("bundles", nargs="+", metavar="BUNDLE", help="bundle folders, or a folder of foldK bundles")
    n.add_argument("--out", required=True, help="bundle folder")
    n.add_argument("--name", required=True)
    n.add_argument("--version", default="1")
    n.add_argument("--half-weights", action="store_true", help="store the weights as float16")
    n.add_argument("--mean-weights", action="store_true", help="average the weights instead of the probabilities (a 'model soup': runs one network; only for runs that continue one another)")
    n.add_argument("--mix", type=float, nargs="+", metavar="W", help="--mean-weights: one weight per bundle, summing to 1 (default: equal)")
    n.add_argument("--overwrite", action="store_true", help="replace the bundle in OUT")

    # train-demo -------------------------------------------------------------------------------
    d = sub.add_parser("train-demo", help="the shipped demo weights, from scratch, on a CPU", description="Generates synthetic training data, trains both stages, exports the bundle and evaluates it on held-out synthetic cases (settings: Training/demo.py).")
    d.add_argument("--recipe", choices=("demo", "realism"), default="demo", help="demo: version 1 from scratch; realism: the current shipped model, version 1 fine-tuned on generator-v2 cases (Training/demo.py)")
    d.add_argument("--init-from", metavar="BUNDLE", help="--recipe realism: the version-1 bundle to fine-tune (made by train-demo without --recipe)")
    d.add_argument("--work", default="runs/demo", help="training folder")
    d.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "PancreasC2FLib" / "models" / "demo-synthetic"), help="bundle folder")
    d.add_argument("--cache", default=DEFAULT_CACHE)
    d.add_argument("--workers", type=int, default=2, help="processes generating the data")
    d.add_argument("--threads", type=int, default=2, help="CPU threads for training")
    d.add_argument("--scale", type=float, default=1.0, help="multiply the iterations (e.g. 0.05 for a smoke run)")
    d.add_argument("--evaluate-cases", type=int, help="evaluate on only the first N held-out cases")
    d.add_argument("--sequential", action="store_true", help="train the stages one after the other instead of side by side")
    d.add_argument("--skip-training", action="store_true", help="only export WORK/coarse and WORK/fine and evaluate")
    d.add_argument("--set", action="append", default=[], metavar="STAGE.KEY=JSON", help="change an inference setting at export, e.g. --set coarse.threshold=0.7")
    # card -------------------------------------------------------------------------------------
    k = sub.add_parser("card", help="write the model card into a bundle's model.json", description="Records what the model was trained on, what it was checked on with which result (evaluate output folders) and its intended use (Training/card.py).")
    k.add_argument("--model", required=True, help="bundle folder")
    k.add_argument("--evaluation", action="append", default=[], metavar="TITLE=FOLDER", help="an evaluate output folder and what its data is; repeat")
    k.add_argument("--training-data", help="text describing the training data (default: from the bundle's training record)")

    # realism ----------------------------------------------------------------------------------
    r = sub.add_parser("realism", help="synthetic versus real CT: HU per tissue, noise, blur, field of view", description="Measures real cases (a folder with ct.nii.gz + labels.nii.gz, or images/ + labels/ with multi-organ maps in TotalSegmentator ids) and synthetic cases side by side (Training/realism.py): realism.csv, realism.md, realism.png.")
    r.add_argument("--real", required=True, help="real-CT folder (e.g. ../shared/real-ct): measured only, never trained on")
    r.add_argument("--synthetic", default="synthetic:6:700000", help="synthetic:N[:SEED] (default synthetic:6:700000)")
    r.add_argument("--synthetic-options", type=json.loads, default={}, metavar="JSON", help='generate_case keywords, e.g. \'{"version": 1}\' for the previous generator')
    r.add_argument("--out", required=True, help="output folder")
    return parser


def _json(text: str, what: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{what}: not JSON ({exc.msg})") from None


def parse_overrides(items: list[str]) -> dict[str, dict]:
    """``["coarse.threshold=0.7"]`` -> ``{"coarse": {"threshold": 0.7}}`` (values are JSON)."""
    overrides: dict[str, dict] = {}
    for item in items:
        key, _, value = item.partition("=")
        stage, _, name = key.partition(".")
        if not (stage and name and value):
            raise InputError(f"--set expects STAGE.KEY=JSON, got {item!r}")
        overrides.setdefault(stage, {})[name] = _json(value, "--set " + item)
    return overrides


def _key_values(items: list[str], option: str) -> dict:
    """``KEY=JSON`` items -> ``{KEY: value}``."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not (key and sep):
            raise InputError(f"{option} expects KEY=JSON, got {item!r}")
        out[key] = _json(value, f"{option} {item}")
    return out


def cmd_train(a) -> int:
    if a.fold == "all":
        from .crossval import per_fold

        return max(cmd_train(b) for _, b in per_fold(a, ("out",)))
    from .train import StageJob, setting_values, train_stage
    from .trainer import TrainConfig, tensorboard_available

    if a.tensorboard and not tensorboard_available():
        raise InputError("--tensorboard needs the tensorboard package: pip install tensorboard (log.csv and curves.png are written without it)")
    if a.plan:
        from .plan import apply_plan, read_plan

        print(f"from the plan {a.plan}: {', '.join(apply_plan(a, read_plan(a.plan))) or 'nothing (all given)'}", file=sys.stderr)
    settings = {"window": [int(v) for v in a.window] if a.window else None, "n": a.n, "margin_mm": a.margin_mm, "foreground_fraction": a.foreground_fraction, "foreground_centred": a.foreground_centred, "class_weights": a.class_weights}
    if hasattr(a, "spacing"):
        settings["spacing"] = a.spacing  # None: native resolution
    settings.update(setting_values(a.set))
    cfg = TrainConfig(
        iterations=a.iterations, batch=a.batch, effective_batch=a.effective_batch, lr=a.lr, momentum=a.momentum, weight_decay=a.weight_decay,
        seed=a.seed, augment=a.augment, checkpoint_every=a.checkpoint_every, validate_every=a.validate_every, validation_windows=a.validation_windows, validate_cases_every=a.validate_cases_every, loader_threads=a.loader_threads, tensorboard=a.tensorboard,
        amp=not a.no_amp, device=a.device, threads=a.threads, time_limit_min=a.time_limit_min,
    )
    job = StageJob(
        stage=a.stage, data=a.data, out=a.out, pipeline=a.pipeline, labels=a.labels, splits=a.splits, fold=a.fold if a.splits else None,
        val_data=a.val_data, val_count=a.val_count, settings=settings, network_args={"width": a.width, **_key_values(a.network_arg, "--network-arg")},
        preprocessing={"clip": list(a.clip or PAPER_PREPROCESSING["clip"]), "normalize": a.normalize or PAPER_PREPROCESSING["normalize"]}, synthetic_options=a.synthetic_options, cache=a.cache, workers=a.workers, resume=a.resume, init_from=a.init_from, check=not a.skip_check, config=cfg,
    )
    _check_train(a, job)
    result = train_stage(job)
    print(json.dumps(result, indent=2))
    return 0


def _check_train(a, job) -> None:
    """Arguments, stage settings and the output folder, before any data is read (guards.py)."""
    from PancreasC2FLib.networks import build_network

    from .catalog import recipe
    from .guards import check_train_arguments, prepare_out_folder
    from .train import stage_settings

    pipeline = recipe(a.pipeline)
    if a.stage not in pipeline.stages:
        raise InputError(f"pipeline {a.pipeline!r} has stages {', '.join(pipeline.stages)}, not {a.stage!r}")
    stage = pipeline.stages[a.stage]
    settings = stage_settings(job)
    check_train_arguments(a, settings, build_network(stage.arch, {**stage.network_args, **job.network_args}))
    if int(os.environ.get("RANK", "0")) == 0:  # torchrun: one process decides about the folder
        prepare_out_folder(a.out, a.resume, a.overwrite, a.iterations, log=lambda m: print(m, file=sys.stderr))


def cmd_export(a) -> int:
    if a.fold == "all":
        from .crossval import per_fold

        return max(cmd_export(b) for _, b in per_fold(a, ("out", "stage")))
    from .export import export_bundle
    from .guards import check_bundle_out

    check_bundle_out(a.out, a.overwrite)
    checkpoints = {}
    for item in a.stage:
        if "=" not in item:
            raise InputError(f"--stage expects STAGE=CHECKPOINT, got {item!r}")
        stage, path = item.split("=", 1)
        checkpoints[stage] = path
    overrides = parse_overrides(a.set)
    notes = dict(n.split("=", 1) for n in a.training_note if "=" in n)
    bundle = export_bundle(checkpoints, a.out, a.name, a.version, a.description, a.license, a.attribution, notes or None, overrides or None, "float16" if a.half_weights else "float32")
    print(f"wrote {bundle.path} (sha256 {bundle.sha256[:16]})")
    return 0


def cmd_ensemble(a) -> int:
    from .export import ensemble_bundle, weight_mean_bundle
    from .guards import check_bundle_out

    if a.mix and not a.mean_weights:
        raise ValueError("--mix is for --mean-weights")
    check_bundle_out(a.out, a.overwrite)
    dtype = "float16" if a.half_weights else "float32"
    if a.mean_weights:
        bundle = weight_mean_bundle(a.bundles, a.out, a.name, a.version, a.mix, dtype)
        mix = ", ".join(f"{m['model_name']} (version {m['model_version']}) x {m['mix']:g}" for m in bundle.metadata["training"]["weight_mean"])
        print(f"wrote {bundle.path}: the mean of the weights of {mix} (sha256 {bundle.sha256[:16]})")
        return 0
    bundle = ensemble_bundle(a.bundles, a.out, a.name, a.version, dtype)
    stages = bundle.metadata["stages"]
    averaged = [s for s, spec in stages.items() if spec["network"]["arch"] == "ensemble"]
    shared = f"; shared by all: {', '.join(s for s in stages if s not in averaged)}" if len(averaged) < len(stages) else ""
    print(f"wrote {bundle.path}: {len(bundle.metadata['training']['ensemble'])} networks averaged in {', '.join(averaged)}{shared} (sha256 {bundle.sha256[:16]})")
    return 0


def cmd_evaluate(a) -> int:
    if a.fold == "all":
        return _evaluate_all_folds(a)
    _evaluate_one(a)
    return 0


def _evaluate_one(a) -> dict | None:
    from .datasets import open_dataset
    from .evaluate import evaluate
    from .splits import read_fold

    cases = open_dataset(a.data, a.labels, a.synthetic_options)
    if a.splits:
        keep = set(read_fold(a.splits, a.fold)["test"])
        cases = [c for c in cases if c.name in keep]
    if a.limit:
        cases = cases[: a.limit]
    methods = tuple(m.strip() for m in a.methods.split(",") if m.strip())
    from PancreasC2FLib.io.bundle import load_bundle, resolve_model

    models = [str(resolve_model(m)) for m in a.model]  # registry names or folders
    if len(models) > 1 or load_bundle(models[0]).pipeline != "resdsn-c2f":
        from .compare import compare

        compare(models, cases, a.out, a.preset, a.device, a.threads)
        return None
    return evaluate(models[0], cases, a.out, a.preset, a.device, methods, a.threads)


def _evaluate_all_folds(a) -> int:
    """Each fold's model on its test cases (OUT/foldK), then one table over every case (OUT)."""
    from PancreasC2FLib.io.bundle import load_bundle
    from PancreasC2FLib.pipelines import create_pipeline

    from .crossval import merge_folds, per_fold

    bundle = load_bundle(Path(a.model[0]) / "fold0")
    if len(a.model) != 1 or bundle.pipeline != "resdsn-c2f":
        raise InputError("--fold all evaluates one resdsn-c2f model folder (MODEL/foldK per fold); compare pipelines fold by fold")
    results = {k: _evaluate_one(b) for k, b in per_fold(a, ("out", "model"))}
    methods = tuple(m.strip() for m in a.methods.split(",") if m.strip())
    pipeline = create_pipeline(bundle, device=a.device, preset=a.preset)
    n = sum(len(r["rows"]) for r in results.values())
    merged = merge_folds(results, a.out, pipeline, methods, f"Models `{a.model[0]}/fold0..{len(results) - 1}`, preset `{pipeline.preset}`, {n} cases over {len(results)} folds")
    print(merged["table"])
    return 0


def cmd_calibrate(a) -> int:
    from PancreasC2FLib.io.bundle import load_bundle, resolve_model

    from .calibrate import calibration_cases, sweep, write_report
    from .datasets import open_dataset

    training = load_bundle(resolve_model(a.model)).metadata.get("training")
    cases = calibration_cases(open_dataset(a.data, a.labels), a.splits, a.fold, a.val_count, training, log=lambda m: print(m, file=sys.stderr))[: a.limit or None]
    result = sweep(a.model, a.stage, a.thresholds, cases, a.device, a.threads)
    for t, d in result["mean_dsc"].items():
        print(f"{a.stage}.threshold {t:g}: mean DSC {100 * d:.2f}%{'  <- best' if t == result['best'] else ''}")
    print(f"export option: --set {a.stage}.threshold={result['best']:g}")
    if a.out:
        write_report(result, a.out)
    return 0


def cmd_check(a) -> int:
    from .check import check_cases, dataset_problems
    from .datasets import DatasetError, open_dataset

    cases = open_dataset(a.data, a.labels, a.synthetic_options)
    records = check_cases(cases, workers=a.workers, log=lambda m: print(m, file=sys.stderr))
    errors, warnings = dataset_problems(records)
    for line in warnings:
        print(f"warning: {line}")
    for line in errors:
        print(f"error: {line}")
    skipped = list(getattr(cases, "skipped", ()))
    print(f"{len(cases)} case(s) checked: {len(errors)} error(s), {len(warnings)} warning(s)" + (f"; {len(skipped)} image(s) without a label left out" if skipped else ""))
    if a.out:
        Path(a.out).write_text(json.dumps({"data": a.data, "labels": a.labels, "errors": errors, "warnings": warnings, "unlabelled": skipped, "cases": records}, indent=2), encoding="utf-8")
    if errors:
        raise DatasetError(f"{len(errors)} error(s) in {a.data} (listed above)")
    return 0


def cmd_splits(a) -> int:
    from .datasets import open_dataset
    from .splits import write_splits

    names = [c.name for c in open_dataset(a.data, a.labels)]
    doc = write_splits(a.out, names, a.folds, a.seed, a.data)
    print(f"{len(names)} cases -> test folds of " + ", ".join(str(len(s["test"])) for s in doc["splits"]) + f": {a.out}")
    return 0


def cmd_plan(a) -> int:
    from .datasets import open_dataset
    from .plan import make_plan, print_summary

    cases = open_dataset(a.data, a.labels, a.synthetic_options)
    print(f"planning from {len(cases)} case(s) of {a.data} ...", file=sys.stderr)
    plan = make_plan(a.data, a.labels, cases, log=lambda m: print(m, file=sys.stderr))
    from PancreasC2FLib.io.outputs import atomic_write_text

    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(a.out), json.dumps(plan, indent=2))
    print_summary(plan)
    print(f"wrote {a.out}")
    return 0


def cmd_train_demo(a) -> int:
    from .demo import RECIPES as DEMO_RECIPES, train_demo

    demo = dict(DEMO_RECIPES[a.recipe])
    if a.init_from:
        demo["init_from"] = a.init_from
    elif a.recipe == "realism" and not a.skip_training:
        raise InputError("--recipe realism fine-tunes version 1: give its bundle with --init-from (train-demo without --recipe makes it)")
    result = train_demo(a.work, a.out, a.cache, a.workers, a.threads, a.scale, a.evaluate_cases, parallel=not a.sequential, train=not a.skip_training, stage_overrides=parse_overrides(a.set) or None, demo=demo)
    print(json.dumps({k: v for k, v in result.items() if k != "evaluation"}, indent=2, default=str))
    return 0


def cmd_card(a) -> int:
    from .card import write_model_card

    evaluations = []
    for item in a.evaluation:
        title, sep, folder = item.rpartition("=")
        if not (sep and title):
            raise InputError(f"--evaluation expects TITLE=FOLDER, got {item!r}")
        evaluations.append((title, folder))
    card = write_model_card(a.model, evaluations, a.training_data)
    print(json.dumps(card, indent=2))
    return 0


def cmd_realism(a) -> int:
    from .datasets import synthetic_spec
    from .realism import real_cases, realism_report, synthetic_cases

    counted = synthetic_spec(a.synthetic)
    if not counted:
        raise InputError(f"--synthetic expects synthetic:N[:SEED], got {a.synthetic!r}")
    real = real_cases(a.real)
    synth = synthetic_cases(*counted, a.synthetic_options)
    realism_report(real, synth, a.out)
    print((Path(a.out) / "realism.md").read_text(encoding="utf-8"))
    return 0


COMMANDS = {"ensemble": cmd_ensemble, "card": cmd_card, "check": cmd_check, "realism": cmd_realism, "train": cmd_train, "export": cmd_export, "evaluate": cmd_evaluate, "calibrate": cmd_calibrate, "splits": cmd_splits, "plan": cmd_plan, "train-demo": cmd_train_demo}


def main(argv: list[str] | None = None) -> int:
    """Errors are one line on stderr with the exit codes of the library's CLI (PancreasC2FLib/
    errors.py); ``--debug`` shows the traceback. ValueError and FileNotFoundError are how the
    Training modules refuse a dataset, checkpoint or setting, so they count as bad input (2)."""
    args = build_parser().parse_args(argv)
    try:
        return int(COMMANDS[args.command](args) or 0)
    except KeyboardInterrupt:
        print(f"{PROG}: cancelled", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        if isinstance(exc, PancreasC2FError):
            code = exc.exit_code
        elif isinstance(exc, (ValueError, FileNotFoundError, NotADirectoryError)):
            code = InputError.exit_code
        else:
            print(f"{PROG}: internal error: {exc.__class__.__name__}: {exc} (rerun with --debug for the traceback)", file=sys.stderr)
            return 1
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
