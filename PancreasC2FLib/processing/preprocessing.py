"""Intensity preprocessing and resampling shared by inference and training (one place, no drift).

The parameters live in a model bundle's metadata (``preprocessing`` section), e.g.::

    {"clip": [-100, 240], "normalize": "case_zscore"}      # the paper (Sec. 4.1)
    {"clip": [-100, 240], "normalize": "fixed"}            # maps the clip range to [-1, 1]
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

PAPER_PREPROCESSING = {"clip": [-100.0, 240.0], "normalize": "case_zscore"}


def normalization_stats(volume_hu: np.ndarray, params: dict) -> tuple[float, float]:
    """(offset, scale) so that normalized = (clip(x) - offset) / scale.

    Computed once per case on the whole volume, then reused for every crop and window, so the
    coarse and fine stages (and training windows) see the same normalisation.
    """
    lo, hi = (float(v) for v in params.get("clip", PAPER_PREPROCESSING["clip"]))
    mode = params.get("normalize", "case_zscore")
    if mode == "fixed":
        return (lo + hi) / 2.0, max((hi - lo) / 2.0, 1e-6)
    if mode != "case_zscore":
        raise ValueError(f"unknown normalization {mode!r}")
    # Subsample large volumes: mean/std of 1/8 of the voxels is the same to 3 digits.
    sample = volume_hu[::2, ::2, ::2] if volume_hu.size > 8_000_000 else volume_hu
    clipped = np.clip(sample, lo, hi, dtype=np.float32) if sample.dtype == np.float32 else np.clip(sample.astype(np.float32), lo, hi)
    mean = float(clipped.mean(dtype=np.float64))
    std = float(clipped.std(dtype=np.float64))
    return mean, max(std, 1e-6)


def normalize(volume_hu: np.ndarray, params: dict, stats: tuple[float, float] | None = None) -> np.ndarray:
    """Clip to the HU window and normalise; returns float32 (never a float64 copy)."""
    lo, hi = (float(v) for v in params.get("clip", PAPER_PREPROCESSING["clip"]))
    offset, scale = stats if stats is not None else normalization_stats(volume_hu, params)
    out = np.clip(volume_hu.astype(np.float32, copy=True), lo, hi)
    out -= np.float32(offset)
    out /= np.float32(scale)
    return out


def resampled_shape(shape: tuple[int, ...], spacing: tuple[float, ...], target: tuple[float, ...]) -> tuple[int, int, int]:
    """Grid size that keeps the physical extent when going from ``spacing`` to ``target``."""
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target))


def resample_array(array: np.ndarray, shape: tuple[int, int, int], mode: str = "trilinear") -> np.ndarray:
    """Resample a 3D array to ``shape`` keeping the physical extent (voxel edges aligned).

    ``mode`` is "trilinear" for intensities and probabilities, "nearest" for labels. Labels are
    kept uint8 so a full-resolution mask costs one byte per voxel.
    """
    if tuple(array.shape) == tuple(shape):
        return array
    if mode == "nearest":
        src = torch.from_numpy(np.ascontiguousarray(array, dtype=np.uint8))[None, None]
        out = F.interpolate(src, size=shape, mode="nearest-exact")
        return out[0, 0].numpy()
    src = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
    out = F.interpolate(src, size=shape, mode="trilinear", align_corners=False)
    return out[0, 0].numpy()
