"""Tests of the PNG overlay renderer (PancreasC2FLib.apps.overlay)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from PancreasC2FLib.apps.overlay import render_overlay, save_case_grid, save_png, window_to_uint8
from PancreasC2FLib.synthetic import generate_small_case

YELLOW = (255, 220, 0)


def _phantom(direction: tuple[float, ...], spacing=(1.0, 1.0, 1.0), size=(40, 30, 20)):
    """A 0 HU box with a bright cube and a mask cube, both on the patient's LEFT (+x in LPS)."""
    img = sitk.Image(list(size), sitk.sitkInt16)
    img.SetSpacing(spacing)
    img.SetDirection(direction)
    # centre the volume at the physical origin whatever the direction
    d = np.array(direction).reshape(3, 3)
    img.SetOrigin(tuple(-d @ ((np.array(size) - 1) / 2 * np.array(spacing))))
    mask = sitk.Image(list(size), sitk.sitkUInt8)
    mask.CopyInformation(img)
    k, j, i = np.indices(size[::-1])
    pts = np.stack([i, j, k], -1) * np.array(spacing) @ d.T + np.array(img.GetOrigin())
    x, y, z = pts[..., 0], pts[..., 1], pts[..., 2]
    m = ((x >= 6) & (x <= 14) & (np.abs(y) <= 4) & (np.abs(z) <= 4)).astype(np.uint8)
    a = m.astype(np.int16) * 300
    out = sitk.GetImageFromArray(a)
    out.CopyInformation(img)
    lab = sitk.GetImageFromArray(m)
    lab.CopyInformation(img)
    return out, lab


def test_window_to_uint8() -> None:
    v = window_to_uint8(np.array([-1000, -160, 40, 240, 3000]), (40, 400))
    assert v.dtype == np.uint8
    assert v.tolist() == [0, 0, 128, 255, 255]


def test_render_shape_and_outline_colour() -> None:
    case = generate_small_case(0)
    rgb = render_overlay(case.image, [(case.label, YELLOW)])
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
    # 2 mm isotropic 96 x 96 x 64: axial 96 x 96, coronal and sagittal 64 x 96, gaps of 4
    assert rgb.shape == (96, 96 * 3 + 2 * 4, 3)
    outline = np.all(rgb == YELLOW, axis=2)
    assert outline.sum() > 20
    for x0 in (0, 100, 200):  # every panel shows the mask
        assert outline[:, x0: x0 + 96].any()
    # outline pixels sit on the mask boundary: the axial panel outline is within the mask slice
    lab = sitk.GetArrayFromImage(sitk.DICOMOrient(case.label, "LPS"))
    k = int(round(np.argwhere(lab > 0)[:, 0].mean()))
    assert lab[k][outline[:, :96]].mean() > 0.9


def test_physical_aspect_ratio() -> None:
    img, lab = _phantom((1, 0, 0, 0, 1, 0, 0, 0, 1), spacing=(1.0, 1.0, 3.0))
    rgb = render_overlay(img, [(lab, YELLOW)], views=("coronal",), pixel_mm=1.0)
    assert rgb.shape[:2] == (20 * 3, 40)  # rows = z extent in mm, columns = x extent


@pytest.mark.parametrize("direction", [(1, 0, 0, 0, 1, 0, 0, 0, 1), (-1, 0, 0, 0, -1, 0, 0, 0, 1)])
def test_radiological_convention(direction: tuple[float, ...]) -> None:
    """Patient left appears on the image right, whether the volume is stored LPS or RAS."""
    img, lab = _phantom(direction)
    for view in ("axial", "coronal"):
        rgb = render_overlay(img, [(lab, YELLOW)], views=(view,), window=(0, 400))
        cols = np.nonzero(np.all(rgb == YELLOW, axis=2).any(axis=0))[0]
        assert cols.size and cols.min() > rgb.shape[1] / 2, view


def test_center_index_and_empty_mask() -> None:
    img, lab = _phantom((1, 0, 0, 0, 1, 0, 0, 0, 1))
    empty = sitk.Image(lab.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(lab)
    rgb = render_overlay(img, [(empty, YELLOW)], center_xyz_index=(5, 5, 5))
    assert not np.all(rgb == YELLOW, axis=2).any()


def test_save_png_roundtrip(tmp_path: Path) -> None:
    rgb = np.zeros((10, 20, 3), np.uint8)
    rgb[2:5, 3:9] = YELLOW
    path = tmp_path / "sub" / "x.png"
    save_png(path, rgb)
    back = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    assert back.shape == rgb.shape and np.array_equal(back, rgb)


def test_save_case_grid(tmp_path: Path) -> None:
    cases = [generate_small_case(s) for s in (0, 1, 2)]
    path = tmp_path / "grid.png"
    save_case_grid(path, cases, tile=(120, 120))
    back = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    assert back.ndim == 3 and back.shape[2] == 3
    assert back.shape[0] == 2 * 120 + 6 and back.shape[1] == 2 * (2 * 120 + 2) + 6
