"""Checkpoints -> a model bundle (``PancreasC2FLib.io.bundle.save_bundle``) with provenance.

The stage settings, network arguments and preprocessing are read from the checkpoints (they were
recorded at training time), so a bundle cannot disagree with how its networks were trained.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import torch

from PancreasC2FLib.io.bundle import Bundle, is_bundle, load_bundle, save_bundle
from PancreasC2FLib.networks import build_network

from . import registry
from .catalog import recipe
from .trainer import load_checkpoint, resolve_checkpoint


def export_bundle(
    checkpoints: dict[str, str | Path],
    out: str | Path,
    name: str,
    version: str = "1",
    description: str = "",
    license: str = "",
    attribution: str = "",
    extra_training: dict | None = None,
    stage_overrides: dict[str, dict] | None = None,
    weights_dtype: str = "float32",
    postprocess: dict | None = None,
) -> Bundle:
    """Write a bundle with one network per stage of the checkpoints' pipeline (``weights_dtype``
    "float16": half-size weight files, see ``save_bundle``).

    ``stage_overrides`` changes inference settings of a stage (e.g. ``{"coarse": {"threshold":
    0.7}}`` chosen on validation cases); they are recorded under ``training.export_overrides``.
    ``postprocess`` replaces entries of the pipeline's default post-processing (island removal).
    A stage given as a bundle folder instead of a checkpoint is taken over from that bundle
    unchanged (network, settings, training record): e.g. Roth's stage 1 when only stage 2 was
    fine-tuned from a shipped model, or yu-rstn's axial view beside newly trained views."""
    kept = {stage: load_bundle(p) for stage, p in checkpoints.items() if is_bundle(p)}
    files = {stage: resolve_checkpoint(p) for stage, p in checkpoints.items() if stage not in kept}  # a folder: best.pt, else final.pt
    ckpts = {stage: load_checkpoint(f) for stage, f in files.items()}
    pipelines = {c["info"]["pipeline"] for c in ckpts.values()}
    if len(pipelines) != 1:
        raise ValueError(f"checkpoints of different pipelines: {sorted(pipelines)}" if pipelines else "at least one stage must come from a checkpoint")
    pipeline = recipe(pipelines.pop())
    preprocessing = next(iter(ckpts.values()))["info"]["preprocessing"]
    taken = {stage: pipeline.stage_from_bundle(bundle, stage) for stage, bundle in kept.items()}  # raises when it has none
    for stage, bundle in kept.items():
        if dict(bundle.metadata["preprocessing"]) != dict(preprocessing):
            raise ValueError(f"stage {stage!r} from {bundle.path}: its preprocessing {bundle.metadata['preprocessing']} differs from the checkpoints' {preprocessing}")
    missing = pipeline.required_checkpoints() - set(ckpts) - set(kept)
    if missing:
        raise ValueError(f"pipeline {pipeline.name} needs a checkpoint for stage(s) {', '.join(sorted(missing))}")
    for stage, c in ckpts.items():
        if c["info"]["stage"] != stage:
            raise ValueError(f"the checkpoint given for {stage!r} was trained for {c['info']['stage']!r}")
    preps = {str(sorted(c["info"]["preprocessing"].items())) for c in ckpts.values()}
    if len(preps) != 1:
        raise ValueError("the stages were trained with different preprocessing; retrain one of them")
    networks, stages, training = {}, {}, {}
    for stage in (s for s in pipeline.stages if s in kept):  # taken over unchanged from a bundle
        bundle = kept[stage]
        networks[stage], stages[stage] = taken[stage]
        training[stage] = {"from_bundle": bundle.provenance(), **bundle.metadata.get("training", {}).get("stages", {}).get(stage, {})}
    for stage in (s for s in pipeline.stages if s in ckpts):
        c = ckpts[stage]
        info, cfg = c["info"], c["config"]
        net = build_network(info["network"]["arch"], dict(info["network"]["args"]))
        net.load_state_dict(c["model"], strict=True)
        networks[stage] = net
        settings = {k: v for k, v in info["settings"].items() if k not in registry.TRAINING_ONLY_SETTINGS}
        stages[stage] = {"network": info["network"], **settings}
        training[stage] = {
            "dataset": info["data"]["dataset"],
            "training_cases": info["data"]["training_cases"],
            "splits": info["data"].get("splits"),
            "fold": info["data"].get("fold"),
            "synthetic_options": info["data"].get("synthetic_options"),
            "synthetic_generator_version": info["data"].get("synthetic_generator_version"),
            "init_from": info.get("init_from"),
            "iterations": int(c["iteration"]),
            "planned_iterations": cfg["iterations"],
            "stopped_early": bool(c.get("stopped_early", False)),
            "batch": cfg["effective_batch"],
            "lr": cfg["lr"],
            "poly_power": cfg["poly_power"],
            "momentum": cfg["momentum"],
            "weight_decay": cfg["weight_decay"],
            "augment": cfg["augment"],
            "sampler": {k: info["settings"][k] for k in registry.TRAINING_ONLY_SETTINGS if k in info["settings"]},
            "seed": cfg["seed"],
            "processes": c.get("world_size", 1),
            "training_time_s": round(float(c.get("elapsed_s", 0.0)), 1),
            "final_log": c.get("last_log", {}),
            "checkpoint": files[stage].name,
            **({"best_case_validation": c["best"]} if c.get("best") else {}),
            "command": info.get("command"),
            "date": info.get("date"),
        }
    order = [s for s in pipeline.stages if s in networks]
    networks, stages = pipeline.bundle_stages({s: networks[s] for s in order}, {s: stages[s] for s in order})  # yu-rstn: views -> coarse, fine
    for stage, override in (stage_overrides or {}).items():
        if stage not in stages:
            raise ValueError(f"--set {stage}.*: the bundle has no stage {stage!r} (it has {', '.join(stages)})")
        stages[stage].update(override)
    metadata = {
        "name": name,
        "version": str(version),
        "pipeline": pipeline.name,
        "trained": True,
        "description": description,
        "license": license,
        "attribution": attribution,
        "training": {"exported": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "stages": training, **({"export_overrides": stage_overrides} if stage_overrides else {}), **(extra_training or {})},
        "preprocessing": preprocessing,
        "stages": stages,
        "postprocess": {**pipeline.postprocess, **(postprocess or {})},
        "presets": dict(pipeline.presets),
    }
    return save_bundle(out, networks, metadata, weights_dtype)


def _load_members(bundles: list[str | Path]) -> tuple[list[Path], list[Bundle]]:
    """The bundles to combine (a folder of ``foldK`` bundles counts as all of them), loaded; they
    must be at least two, of one pipeline and one preprocessing."""
    folders = []
    for b in map(Path, bundles):
        folds = sorted(p for p in b.glob("fold*") if is_bundle(p)) if not is_bundle(b) else []
        folders += folds or [b]
    if len(folders) < 2:
        raise ValueError(f"combining bundles needs at least two, got {len(folders)}")
    members = [load_bundle(f) for f in folders]
    if {m.pipeline for m in members} != {members[0].pipeline}:
        raise ValueError(f"bundles of different pipelines: {sorted({m.pipeline for m in members})}")
    if len({json.dumps(m.metadata.get("preprocessing"), sort_keys=True) for m in members}) != 1:
        raise ValueError("the bundles were trained with different preprocessing")
    return folders, members


def _shared_stage(members: list[Bundle], stage: str, mix: list[float]) -> dict:
    """The stage's entry common to all members (network and settings must agree; the weights
    differ), with the ``mix``-weighted mean of the thresholds the members have (a member without
    one, e.g. an uncalibrated fold, does not count; if those members all have mix 0, their plain
    mean)."""
    settings = [{k: v for k, v in m.stage(stage).items() if k not in ("weights", "sha256", "threshold")} for m in members]
    if any(json.dumps(s, sort_keys=True) != json.dumps(settings[0], sort_keys=True) for s in settings):
        raise ValueError(f"stage {stage!r}: the bundles' networks or settings differ; combine models of one recipe")
    out = dict(settings[0])
    having = [(w, float(m.stage(stage)["threshold"])) for w, m in zip(mix, members) if "threshold" in m.stage(stage)]
    total = sum(w for w, _ in having)
    if having:
        out["threshold"] = round(sum(w * t for w, t in having) / total if total else sum(t for _, t in having) / len(having), 4)
    return out


def _combined_metadata(members: list[Bundle], folders: list[Path], name: str, version: str, stages: dict, record: str, extra: list[dict]) -> dict:
    """The first member's model.json with the new name, version and stages; ``training.<record>``
    lists every member's provenance and folder with its ``extra`` entries."""
    return {
        **{k: v for k, v in members[0].metadata.items() if k not in ("stages", "weights_dtype", "created_with", "training")},
        "name": name,
        "version": str(version),
        "stages": stages,
        "training": {
            "exported": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            record: [{**m.provenance(), "folder": str(f), **e} for m, f, e in zip(members, folders, extra)],
        },
    }


def ensemble_bundle(bundles: list[str | Path], out: str | Path, name: str, version: str = "1", weights_dtype: str = "float32") -> Bundle:
    """One bundle whose every stage averages the networks of ``bundles`` (e.g. the fold models of
    ``export --fold all``, or runs of one recipe with other seeds; a folder of ``foldK`` bundles
    counts as all of them): arch "ensemble" (PancreasC2FLib/networks/ensemble.py). The bundles
    must be of one pipeline with the same stages, networks and settings; calibrated thresholds may
    differ and become their mean. A stage whose weights all members share (one taken over
    unchanged, as ``--stages stage2`` runs do) stays one network: averaging copies costs time and
    changes nothing. The members' provenance is recorded under ``training.ensemble``."""
    from PancreasC2FLib.networks.ensemble import MEMBERWISE_ARCHITECTURES, SOFTMAX_ARCHITECTURES, Ensemble

    folders, members = _load_members(bundles)
    first, mix = members[0], [1.0 / len(members)] * len(members)
    networks, stages = {}, {}
    for stage, spec in first.metadata["stages"].items():
        net_spec = spec.get("network", {})
        if net_spec.get("arch") not in SOFTMAX_ARCHITECTURES + MEMBERWISE_ARCHITECTURES:
            raise ValueError(f"stage {stage!r}: an ensemble holds {', '.join(SOFTMAX_ARCHITECTURES + MEMBERWISE_ARCHITECTURES)} networks, not {net_spec.get('arch')!r}")
        shared = _shared_stage(members, stage, mix)
        states = [m.networks[stage].state_dict() for m in members]
        if all(_same_weights(states[0], s) for s in states[1:]):
            networks[stage], stages[stage] = first.networks[stage], shared
            continue
        ens = Ensemble(net_spec, len(members))
        for member, state in zip(ens.members, states):
            member.load_state_dict(state)
        networks[stage] = ens
        stages[stage] = {**shared, "network": {"arch": "ensemble", "args": {"member": net_spec, "count": len(members)}}}
    thresholds = [{"thresholds": {s: m.stage(s).get("threshold") for s in stages}, "training": m.metadata.get("training")} for m in members]
    return save_bundle(out, networks, _combined_metadata(members, folders, name, version, stages, "ensemble", thresholds), weights_dtype)


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].float(), b[k].float()) if a[k].is_floating_point() else torch.equal(a[k], b[k]) for k in a)


def weight_mean_bundle(bundles: list[str | Path], out: str | Path, name: str, version: str = "1", mix: list[float] | None = None, weights_dtype: str = "float32") -> Bundle:
    """One bundle whose networks hold the ``mix``-weighted mean of ``bundles``' weights (a "model
    soup", Wortsman et al. 2022; equal weights by default). Unlike ``ensemble_bundle`` it runs one
    network, not several, and it works for every architecture; but a mean of weights only makes
    sense for runs that continue one another (a fine-tuned model and the model it started from),
    whose weights lie in one basin. Stages, networks and settings must agree; thresholds become
    their weighted mean. The members' provenance and mix are recorded under
    ``training.weight_mean``."""
    folders, members = _load_members(bundles)
    mix = [1.0 / len(members)] * len(members) if mix is None else [float(w) for w in mix]
    if len(mix) != len(members) or min(mix) < 0 or abs(sum(mix) - 1.0) > 1e-6:
        raise ValueError(f"--mix needs one non-negative weight per bundle ({len(members)}) summing to 1, got {mix}")
    networks, stages = {}, {}
    for stage, spec in members[0].metadata["stages"].items():
        stages[stage] = _shared_stage(members, stage, mix)
        states = [m.networks[stage].state_dict() for m in members]
        mean = {k: sum(w * s[k].double() for w, s in zip(mix, states)).to(v.dtype) if v.is_floating_point() else v for k, v in states[0].items()}
        net = build_network(spec["network"]["arch"], dict(spec["network"].get("args", {})))
        net.load_state_dict(mean, strict=True)
        networks[stage] = net.eval()
    extra = [{"mix": w, "training": m.metadata.get("training")} for w, m in zip(mix, members)]
    return save_bundle(out, networks, _combined_metadata(members, folders, name, version, stages, "weight_mean", extra), weights_dtype)
