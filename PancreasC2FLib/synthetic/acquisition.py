"""Synthetic CT, the acquisition: output grids (spacing, size, orientation, field of view),
resampling and interpolation, smooth random fields, the PSF's effect on noise, and the label on
the output grid."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch

from .anatomy import PANCREAS_LABEL_ID, _bbox, _index_to_physical

ORIENTATIONS = ("LPS", "RAS", "oblique")
_WORK_SPACING = 1.5  # mm; the label maps' own grid, fine enough for the PSF that follows


def _rot(axis: int, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    i, j = [a for a in range(3) if a != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int, int],
                  spacing_mm: float | np.ndarray, sigma_mm: float) -> np.ndarray:
    """Unit-variance smooth Gaussian random field (z, y, x float32) on a grid of ``shape`` with
    ``spacing_mm`` (x, y, z or one value).

    Smooth fields are drawn on a grid ~sigma/2 coarse and interpolated: same look, far cheaper.
    """
    sp = np.broadcast_to(np.asarray(spacing_mm, float), (3,))[::-1]  # z, y, x
    step = tuple(max(1, int(sigma_mm / (2.0 * v))) for v in sp)
    small = tuple(-(-n // k) + 2 for n, k in zip(shape, step))
    img = sitk.GetImageFromArray(rng.standard_normal(small, dtype=np.float32))
    img.SetSpacing([float(v * k) for v, k in zip(sp, step)][::-1])
    a = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(img, sigma_mm))
    if max(step) > 1:
        a = _interp(a[None], step, shape)[0]
    else:
        a = a[: shape[0], : shape[1], : shape[2]]
    a = np.ascontiguousarray(a)
    a -= a.mean()
    a /= a.ravel()[::3].std() + 1e-6
    return a


def _interp(channels: np.ndarray, factor: int | tuple[int, int, int],
            shape: tuple[int, int, int]) -> np.ndarray:
    """Trilinear upsampling of (C, z, y, x) by integer factor(s), cropped to ``shape``.

    Voxel k of the input is centred on output index factor * k + (factor - 1) / 2 (half-voxel
    aligned grids), the convention of ``torch.nn.functional.interpolate(align_corners=False)``.
    """
    x = torch.from_numpy(np.ascontiguousarray(channels, dtype=np.float32))[None]
    with torch.inference_mode():
        f = tuple(float(v) for v in np.broadcast_to(factor, (3,)))
        y = torch.nn.functional.interpolate(x, scale_factor=f, mode="trilinear",
                                            align_corners=False)
    return y[0, :, : shape[0], : shape[1], : shape[2]].numpy()


def _upsample2_box(a: np.ndarray, box: tuple[slice, ...]) -> np.ndarray:
    """``_interp(a[None], 2, full)[0][box]`` computed only around the box."""
    lo = [max(0, sl.start // 2 - 1) for sl in box]
    hi = [min(n, (sl.stop - 1) // 2 + 2) for sl, n in zip(box, a.shape)]
    sub = a[lo[0]: hi[0], lo[1]: hi[1], lo[2]: hi[2]]
    stop = tuple(sl.stop - 2 * l for sl, l in zip(box, lo))
    up = _interp(sub[None], 2, stop)[0]
    return up[tuple(slice(sl.start - 2 * l, sl.stop - 2 * l) for sl, l in zip(box, lo))]


def _gauss_noise_gain(sigma_vox: float) -> float:
    """Std of white noise after a sampled 1D Gaussian of ``sigma_vox`` voxels."""
    if sigma_vox < 0.2:
        return 1.0
    x = np.arange(-int(4 * sigma_vox) - 1, int(4 * sigma_vox) + 2)
    k = np.exp(-0.5 * (x / sigma_vox) ** 2)
    k /= k.sum()
    return float(np.sqrt((k**2).sum()))


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------
@dataclass
class _Grid:
    size: tuple[int, int, int]        # x, y, z
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray              # 3x3, columns = axis directions

    def image(self, pixel: int = sitk.sitkUInt8, size: tuple[int, ...] | None = None) -> sitk.Image:
        """An image on this grid (``size=(1, 1, 1)`` for a cheap geometry probe)."""
        img = sitk.Image([int(s) for s in (size or self.size)], pixel)
        img.SetSpacing([float(s) for s in self.spacing])
        img.SetOrigin([float(o) for o in self.origin])
        img.SetDirection([float(v) for v in self.direction.ravel()])
        return img

    def xy(self) -> tuple[np.ndarray, np.ndarray]:
        """Physical x, y of every (row, column); valid because directions only rotate about z."""
        j, i = np.mgrid[0: self.size[1], 0: self.size[0]].astype(np.float32)
        d = self.direction
        x = self.origin[0] + d[0, 0] * i * self.spacing[0] + d[0, 1] * j * self.spacing[1]
        y = self.origin[1] + d[1, 0] * i * self.spacing[0] + d[1, 1] * j * self.spacing[1]
        return x.astype(np.float32), y.astype(np.float32)

    def stamp(self, img: sitk.Image) -> None:
        """Give ``img`` (already of this size) this grid's geometry."""
        img.SetSpacing([float(s) for s in self.spacing])
        img.SetOrigin([float(o) for o in self.origin])
        img.SetDirection([float(v) for v in self.direction.ravel()])

    def resample(self, img: sitk.Image, transform: sitk.Transform, interp: int,
                 default: float, pixel: int | None = None) -> sitk.Image:
        """Resample onto this grid without allocating a reference image."""
        f = sitk.ResampleImageFilter()
        f.SetSize([int(s) for s in self.size])
        f.SetOutputSpacing([float(s) for s in self.spacing])
        f.SetOutputOrigin([float(o) for o in self.origin])
        f.SetOutputDirection([float(v) for v in self.direction.ravel()])
        f.SetTransform(transform)
        f.SetInterpolator(interp)
        f.SetDefaultPixelValue(default)
        if pixel is not None:
            f.SetOutputPixelType(pixel)
        return f.Execute(img)


def _centred_grid(center: np.ndarray, size: np.ndarray, spacing: np.ndarray,
                  direction: np.ndarray) -> _Grid:
    origin = center - direction @ ((size - 1) / 2.0 * spacing)
    return _Grid(tuple(int(s) for s in size), tuple(float(s) for s in spacing),
                 tuple(float(o) for o in origin), direction)


def _fit_center(center: np.ndarray, extent: np.ndarray, direction: np.ndarray,
                points: np.ndarray) -> np.ndarray:
    """Shift the FOV centre (least possible) so that ``points`` lie inside the FOV."""
    u = (points - center) @ direction  # coordinates along the FOV axes
    lo, hi = u.min(axis=0), u.max(axis=0)
    half = extent / 2.0
    shift = np.zeros(3)
    for a in range(3):
        a_lo, a_hi = hi[a] - half[a], lo[a] + half[a]
        shift[a] = np.clip(0.0, a_lo, a_hi) if a_lo <= a_hi else (lo[a] + hi[a]) / 2.0
    return center + direction @ shift


def _label_on_grid(panc: np.ndarray, work: _Grid, out_grid: _Grid) -> sitk.Image:
    """0.5 iso-contour of the linearly resampled work-grid pancreas, computed in its bounding box."""
    lab = np.zeros(tuple(out_grid.size[::-1]), np.uint8)
    box = _bbox(panc, margin=2)
    if box is not None:
        w_img = sitk.GetImageFromArray(panc[box].astype(np.float32))
        w_img.SetSpacing(work.spacing)
        w_img.SetDirection([float(v) for v in work.direction.ravel()])
        start = [box[2].start, box[1].start, box[0].start]
        w_full = work.image(size=(1, 1, 1))
        w_img.SetOrigin(w_full.TransformIndexToPhysicalPoint([int(s) for s in start]))
        o_full = out_grid.image(size=(1, 1, 1))
        stop = [box[2].stop - 1, box[1].stop - 1, box[0].stop - 1]
        corners = np.array([[a, b, c] for a in (start[0], stop[0]) for b in (start[1], stop[1])
                            for c in (start[2], stop[2])], float)
        phys = _index_to_physical(w_full, corners)
        idx = np.array([o_full.TransformPhysicalPointToContinuousIndex(tuple(map(float, q)))
                        for q in phys])
        lo = np.clip(np.floor(idx.min(axis=0)).astype(int) - 1, 0, None)
        hi = np.minimum(np.ceil(idx.max(axis=0)).astype(int) + 2, np.asarray(out_grid.size))
        if np.all(hi > lo):
            crop = sitk.Image([int(v) for v in hi - lo], sitk.sitkFloat32)
            crop.SetSpacing(out_grid.spacing)
            crop.SetDirection(o_full.GetDirection())
            crop.SetOrigin(o_full.TransformIndexToPhysicalPoint([int(v) for v in lo]))
            r = sitk.Resample(w_img, crop, sitk.Transform(), sitk.sitkLinear, 0.0)
            sub = (sitk.GetArrayFromImage(r) >= 0.5).astype(np.uint8) * PANCREAS_LABEL_ID
            lab[lo[2]: hi[2], lo[1]: hi[1], lo[0]: hi[0]] = sub
    return sitk.GetImageFromArray(lab)
