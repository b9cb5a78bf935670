"""Geometry: boxes, margins, Crop/DeCrop (Eq. 5), islands, DSC, canonical orientation on every
kind of grid (the result lands on the exact input grid), and Slicer ROI files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

import c2f_testutils as tu
from PancreasC2FLib.io.bundle import load_bundle
from PancreasC2FLib.errors import InputError
from PancreasC2FLib.processing.geometry import Orientation, box_corners_physical, box_to_ijk, canonical_shape, crop, decrop, expand_box, mask_box, touches_box_border
from PancreasC2FLib.pipelines import create_pipeline
from PancreasC2FLib.processing.postprocess import dice, keep_largest_component, mask_statistics, remove_small_components
from PancreasC2FLib.io.roi import box_to_roi_dict, read_roi, roi_to_box, write_roi

# --- boxes, margins, Crop / DeCrop ---------------------------------------------------------------


def test_mask_box():
    m = np.zeros((10, 12, 14), np.uint8)
    assert mask_box(m) is None
    m[2:5, 3, 7:10] = 1
    m[8, 11, 13] = 1
    assert mask_box(m) == ((2, 9), (3, 12), (7, 14))


def test_margin_in_mm_with_anisotropic_spacing_and_clamping():
    box = ((10, 20), (30, 40), (30, 40))
    spacing = (2.5, 0.7, 0.8)  # z, y, x mm
    out = expand_box(box, 10.0, spacing, (100, 200, 200))
    # ceil(10 / 2.5) = 4, ceil(10 / 0.7) = 15, ceil(10 / 0.8) = 13: at least 10 mm on every side
    assert out == ((6, 24), (15, 55), (17, 53))
    # clamped to the image
    assert expand_box(((1, 3), (0, 5), (95, 99)), 10.0, (1, 1, 1), (10, 100, 100)) == ((0, 10), (0, 15), (85, 100))
    # a per-axis margin
    assert expand_box(box, (5.0, 0.0, 1.6), spacing, (100, 200, 200)) == ((8, 22), (30, 40), (28, 42))
    # exact multiples are not rounded up by float noise
    assert expand_box(((10, 11),) * 3, 3.0, (0.1 * 3, 1.0, 1.5), (50, 50, 50)) == ((0, 21), (7, 14), (8, 13))


def test_crop_decrop_round_trip_eq5():
    rng = np.random.default_rng(0)
    coarse = (rng.random((20, 30, 40)) > 0.7).astype(np.uint8)
    box = ((3, 15), (5, 25), (10, 33))
    assert crop(coarse, box).shape == (12, 20, 23)
    np.testing.assert_array_equal(decrop(coarse, crop(coarse, box), box), coarse)
    fine = np.zeros((12, 20, 23), np.uint8)
    fine[4:8, 4:8, 4:8] = 1
    out = decrop(coarse, fine, box)
    np.testing.assert_array_equal(crop(out, box), fine)  # the fine result replaces P^C inside
    outside = np.ones(coarse.shape, bool)
    outside[3:15, 5:25, 10:33] = False
    np.testing.assert_array_equal(out[outside], coarse[outside])  # P^C is kept outside
    assert out is not coarse and not np.shares_memory(out, coarse)  # a new array: P^C untouched


def test_small_island_removal_fraction():
    m = np.zeros((30, 30, 30), np.uint8)
    m[0:5, 0:5, 0:4] = 1  # 100 voxels
    m[10:13, 10:20, 10:11] = 1  # 30 voxels (30 / 140 = 0.21: kept)
    m[20:22, 20:25, 20:21] = 1  # 10 voxels (0.07: dropped)
    m[28, 28, 28] = 1  # 1 voxel
    out = remove_small_components(m, 0.2)
    assert out.sum() == 130 and out[0, 0, 0] and out[11, 15, 10] and not out[21, 22, 20] and not out[28, 28, 28]
    assert remove_small_components(m, 0).sum() == m.sum()
    assert remove_small_components(m, 1.0).sum() == 100
    assert keep_largest_component(m).sum() == 100
    # 26-connectivity: diagonal neighbours are one component
    d = np.zeros((5, 5, 5), np.uint8)
    d[1, 1, 1] = d[2, 2, 2] = d[3, 3, 3] = 1
    assert remove_small_components(d, 0.9).sum() == 3
    assert remove_small_components(np.zeros((4, 4, 4), np.uint8)).sum() == 0


def test_dice_values():
    a = np.zeros((10, 10, 10), bool)
    b = np.zeros((10, 10, 10), bool)
    assert dice(a, b) == 1.0
    a[:5] = True
    assert dice(a, b) == 0.0
    assert dice(a, a) == 1.0
    b[:5, :5] = True  # half of a
    assert dice(a, b) == pytest.approx(2 * 250 / (500 + 250))


def test_statistics_and_border_flags():
    m = np.zeros((10, 10, 10), np.uint8)
    m[2:4, 2:4, 2:4] = 1
    hu = np.full(m.shape, 40.0)
    hu[m > 0] = 100.0
    s = mask_statistics(m, hu, (2.0, 1.0, 0.5))
    assert s == {"voxels": 8, "volume_ml": 0.008, "mean_hu": 100.0, "std_hu": 0.0}
    flags = touches_box_border(m, ((2, 6), (0, 10), (0, 10)), m.shape)
    assert flags == {"touches_box": True, "touches_image_border": False}
    assert touches_box_border(m, ((1, 6), (1, 6), (1, 6)), m.shape)["touches_box"] is False
    m[0, 5, 5] = 1
    assert touches_box_border(m, ((0, 10),) * 3, m.shape) == {"touches_box": False, "touches_image_border": True}


# --- canonical orientation: results on the exact input grid ---------------------------------------

GRIDS = {
    "LPS": {},
    "RAS": {"flips": (True, True, False)},
    "LPI (flipped slices)": {"flips": (False, False, True)},
    "permuted (sagittal storage)": {"axes": (1, 2, 0), "flips": (False, True, False)},
    "permuted + flipped": {"axes": (2, 0, 1), "flips": (True, False, True)},
    "anisotropic": {"spacing_xyz": (0.7, 0.9, 2.5)},
    "oblique 20 deg": {"rotation_deg": 20.0},
    "oblique RAS 35 deg": {"rotation_deg": 35.0, "flips": (True, True, False)},
    "far origin": {"origin": (1234.5, -987.25, 55.125)},
}


def _grid(kwargs):
    kwargs = dict(kwargs)
    spacing = kwargs.pop("spacing_xyz", (2.0, 2.0, 2.0))
    return spacing, kwargs


@pytest.mark.parametrize("name", list(GRIDS))
def test_orientation_round_trip(name):
    spacing, grid = _grid(GRIDS[name])
    hu, _ = tu.phantom_arrays()
    img = tu.image_from_canonical(hu, spacing, **grid)
    o = Orientation.of(img)
    arr = sitk.GetArrayViewFromImage(img)
    canon = o.to_canonical(arr)
    np.testing.assert_array_equal(canon, hu)  # every storage maps to the same canonical array
    np.testing.assert_array_equal(o.from_canonical(canon), arr)
    assert canonical_shape(img, o) == hu.shape
    assert o.spacing_zyx(img) == pytest.approx(tuple(spacing[::-1]))
    # continuous index round trip
    p = np.array([3.25, 7.5, 11.0])
    np.testing.assert_allclose(o.index_to_canonical(img, o.canonical_to_index(img, p)), p)


@pytest.mark.parametrize("name", list(GRIDS))
def test_result_lands_on_the_input_grid(name, forced_bundle):
    spacing, grid = _grid(GRIDS[name])
    image, label = tu.phantom_case(spacing_xyz=spacing, **grid)
    pipe = create_pipeline(load_bundle(forced_bundle), device="cpu")
    result = pipe.run(image)
    out = result.label
    assert out.GetSize() == image.GetSize()
    assert out.GetSpacing() == image.GetSpacing()
    assert out.GetOrigin() == image.GetOrigin()
    assert out.GetDirection() == image.GetDirection()
    assert out.GetPixelID() == sitk.sitkUInt8
    # The mask lands on the same physical voxels as the reference (the stub finds it exactly).
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(out), sitk.GetArrayViewFromImage(label))
    # ... and the stray in-band island was removed (fraction 0.2)
    assert result.statistics["voxels"] == int(sitk.GetArrayViewFromImage(label).sum())


def test_same_physical_mask_from_lps_and_ras_files(forced_bundle):
    pipe = create_pipeline(load_bundle(forced_bundle), device="cpu")
    centroids = []
    for grid in ({}, {"flips": (True, True, False)}, {"axes": (2, 0, 1)}):
        image, _ = tu.phantom_case(**grid)
        label = pipe.run(image).label
        idx = np.argwhere(sitk.GetArrayViewFromImage(label))[:, ::-1]  # (i, j, k)
        pts = np.array([label.TransformIndexToPhysicalPoint([int(v) for v in p]) for p in idx])
        centroids.append(pts.mean(axis=0))
    np.testing.assert_allclose(centroids[1], centroids[0], atol=1e-6)
    np.testing.assert_allclose(centroids[2], centroids[0], atol=1e-6)


# --- ROI files -----------------------------------------------------------------------------------

def _to_ras(roi: dict) -> dict:
    roi = json.loads(json.dumps(roi))
    m = roi["markups"][0]
    flip = np.diag([-1.0, -1.0, 1.0])
    m["coordinateSystem"] = "RAS"
    m["center"] = list(flip @ np.array(m["center"]))
    m["orientation"] = list((flip @ np.array(m["orientation"]).reshape(3, 3)).ravel())
    return roi


@pytest.mark.parametrize("name", ["LPS", "RAS", "permuted + flipped", "anisotropic", "oblique 20 deg", "far origin"])
def test_roi_round_trip_exact(name, tmp_path):
    spacing, grid = _grid(GRIDS[name])
    image, _ = tu.phantom_case(spacing_xyz=spacing, **grid)
    o = Orientation.of(image)
    box = ((5, 31), (12, 50), (3, 64))
    roi = box_to_roi_dict(image, o, box)
    assert roi["markups"][0]["type"] == "ROI" and roi["markups"][0]["coordinateSystem"] == "LPS"
    back, warnings = roi_to_box(image, o, roi)
    assert back == box and warnings == []
    # as files, in LPS and in RAS
    write_roi(tmp_path / "lps.mrk.json", roi)
    write_roi(tmp_path / "ras.mrk.json", _to_ras(roi))
    for f in ("lps.mrk.json", "ras.mrk.json"):
        assert roi_to_box(image, o, read_roi(tmp_path / f)) == (box, [])
    # physical size of the ROI = voxel count x spacing (index order i, j, k)
    ijk = box_to_ijk(image, o, box)
    np.testing.assert_allclose(roi["markups"][0]["size"], [(b - a) * s for (a, b), s in zip(ijk, image.GetSpacing())])
    corners = box_corners_physical(image, o, box)
    np.testing.assert_allclose(roi["markups"][0]["center"], corners.mean(axis=0))


def test_box_to_ijk_flipped_axes():
    image, _ = tu.phantom_case(flips=(True, False, True))  # i runs R->L reversed, k I->S reversed
    o = Orientation.of(image)
    box = ((2, 10), (3, 20), (5, 9))  # canonical z, y, x
    nx, ny, nz = image.GetSize()
    assert box_to_ijk(image, o, box) == [[nx - 9, nx - 5], [3, 20], [nz - 10, nz - 2]]


def test_rotated_roi_warns_and_uses_bounding_box():
    image, _ = tu.phantom_case()
    o = Orientation.of(image)
    box = ((10, 30), (20, 40), (20, 40))
    roi = box_to_roi_dict(image, o, box)
    t = np.deg2rad(30)
    roi["markups"][0]["orientation"] = [np.cos(t), -np.sin(t), 0, np.sin(t), np.cos(t), 0, 0, 0, 1]
    got, warnings = roi_to_box(image, o, roi)
    assert any("rotated" in w for w in warnings)
    # the axis-aligned hull of the rotated box contains the original
    assert all(g0 <= b0 and g1 >= b1 for (g0, g1), (b0, b1) in zip(got, box))
    assert got[0] == box[0] and got[1] != box[1]


def test_roi_outside_image_and_clamping():
    image, _ = tu.phantom_case()
    o = Orientation.of(image)
    roi = box_to_roi_dict(image, o, ((10, 20), (10, 20), (10, 20)))
    far = json.loads(json.dumps(roi))
    far["markups"][0]["center"] = [5000.0, 0.0, 0.0]
    with pytest.raises(InputError, match="does not overlap"):
        roi_to_box(image, o, far)
    # partly outside: clamped to the image
    part = json.loads(json.dumps(roi))
    part["markups"][0]["size"] = [1000.0, 20.0, 20.0]
    box, _ = roi_to_box(image, o, part)
    assert box[2] == (0, 64)


@pytest.mark.parametrize(
    "doc",
    [
        {},
        {"markups": []},
        {"markups": [{"type": "Fiducial"}]},
        {"markups": [{"type": "ROI", "center": [0, 0], "size": [1, 1, 1]}]},
        {"markups": [{"type": "ROI", "center": [0, 0, 0], "size": [0, 1, 1]}]},
        {"markups": [{"type": "ROI", "center": [0, 0, "x"], "size": [1, 1, 1]}]},
        {"markups": [{"type": "ROI", "center": [0, 0, float("nan")], "size": [1, 1, 1]}]},
        [],
        "ROI",
    ],
)
def test_bad_roi_documents_are_input_errors(doc):
    image, _ = tu.phantom_case()
    with pytest.raises(InputError):
        roi_to_box(image, Orientation.of(image), doc)


def test_unreadable_roi_files(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_roi(tmp_path / "missing.mrk.json")
    (tmp_path / "bad.mrk.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(InputError):
        read_roi(tmp_path / "bad.mrk.json")
    (tmp_path / "bin.mrk.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(InputError):
        read_roi(tmp_path / "bin.mrk.json")
