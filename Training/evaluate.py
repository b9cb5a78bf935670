"""Evaluation of a bundle the way users run it (``PancreasC2FLib.pipelines``), per case and method:

* **Coarse** - the coarse mask P^C (``find_region(...).coarse_mask``);
* **Fine**   - the fine network over the whole volume (``fine_everywhere``), the paper's baseline;
* **C2F**    - ``find_region`` then ``segment_region`` (Eq. 5).

Per case it also reports how well the first stage localised the pancreas, the figures that decide
whether the fine stage can succeed on real scans: ``region_coverage`` (fraction of the reference
pancreas inside the region the fine stage runs in) and ``region_size_ratio`` (the region's extent
over the reference's extent + 20 mm per side, on the worst axis: 1 is a tight box, 2 twice that).

Output: the per-case CSV and a summary shaped like Tables 2 and 5 of Zhu et al. 2018 (mean +- std,
max and min DSC, sliding-window n, seconds per case), as Markdown and CSV.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from PancreasC2FLib.io.bundle import load_bundle
from PancreasC2FLib.errors import EmptyCoarseResult
from PancreasC2FLib.pipelines import create_pipeline
from PancreasC2FLib.processing.geometry import box_slices, mask_box
from PancreasC2FLib.processing.postprocess import dice

from .datasets import CaseRef
from .metrics import case_metrics, markdown_surface_table, summary_metrics

METHODS = ("c2f", "coarse", "fine")
LABELS = {"c2f": "C2F", "coarse": "Coarse", "fine": "Fine"}


def evaluate_case(pipeline, case: CaseRef, methods=METHODS) -> dict:
    image, label = case.load()
    prepared = pipeline.prepare(image)
    truth = prepared.orientation.to_canonical(sitk.GetArrayViewFromImage(label)) > 0
    row = {"case": case.name, "size": "x".join(str(s) for s in image.GetSize()), "spacing": "x".join(f"{s:.2f}" for s in image.GetSpacing()), "note": ""}
    if "coarse" in methods or "c2f" in methods:
        t0 = time.perf_counter()
        try:
            region = pipeline.find_region(prepared)
            coarse = region.coarse_mask
        except EmptyCoarseResult:
            region, coarse = None, np.zeros(prepared.shape, np.uint8)
            row["note"] = "coarse stage found nothing"
        t_coarse = time.perf_counter() - t0
        row["coarse_dsc"], row["coarse_s"] = dice(coarse, truth), t_coarse
        row.update(case_metrics("coarse", coarse, truth, prepared.spacing))
        row.update(region_figures(region.box if region is not None else None, truth, prepared.spacing))
        if "c2f" in methods:
            t0 = time.perf_counter()
            mask = pipeline.segment_region(prepared, region).mask if region is not None else coarse
            row["c2f_dsc"], row["c2f_s"] = dice(mask, truth), t_coarse + time.perf_counter() - t0
            row.update(case_metrics("c2f", mask, truth, prepared.spacing))
    if "fine" in methods:
        t0 = time.perf_counter()
        mask = pipeline.fine_everywhere(prepared)
        row["fine_dsc"], row["fine_s"] = dice(mask, truth), time.perf_counter() - t0
        row.update(case_metrics("fine", mask, truth, prepared.spacing))
    return row


REGION_MARGIN_MM = 20.0


def region_figures(box, truth: np.ndarray, spacing) -> dict:
    """``region_coverage`` and ``region_size_ratio`` of a canonical box against the reference
    mask (see the module docstring); an empty region covers nothing."""
    ref = mask_box(truth)
    if ref is None:
        return {}
    if box is None:
        return {"region_coverage": 0.0, "region_size_ratio": float("nan")}
    inside = int(truth[box_slices(box)].sum())
    sp = np.asarray(spacing, float)
    region_mm = np.array([hi - lo for lo, hi in box]) * sp
    ref_mm = np.array([hi - lo for lo, hi in ref]) * sp + 2 * REGION_MARGIN_MM
    return {"region_coverage": inside / int(truth.sum()), "region_size_ratio": float((region_mm / ref_mm).max())}


def summarize(rows: list[dict], pipeline, methods=METHODS) -> list[dict]:
    stages = pipeline.config["stages"]
    n_of = {"coarse": f"{stages['coarse'].get('n')}", "fine": f"{stages['fine'].get('n')}", "c2f": f"{stages['coarse'].get('n')}&{stages['fine'].get('n')}"}
    out = []
    for m in methods:
        d = np.array([r[f"{m}_dsc"] for r in rows if f"{m}_dsc" in r]) * 100
        t = np.array([r[f"{m}_s"] for r in rows if f"{m}_s" in r])
        if len(d):
            out.append({"method": LABELS[m], "mean_dsc": d.mean(), "std_dsc": d.std(), "max_dsc": d.max(), "min_dsc": d.min(), "n": n_of[m], "seconds_per_case": t.mean(), "cases": len(d)})
    return out


def markdown_table(summary: list[dict], title: str = "") -> str:
    lines = [title, ""] if title else []
    lines += ["| Method | Mean DSC | Max DSC | Min DSC | n | Time per case (s) |", "|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['method']} | {s['mean_dsc']:.2f} ± {s['std_dsc']:.2f}% | {s['max_dsc']:.2f}% | {s['min_dsc']:.2f}% | {s['n']} | {s['seconds_per_case']:.1f} |")
    return "\n".join(lines) + "\n"


def write_tables(out: Path, rows: list[dict], fields: list[str], pipeline, methods, heading: str) -> tuple[list[dict], str]:
    """``cases.csv``, ``summary.csv`` and ``summary.md`` of per-case rows; (summary, Markdown)."""
    with open(out / "cases.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})
    summary = summarize(rows, pipeline, methods)
    for s in summary:  # HD95, NSD, volume error (metrics.py)
        s.update(summary_metrics(rows, next(m for m in methods if LABELS[m] == s["method"])))
    with open(out / "summary.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(summary[0]))
        w.writeheader()
        for s in summary:
            w.writerow({k: (f"{v:.2f}" if isinstance(v, float) else v) for k, v in s.items()})
    table = markdown_table(summary, heading) + markdown_surface_table(summary)
    (out / "summary.md").write_text(table, encoding="utf-8")
    return summary, table


def evaluate(
    bundle_path: str | Path,
    cases: list[CaseRef],
    out_dir: str | Path,
    preset: str | None = None,
    device: str = "cpu",
    methods=METHODS,
    threads: int | None = None,
    title: str = "",
    log=print,
) -> dict:
    """Run every case, write ``cases.csv``, ``summary.csv``, ``summary.md``; return the summary."""
    bundle = load_bundle(bundle_path)
    pipeline = create_pipeline(bundle, device=device, preset=preset, threads=threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, case in enumerate(cases, 1):
        row = evaluate_case(pipeline, case, methods)
        rows.append(row)
        region = f", region holds {row['region_coverage']:.0%} of the pancreas at {row['region_size_ratio']:.2f}x its extent + 20 mm" if "region_coverage" in row else ""
        log(f"[{i}/{len(cases)}] {case.name}: " + ", ".join(f"{LABELS[m]} {row[m + '_dsc']:.4f} ({row[m + '_s']:.1f} s)" for m in methods if m + "_dsc" in row) + region + (f" [{row['note']}]" if row["note"] else ""))
    fields = ["case", "size", "spacing"] + [f"{m}_{k}" for m in methods for k in ("dsc", "s", "hd95", "nsd", "vol_ml", "vol_err_ml")] + ["region_coverage", "region_size_ratio", "note"]
    device_name = str(pipeline.device)
    heading = title or f"Model `{bundle.name}` ({bundle.sha256[:12]}), preset `{pipeline.preset}`, {len(rows)} cases, {device_name}"
    summary, table = write_tables(out, rows, fields, pipeline, methods, heading)
    (out / "evaluation.json").write_text(json.dumps({"model": bundle.provenance(), "preset": pipeline.preset, "device": device_name, "cases": [c.name for c in cases], "summary": summary}, indent=2, default=float), encoding="utf-8")
    log(table)
    return {"summary": summary, "rows": rows, "table": table}
