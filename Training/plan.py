"""Dataset planning as nnU-Net does it (Isensee et al., Nature Methods 2021): measure a dataset's
fingerprint, derive the settings of each stage from it, write both as ``plan.json``; ``train
--plan plan.json`` then uses them unless an option overrides them.

    python -m Training plan --data D [--labels L] --out plan.json

Fingerprint (per case and pooled): image size and spacing, HU inside the pancreas (percentiles,
mean, std, from up to ``SAMPLES_PER_CASE`` voxels per case, as nnU-Net samples its foreground),
pancreas volume (mL) and extent (mm, along the patient axes x = R-L, y = A-P, z = I-S).

Rules (resdsn-c2f's two stages; the numbers are nnU-Net's where it has one):

* intensities: clip to the 0.5 and 99.5 percentiles of the pancreas HU (nnU-Net's CT scheme);
  normalise with the "fixed" mapping (the clip range to [-1, 1]): one mapping for the whole
  dataset like nnU-Net's global foreground z-score, an affine of it, rather than per case;
* fine stage spacing: the median spacing per axis; on anisotropic data (the largest median
  spacing over 3x the smallest) the coarse axis takes the 10th percentile instead (nnU-Net's
  full-resolution target spacing);
* fine window: the pancreas box plus the margin on both sides (95th percentile of the cases) in
  voxels, rounded up to multiples of 8, shrunk along its largest axis (in mm) until it holds at
  most 64^3 voxels, the paper's window, so memory stays the paper's; at least 32 per axis;
* coarse stage spacing: coarse enough that two 64-voxel windows span the median scan along each
  axis, never finer than the fine stage (nnU-Net's low-resolution stage likewise coarsens the
  spacing until a patch covers a good part of the image); the window is the paper's 64 per axis,
  smaller (multiples of 8, at least 32) if the median scan is smaller than that;
* margin: the paper's 20 mm, at least three coarse voxels (the coarse mask is about one coarse
  voxel off at its border; three leave slack).
"""

from __future__ import annotations

import datetime as _dt
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from PancreasC2FLib import __version__
from PancreasC2FLib.processing.geometry import Orientation, mask_box

from .datasets import CaseRef, DatasetError

PLAN_FORMAT = "pancreas-c2f-plan"
PLAN_PIPELINE = "resdsn-c2f"  # the stages the rules below are written for
SAMPLES_PER_CASE = 10_000  # pancreas voxels sampled per case for the HU statistics (nnU-Net: 10,000)
CLIP_PERCENTILES = (0.5, 99.5)
ANISOTROPY = 3.0  # nnU-Net: an axis over 3x the finest spacing is treated as the coarse one
MAX_WINDOW_VOXELS = 64 ** 3  # the paper's window
WINDOW_STEP, MIN_WINDOW, COARSE_WINDOW = 8, 32, 64
DEFAULT_MARGIN_MM = 20.0
HU_PERCENTILES = (0.5, 1, 5, 25, 50, 75, 95, 99, 99.5)


def case_fingerprint(name: str, image: sitk.Image, label: sitk.Image, rng: np.random.Generator) -> tuple[dict, np.ndarray]:
    """One case's measurements (x, y, z along the patient axes) and its sampled pancreas HU."""
    orientation = Orientation.of(image)
    hu = orientation.to_canonical(sitk.GetArrayViewFromImage(image))
    lab = orientation.to_canonical(sitk.GetArrayViewFromImage(label)) > 0
    spacing_zyx = np.array(orientation.spacing_zyx(image))
    voxels = int(lab.sum())
    values = hu[lab]
    if values.size > SAMPLES_PER_CASE:
        values = rng.choice(values, SAMPLES_PER_CASE, replace=False)
    box = mask_box(lab)
    extent_zyx = None if box is None else [(hi - lo) * s for (lo, hi), s in zip(box, spacing_zyx)]
    return {
        "name": name,
        "size_xyz": list(hu.shape[::-1]),
        "spacing_xyz": [round(float(v), 4) for v in spacing_zyx[::-1]],
        "pancreas_voxels": voxels,
        "pancreas_ml": round(voxels * float(np.prod(spacing_zyx)) / 1000.0, 2),
        "pancreas_extent_mm_xyz": None if extent_zyx is None else [round(float(v), 1) for v in extent_zyx[::-1]],
        "pancreas_median_hu": None if not voxels else float(np.median(values)),
    }, values.astype(np.float32)


def fingerprint(cases: list[CaseRef], log: Callable[[str], None] = print, seed: int = 0) -> dict:
    """Every case read once (one at a time), measured, and pooled."""
    if not cases:
        raise DatasetError("no cases to plan from")
    rng = np.random.default_rng(seed)
    per_case, samples = [], []
    for i, c in enumerate(cases, 1):
        image, label = c.load()
        fp, values = case_fingerprint(c.name, image, label, rng)
        per_case.append(fp)
        samples.append(values)
        log(f"  {i}/{len(cases)} {c.name}: {fp['size_xyz']} at {fp['spacing_xyz']} mm, pancreas {fp['pancreas_ml']} mL")
    hu = np.concatenate(samples) if samples else np.zeros(0, np.float32)
    if hu.size == 0:
        raise DatasetError("no case has any pancreas voxel: nothing to measure intensities on")
    spacing = np.array([c["spacing_xyz"] for c in per_case])
    size = np.array([c["size_xyz"] for c in per_case])
    with_organ = [c for c in per_case if c["pancreas_voxels"]]
    extent = np.array([c["pancreas_extent_mm_xyz"] for c in with_organ])
    ml = np.array([c["pancreas_ml"] for c in with_organ])

    def stats(a: np.ndarray, digits: int = 2) -> dict:
        return {"min": np.round(a.min(0), digits).tolist(), "median": np.round(np.median(a, 0), digits).tolist(),
                "p95": np.round(np.percentile(a, 95, axis=0), digits).tolist(), "max": np.round(a.max(0), digits).tolist()}

    return {
        "cases": len(per_case),
        "cases_without_pancreas": len(per_case) - len(with_organ),
        "spacing_mm_xyz": {**stats(spacing, 3), "p10": np.round(np.percentile(spacing, 10, axis=0), 3).tolist()},
        "size_xyz": stats(size, 0),
        "extent_mm_xyz": stats(size * spacing, 1),
        "pancreas_hu": {"mean": round(float(hu.mean()), 1), "std": round(float(hu.std()), 1), "samples": int(hu.size),
                        "percentiles": {f"{p:g}": round(float(np.percentile(hu, p)), 1) for p in HU_PERCENTILES}},
        "pancreas_ml": stats(ml, 1),
        "pancreas_extent_mm_xyz": stats(extent, 1),
        "per_case": per_case,
    }


def _round_up(v: float, step: int = WINDOW_STEP) -> int:
    return int(step * np.ceil(v / step))


def fine_spacing(fp: dict) -> list[float]:
    """nnU-Net's full-resolution target spacing: the median, the coarse axis of anisotropic data
    at the 10th percentile."""
    median = np.array(fp["spacing_mm_xyz"]["median"], float)
    target = median.copy()
    worst = int(np.argmax(median))
    if median[worst] > ANISOTROPY * median.min():
        target[worst] = fp["spacing_mm_xyz"]["p10"][worst]
    return [round(float(v), 3) for v in target]


def fine_window(extent_mm_xyz, margin_mm: float, spacing_xyz) -> list[int]:
    """Window (x, y, z voxels) covering the pancreas box plus margins, within the voxel budget."""
    need = [max(MIN_WINDOW, _round_up((e + 2 * margin_mm) / s)) for e, s in zip(extent_mm_xyz, spacing_xyz)]
    while int(np.prod(need)) > MAX_WINDOW_VOXELS:
        mm = [n * s if n > MIN_WINDOW else 0 for n, s in zip(need, spacing_xyz)]
        axis = int(np.argmax(mm))
        if mm[axis] == 0:
            break
        need[axis] -= WINDOW_STEP
    return need


def coarse_stage(fp: dict, fine_xyz: list[float]) -> tuple[list[float], list[int]]:
    """Coarse spacing (two windows span the median scan) and window (x, y, z)."""
    extent = fp["extent_mm_xyz"]["median"]
    spacing = [round(max(f, e / (2 * COARSE_WINDOW)), 2) for f, e in zip(fine_xyz, extent)]
    window = [max(MIN_WINDOW, min(COARSE_WINDOW, int(WINDOW_STEP * (e / s // WINDOW_STEP)))) for e, s in zip(extent, spacing)]
    return spacing, window


def derive_settings(fp: dict) -> dict:
    """The settings the fingerprint implies, per stage of ``PLAN_PIPELINE``, and the preprocessing."""
    lo, hi = (fp["pancreas_hu"]["percentiles"][f"{p:g}"] for p in CLIP_PERCENTILES)
    fine_sp = fine_spacing(fp)
    coarse_sp, coarse_win = coarse_stage(fp, fine_sp)
    margin = round(max(DEFAULT_MARGIN_MM, 3 * max(coarse_sp)), 1)
    fine_win = fine_window(fp["pancreas_extent_mm_xyz"]["p95"], margin, fine_sp)
    # stage settings hold the window in the networks' array order (z, y, x), the spacing as x, y, z
    return {
        "preprocessing": {"clip": [lo, hi], "normalize": "fixed"},
        "stages": {
            "coarse": {"spacing": coarse_sp, "window": coarse_win[::-1]},
            "fine": {"spacing": fine_sp, "window": fine_win[::-1], "margin_mm": margin},
        },
        "why": {
            "clip": f"pancreas HU percentiles {CLIP_PERCENTILES[0]:g} and {CLIP_PERCENTILES[1]:g} (nnU-Net CT scheme)",
            "normalize": "one mapping for the whole dataset (clip range -> [-1, 1]), not per case",
            "fine.spacing": "median spacing; anisotropic data: the coarse axis at the 10th percentile",
            "fine.window": f"95th-percentile pancreas box + 2 x margin, multiples of {WINDOW_STEP}, at most 64^3 voxels; z, y, x",
            "coarse.spacing": f"two {COARSE_WINDOW}-voxel windows span the median scan; never finer than the fine stage",
            "coarse.window": f"{COARSE_WINDOW} per axis (paper), smaller if the median scan is; z, y, x",
            "fine.margin_mm": f"{DEFAULT_MARGIN_MM:g} mm (paper), at least 3 coarse voxels",
        },
    }


def make_plan(data: str, labels: str | None, cases: list[CaseRef], log: Callable[[str], None] = print) -> dict:
    fp = fingerprint(cases, log)
    return {
        "format": PLAN_FORMAT,
        "version": 1,
        "tool_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "data": data,
        "labels": labels,
        "pipeline": PLAN_PIPELINE,
        "fingerprint": fp,
        **derive_settings(fp),
    }


def read_plan(path: str | Path) -> dict:
    try:
        plan = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DatasetError(f"cannot read the plan {path}: {exc}") from None
    if not isinstance(plan, dict) or plan.get("format") != PLAN_FORMAT:
        raise DatasetError(f"{path} is not a plan written by 'python -m Training plan'")
    return plan


def apply_plan(args, plan: dict) -> list[str]:
    """``train --plan``: fill the options left unset (None) from the plan; returns what was taken.
    The stage settings apply when the plan was made for this pipeline and has this stage."""
    taken = []
    for key in ("clip", "normalize"):
        if getattr(args, key, None) is None:
            setattr(args, key, plan["preprocessing"][key])
            taken.append(key)
    stage = plan.get("stages", {}).get(args.stage) if getattr(args, "pipeline", PLAN_PIPELINE) == plan.get("pipeline") else None
    for key, value in (stage or {}).items():
        attr = key.replace("-", "_")
        if attr == "spacing" and hasattr(args, "spacing"):
            continue  # given on the command line (argparse leaves it out otherwise)
        if attr != "spacing" and getattr(args, attr, None) is not None:
            continue
        setattr(args, attr, value)
        taken.append(f"{args.stage}.{key}")
    return taken


def print_summary(plan: dict, out=None) -> None:
    out = out or sys.stdout
    fp = plan["fingerprint"]
    hu = fp["pancreas_hu"]["percentiles"]
    print(f"{fp['cases']} case(s); median spacing {fp['spacing_mm_xyz']['median']} mm, median size {fp['size_xyz']['median']}", file=out)
    print(f"pancreas: median {fp['pancreas_ml']['median']} mL, extent p95 {fp['pancreas_extent_mm_xyz']['p95']} mm (x, y, z); "
          f"HU p0.5 {hu['0.5']}, median {hu['50']}, p99.5 {hu['99.5']}", file=out)
    print(f"preprocessing: {json.dumps(plan['preprocessing'])}", file=out)
    for stage, s in plan["stages"].items():
        print(f"{stage}: {json.dumps(s)}", file=out)
