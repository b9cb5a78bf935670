"""Dataset integrity check: ``python -m Training check --data D [--labels L]``, also run by ``train``
before any preparation (the records are kept, so each case is checked once).

Errors (training refuses the dataset, exit 2): a label that is empty, or empty once placed on its
image's grid (the headers disagree: e.g. a label written with origin 0 over a DICOM series), negative
label values, unusable spacing, the same image twice. Warnings: the label is resampled (its grid
differs), values other than 0/1/2 (all > 0 count as pancreas), a pancreas volume outside 5-500 mL,
a spacing far from the dataset's median, images without a label (left out).
"""

from __future__ import annotations

import hashlib
import json
import math
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .datasets import CaseRef, DatasetError

CHECK_VERSION = 1  # bump when a record's content changes, so kept records are redone
OVERLAP_MIN = 0.5  # at least this fraction of the label's volume must land on the image
VOLUME_ML = (5.0, 500.0)  # a pancreas outside this is a wrong label, unit or structure
SPACING_FACTOR = 2.5  # a spacing this far from the dataset median is flagged


def _ml(voxels: int, spacing) -> float:
    return voxels * float(np.prod(spacing)) / 1000.0


def _source_stamp(ref: CaseRef) -> str | None:
    if ref.label_path is None:
        return None
    st = Path(ref.label_path).stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def check_case(ref: CaseRef) -> dict:
    """One case's facts and problems: ``{"name", ..., "errors": [...], "warnings": [...]}``."""
    errors, warnings = [], []
    image, label = ref.load()  # label: binary, on the image's grid
    spacing = list(image.GetSpacing())
    on_grid = int(np.count_nonzero(sitk.GetArrayViewFromImage(label)))
    if not all(math.isfinite(s) and s > 0 for s in spacing):
        errors.append(f"image spacing {spacing} is not usable")
    raw_voxels, raw_ml, values = on_grid, _ml(on_grid, spacing), [0, 1] if on_grid else [0]
    if ref.label_path is not None:
        raw = sitk.ReadImage(str(ref.label_path))
        arr = sitk.GetArrayViewFromImage(raw)
        values = [v.item() for v in np.unique(arr)]
        raw_voxels = int(np.count_nonzero(arr > 0))
        raw_ml = _ml(raw_voxels, raw.GetSpacing())
        same = raw.GetSize() == image.GetSize() and np.allclose(raw.GetSpacing(), spacing, atol=1e-3) and np.allclose(raw.GetOrigin(), image.GetOrigin(), atol=1e-2) and np.allclose(raw.GetDirection(), image.GetDirection(), atol=1e-4)
        if not same:
            warnings.append(f"label grid differs from the image's (label origin {_round(raw.GetOrigin())}, image origin {_round(image.GetOrigin())}): resampled onto the image")
        if min(values) < 0:
            errors.append(f"negative label values {[v for v in values if v < 0][:5]}")
        extra = [v for v in values if v not in (0, 1, 2)]
        if extra:
            warnings.append(f"label values {values[:8]}: everything > 0 counts as pancreas")
    grid_ml = _ml(on_grid, spacing)
    if raw_voxels == 0:
        errors.append("empty label (no voxel > 0)")
    elif on_grid == 0 or grid_ml < OVERLAP_MIN * raw_ml:
        errors.append(f"the label does not lie on its image: {raw_ml:.1f} mL labelled, {grid_ml:.1f} mL of it inside the image (do the two headers' origin and direction agree?)")
    elif not VOLUME_ML[0] <= grid_ml <= VOLUME_ML[1]:
        warnings.append(f"pancreas volume {grid_ml:.1f} mL outside {VOLUME_ML[0]:g}-{VOLUME_ML[1]:g} mL")
    digest = hashlib.sha256(sitk.GetArrayViewFromImage(image).tobytes()).hexdigest()[:20]
    return {
        "name": ref.name, "check_version": CHECK_VERSION, "source": _source_stamp(ref), "size": list(image.GetSize()), "spacing": spacing,
        "label_values": values, "label_ml": round(grid_ml, 2), "image_sha256": digest, "errors": errors, "warnings": warnings,
    }


def _round(values) -> list[float]:
    return [round(float(v), 1) for v in values]


def dataset_problems(records: list[dict]) -> tuple[list[str], list[str]]:
    """(errors, warnings) as ``case: message`` lines, with the checks across cases (duplicates,
    spacing outliers)."""
    errors = [f"{r['name']}: {m}" for r in records for m in r["errors"]]
    warnings = [f"{r['name']}: {m}" for r in records for m in r["warnings"]]
    seen: dict[str, str] = {}
    for r in records:
        first = seen.setdefault(r["image_sha256"], r["name"])
        if first != r["name"]:
            errors.append(f"{r['name']}: the same image as {first} (a duplicate leaks between training and test)")
    good = [r["spacing"] for r in records if not any("spacing" in e for e in r["errors"])]
    if len(good) >= 3:
        median = np.median(np.array(good), axis=0)
        for r in records:
            ratio = np.array(r["spacing"]) / median
            if np.any(ratio > SPACING_FACTOR) or np.any(ratio < 1 / SPACING_FACTOR):
                warnings.append(f"{r['name']}: spacing {_round(r['spacing'])} mm far from the dataset's median {_round(median)} mm")
    return errors, warnings


def check_cases(cases: list[CaseRef], keep: str | Path | None = None, workers: int = 1, log=print) -> list[dict]:
    """Check every case (records kept in ``keep``, one JSON per case, reused while the label file
    is unchanged)."""
    folder = Path(keep) if keep else None
    records: dict[str, dict] = {}
    todo = []
    for ref in cases:
        path = folder / f"{ref.name}.json" if folder else None
        if path is not None and path.is_file():
            rec = json.loads(path.read_text(encoding="utf-8"))
            if rec.get("check_version") == CHECK_VERSION and rec.get("source") == _source_stamp(ref):
                records[ref.name] = rec
                continue
        todo.append(ref)
    if todo:
        log(f"checking {len(todo)} case(s) ...")
        if folder:
            folder.mkdir(parents=True, exist_ok=True)
        pool = ProcessPoolExecutor(workers) if workers > 1 and len(todo) > 1 else None
        try:
            for ref, rec in zip(todo, pool.map(check_case, todo) if pool else map(check_case, todo)):
                records[ref.name] = rec
                if folder:
                    (folder / f"{ref.name}.json").write_text(json.dumps(rec), encoding="utf-8")
        finally:
            if pool:
                pool.shutdown(cancel_futures=True)
    return [records[c.name] for c in cases]


def require_clean(cases: list[CaseRef], keep: str | Path | None, data: str, workers: int = 1, log=print) -> None:
    """Refuse (DatasetError, exit 2) a dataset with errors; print its warnings."""
    errors, warnings = dataset_problems(check_cases(cases, keep, workers, log))
    for w in warnings:
        log(f"warning: {w}")
    if errors:
        more = f" (and {len(errors) - 1} more: python -m Training check --data {data})" if len(errors) > 1 else ""
        raise DatasetError(f"dataset check failed: {errors[0]}{more}")
