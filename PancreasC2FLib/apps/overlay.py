"""PNG views of a CT volume with segmentation outlines (no matplotlib: SimpleITK writes the PNG).

Also the example grid of synthetic cases (``python -m PancreasC2FLib.apps.overlay [grid.png]``).

Panels are axial | coronal | sagittal through one point, each resampled to square pixels so the
physical aspect ratio is right, in the radiological convention: the volume is first reoriented to
LPS, so the patient's left is on the image right (axial, coronal), anterior is up (axial) or left
(sagittal) and superior is up (coronal, sagittal).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from ..synthetic import EXAMPLE_GRID_CASES, generate_case

__all__ = ["render_overlay", "save_png", "save_case_grid", "window_to_uint8", "write_example_grid"]

Color = tuple[int, int, int]
DEFAULT_COLORS: tuple[Color, ...] = ((255, 220, 0), (0, 200, 255), (255, 60, 60), (60, 255, 60))


def window_to_uint8(a: np.ndarray, window: tuple[float, float] = (40, 400)) -> np.ndarray:
    """Map HU to 0..255 with a (level, width) window."""
    level, width = window
    lo = level - width / 2.0
    return (np.clip((a.astype(np.float32) - lo) / float(width), 0.0, 1.0) * 255.0 + 0.5).astype(
        np.uint8)


def _to_square_pixels(a: np.ndarray, row_mm: float, col_mm: float, pixel_mm: float,
                      nearest: bool) -> np.ndarray:
    """Resample a 2D array (rows, cols) with the given pixel sizes to ``pixel_mm`` square pixels."""
    img = sitk.GetImageFromArray(a.astype(np.float32))
    img.SetSpacing((col_mm, row_mm))
    size = [max(1, int(round(a.shape[1] * col_mm / pixel_mm))),
            max(1, int(round(a.shape[0] * row_mm / pixel_mm)))]
    # keep the first and last pixel edges of both grids aligned
    origin = (-0.5 * col_mm + 0.5 * a.shape[1] * col_mm / size[0],
              -0.5 * row_mm + 0.5 * a.shape[0] * row_mm / size[1])
    spacing = (a.shape[1] * col_mm / size[0], a.shape[0] * row_mm / size[1])
    interp = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
    out = sitk.Resample(img, size, sitk.Transform(), interp, origin, spacing, (1.0, 0.0, 0.0, 1.0),
                        0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out)


def _outline(mask: np.ndarray, thickness: int = 1) -> np.ndarray:
    """Boundary pixels of a 2D mask (pixels with a 4-neighbour outside the mask)."""
    inner = mask.copy()
    for _ in range(thickness):
        e = inner.copy()
        e[1:] &= inner[:-1]
        e[:-1] &= inner[1:]
        e[:, 1:] &= inner[:, :-1]
        e[:, :-1] &= inner[:, 1:]
        e[0] = e[-1] = False
        e[:, 0] = e[:, -1] = False
        inner = e
    return mask & ~inner


def _on_grid(mask: sitk.Image, ref: sitk.Image) -> sitk.Image:
    same = (mask.GetSize() == ref.GetSize()
            and np.allclose(mask.GetSpacing(), ref.GetSpacing())
            and np.allclose(mask.GetOrigin(), ref.GetOrigin())
            and np.allclose(mask.GetDirection(), ref.GetDirection()))
    if same:
        return mask
    return sitk.Resample(mask, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                         mask.GetPixelID())


def render_overlay(image: sitk.Image, masks: Sequence[tuple[sitk.Image, Color]] = (),
                   center_xyz_index: tuple[int, int, int] | None = None,
                   window: tuple[float, float] = (40, 400), *, pixel_mm: float | None = None,
                   views: Sequence[str] = ("axial", "coronal", "sagittal"),
                   thickness: int = 1, gap: int = 4) -> np.ndarray:
    """RGB uint8 (H, W, 3) panels through one point, each mask drawn as a coloured outline.

    center_xyz_index: an (x, y, z) index of ``image``; None = centroid of the first non-empty
        mask (the image centre if none).
    window: (level, width) in HU.
    pixel_mm: display pixel size; None = the finest spacing of the image.
    views: panels to draw, left to right, from "axial", "coronal", "sagittal".
    """
    if image.GetDimension() != 3:
        raise ValueError("render_overlay expects a 3D image")
    # the centre as a physical point first, so that it survives the reorientation
    if center_xyz_index is not None:
        center_pt = image.TransformContinuousIndexToPhysicalPoint(
            [float(v) for v in center_xyz_index])
    else:
        center_pt = None
        for m, _ in masks:
            mm = _on_grid(m, image)
            idx = np.argwhere(sitk.GetArrayViewFromImage(mm) > 0)
            if idx.size:
                c = idx.mean(axis=0)[::-1]
                center_pt = image.TransformContinuousIndexToPhysicalPoint([float(v) for v in c])
                break
        if center_pt is None:
            c = (np.asarray(image.GetSize()) - 1) / 2.0
            center_pt = image.TransformContinuousIndexToPhysicalPoint([float(v) for v in c])

    img = sitk.DICOMOrient(image, "LPS")
    arr = sitk.GetArrayFromImage(img)  # z (S+), y (P+), x (L+)
    mask_arrs = [(sitk.GetArrayFromImage(sitk.DICOMOrient(_on_grid(m, image), "LPS")) > 0,
                  tuple(int(v) for v in col)) for m, col in masks]
    sx, sy, sz = img.GetSpacing()
    cidx = img.TransformPhysicalPointToContinuousIndex(center_pt)
    i, j, k = (int(np.clip(round(c), 0, n - 1)) for c, n in zip(cidx, img.GetSize()))
    pix = pixel_mm or float(min(sx, sy, sz))

    def cut(a: np.ndarray, view: str) -> tuple[np.ndarray, float, float]:
        if view == "axial":  # rows anterior -> posterior, columns right -> left
            return a[k], sy, sx
        if view == "coronal":  # rows superior -> inferior
            return a[::-1, j, :], sz, sx
        if view == "sagittal":  # rows superior -> inferior, columns anterior -> posterior
            return a[::-1, :, i], sz, sy
        raise ValueError(f"unknown view {view!r}")

    panels = []
    for view in views:
        sl, rmm, cmm = cut(arr, view)
        gray = window_to_uint8(_to_square_pixels(sl, rmm, cmm, pix, nearest=False), window)
        rgb = np.repeat(gray[..., None], 3, axis=2)
        for m, col in mask_arrs:
            ms, _, _ = cut(m, view)
            sq = _to_square_pixels(ms.astype(np.float32), rmm, cmm, pix, nearest=False) >= 0.5
            rgb[_outline(sq, thickness)] = col
        panels.append(rgb)
    return _hstack(panels, gap)


def _hstack(panels: Sequence[np.ndarray], gap: int = 4) -> np.ndarray:
    h = max(p.shape[0] for p in panels)
    cols = []
    for n, pnl in enumerate(panels):
        pad = np.zeros((h, pnl.shape[1], 3), np.uint8)
        top = (h - pnl.shape[0]) // 2
        pad[top: top + pnl.shape[0]] = pnl
        cols.append(pad)
        if gap and n < len(panels) - 1:
            cols.append(np.zeros((h, gap, 3), np.uint8))
    return np.concatenate(cols, axis=1)


def save_png(path: str | Path, rgb: np.ndarray) -> None:
    """Write an (H, W, 3) uint8 array (or (H, W) grayscale) as PNG."""
    a = np.ascontiguousarray(rgb)
    if a.dtype != np.uint8:
        raise ValueError(f"expected uint8, got {a.dtype}")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(a, isVector=a.ndim == 3)
    sitk.WriteImage(img, str(path))


def save_case_grid(path: str | Path, cases: Sequence[Any], *, columns: int = 2,
                   pixel_mm: float = 2.0, tile: tuple[int, int] = (220, 220),
                   color: Color = DEFAULT_COLORS[0], window: tuple[float, float] = (40, 400)) -> None:
    """Grid of cases (anything with ``.image`` and ``.label``): axial | coronal through the
    pancreas centroid, pancreas outlined. Tiles are padded/cropped to ``tile`` (h, w) per view."""
    tiles = []
    for case in cases:
        views = []
        for view in ("axial", "coronal"):
            p = render_overlay(case.image, [(case.label, color)], window=window,
                               pixel_mm=pixel_mm, views=(view,))
            views.append(_fit(p, tile))
        tiles.append(_hstack(views, gap=2))
    rows = []
    for r in range(0, len(tiles), columns):
        row = tiles[r: r + columns]
        while len(row) < columns:
            row.append(np.zeros_like(tiles[0]))
        rows.append(_hstack(row, gap=6))
    sep = np.zeros((6, rows[0].shape[1], 3), np.uint8)
    grid = np.concatenate([x for r in rows for x in (r, sep)][:-1], axis=0)
    save_png(path, grid)


def _fit(p: np.ndarray, tile: tuple[int, int]) -> np.ndarray:
    """Centre-crop or pad a panel to (h, w)."""
    h, w = tile
    out = np.zeros((h, w, 3), np.uint8)
    sh, sw = p.shape[:2]
    y0, x0 = max(0, (sh - h) // 2), max(0, (sw - w) // 2)
    crop = p[y0: y0 + h, x0: x0 + w]
    oy, ox = (h - crop.shape[0]) // 2, (w - crop.shape[1]) // 2
    out[oy: oy + crop.shape[0], ox: ox + crop.shape[1]] = crop
    return out


def write_example_grid(path: str | Path,
                       cases: tuple[dict[str, Any], ...] = EXAMPLE_GRID_CASES) -> list[dict[str, Any]]:
    """Generate the example cases and save their axial | coronal grid (pancreas outlined) as PNG.

    Returns the parameters of each case, in grid order (left to right, top to bottom)."""
    made = [generate_case(c["seed"], **{k: v for k, v in c.items() if k != "seed"})
            for c in cases]
    save_case_grid(path, made)
    return [m.params for m in made]


if __name__ == "__main__":  # python -m PancreasC2FLib.apps.overlay [grid.png]
    import sys

    out = sys.argv[1] if len(sys.argv) > 1 else "synthetic_grid.png"
    for prm in write_example_grid(out):
        print(prm["seed"], prm["anatomy"], prm["phase"], prm["orientation"],
              [round(v, 3) for v in prm["spacing"]], prm["size"])
