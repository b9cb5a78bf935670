"""The five pipelines' demo models side by side, in one command (README "Pipelines" table,
``docs/pipelines_table.md``):

    python -m Training.pipelines_table [--cases 5] [--real ../shared/real-ct] [--out runs/pipelines-table]

Runs every installed demo model (``demo-synthetic`` and the ``demo-*`` of ``Training/demo_variants.py``)
exactly as users run it (``Training/compare.py``) on the first ``--cases`` held-out synthetic cases
(generator version 2, seeds 900000 and up, never used in training or for choosing a threshold;
written as NIfTI by ``demo_variants.export_cases``) and on each real case of ``--real`` (a folder
of ``ct.nii.gz`` + ``pancreas.nii.gz`` case folders; measured, never trained or tuned on). Writes
``OUT/synthetic/`` and ``OUT/real/`` (per-case CSVs) and ``OUT/table.md``: per pipeline the mean,
standard deviation and minimum DSC of the final mask and of the first stage's own mask on the
synthetic cases, whether the second stage improves on the first in mean and minimum (the claim of
every two-stage paper), the seconds per case, and the real-CT DSC and precision (the share of the
marked voxels that are pancreas: 0 for a mask beside it, however small).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from PancreasC2FLib.errors import ModelError
from PancreasC2FLib.io.bundle import resolve_model

from .compare import PIPELINE_TITLES, compare
from .datasets import open_dataset
from .demo_variants import DEMOS, export_cases

SHIPPED = ["demo-synthetic"] + [d["name"] for d in DEMOS.values()]


def installed_models(names: list[str] = SHIPPED) -> list[str]:
    """The demo models of ``names`` that are installed (registry names)."""
    out = []
    for name in names:
        try:
            resolve_model(name)
        except ModelError:  # not installed (e.g. a pipeline whose demo was not trained)
            continue
        out.append(name)
    return out


def _pct(v: float) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.1f}"


def stage_verdict(s: dict) -> str:
    """'yes' when the final mask beats the first stage's own mask in mean and minimum DSC."""
    if math.isnan(s["stage1_mean_dsc"]):
        return "one stage"
    better = s["mean_dsc"] >= s["stage1_mean_dsc"] and s["min_dsc"] >= s["stage1_min_dsc"]
    return "yes" if better else "no"


def combined_table(synthetic: list[dict], real: list[dict] | None, n_cases: int, n_real: int) -> str:
    real_by = {r["model"]: r for r in real or []}
    head = f"| Pipeline | Model | DSC, {n_cases} held-out synthetic (mean ± std) | Min | Stage 1 mean | Stage 1 min | Stage 2 ≥ stage 1 | s per case |"
    sep = "|---|---|---|---|---|---|---|---|"
    if real is not None:
        head += f" Real CT DSC ({n_real} case{'s' if n_real != 1 else ''}) | Real CT precision | Real CT stage 1 |"
        sep += "---|---|---|"
    lines = [head, sep]
    for s in synthetic:
        row = (f"| {PIPELINE_TITLES.get(s['pipeline'], s['pipeline'])} | `{s['model']}` | {s['mean_dsc']:.1f} ± {s['std_dsc']:.1f} | {s['min_dsc']:.1f} | "
               f"{_pct(s['stage1_mean_dsc'])} | {_pct(s['stage1_min_dsc'])} | {stage_verdict(s)} | {s['seconds_per_case']:.1f} |")
        if real is not None:
            r = real_by.get(s["model"])
            row += f" {_pct(r['mean_dsc'])} | {_pct(r['mean_precision'])} | {_pct(r['stage1_mean_dsc'])} |" if r else " n/a | n/a | n/a |"
        lines.append(row)
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m Training.pipelines_table", description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=5, help="held-out synthetic cases (default 5)")
    p.add_argument("--real", help="a folder of real labelled cases (e.g. ../shared/real-ct); measured only")
    p.add_argument("--model", action="append", help="a model to include (default: every installed demo model)")
    p.add_argument("--data-dir", default="runs/demo-variants/data-v2", help="where the held-out cases are written as NIfTI")
    p.add_argument("--out", default="runs/pipelines-table")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workers", type=int, default=2, help="processes writing the held-out cases")
    a = p.parse_args(argv)
    models = a.model or installed_models()
    if not models:
        p.error("no demo model is installed")
    out = Path(a.out)
    images, labels = export_cases(Path(a.data_dir), "test", a.cases, workers=a.workers)
    cases = open_dataset(images, labels)[: a.cases]
    synthetic = compare(models, cases, out / "synthetic", threads=a.threads, heading=f"{len(cases)} held-out synthetic cases")["summary"]
    real, n_real = None, 0
    if a.real:
        real_cases = open_dataset(a.real)
        n_real = len(real_cases)
        real = compare(models, real_cases, out / "real", threads=a.threads, heading=f"real CT: {a.real}")["summary"]
    table = combined_table(synthetic, real, len(cases), n_real)
    (out / "table.md").write_text(table, encoding="utf-8")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
