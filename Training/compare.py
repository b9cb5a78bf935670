"""Several pipelines side by side on the same labelled cases (``python -m Training evaluate`` with
more than one ``--model``, or with a model of a pipeline other than ResDSN C2F).

Every case is loaded once and run through each bundle's pipeline exactly as users run it
(``find_region`` then ``segment_region``). Per pipeline: mean +- std, min and max DSC of the final
mask, the DSC of the first stage's own mask, and the seconds per case (both stages, without
loading the case). Writes ``cases.csv``, ``summary.csv``, ``summary.md`` and ``comparison.json``.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from PancreasC2FLib.io.bundle import load_bundle, resolve_model
from PancreasC2FLib.errors import EmptyCoarseResult
from PancreasC2FLib.pipelines import create_pipeline
from PancreasC2FLib.processing.postprocess import dice
from PancreasC2FLib.processing.quality import first_stage_mask

from .datasets import CaseRef
from .evaluate import region_figures

PIPELINE_TITLES = {
    "resdsn-c2f": "ResDSN C2F (Zhu et al. 2018)",
    "roth-cascade": "Cascaded 3D U-Net (Roth et al. 2018)",
    "zhao-two-stage": "Two-stage 3D U-Net (Zhao et al. 2019)",
    "yu-rstn": "Recurrent saliency transformation network (Yu et al. 2018)",
    "fang-ggpfn": "Globally guided progressive fusion network (Fang et al. 2019)",
}


def run_case(pipeline, image: sitk.Image, label: sitk.Image) -> dict:
    t0 = time.perf_counter()
    case = pipeline.prepare(image)
    truth = case.orientation.to_canonical(sitk.GetArrayViewFromImage(label)) > 0
    note = ""
    figures = {}
    rounds = ""
    try:
        region = pipeline.find_region(case)
        figures = region_figures(region.box, truth, case.spacing)
        coarse = first_stage_mask(region)  # None for an end-to-end network (fang-ggpfn)
        if coarse is None and not region.extra.get("end_to_end"):
            coarse = np.zeros(case.shape, np.uint8)
        mask = pipeline.segment_region(case, region).mask
        rounds = fine_rounds(region.extra)
    except EmptyCoarseResult:
        coarse = mask = np.zeros(case.shape, np.uint8)
        note = "first stage found nothing"
        figures = region_figures(None, truth, case.spacing)
    seconds = time.perf_counter() - t0
    return {"dsc": dice(mask, truth), **overlap_figures(mask, truth), "stage1_dsc": float("nan") if coarse is None else dice(coarse, truth), "seconds": seconds, "note": note, "fine_rounds": rounds, **figures}


def overlap_figures(mask: np.ndarray, truth: np.ndarray) -> dict:
    """Precision (the share of the marked voxels that are pancreas; nan when nothing is marked) and
    recall: what a DSC of 0 hides, a mask far from the pancreas against an empty one, and whether a
    higher DSC comes from finding more of the pancreas or from marking less elsewhere."""
    mask, truth = mask > 0, truth > 0
    hit, marked, total = int((mask & truth).sum()), int(mask.sum()), int(truth.sum())
    return {"precision": hit / marked if marked else float("nan"), "recall": hit / total if total else float("nan")}


def fine_rounds(extra: dict) -> str:
    """RSTN's recurrent rounds as "3" or "10, not converged" (empty for the other pipelines)."""
    if "rounds" not in extra:
        return ""
    return f"{extra['rounds']}" + ("" if extra.get("converged") else ", not converged")


def distinct_names(models: list[dict]) -> None:
    """Bundles sharing a name (two versions or seeds of one model) get their sha256 prefix, or
    their place when they are the same bundle, so that their rows and summaries stay apart."""
    names, shas = [m["name"] for m in models], [m["sha256"] for m in models]
    for k, m in enumerate(models):
        if names.count(names[k]) > 1:
            m["name"] = f"{names[k]} ({m['sha256'][:8]})" if shas.count(m["sha256"]) == 1 else f"{names[k]} (#{k + 1})"


def summarize(rows: list[dict], models: list[dict]) -> list[dict]:
    out = []
    for m in models:
        r = [x for x in rows if x["model"] == m["name"]]
        if not r:
            continue
        d = np.array([x["dsc"] for x in r]) * 100
        c = np.array([x["stage1_dsc"] for x in r]) * 100
        t = np.array([x["seconds"] for x in r])
        prec = np.array([x["precision"] for x in r]) * 100
        out.append({
            "pipeline": m["pipeline"], "model": m["name"], "sha256": m["sha256"][:12], "cases": len(r),
            "mean_dsc": d.mean(), "std_dsc": d.std(), "min_dsc": d.min(), "max_dsc": d.max(),
            "stage1_mean_dsc": c.mean(), "stage1_min_dsc": c.min(), "mean_precision": float(np.nanmean(prec)) if np.isfinite(prec).any() else float("nan"), "seconds_per_case": t.mean(), "failures": sum(bool(x["note"]) for x in r),
        })
    return out


def markdown_table(summary: list[dict], heading: str = "") -> str:
    lines = [heading, ""] if heading else []
    lines += [
        "| Pipeline | Model | Mean ± std DSC | Min DSC | Max DSC | Stage-1 mean DSC | Time per case (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        name = PIPELINE_TITLES.get(s["pipeline"], s["pipeline"])
        fail = f" ({s['failures']} empty)" if s["failures"] else ""
        stage1 = "n/a (one stage)" if np.isnan(s["stage1_mean_dsc"]) else f"{s['stage1_mean_dsc']:.2f}%"
        lines.append(f"| {name} | `{s['model']}` | {s['mean_dsc']:.2f} ± {s['std_dsc']:.2f}%{fail} | {s['min_dsc']:.2f}% | {s['max_dsc']:.2f}% | {stage1} | {s['seconds_per_case']:.1f} |")
    return "\n".join(lines) + "\n"


def compare(models: list[str], cases: list[CaseRef], out_dir: str | Path, preset: str | None = None, device: str = "cpu", threads: int | None = None, heading: str = "", log=print) -> dict:
    pipelines, info = [], []
    for spec in models:
        bundle = load_bundle(resolve_model(spec))
        pipelines.append(create_pipeline(bundle, device=device, preset=preset, threads=threads))
        info.append({"name": bundle.name, "pipeline": bundle.pipeline, "sha256": bundle.sha256, "trained": bool(bundle.metadata.get("trained"))})
    distinct_names(info)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, ref in enumerate(cases, 1):
        image, label = ref.load()
        parts = []
        for pipe, m in zip(pipelines, info):
            r = run_case(pipe, image, label)
            rows.append({"case": ref.name, "model": m["name"], "pipeline": m["pipeline"], **r})
            parts.append(f"{m['pipeline']} {r['dsc']:.4f} ({r['seconds']:.1f} s){' [' + r['note'] + ']' if r['note'] else ''}")
        log(f"[{i}/{len(cases)}] {ref.name}: " + ", ".join(parts))
    with open(out / "cases.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["case", "pipeline", "model", "dsc", "precision", "recall", "stage1_dsc", "region_coverage", "region_size_ratio", "seconds", "fine_rounds", "note"])
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})
    summary = summarize(rows, info)
    with open(out / "summary.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(summary[0]))
        w.writeheader()
        for s in summary:
            w.writerow({k: (f"{v:.2f}" if isinstance(v, float) else v) for k, v in s.items()})
    device_name = str(pipelines[0].device)
    heading = heading or f"{len(cases)} held-out cases, {device_name}"
    table = markdown_table(summary, heading)
    (out / "summary.md").write_text(table, encoding="utf-8")
    (out / "comparison.json").write_text(json.dumps({"models": info, "device": device_name, "preset": preset, "cases": [c.name for c in cases], "summary": summary}, indent=2, default=float), encoding="utf-8")
    log(table)
    return {"summary": summary, "rows": rows, "table": table}
