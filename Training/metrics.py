"""Segmentation metrics beyond Dice for ``evaluate``: HD95, normalised surface distance (NSD) and
the volume error in mL, on the case's own voxel spacing.

Surface distances come from SimpleITK's Maurer distance transform (``SignedMaurerDistanceMap``) of
each mask's contour (``BinaryContour``), read at the other mask's contour voxels: the definitions of
MONAI's ``compute_hausdorff_distance(percentile=95)`` and ``compute_surface_dice`` (voxel surfaces,
no sub-voxel surfels). SimpleITK is already a dependency; MONAI would add a large package (and
scipy) for two functions, and the ``surface-distance`` copies on PyPI are unmaintained.

Undefined is never success: both masks empty gives NaN for HD95 and NSD; one empty gives an
infinite HD95 and NSD 0.
"""

from __future__ import annotations

import math

import numpy as np
import SimpleITK as sitk

NSD_TOLERANCE_MM = 2.0  # surface tolerance of NSD (a voxel or two of a portal-venous CT)


def _image(mask: np.ndarray, spacing_zyx) -> sitk.Image:
    img = sitk.GetImageFromArray(np.ascontiguousarray(mask, dtype=np.uint8))
    img.SetSpacing(tuple(float(s) for s in spacing_zyx[::-1]))
    return img


def _contour(mask: sitk.Image) -> sitk.Image:
    return sitk.BinaryContour(mask, fullyConnected=True, backgroundValue=0, foregroundValue=1)


def surface_distances(pred: np.ndarray, truth: np.ndarray, spacing_zyx) -> tuple[np.ndarray, np.ndarray]:
    """(distances in mm from each surface voxel of ``pred`` to the surface of ``truth``, and back)."""
    a, b = _contour(_image(pred > 0, spacing_zyx)), _contour(_image(truth > 0, spacing_zyx))

    def to_surface_of(surface: sitk.Image) -> np.ndarray:
        d = sitk.SignedMaurerDistanceMap(surface, insideIsPositive=False, squaredDistance=False, useImageSpacing=True)
        return np.maximum(sitk.GetArrayViewFromImage(d), 0.0)  # contour voxels themselves: 0

    sa, sb = sitk.GetArrayViewFromImage(a) > 0, sitk.GetArrayViewFromImage(b) > 0
    return to_surface_of(b)[sa], to_surface_of(a)[sb]


def case_metrics(prefix: str, pred: np.ndarray, truth: np.ndarray, spacing_zyx, tolerance_mm: float = NSD_TOLERANCE_MM) -> dict:
    """``{prefix}_hd95`` (mm), ``{prefix}_nsd`` (0-1 at ``tolerance_mm``), ``{prefix}_vol_ml`` and
    ``{prefix}_vol_err_ml`` (prediction - truth) of one case."""
    voxel_ml = float(np.prod(spacing_zyx)) / 1000.0
    vol, vol_truth = float(np.count_nonzero(pred)) * voxel_ml, float(np.count_nonzero(truth)) * voxel_ml
    out = {f"{prefix}_vol_ml": vol, f"{prefix}_vol_err_ml": vol - vol_truth}
    if not vol and not vol_truth:
        hd95, nsd = math.nan, math.nan
    elif not vol or not vol_truth:
        hd95, nsd = math.inf, 0.0
    else:
        da, db = surface_distances(pred, truth, spacing_zyx)
        hd95 = float(max(np.percentile(da, 95), np.percentile(db, 95)))
        nsd = float((np.count_nonzero(da <= tolerance_mm) + np.count_nonzero(db <= tolerance_mm)) / (len(da) + len(db)))
    out[f"{prefix}_hd95"], out[f"{prefix}_nsd"] = hd95, nsd
    return out


def summary_metrics(rows: list[dict], method: str) -> dict:
    """Means over the cases of one method (HD95 over the cases where it is finite, with their count)."""
    hd = np.array([r[f"{method}_hd95"] for r in rows if f"{method}_hd95" in r], float)
    nsd = np.array([r[f"{method}_nsd"] for r in rows if f"{method}_nsd" in r], float)
    err = np.array([r[f"{method}_vol_err_ml"] for r in rows if f"{method}_vol_err_ml" in r], float)
    if not len(hd):
        return {}
    finite = hd[np.isfinite(hd)]
    return {
        "mean_hd95_mm": float(finite.mean()) if len(finite) else math.nan,
        "hd95_cases": int(len(finite)),
        "mean_nsd": float(np.nanmean(nsd)) if np.isfinite(nsd).any() else math.nan,
        "mean_abs_vol_err_ml": float(np.abs(err).mean()),
    }


def markdown_surface_table(summary: list[dict], tolerance_mm: float = NSD_TOLERANCE_MM) -> str:
    lines = ["", f"| Method | Mean HD95 (mm) | Mean NSD at {tolerance_mm:g} mm | Mean abs. volume error (mL) |", "|---|---|---|---|"]
    for s in summary:
        if "mean_hd95_mm" in s:
            n = f" ({s['hd95_cases']} of {s['cases']} cases)" if s["hd95_cases"] != s["cases"] else ""
            lines.append(f"| {s['method']} | {s['mean_hd95_mm']:.2f}{n} | {100 * s['mean_nsd']:.2f}% | {s['mean_abs_vol_err_ml']:.2f} |")
    return "\n".join(lines) + "\n"
