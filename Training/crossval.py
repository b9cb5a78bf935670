"""Cross-validation as one command per step: ``--fold all``.

With ``--fold all`` every path is the parent of one ``foldK`` folder per fold of ``--splits``:
``train`` trains the stage on each fold's training part into ``OUT/foldK``; ``export`` turns
``RUN/foldK`` of each stage into ``OUT/foldK``; ``evaluate`` runs ``MODEL/foldK`` on fold K's test
cases into ``OUT/foldK`` and merges them into one table over every case (``OUT/cases.csv`` with a
``fold`` column, ``OUT/summary.md``/``.csv``), as the paper's Table 2 (all 82 NIH cases).
"""

from __future__ import annotations

import copy
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
    from .evaluate import write_tables

    rows = [{"fold": k, **r} for k, res in sorted(results.items()) for r in res["rows"]]
    fields = list(dict.fromkeys(["fold"] + [f for r in rows for f in r]))
    summary, table = write_tables(Path(out), rows, fields, pipeline, methods, title)
    return {"summary": summary, "rows": rows, "table": table}
