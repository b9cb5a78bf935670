"""Tests of the synthetic CT generator (PancreasC2FLib.synthetic)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from PancreasC2FLib.synthetic import PANCREAS_LABEL_ID, SyntheticCase, generate_case, generate_small_case

# README table, widened by the fatty-pancreas shift (<= 20 HU) and some noise: generator version
# 1's phase table (version 2 departs from it on purpose, see test_realism.py)
PANCREAS_HU = {"non-contrast": (25, 50), "arterial": (100, 150), "portal-venous": (80, 130)}


def _arr(img: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(img)


def _geometry(img: sitk.Image) -> tuple:
    return img.GetSize(), img.GetSpacing(), img.GetOrigin(), img.GetDirection()


def _centroid_lps(label: sitk.Image) -> np.ndarray:
    idx = np.argwhere(_arr(label) == PANCREAS_LABEL_ID)[:, ::-1].mean(axis=0)
    return np.asarray(label.TransformContinuousIndexToPhysicalPoint([float(v) for v in idx]))


@pytest.fixture(scope="module")
def small() -> SyntheticCase:
    return generate_small_case(11)


def test_small_case_basics(small: SyntheticCase) -> None:
    assert small.image.GetSize() == (96, 96, 64)
    assert small.image.GetSpacing() == pytest.approx((2.0, 2.0, 2.0))
    assert small.image.GetPixelID() == sitk.sitkInt16
    assert small.label.GetPixelID() == sitk.sitkUInt8
    assert _geometry(small.image) == _geometry(small.label)
    assert set(np.unique(_arr(small.label)).tolist()) == {0, PANCREAS_LABEL_ID}
    json.dumps(small.params)  # JSON-serialisable
    for key in ("seed", "anatomy", "phase", "spacing", "orientation", "size", "noise_sigma", "hu"):
        assert key in small.params


def test_determinism(small: SyntheticCase) -> None:
    again = generate_small_case(11)
    assert np.array_equal(_arr(again.image), _arr(small.image))
    assert np.array_equal(_arr(again.label), _arr(small.label))
    assert again.params == small.params
    assert _geometry(again.image) == _geometry(small.image)
    other = generate_small_case(12)
    assert not np.array_equal(_arr(other.image), _arr(small.image))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_pancreas_volume_and_inside_small_fov(seed: int) -> None:
    case = generate_small_case(seed)
    lab = _arr(case.label) > 0
    volume_ml = lab.sum() * float(np.prod(case.label.GetSpacing())) / 1000.0
    assert 40.0 <= volume_ml <= 150.0
    # whole pancreas inside: nothing on any face of the volume
    for ax in range(3):
        assert not lab.take(0, axis=ax).any() and not lab.take(-1, axis=ax).any()


@pytest.mark.parametrize("orientation", ["LPS", "RAS", "oblique"])
def test_geometry_and_orientation(orientation: str) -> None:
    case = generate_small_case(5, orientation=orientation)
    assert _geometry(case.image) == _geometry(case.label)
    d = np.array(case.image.GetDirection()).reshape(3, 3)
    assert np.allclose(d @ d.T, np.eye(3), atol=1e-9)
    if orientation == "LPS":
        assert np.allclose(d, np.eye(3))
    elif orientation == "RAS":
        assert np.allclose(d, np.diag([-1.0, -1.0, 1.0]))
    else:  # a small rotation about z of LPS or RAS
        assert np.allclose(d[2], [0, 0, 1]) and np.allclose(d[:, 2], [0, 0, 1])
        angle = abs(case.params["oblique_angle_deg"])
        assert 2.0 <= angle <= 10.0
        assert not np.allclose(np.abs(d), np.eye(3))
    assert case.params["orientation"] == orientation
    assert np.linalg.norm(case.image.GetOrigin()) > 1.0  # scanner-like, not zero


def test_physical_consistency_across_orientations() -> None:
    """The anatomy lives in physical LPS space: only the storage changes with the orientation."""
    centroids = {o: _centroid_lps(generate_small_case(8, orientation=o).label)
                 for o in ("LPS", "RAS", "oblique")}
    assert np.linalg.norm(centroids["LPS"] - centroids["RAS"]) < 2.0  # mm, within one voxel
    assert np.linalg.norm(centroids["LPS"] - centroids["oblique"]) < 4.0


def test_patient_left_is_physical_left() -> None:
    """Spleen side check through the image: the pancreas tail (patient left) has larger LPS x
    than the head, whatever the storage orientation."""
    for o in ("LPS", "RAS"):
        case = generate_small_case(3, orientation=o, deform=False)
        idx = np.argwhere(_arr(case.label) > 0)[:, ::-1].astype(float)
        pts = np.array([case.label.TransformContinuousIndexToPhysicalPoint(v) for v in idx[::20]])
        # the pancreas runs from the head (right, near the duodenum) to the tail (left, up)
        slope = np.polyfit(pts[:, 0], pts[:, 2], 1)[0]
        assert slope > 0, o  # the tail (patient left, +x) lies higher (+z) than the head


@pytest.mark.parametrize("phase", ["non-contrast", "arterial", "portal-venous"])
def test_pancreas_hu_matches_phase(phase: str) -> None:
    case = generate_small_case(21, phase=phase, version=1)
    lo, hi = PANCREAS_HU[phase]
    sampled = case.params["hu"]["pancreas"]
    assert lo - 20.5 <= sampled <= hi + 0.5
    lab = sitk.BinaryErode(case.label, [1, 1, 1])  # away from partial volume
    vals = _arr(case.image)[_arr(lab) > 0].astype(float)
    tol = 15.0 + case.params["noise_sigma"]
    assert lo - 20 - tol <= np.median(vals) <= hi + tol


def test_intermediate_phase_interpolates() -> None:
    nc = generate_small_case(4, phase=0.0, version=1).params["hu"]["liver"]
    mid = generate_small_case(4, phase=0.5, version=1).params["hu"]["liver"]
    pv = generate_small_case(4, phase=1.0, version=1).params["hu"]["liver"]
    assert nc < mid < pv


def test_air_and_fat() -> None:
    # a wide, coarse FOV: air around the body, fat inside
    case = generate_case(6, spacing=(4.0, 4.0, 4.0), size=(128, 128, 10))
    a = _arr(case.image).astype(float)
    corners = np.concatenate([a[:, :6, :6].ravel(), a[:, :6, -6:].ravel(),
                              a[:, -6:, :6].ravel(), a[:, -6:, -6:].ravel()])
    assert np.median(corners) < -950
    body = a > -500
    fat = (a > -150) & (a < -50)
    assert fat.sum() > 0.1 * body.sum()


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        generate_small_case(0, phase="delayed")
    with pytest.raises(ValueError):
        generate_small_case(0, phase=1.5)
    with pytest.raises(ValueError):
        generate_small_case(0, orientation="LPI")
    with pytest.raises(ValueError):
        generate_small_case(0, anatomy="s9999")
    with pytest.raises(ValueError):
        generate_small_case(0, version=4)


def test_realistic_size_case() -> None:
    """One full-size case (thick slices keep it quick): 512 x 512, int16, abdominal z extent."""
    case = generate_case(2, spacing=(0.78, 0.78, 5.0))
    size = case.image.GetSize()
    assert size[:2] == (512, 512)
    assert 40 <= size[2] <= 120  # ~200-600 mm of abdomen at 5 mm
    assert case.image.GetPixelID() == sitk.sitkInt16
    assert _geometry(case.image) == _geometry(case.label)
    a = _arr(case.image)
    assert a.min() >= -1024 and a.max() <= 3071
    assert (_arr(case.label) > 0).sum() > 0
