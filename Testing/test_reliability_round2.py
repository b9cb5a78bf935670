"""Reliability round 2 (issue 14): what a hostile user tried and the tool must refuse or survive.
Each test fails without its fix: outputs inside a DICOM input, two runs on one output, zero or NaN
spacing, irregular DICOM series, sheared directions, outputs that are links or devices, a failing
final rename, stale temporaries, umask, FIFOs, odd ROI files and exit codes."""

from __future__ import annotations

import os
import stat
import struct

import numpy as np
import pytest
import SimpleITK as sitk

import c2f_testutils as tu
from PancreasC2FLib.apps import cli
from PancreasC2FLib.errors import InputError
from PancreasC2FLib.io import images as imageio
from PancreasC2FLib.io.images import read_image


def run_cli(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def files_in(folder):
    return {p.name for p in folder.iterdir()}


@pytest.fixture(scope="module")
def dicom_volume():
    image, _ = tu.phantom_case(shape_zyx=(12, 32, 32), spacing_xyz=(0.8, 0.8, 2.5))
    return image


# --- 1. an output inside the input ------------------------------------------------------------------

def test_dicom_seg_may_not_overwrite_a_slice_of_the_input_series(tmp_path, dicom_volume, forced_bundle, capsys):
    series = tmp_path / "series"
    files = tu.write_dicom_series(series, dicom_volume, "1.2.826.0.1.3680043.8.498.40")
    before = {f: tu.file_fingerprint(f) for f in files}
    for extra in (["--dicom-seg", files[0]], ["--report", series / "new.json", "--dicom-seg", tmp_path / "s.dcm"]):
        rc, _, err = run_cli(capsys, "segment", series, "-o", tmp_path / "x.nii.gz", *extra, "--overwrite", "--model", forced_bundle, "--quiet")
        assert rc == 4 and "input folder" in err, err
    assert {f: tu.file_fingerprint(f) for f in files} == before and not (series / "new.json").exists()
    assert not (tmp_path / "x.nii.gz").exists()


# --- 4. two runs writing the same output ---------------------------------------------------------------

def test_an_output_that_appears_during_the_run_is_not_replaced(tmp_path, phantom_file, forced_bundle, monkeypatch, capsys):
    out = tmp_path / "seg.nii.gz"
    real_read = imageio.read_image

    def read_then_another_run_writes(*a, **k):
        image = real_read(*a, **k)
        out.write_bytes(b"the other run's result")
        return image

    monkeypatch.setattr(imageio, "read_image", read_then_another_run_writes)
    rc, _, err = run_cli(capsys, "segment", phantom_file, "-o", out, "--report", tmp_path / "r.json", "--model", forced_bundle, "--quiet")
    assert rc == 4 and "appeared" in err
    assert out.read_bytes() == b"the other run's result" and not (tmp_path / "r.json").exists()
    assert files_in(tmp_path) == {"ct.nii.gz", "seg.nii.gz"}


# --- 5. zero or NaN spacing --------------------------------------------------------------------------

@pytest.mark.parametrize("value", [0.0, float("nan")])
def test_nifti_zero_or_nan_spacing_is_refused(value, tmp_path, phantom_ct):
    p = tmp_path / "ct.nii"
    sitk.WriteImage(phantom_ct.image, str(p))
    data = bytearray(p.read_bytes())
    data[80:84] = struct.pack("<f", value)  # pixdim[1]: ITK would read 1 mm
    p.write_bytes(bytes(data))
    with pytest.raises(InputError, match="voxel size"):
        read_image(p)


def _edit_dicom(path, **changes):
    import pydicom

    ds = pydicom.dcmread(str(path))
    for key, value in changes.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    ds.save_as(str(path))


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"PixelSpacing": [0, 0]}, "PixelSpacing"),  # ITK would read 1 mm: 0.09 mL instead of 82.5
        ({"ImagePositionPatient": None}, "ImagePositionPatient"),  # the position check was skipped
        ({"ImageOrientationPatient": [0, 1, 0, 1, 0, 0]}, "another orientation"),
        ("shift", "shifted sideways"),
    ],
)
def test_irregular_dicom_series_are_refused(changes, match, tmp_path, dicom_volume):
    files = tu.write_dicom_series(tmp_path, dicom_volume, "1.2.826.0.1.3680043.8.498.41")
    if changes == "shift":
        import pydicom

        ipp = [float(v) for v in pydicom.dcmread(str(files[5])).ImagePositionPatient]
        changes = {"ImagePositionPatient": [ipp[0] + 30.0, ipp[1], ipp[2]]}
    _edit_dicom(files[5], **changes)
    with pytest.raises(InputError, match=match):
        read_image(tmp_path)


# --- 7. sheared directions -----------------------------------------------------------------------------

def test_sheared_direction_is_refused(tmp_path, phantom_ct):
    p = tmp_path / "ct.mha"
    sitk.WriteImage(phantom_ct.image, str(p))
    text = p.read_bytes()
    assert b"TransformMatrix = 1 0 0 0 1 0 0 0 1" in text
    p.write_bytes(text.replace(b"TransformMatrix = 1 0 0 0 1 0 0 0 1", b"TransformMatrix = 1 0 0 0.5 1 0 0 0 1"))  # determinant 1
    with pytest.raises(InputError, match="orthonormal"):
        read_image(p)


# --- 8. outputs are regular files -------------------------------------------------------------------------

@pytest.mark.skipif(os.name != "posix", reason="symlinks and FIFOs")
def test_outputs_that_are_links_or_fifos_are_refused(tmp_path, phantom_file, forced_bundle, capsys):
    target = tmp_path / "elsewhere.json"
    target.write_text("keep", encoding="utf-8")
    link, fifo = tmp_path / "link.json", tmp_path / "fifo.json"
    link.symlink_to(target)
    os.mkfifo(fifo)
    for report in (link, fifo, "/dev/null"):
        rc, _, err = run_cli(capsys, "segment", phantom_file, "-o", tmp_path / "s.nii.gz", "--report", report, "--overwrite", "--model", forced_bundle, "--quiet")
        assert rc == 4 and "regular file" in err, err
    assert link.is_symlink() and target.read_text(encoding="utf-8") == "keep" and stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert not (tmp_path / "s.nii.gz").exists()


# --- 9. all or nothing when the final renames fail -------------------------------------------------------

def test_a_failing_rename_puts_everything_back(tmp_path, phantom_file, forced_bundle, monkeypatch, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.nii.gz").write_bytes(b"previous result")
    real_read = imageio.read_image

    def read_then_report_becomes_a_folder(*a, **k):
        image = real_read(*a, **k)
        (out / "r.json").mkdir()
        return image

    monkeypatch.setattr(imageio, "read_image", read_then_report_becomes_a_folder)
    rc, _, err = run_cli(capsys, "segment", phantom_file, "-o", out / "a.nii.gz", "--seg-out", out / "a.seg.nrrd", "--report", out / "r.json", "--overwrite", "--model", forced_bundle, "--quiet")
    assert rc == 4, err
    assert files_in(out) == {"a.nii.gz", "r.json"} and (out / "a.nii.gz").read_bytes() == b"previous result"
