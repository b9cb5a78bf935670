"""The model card: what a bundle was trained on, what it was checked on with which result, and
what it is for, stored in its ``model.json`` (``model_card``) so that it travels with the weights.

    python -m Training card --model runs/realism/bundle \\
        --evaluation "real CT (shared/real-ct, non-contrast, 3 mm)=runs/eval-real" \\
        --evaluation "held-out synthetic CT (generator v2, seeds 900000-900007)=runs/eval-synthetic"

Each ``--evaluation`` names the data and points at an ``evaluate`` output folder (its
``evaluation.json`` and ``cases.csv``). Rewriting ``model.json`` changes the bundle's sha256 (the
weights and their hashes stay): write the card before the bundle is shared.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

INTENDED_USE = (
    "Demonstration of the software: trying the workflow (coarse region, adjustable ROI, fine stage) on "
    "abdominal CT. Not a medical device; not for clinical use or for research results. Trained on synthetic CT "
    "only; on real scans it may miss or mislabel the pancreas, so check every result (the quality flag helps)."
)


def evaluation_entry(title: str, folder: str | Path) -> dict:
    """One checked data set: its summary and, per case, the DSC and region figures."""
    folder = Path(folder)
    ev = json.loads((folder / "evaluation.json").read_text(encoding="utf-8"))
    with open(folder / "cases.csv", newline="", encoding="utf-8") as f:
        cases = list(csv.DictReader(f))
    keep = ("case", "c2f_dsc", "coarse_dsc", "region_coverage", "region_size_ratio", "note")
    return {
        "data": title,
        "preset": ev.get("preset"),
        "evaluated_model_sha256": ev.get("model", {}).get("model_sha256"),
        "summary": [{k: (round(v, 2) if isinstance(v, float) else v) for k, v in s.items()} for s in ev["summary"]],
        "cases": [{k: r[k] for k in keep if r.get(k) not in (None, "")} for r in cases],
    }


def write_model_card(bundle: str | Path, evaluations: list[tuple[str, str | Path]], training_data: str | None = None, intended_use: str = INTENDED_USE) -> dict:
    """Merge the card into ``bundle/model.json`` (atomically) and return it."""
    path = Path(bundle) / "model.json"
    md = json.loads(path.read_text(encoding="utf-8"))
    card = {
        "intended_use": intended_use,
        "training_data": training_data or _training_data(md),
        "checked_on": [evaluation_entry(t, f) for t, f in evaluations],
    }
    md["model_card"] = card
    tmp = path.with_name(f".{path.name}.card.tmp")
    tmp.write_text(json.dumps(md, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return card


def _training_data(md: dict) -> str:
    """The datasets of every stage, also of the members of an ensemble or weight mean."""
    training = md.get("training") or {}
    records = [training] + [m.get("training") or {} for m in training.get("ensemble", []) + training.get("weight_mean", [])]
    stages = [s for r in records for s in (r.get("stages") or {}).values()]
    parts = sorted({f"{s.get('dataset')} (generator version {s.get('synthetic_generator_version') or 'n/a'})" for s in stages})
    return " ".join(t for t in (f"{'; '.join(parts)}." if parts else "", md.get("attribution", "")) if t)
