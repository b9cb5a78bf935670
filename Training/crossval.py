"""Cross-validation as one command per step: ``--fold all``.

With ``--fold all`` every path is the parent of one ``foldK`` folder per fold of ``--splits``:
``train`` trains the stage on each fold's training part into ``OUT/foldK``; ``export`` turns
``RUN/foldK`` of each stage into ``OUT/foldK``; ``evaluate`` runs ``MODEL/foldK`` on fold K's test
cases into ``OUT/foldK`` and merges them into one table over every case (``OUT/cases.csv`` with a
``fold`` column, ``OUT/summary.md``/``.csv``), as the paper's Table 2 (all 82 NIH cases).
"""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

from PancreasC2FLib.errors import InputError


def fold_count(splits: str | None) -> int:
    if not splits:
        raise InputError("--fold all needs --splits (the folds come from the splits file)")
    return len(json.loads(Path(splits).read_text(encoding="utf-8"))["splits"])


def per_fold(a, paths: tuple[str, ...]):
    """For each fold K: a copy of the parsed arguments with ``fold`` K and each attribute named in
    ``paths`` (a path, or a list of ``STAGE=path`` / paths) pointing at its ``foldK`` sub-folder."""
    for k in range(fold_count(a.splits)):
        b = copy.copy(a)
        b.fold = k
        for name in paths:
            value = getattr(a, name)
            if isinstance(value, list):
                setattr(b, name, [_sub(v, k) for v in value])
            else:
                setattr(b, name, _sub(value, k))
        yield k, b


def _sub(value: str, k: int) -> str:
    key, sep, path = value.rpartition("=")
    return f"{key}{sep}{Path(path) / f'fold{k}'}"


def merge_folds(results: dict[int, dict], out: str | Path, pipeline, methods, title: str) -> dict:
    """Per-fold ``evaluate`` results -> one table over every case."""
    from .evaluate import LABELS, markdown_table, summarize
    from .metrics import markdown_surface_table, summary_metrics

    rows = [{"fold": k, **r} for k, res in sorted(results.items()) for r in res["rows"]]
    out = Path(out)
    fields = list(dict.fromkeys(["fold"] + [f for r in rows for f in r]))
    with open(out / "cases.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})
    summary = summarize(rows, pipeline, methods)
    for s in summary:
        s.update(summary_metrics(rows, next(m for m in methods if LABELS[m] == s["method"])))
    with open(out / "summary.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(summary[0]))
        w.writeheader()
        for s in summary:
            w.writerow({k: (f"{v:.2f}" if isinstance(v, float) else v) for k, v in s.items()})
    table = markdown_table(summary, title) + markdown_surface_table(summary)
    (out / "summary.md").write_text(table, encoding="utf-8")
    return {"summary": summary, "rows": rows, "table": table}
