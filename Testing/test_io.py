"""Reading CT (NIfTI, NRRD, MHA, DICOM folders) and writing results (label maps, .seg.nrrd)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import SimpleITK as sitk

import c2f_testutils as tu
from PancreasC2FLib.io import images as imageio
from PancreasC2FLib.io import outputs
from PancreasC2FLib.errors import InputError, OutputError
from PancreasC2FLib.io.outputs import atomic_path
from PancreasC2FLib.io.images import read_image, write_label, write_seg_nrrd, write_segmentation


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".nhdr"])
def test_read_formats(suffix, tmp_path):
    image, _ = tu.phantom_case(flips=(True, True, False), spacing_xyz=(0.75, 0.75, 2.5))
    p = tmp_path / f"ct{suffix}"
    sitk.WriteImage(image, str(p))
    got = read_image(p)
    assert got.GetSize() == image.GetSize()
    np.testing.assert_allclose(got.GetSpacing(), image.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(got.GetOrigin(), image.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(got.GetDirection(), image.GetDirection(), atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(got), sitk.GetArrayViewFromImage(image))


def test_4d_with_one_volume_is_accepted(tmp_path):
    p = tmp_path / "one.nii.gz"
    sitk.WriteImage(sitk.Image([14, 12, 10, 1], sitk.sitkInt16), str(p))
    assert read_image(p).GetSize() == (14, 12, 10)


# --- DICOM -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dicom_volume():
    image, _ = tu.phantom_case(shape_zyx=(12, 32, 32), spacing_xyz=(0.8, 0.8, 2.5))
    return image


def test_dicom_folder(dicom_volume, tmp_path):
    tu.write_dicom_series(tmp_path, dicom_volume, "1.2.826.0.1.3680043.8.498.10")
    got = read_image(tmp_path)
    assert got.GetSize() == dicom_volume.GetSize()
    np.testing.assert_allclose(got.GetSpacing(), dicom_volume.GetSpacing(), rtol=1e-4)
    np.testing.assert_allclose(got.GetOrigin(), dicom_volume.GetOrigin(), atol=1e-3)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(got), sitk.GetArrayViewFromImage(dicom_volume))


def test_dicom_two_series_picks_the_longest_and_series_uid_picks_another(dicom_volume, tmp_path):
    long_uid, short_uid = "1.2.826.0.1.3680043.8.498.11", "1.2.826.0.1.3680043.8.498.12"
    tu.write_dicom_series(tmp_path, dicom_volume[:, :, :9], short_uid, prefix="a")
    tu.write_dicom_series(tmp_path, dicom_volume, long_uid, prefix="b")
    assert read_image(tmp_path).GetSize()[2] == 12
    assert read_image(tmp_path, series_uid=short_uid).GetSize()[2] == 9
    with pytest.raises(InputError, match="not in"):
        read_image(tmp_path, series_uid="1.2.3.999")


def test_dicom_missing_slice(dicom_volume, tmp_path):
    tu.write_dicom_series(tmp_path, dicom_volume, "1.2.826.0.1.3680043.8.498.13", skip=(5,))
    with pytest.raises(InputError, match="slice is missing"):
        read_image(tmp_path)


def test_dicom_uneven_spacing(dicom_volume, tmp_path):
    z0 = dicom_volume.GetOrigin()[2]
    z = [z0 + 2.5 * k + (0.9 if k > 6 else 0.0) for k in range(12)]  # one gap of 3.4 mm
    tu.write_dicom_series(tmp_path, dicom_volume, "1.2.826.0.1.3680043.8.498.14", z_override=z)
    with pytest.raises(InputError, match="uneven slice spacing"):
        read_image(tmp_path)


def test_dicom_tilted_gantry(dicom_volume, tmp_path):
    tu.write_dicom_series(tmp_path, dicom_volume, "1.2.826.0.1.3680043.8.498.15", tilt_mm_per_slice=0.5)
    with pytest.raises(InputError, match="tilted gantry"):
        read_image(tmp_path)


def test_dicom_single_slice_and_empty_folder(dicom_volume, tmp_path):
    with pytest.raises(InputError, match="no DICOM"):
        read_image(tmp_path)
    tu.write_dicom_series(tmp_path, dicom_volume, "1.2.826.0.1.3680043.8.498.16", skip=range(1, 12))
    with pytest.raises(InputError, match="single slice"):
        read_image(tmp_path)


# --- unusable files ------------------------------------------------------------------------------

def _bad_files(tmp_path, phantom_file):
    data = phantom_file.read_bytes()
    files = {
        "empty.nii.gz": b"",
        "truncated.nii.gz": data[: len(data) // 2],
        "truncated_end.nii.gz": data[:-20],
        "text.nii.gz": b"this is not an image\n" * 20,
        "text.nrrd": b"hello",
        "random.mha": bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8)),
        "huge.mha": b"ObjectType = Image\nNDims = 3\nDimSize = 100000 100000 100000\nElementType = MET_SHORT\nElementDataFile = LOCAL\n",
        "huge.nhdr": b"NRRD0004\ntype: short\ndimension: 3\nsizes: 100000 100000 100000\nencoding: raw\ndata file: huge.raw\n\n",
    }
    raw = sitk.ReadImage(str(phantom_file))
    sitk.WriteImage(raw, str(tmp_path / "full.nii"))
    files["truncated.nii"] = (tmp_path / "full.nii").read_bytes()[:-5000]
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    return list(files)


def test_unusable_files_are_input_errors(tmp_path, phantom_file):
    for name in _bad_files(tmp_path, phantom_file):
        with pytest.raises(InputError):
            read_image(tmp_path / name)


@pytest.mark.parametrize(
    "image, match",
    [
        (sitk.Image([20, 20], sitk.sitkInt16), "2D"),
        (sitk.Image([20, 20, 20, 3], sitk.sitkInt16), "4D"),
        (sitk.Image([20, 20, 20], sitk.sitkVectorUInt8, 3), "components"),
        (sitk.Image([5, 5, 5], sitk.sitkInt16), "too small"),
        (sitk.GetImageFromArray(np.full((10, 10, 10), np.nan, np.float32)), "NaN"),
    ],
)
def test_unsuitable_volumes(image, match, tmp_path):
    p = tmp_path / "x.nrrd"
    sitk.WriteImage(image, str(p))
    with pytest.raises(InputError, match=match):
        read_image(p)


def test_header_larger_than_memory(tmp_path, monkeypatch):
    p = tmp_path / "big.mha"
    p.write_text("ObjectType = Image\nNDims = 3\nDimSize = 200 200 200\nElementType = MET_SHORT\nElementDataFile = LOCAL\n", encoding="utf-8")
    monkeypatch.setattr(imageio, "_physical_memory", lambda: 1 << 20)  # a machine with 1 MiB
    with pytest.raises(InputError, match="memory"):
        read_image(p)


def test_missing_input():
    with pytest.raises(InputError, match="not found"):
        read_image("/nonexistent/ct.nii.gz")


def test_intensity_warnings():
    hu, _ = tu.phantom_arrays()
    assert imageio.intensity_warnings(hu.astype(np.float32)) == []
    mr = np.random.default_rng(0).uniform(0, 800, (20, 20, 20)).astype(np.float32)  # all >= 0
    assert any("Hounsfield" in w for w in imageio.intensity_warnings(mr))


# --- writing ----------------------------------------------------------------------------------

PROV = {"tool": "PancreasC2F", "tool_version": "9.9.9", "model_sha256": "ab" * 32, "parameters": {"n": 1}}


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".nii.gz", ".nii"])
def test_label_map_keeps_geometry_and_provenance(suffix, tmp_path):
    _, label = tu.phantom_case(axes=(2, 0, 1), flips=(True, False, True), rotation_deg=15.0, origin=(10.5, -3.25, 99.0))
    p = tmp_path / f"label{suffix}"
    write_label(p, label, PROV)
    got = sitk.ReadImage(str(p))
    assert got.GetSize() == label.GetSize() and got.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_allclose(got.GetSpacing(), label.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(got.GetOrigin(), label.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(got.GetDirection(), label.GetDirection(), atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(got), sitk.GetArrayViewFromImage(label))
    if suffix in (".nrrd", ".mha"):
        assert json.loads(got.GetMetaData("PancreasC2F_provenance"))["model_sha256"] == PROV["model_sha256"]
    else:
        descrip = got.GetMetaData("descrip")
        assert "PancreasC2F 9.9.9" in descrip and PROV["model_sha256"][:12] in descrip
    assert [f.name for f in tmp_path.iterdir()] == [p.name]  # no temporary left


def test_seg_nrrd_reloads_with_one_pancreas_segment(tmp_path):
    import slicerio

    image, label = tu.phantom_case(flips=(True, True, False), spacing_xyz=(0.7, 0.8, 2.0), origin=(5.0, 6.0, -7.0))
    p = tmp_path / "pancreas.seg.nrrd"
    write_segmentation(p, label, PROV)
    seg = slicerio.read_segmentation(str(p))
    assert len(seg["segments"]) == 1
    s = seg["segments"][0]
    assert s["name"] == "Pancreas" and s["labelValue"] == 1
    assert s["terminology"]["type"][:2] == ["SCT", "15776009"]
    assert s["terminology"]["category"][:2] == ["SCT", "123037004"]
    np.testing.assert_allclose(seg["ijkToLPS"], imageio.ijk_to_lps(image), atol=1e-6)
    voxels = np.asarray(seg["voxels"])
    assert voxels.shape == image.GetSize()  # (i, j, k): the exact input grid, not cropped
    np.testing.assert_array_equal(np.transpose(voxels, (2, 1, 0)) > 0, sitk.GetArrayViewFromImage(label) > 0)
    assert json.loads(seg["PancreasC2F_provenance"])["tool_version"] == "9.9.9"
    # and SimpleITK reads the same grid
    got = sitk.ReadImage(str(p))
    assert got.GetSize() == image.GetSize()
    np.testing.assert_allclose(got.GetSpacing(), image.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(got.GetOrigin(), image.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(got.GetDirection(), image.GetDirection(), atol=1e-6)


def test_empty_mask_writes_a_valid_seg_nrrd(tmp_path):
    import slicerio

    _, label = tu.phantom_case()
    empty = sitk.Image(label.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(label)
    write_seg_nrrd(tmp_path / "e.seg.nrrd", empty)
    seg = slicerio.read_segmentation(str(tmp_path / "e.seg.nrrd"))
    assert len(seg["segments"]) == 1 and not np.asarray(seg["voxels"]).any()


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.nii.gz"
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"new")
            raise RuntimeError("disk full")
    assert target.read_bytes() == b"old" and [f.name for f in tmp_path.iterdir()] == ["out.nii.gz"]


def test_unwritable_outputs(tmp_path):
    _, label = tu.phantom_case()
    with pytest.raises(OutputError):
        write_label(tmp_path / "missing_dir" / "x.nii.gz", label)
    with pytest.raises(OutputError, match="extension"):
        write_label(tmp_path / "x.png", label)
    with pytest.raises(OutputError, match="exists"):
        (tmp_path / "e.nii.gz").write_bytes(b"x")
        outputs.check_output_path(tmp_path / "e.nii.gz", overwrite=False)
    if os.name == "posix" and os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            with pytest.raises(OutputError):
                write_label(ro / "x.nii.gz", label)
            with pytest.raises(OutputError):
                write_seg_nrrd(ro / "x.seg.nrrd", label)
        finally:
            ro.chmod(0o700)
