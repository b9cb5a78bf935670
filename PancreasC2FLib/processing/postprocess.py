"""Post-processing and measurements on binary masks (uint8, canonical z/y/x)."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk


def component_sizes(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Connected components (26-connectivity) labelled by decreasing size, and their sizes."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(mask, dtype=np.uint8))
    labels = sitk.RelabelComponent(sitk.ConnectedComponent(img, True), sortByObjectSize=True)
    arr = sitk.GetArrayFromImage(labels)  # a copy: a view would outlive the image's buffer
    sizes = np.bincount(arr.ravel())[1:]
    return arr, sizes


def remove_small_components(mask: np.ndarray, min_fraction: float = 0.2) -> np.ndarray:
    """Drop components smaller than ``min_fraction`` of the total foreground (paper: 0.2).

    ``min_fraction = 0`` keeps everything; ``1`` keeps only the largest component.
    """
    mask = mask.astype(np.uint8, copy=False)
    total = int(mask.sum())
    if total == 0 or min_fraction <= 0:
        return mask.copy()
    labels, sizes = component_sizes(mask)
    # Components are numbered by decreasing size: keep labels 1..k (at least the largest).
    k = max(1, int(np.count_nonzero(sizes >= min_fraction * total)))
    return ((labels >= 1) & (labels <= k)).astype(np.uint8)


def keep_largest_component(mask: np.ndarray) -> np.ndarray:
    if not mask.any():
        return mask.astype(np.uint8)
    labels, _ = component_sizes(mask)
    return (labels == 1).astype(np.uint8)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice-Sørensen coefficient of two binary masks; 1.0 when both are empty."""
    a = a.astype(bool, copy=False)
    b = b.astype(bool, copy=False)
    denom = int(a.sum()) + int(b.sum())
    if denom == 0:
        return 1.0
    return 2.0 * int(np.logical_and(a, b).sum()) / denom


def mask_statistics(mask: np.ndarray, volume_hu: np.ndarray, spacing_zyx) -> dict:
    """Volume in mL and mean/std HU of the voxels inside the mask, on the grid given."""
    n = int(np.count_nonzero(mask))
    voxel_ml = float(np.prod(spacing_zyx)) / 1000.0
    stats = {"voxels": n, "volume_ml": round(n * voxel_ml, 3), "mean_hu": None, "std_hu": None}
    if n:
        values = volume_hu[mask.astype(bool)].astype(np.float64)
        stats["mean_hu"] = round(float(values.mean()), 2)
        stats["std_hu"] = round(float(values.std()), 2)
    return stats
