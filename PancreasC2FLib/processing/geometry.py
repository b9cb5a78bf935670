"""Geometry: the canonical array orientation, boxes, margins, Crop and DeCrop.

Networks always see arrays in one orientation (numpy z/y/x with x toward patient Left, y toward
Posterior, z toward Superior, i.e. LPS index order), whatever order the file stores. Going there
and back is only axis permutations and flips, so a result maps back onto the exact input grid.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

Box = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]  # ((z0, z1), (y0, y1), (x0, x1)), end exclusive


@dataclass(frozen=True)
class Orientation:
    """How the input's numpy array (k, j, i) maps to the canonical array (z, y, x).

    ``axes[p]`` is the input numpy axis that becomes canonical numpy axis ``p``;
    ``flip[p]`` says whether it is reversed.
    """

    axes: tuple[int, int, int]
    flip: tuple[bool, bool, bool]

    @staticmethod
    def of(image: sitk.Image) -> "Orientation":
        d = np.array(image.GetDirection(), float).reshape(3, 3)  # columns: physical dir of i, j, k
        # The index axis for each physical axis (L, P, S): the permutation closest to the matrix,
        # which stays well defined for oblique scans.
        best = max(itertools.permutations(range(3)), key=lambda perm: sum(abs(d[p, perm[p]]) for p in range(3)))
        axes, flip = [0, 0, 0], [False, False, False]
        for phys, index_axis in enumerate(best):
            canonical_np_axis = 2 - phys  # x (L) is the last numpy axis
            axes[canonical_np_axis] = 2 - index_axis
            flip[canonical_np_axis] = d[phys, index_axis] < 0
        return Orientation(tuple(axes), tuple(flip))

    def to_canonical(self, array: np.ndarray) -> np.ndarray:
        out = np.transpose(array, self.axes)
        for ax, f in enumerate(self.flip):
            if f:
                out = np.flip(out, ax)
        return out

    def from_canonical(self, array: np.ndarray) -> np.ndarray:
        out = array
        for ax, f in enumerate(self.flip):
            if f:
                out = np.flip(out, ax)
        return np.transpose(out, np.argsort(self.axes))

    def spacing_zyx(self, image: sitk.Image) -> tuple[float, float, float]:
        sp_np = image.GetSpacing()[::-1]  # numpy order (k, j, i)
        return tuple(float(sp_np[a]) for a in self.axes)

    def index_to_canonical(self, image: sitk.Image, ijk: np.ndarray) -> np.ndarray:
        """Continuous ITK index (i, j, k) -> canonical continuous index (z, y, x)."""
        kji = np.asarray(ijk, float)[::-1]
        shape_np = image.GetSize()[::-1]
        out = np.empty(3)
        for p, a in enumerate(self.axes):
            out[p] = (shape_np[a] - 1 - kji[a]) if self.flip[p] else kji[a]
        return out

    def canonical_to_index(self, image: sitk.Image, zyx: np.ndarray) -> np.ndarray:
        """Canonical continuous index (z, y, x) -> continuous ITK index (i, j, k)."""
        shape_np = image.GetSize()[::-1]
        kji = np.empty(3)
        for p, a in enumerate(self.axes):
            kji[a] = (shape_np[a] - 1 - zyx[p]) if self.flip[p] else zyx[p]
        return kji[::-1]


def canonical_shape(image: sitk.Image, orientation: Orientation) -> tuple[int, int, int]:
    shape_np = image.GetSize()[::-1]
    return tuple(int(shape_np[a]) for a in orientation.axes)


# --- boxes -----------------------------------------------------------------------------------

def mask_box(mask: np.ndarray) -> Box | None:
    """Smallest box covering every non-zero voxel, or None for an empty mask."""
    if not mask.any():
        return None
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        nz = np.flatnonzero(mask.any(axis=other))
        box.append((int(nz[0]), int(nz[-1]) + 1))
    return tuple(box)


def expand_box(box: Box, margin_mm: float | tuple[float, float, float], spacing_zyx, shape) -> Box:
    """Add a margin in millimetres on every side (Crop[X; P, m]) and clamp to the image."""
    margins = (margin_mm,) * 3 if np.isscalar(margin_mm) else margin_mm
    out = []
    for (lo, hi), m, sp, n in zip(box, margins, spacing_zyx, shape):
        pad = int(math.ceil(float(m) / float(sp) - 1e-9))
        out.append((max(0, lo - pad), min(int(n), hi + pad)))
    return tuple(out)


def clamp_box(box: Box, shape) -> Box:
    return tuple((max(0, lo), min(int(n), hi)) for (lo, hi), n in zip(box, shape))


def box_on_grid(box: Box, shape, grid_shape, pad: int = 0) -> Box:
    """``box`` of a grid of ``shape`` on another grid of ``grid_shape`` with the same extent (a
    resampled copy, voxel edges aligned as ``resample_array`` keeps them): the smallest covering
    box (outward rounding), grown by ``pad`` voxels and clamped."""
    return tuple((max(0, lo * m // n - pad), min(m, -(-hi * m // n) + pad)) for (lo, hi), n, m in zip(box, shape, grid_shape))


def box_is_empty(box: Box) -> bool:
    return any(hi <= lo for lo, hi in box)


def box_slices(box: Box) -> tuple[slice, slice, slice]:
    return tuple(slice(lo, hi) for lo, hi in box)


def box_shape(box: Box) -> tuple[int, int, int]:
    return tuple(hi - lo for lo, hi in box)


def crop(array: np.ndarray, box: Box) -> np.ndarray:
    return array[box_slices(box)]


def decrop(coarse: np.ndarray, fine: np.ndarray, box: Box) -> np.ndarray:
    """Eq. 5: the fine result replaces the coarse one inside the box (returns a new array)."""
    out = coarse.copy()
    out[box_slices(box)] = fine
    return out


def touches_box_border(mask: np.ndarray, box: Box, shape) -> dict:
    """Whether a mask reaches a face of the box that is not also the image border, and the image border."""
    inner = crop(mask, box)
    touches_box = False
    for axis, (lo, hi) in enumerate(box):
        first = np.take(inner, 0, axis=axis).any() if inner.shape[axis] else False
        last = np.take(inner, inner.shape[axis] - 1, axis=axis).any() if inner.shape[axis] else False
        touches_box |= bool(first and lo > 0) or bool(last and hi < shape[axis])
    touches_image = False
    for axis in range(3):
        touches_image |= bool(np.take(mask, 0, axis=axis).any() or np.take(mask, mask.shape[axis] - 1, axis=axis).any())
    return {"touches_box": touches_box, "touches_image_border": touches_image}


# --- boxes in physical space -----------------------------------------------------------------

def box_corners_physical(image: sitk.Image, orientation: Orientation, box: Box) -> np.ndarray:
    """The 8 corners (voxel edges, LPS mm) of a canonical box."""
    corners = []
    for z, y, x in itertools.product(*[(lo - 0.5, hi - 0.5) for lo, hi in box]):
        ijk = orientation.canonical_to_index(image, np.array([z, y, x]))
        corners.append(image.TransformContinuousIndexToPhysicalPoint([float(v) for v in ijk]))
    return np.array(corners)


def physical_points_to_box(image: sitk.Image, orientation: Orientation, points_lps: np.ndarray) -> Box:
    """Canonical voxel box whose voxel centres lie inside the axis-aligned hull of the points."""
    idx = np.array([orientation.index_to_canonical(image, np.array(image.TransformPhysicalPointToContinuousIndex([float(v) for v in p]))) for p in points_lps])
    lo = np.ceil(idx.min(axis=0) - 1e-6).astype(int)
    hi = np.floor(idx.max(axis=0) + 1e-6).astype(int) + 1
    return clamp_box(tuple((int(a), int(b)) for a, b in zip(lo, hi)), canonical_shape(image, orientation))


def box_to_ijk(image: sitk.Image, orientation: Orientation, box: Box) -> list[list[int]]:
    """The canonical box as ITK index ranges [[i0, i1], [j0, j1], [k0, k1]] (end exclusive)."""
    shape_np = image.GetSize()[::-1]
    out: list = [None, None, None]
    for p, a in enumerate(orientation.axes):
        lo, hi = box[p]
        if orientation.flip[p]:
            lo, hi = shape_np[a] - hi, shape_np[a] - lo
        out[2 - a] = [int(lo), int(hi)]
    return out
