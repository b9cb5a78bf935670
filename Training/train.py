"""Training one stage end to end: data -> cache -> network -> ``Trainer``.

Everything that differs between stages and pipelines comes from the registered recipes (catalog.py).
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PancreasC2FLib.errors import InputError
from PancreasC2FLib.networks import build_network
from PancreasC2FLib.processing.preprocessing import PAPER_PREPROCESSING

from .datasets import CaseRef, StageCache, dataset_identity, fill_caches, load_stage_volumes, open_dataset
from .catalog import recipe
from .splits import read_fold
from .trainer import Distributed, TrainConfig, Trainer, pick_device, seed_everything


@dataclass
class StageJob:
    """What to train: a stage of a pipeline on a dataset (see ``python -m Training train --help``)."""

    stage: str
    data: str
    out: str
    pipeline: str = "resdsn-c2f"
    labels: str | None = None
    splits: str | None = None
    fold: int | None = None
    val_data: str | None = None
    val_count: int = 0
    settings: dict = field(default_factory=dict)  # overrides of the recipe's stage settings
    network_args: dict = field(default_factory=dict)
    preprocessing: dict = field(default_factory=lambda: dict(PAPER_PREPROCESSING))
    synthetic_options: dict = field(default_factory=dict)
    cache: str = "~/.cache/pancreas-c2f/training"
    workers: int = 1
    resume: bool = False
    check: bool = True  # the dataset check (check.py) before preparation
    init_from: str | None = None  # a bundle (name or folder) whose weights for this stage start the training
    config: TrainConfig = field(default_factory=TrainConfig)


def setting_values(items: list[str]) -> dict:
    """``--set KEY=VALUE`` items -> {KEY: value}: VALUE as JSON, else the bare string (a path)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def stage_settings(job: StageJob) -> dict:
    base = copy.deepcopy(recipe(job.pipeline).stages[job.stage].settings)
    base.update({k: v for k, v in job.settings.items() if v is not None or k == "spacing"})
    return base


def select_cases(job: StageJob) -> tuple[list[CaseRef], list[CaseRef]]:
    """(training, validation) cases: the fold's training part of the data (all of it without a
    splits file), minus ``val_count`` cases kept for validation, or ``val_data`` for it."""
    cases = open_dataset(job.data, job.labels, job.synthetic_options)
    if job.splits is not None:
        keep = set(read_fold(job.splits, job.fold or 0)["train"])
        cases = [c for c in cases if c.name in keep]
        if not cases:
            raise ValueError(f"no case of {job.data} is in the training part of fold {job.fold} of {job.splits}")
    val: list[CaseRef] = []
    if job.val_data:
        val = open_dataset(job.val_data, job.labels, job.synthetic_options)
    elif job.val_count:
        cases, val = cases[: -job.val_count], cases[-job.val_count :]
    overlap = {c.name for c in cases} & {c.name for c in val}
    if overlap:
        raise ValueError(f"validation cases are also training cases: {sorted(overlap)[:5]}")
    return cases, val


def stage_cache(job: StageJob, settings: dict) -> StageCache:
    stage = recipe(job.pipeline).stages[job.stage]
    key = {
        "data": dataset_identity(job.data, job.labels, job.synthetic_options),
        "preprocessing": job.preprocessing,
        "spacing": settings.get("spacing"),
        "crop_margin_mm": stage.crop_margin_mm(settings),
    }
    if getattr(stage, "prepare", ""):  # a stage with its own data preparation (variants.py)
        key["variant"] = stage.data_key(settings)
        return StageCache(Path(job.cache).expanduser(), key, stage.prepare_volume)
    return StageCache(Path(job.cache).expanduser(), key)


def prepare_cases_for_stages(cases: list[CaseRef], jobs: list[StageJob], workers: int = 2, log=print) -> None:
    """Read (or generate) each case once and prepare it for every stage in ``jobs``; cases already
    in all the stages' caches are skipped."""
    caches = [stage_cache(j, stage_settings(j)) for j in jobs]
    todo = sum(not all(c.has(x.name) for c in caches) for x in cases)
    if not todo:
        return
    log(f"preparing {todo} case(s) for {len(caches)} stage(s) with {workers} worker(s) ...")
    t0, done = time.perf_counter(), [0]

    def progress(name):
        done[0] += 1
        log(f"  {done[0]}/{todo} {name} ({time.perf_counter() - t0:.0f} s)")

    fill_caches(cases, caches, workers, progress)


def prepare(job: StageJob, log=print) -> tuple[list, list, StageCache]:
    """Prepared training and validation volumes (rank 0 fills the cache, the others wait)."""
    settings = stage_settings(job)
    train_cases, val_cases = select_cases(job)
    cache = stage_cache(job, settings)
    ddp = Distributed.from_env(pick_device(job.config.device).type)
    # Synthetic cases are right by construction (the generator's own tests): no need to read them twice.
    if ddp.main and job.check and not all(d.startswith("synthetic:") for d in filter(None, (job.data, job.val_data))):
        from .check import require_clean

        ident = dataset_identity(job.data, job.labels, job.synthetic_options) + "|" + (dataset_identity(job.val_data, job.labels, job.synthetic_options) if job.val_data else "")
        keep = Path(job.cache).expanduser() / "checks" / hashlib.sha256(ident.encode()).hexdigest()[:16]
        require_clean(train_cases + val_cases, keep, job.data, job.workers, log)
    n_todo = sum(not cache.has(c.name) for c in train_cases + val_cases)
    if ddp.main and n_todo:
        log(f"preparing {n_todo} case(s) for the {job.stage} stage in {cache.folder} ...")
        done = [0]

        def progress(name):
            done[0] += 1
            if done[0] % 5 == 0 or done[0] == n_todo:
                log(f"  {done[0]}/{n_todo} prepared ({name})")

        load_stage_volumes(train_cases + val_cases, cache, job.workers, progress)
    ddp.barrier()
    return load_stage_volumes(train_cases, cache), load_stage_volumes(val_cases, cache), cache


def train_stage(job: StageJob, log=print, trainer_cls: type[Trainer] = Trainer) -> dict:
    pipeline = recipe(job.pipeline)
    if job.stage not in pipeline.stages:
        raise ValueError(f"pipeline {job.pipeline!r} has stages {', '.join(pipeline.stages)}, not {job.stage!r}")
    stage = pipeline.stages[job.stage]
    settings = stage_settings(job)
    train, val, cache = prepare(job, log)
    network = {"arch": stage.arch, "args": {**stage.network_args, **job.network_args}}
    info = {
        "pipeline": job.pipeline,
        "stage": job.stage,
        "settings": settings,
        "network": network,
        "preprocessing": job.preprocessing,
        "data": {
            "dataset": job.data,
            "labels": job.labels,
            "splits": job.splits,
            "fold": job.fold,
            "training_cases": len(train),
            "validation": job.val_data or (f"last {job.val_count} training cases" if job.val_count else None),
            "synthetic_options": job.synthetic_options or None,
            "synthetic_generator_version": _generator_version(job),
            "cache": str(cache.folder),
        },
        "command": " ".join(["python -m Training"] + sys.argv[1:]) if sys.argv and sys.argv[0].endswith("__main__.py") else None,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    seed_everything(job.config.seed)  # --seed reproduces a run: before the network is built
    net = build_network(network["arch"], network["args"])
    if job.init_from:
        info["init_from"] = initialise_from_bundle(net, network, job.init_from, job.stage, settings.get("init_view"))
        log(f"{job.pipeline}/{job.stage}: weights initialised from {info['init_from']['model_name']} ({info['init_from']['model_sha256'][:12]})")
    trainer_class = stage.trainer or Trainer
    trainer = trainer_class(net, stage.sampler(settings), stage.make_loss(settings), train, val, job.config, job.out, info, resume=job.resume)
    attach_case_validation(trainer, job, info, log)
    log(f"{job.pipeline}/{job.stage}: {len(train)} training and {len(val)} validation cases, {job.config.iterations} iterations of {job.config.effective_batch} windows {settings.get('window') or settings.get('patch') or '(whole slices)'} on {trainer.device} x{trainer.ddp.world} (accumulation {trainer.accumulation})")
    result = trainer.fit()
    result["out"] = str(job.out)
    return result


def attach_case_validation(trainer: Trainer, job: StageJob, info: dict, log=print) -> None:
    """Whole-case validation (case_validation.py) when there are validation cases, the pipeline
    supports it and it is not switched off (``validate_cases_every`` 0)."""
    from .case_validation import CaseValidator, supported

    if job.config.validate_cases_every == 0 or not trainer.ddp.main or not trainer.val_volumes:
        return
    if not supported(job.pipeline, job.stage):
        log(f"note: whole-case validation is for resdsn-c2f stages; {job.pipeline}/{job.stage} validates on windows only")
        return
    trainer.case_validator = CaseValidator(select_cases(job)[1], info, str(trainer.device))


def _generator_version(job: StageJob) -> int | None:
    """The synthetic generator version of synthetic data (None for real data)."""
    if not any(d and d.startswith("synthetic:") for d in (job.data, job.val_data)):
        return None
    from PancreasC2FLib.synthetic import GENERATOR_VERSION

    return int((job.synthetic_options or {}).get("version", GENERATOR_VERSION))


def initialise_from_bundle(net, network: dict, bundle_name: str, stage: str, view: str | None = None) -> dict:
    """Fine-tuning: copy a bundle's weights for ``stage`` into ``net`` (same architecture and
    arguments, checked); returns the bundle's provenance for the training record. A resumed run
    then replaces them with its checkpoint's. ``view`` (yu-rstn's ``init_view``): start a view
    from another view's networks."""
    from PancreasC2FLib.io.bundle import load_bundle, resolve_model

    bundle = load_bundle(resolve_model(bundle_name))
    if bundle.pipeline == "yu-rstn" and network["arch"] == "rstn-joint":  # trained per view, shipped as coarse + fine
        from .rstn_training import init_from_bundle

        init_from_bundle(net, bundle, view or network["args"]["view"])
        return {**bundle.provenance(), **({"view": view} if view else {})}
    if stage not in bundle.networks:
        raise ValueError(f"--init-from {bundle_name}: the bundle has no stage {stage!r} (it has {', '.join(bundle.networks)})")
    theirs = bundle.stage(stage).get("network", {})
    if theirs.get("arch") != network["arch"] or dict(theirs.get("args", {})) != dict(network["args"]):
        raise ValueError(f"--init-from {bundle_name}: its {stage} network {theirs} differs from this one {network}")
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in bundle.networks[stage].state_dict().items()})
    return bundle.provenance()


def job_summary(job: StageJob) -> dict:
    d = asdict(job)
    d["config"] = asdict(job.config)
    return d
