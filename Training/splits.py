"""K-fold cross-validation splits, written to and read from JSON.

The paper (Sec. 4.2) uses 4 folds on the 82 NIH cases with test folds of 21, 21, 20 and 20: the
cases are shuffled once with a fixed seed and cut into folds whose sizes differ by at most one,
larger folds first.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def kfold(names: list[str], folds: int = 4, seed: int = 0) -> list[dict]:
    """``folds`` disjoint test sets covering every name; each fold's train set is the rest."""
    names = sorted(set(names))
    if folds < 2 or folds > len(names):
        raise ValueError(f"cannot make {folds} folds from {len(names)} cases")
    order = np.random.default_rng(seed).permutation(len(names))
    shuffled = [names[i] for i in order]
    out = []
    for k, part in enumerate(np.array_split(np.arange(len(names)), folds)):
        test = sorted(shuffled[i] for i in part)
        out.append({"fold": k, "test": test, "train": sorted(set(names) - set(test))})
    return out


def write_splits(path: str | Path, names: list[str], folds: int = 4, seed: int = 0, dataset: str | None = None) -> dict:
    doc = {"dataset": dataset, "folds": folds, "seed": seed, "splits": kfold(names, folds, seed)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2), encoding="utf-8")
    return doc


def read_fold(path: str | Path, fold: int) -> dict:
    """``{"train": [...], "test": [...]}`` of one fold of a splits file."""
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    splits = doc["splits"]
    if not 0 <= fold < len(splits):
        raise ValueError(f"{path} has folds 0..{len(splits) - 1}, not {fold}")
    return splits[fold]
