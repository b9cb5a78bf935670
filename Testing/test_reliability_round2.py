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
from test_reliability import files_in, run_cli


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


# --- 2, 13, issue 18 item 5: batch names, a damaged table, NIH case folders -----------------------------

def test_batch_case_names_never_clash(tmp_path, phantom_ct):
    from PancreasC2FLib.apps import batch

    d = tmp_path / "in"
    d.mkdir()
    for name in ("a.nii.gz", "a.nrrd", "a_2.nii.gz", "a.mha"):
        sitk.WriteImage(phantom_ct.image, str(d / name))
    names = [c.name for c in batch.discover_cases(d)]
    assert len(set(names)) == 4 and "a_2" in names and sorted(names) == sorted(set(names))
    paths = {batch.output_paths(tmp_path, n)["output"] for n in names}
    assert len(paths) == 4  # four cases, four outputs


def test_batch_repairs_a_table_cut_mid_row(tmp_path, phantom_ct, forced_bundle, capsys):
    from PancreasC2FLib.apps import batch

    d, out = tmp_path / "in", tmp_path / "out"
    d.mkdir()
    sitk.WriteImage(phantom_ct.image, str(d / "a.nii.gz"))
    sitk.WriteImage(phantom_ct.image, str(d / "b.nii.gz"))
    args = ["batch", "--input", d, "--output", out, "--model", forced_bundle, "--device", "cpu"]
    assert cli.main([str(a) for a in args]) == 0
    table = out / batch.CSV_NAME
    text = table.read_text(encoding="utf-8")
    table.write_text(text[: text.rindex("\n", 0, len(text) - 1) + 40], encoding="utf-8")  # b's row cut off
    (out / "b.seg.nrrd").unlink()
    assert cli.main([str(a) for a in args] + ["--resume"]) == 0
    assert "dropped 1 incomplete row" in capsys.readouterr().err
    import csv

    with open(table, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == batch.CSV_FIELDS and all(len(r) == len(batch.CSV_FIELDS) for r in rows)
    assert [(r[0], r[1]) for r in rows[1:]] == [("a", "ok"), ("b", "ok")]


def test_nih_case_folder_is_read_like_training_does(tmp_path, dicom_volume, forced_bundle, capsys):
    """PANCREAS_0003/<study>/<series>/: the series with the most slices, the scout skipped, named."""
    case = tmp_path / "PANCREAS_0003"
    tu.write_dicom_series(case / "study" / "ct", dicom_volume, "1.2.826.0.1.3680043.8.498.50")
    tu.write_dicom_series(case / "study" / "scout", dicom_volume[:, :, :2], "1.2.826.0.1.3680043.8.498.51")
    assert read_image(case).GetSize() == dicom_volume.GetSize()
    rc, _, err = run_cli(capsys, "segment", case, "--coarse-only", "--roi-out", tmp_path / "r.mrk.json", "--model", forced_bundle, "--quiet")
    assert rc == 0, err
    assert "using DICOM series 1.2.826.0.1.3680043.8.498.50 (12 slices) in " in err and str(case / "study" / "ct") in err
    from PancreasC2FLib.apps import batch

    assert [(c.name, c.path) for c in batch.discover_cases(tmp_path, exclude=[tmp_path / "r.mrk.json"])] == [("PANCREAS_0003", case)]


# --- 10. file names that are not UTF-8 -------------------------------------------------------------------

@pytest.mark.skipif(os.name != "posix", reason="POSIX byte names")
def test_non_utf8_names_are_exit_2_and_the_batch_goes_on(tmp_path, phantom_ct, forced_bundle, capsys):
    from PancreasC2FLib.apps import batch

    d = tmp_path / "in"
    d.mkdir()
    bad = os.fsdecode(os.fsencode(str(d)) + b"/bad\xff.nii.gz")
    try:
        sitk.WriteImage(phantom_ct.image, str(d / "good.nii.gz"))
        os.link(d / "good.nii.gz", bad)
    except (OSError, UnicodeError):
        pytest.skip("this file system refuses non-UTF-8 names")
    rc, _, err = run_cli(capsys, "segment", bad, "-o", tmp_path / "x.nii.gz", "--model", forced_bundle, "--quiet")
    assert rc == 2 and "UTF-8" in err
    rc, _, err = run_cli(capsys, "segment", d / "good.nii.gz", "-o", os.fsdecode(os.fsencode(str(tmp_path)) + b"/out\xfe.nii.gz"), "--model", forced_bundle, "--quiet")
    assert rc == 2 and "UTF-8" in err
    rc, _, _ = run_cli(capsys, "batch", "--input", d, "--output", tmp_path / "out", "--model", forced_bundle, "--device", "cpu")
    assert rc == 7  # finished, one case failed
    rows = batch.BatchCSV(tmp_path / "out" / batch.CSV_NAME).rows()
    assert sorted(r["status"] for r in rows) == ["failed", "ok"]
    assert any("UTF-8" in r["error"] for r in rows)


# --- 11. temporaries left by a killed run; SIGTERM -----------------------------------------------------------

def _dead_pid() -> int:
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temporaries_are_cleaned_and_live_ones_kept(tmp_path, phantom_file, forced_bundle, capsys):
    out = tmp_path / "out"
    out.mkdir()
    from PancreasC2FLib.io.outputs import _host_tag, temp_path_for

    stale = temp_path_for(out / ".k.nii.gz", pid=_dead_pid())  # nested, as a label map writer makes
    live = temp_path_for(out / "k.nii.gz", pid=os.getppid())  # a running process's
    elsewhere = out / stale.name.replace(f"pc2f-{_host_tag()}-", "pc2f-000000-")
    elsewhere.write_bytes(b"another machine's run")  # its pid means nothing here
    stale.write_bytes(b"left by kill -9")
    live.write_bytes(b"still being written")
    rc, _, err = run_cli(capsys, "segment", phantom_file, "-o", out / "k.nii.gz", "--model", forced_bundle, "--quiet")
    assert rc == 0, err
    assert not stale.exists() and live.exists() and elsewhere.exists()
    # --resume of a batch cleans its output folder too
    stale.write_bytes(b"left by kill -9")
    (out / "k.nii.gz").unlink()
    rc, _, err = run_cli(capsys, "batch", "--input", phantom_file, "--output", out, "--resume", "--model", forced_bundle, "--device", "cpu")
    assert rc == 0, err
    assert not stale.exists() and live.exists()


@pytest.mark.skipif(not hasattr(__import__("signal"), "SIGTERM") or os.name != "posix", reason="POSIX signals")
@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP"])
def test_sigterm_and_sighup_cancel_like_ctrl_c(signame, tmp_path, phantom_file, forced_bundle, monkeypatch, capsys):
    import signal

    from PancreasC2FLib.progress import Progress

    def terminated(self, stage, fraction, message):
        if stage == "fine":
            os.kill(os.getpid(), getattr(signal, signame))

    class NotHandled(Exception):
        pass

    def not_handled(signum, frame):  # what runs if the CLI installs no handler of its own
        raise NotHandled

    monkeypatch.setattr(Progress, "__call__", terminated)
    sig = getattr(signal, signame)
    before = signal.signal(sig, not_handled)
    try:
        _sigterm_run(tmp_path, phantom_file, forced_bundle, capsys)
        assert signal.getsignal(sig) is not_handled  # handlers restored after the run
    finally:
        signal.signal(sig, before)


def _sigterm_run(tmp_path, phantom_file, forced_bundle, capsys):
    out = tmp_path / "out"
    out.mkdir()
    rc, _, err = run_cli(capsys, "segment", phantom_file, "-o", out / "s.nii.gz", "--report", out / "r.json", "--model", forced_bundle)
    assert rc == 130 and "cancelled" in err and files_in(out) == set()


# --- 12. FIFOs and devices as inputs --------------------------------------------------------------------------

@pytest.mark.skipif(os.name != "posix", reason="FIFOs")
def test_fifos_and_devices_as_inputs_are_exit_2_not_a_hang(tmp_path, phantom_file, forced_bundle, capsys):
    fifo = tmp_path / "data.raw"
    os.mkfifo(fifo)
    (tmp_path / "ct.nhdr").write_text("NRRD0004\ntype: short\ndimension: 3\nsizes: 16 16 16\nencoding: raw\nendian: little\ndata file: data.raw\n\n", encoding="utf-8")
    (tmp_path / "ct.mhd").write_text("ObjectType = Image\nNDims = 3\nDimSize = 16 16 16\nElementType = MET_SHORT\nElementDataFile = data.raw\n", encoding="utf-8")
    (tmp_path / "list.mhd").write_text("ObjectType = Image\nNDims = 3\nDimSize = 16 16 16\nElementType = MET_SHORT\nElementDataFile = LIST\n", encoding="utf-8")
    roi_fifo = tmp_path / "roi.mrk.json"
    os.mkfifo(roi_fifo)
    for argv, match in (
        ([tmp_path / "ct.nhdr"], "not a regular file"),
        ([tmp_path / "ct.mhd"], "not a regular file"),
        ([tmp_path / "list.mhd"], "no data files"),
        ([fifo], "not a regular file"),
        ([phantom_file, "--roi", roi_fifo], "not a regular file"),
        ([phantom_file, "--roi", "/dev/zero"], "not a regular file"),
    ):
        rc, _, err = run_cli(capsys, "segment", *argv, "-o", tmp_path / "o.nii.gz", "--model", forced_bundle, "--quiet")
        assert rc == 2 and match in err, (argv, err)


# --- 14. exit codes the README promises -------------------------------------------------------------------------

_INSIDE = '"center": [0, -16, -252], "size": [30, 30, 30]'  # overlaps the phantom: only the defect can fail


@pytest.mark.parametrize(
    "content, match",
    [
        ('{"markups": [1]}', "not a Slicer markups ROI"),
        ('{"markups": "ROI"}', "not a Slicer markups ROI"),
        ('{"markups": [{"type": "ROI", ' + _INSIDE + ', "coordinateSystem": 5}]}', "coordinate system"),
        ('{"markups": [{"type": "ROI", ' + _INSIDE + ', "coordinateSystem": "XYZ"}]}', "coordinate system"),
        ('{"markups": [{"type": "ROI", ' + _INSIDE + ', "insideOut": true}]}', "inside-out"),
        ('{"markups": [{"type": "ROI", "center": [1e300, 0, 0], "size": [9, 9, 9]}]}', "beyond"),
        ("[" * 100000 + "]" * 100000, "nested too deeply"),
        ('{"markups": [{"type": "ROI", "center": [' + "9" * 5000 + ', 0, 0], "size": [9, 9, 9]}]}', "cannot read ROI"),
    ],
    ids=["list-of-int", "string", "system-5", "system-XYZ", "inside-out", "centre-1e300", "deep", "5000-digits"],
)
def test_odd_roi_files_are_exit_2(content, match, tmp_path, phantom_file, forced_bundle, capsys):
    import warnings

    roi = tmp_path / "roi.mrk.json"
    roi.write_text(content, encoding="utf-8")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a numpy RuntimeWarning would be a second stderr line
        rc, _, err = run_cli(capsys, "segment", phantom_file, "--roi", roi, "-o", tmp_path / "o.nii.gz", "--model", forced_bundle, "--quiet")
    assert rc == 2 and match in err and err.count("\n") == 1, err


def test_complex_nifti_and_unknown_devices_are_exit_2(tmp_path, phantom_file, forced_bundle, capsys):
    p = tmp_path / "complex.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((10, 12, 14), np.complex64)), str(p))
    rc, _, err = run_cli(capsys, "segment", p, "-o", tmp_path / "o.nii.gz", "--model", forced_bundle, "--quiet")
    assert rc == 2 and "complex" in err
    import torch

    devices = ["meta", "hip", "xpu"] + ([] if torch.backends.mps.is_available() else ["mps"])
    for device in devices:
        rc, _, err = run_cli(capsys, "segment", phantom_file, "-o", tmp_path / "o.nii.gz", "--device", device, "--model", forced_bundle, "--quiet")
        assert rc == 2 and err.count("\n") == 1, (device, err)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_output_is_found_before_the_work(tmp_path, phantom_file, forced_bundle, monkeypatch, capsys):
    from PancreasC2FLib.pipelines import base

    monkeypatch.setattr(base.Pipeline, "prepare", lambda *a, **k: pytest.fail("the work started"))
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        rc, _, err = run_cli(capsys, "segment", phantom_file, "-o", ro / "o.nii.gz", "--model", forced_bundle, "--quiet")
        assert rc == 4 and "not writable" in err
    finally:
        ro.chmod(0o700)


def test_output_under_a_file_is_exit_4_before_the_work(tmp_path, phantom_file, forced_bundle, monkeypatch, capsys):
    from PancreasC2FLib.pipelines import base

    monkeypatch.setattr(base.Pipeline, "prepare", lambda *a, **k: pytest.fail("the work started"))
    rc, _, err = run_cli(capsys, "segment", phantom_file, "-o", phantom_file / "o.nii.gz", "--model", forced_bundle, "--quiet")
    assert rc == 4 and err.count("\n") == 1, err


BAD_MODEL_JSON = {
    "format_version": float("inf"),
    "presets": ["fast"],
    "clip": "wide",
    "normalize": "sqrt",
    "threshold": "high",
    "window": [0, 0, 0],
    "window_4000": [4000, 4000, 4000],
    "spacing": [0, 0, 0],
    "spacing_negative": [-1.0, -1.0, -1.0],
    "no_fine": None,
}


@pytest.mark.parametrize("defect", list(BAD_MODEL_JSON))
def test_broken_model_json_is_exit_5(defect, tmp_path, phantom_file, forced_bundle, capsys):
    import json
    import shutil

    bundle = tmp_path / "bundle"
    shutil.copytree(forced_bundle, bundle)
    md = json.loads((bundle / "model.json").read_text(encoding="utf-8"))
    value = BAD_MODEL_JSON[defect]
    key = defect.split("_")[0]
    if key in ("format", "presets"):
        md[defect if key == "format" else key] = value
    elif key in ("clip", "normalize"):
        md["preprocessing"][key] = value
    elif key == "no":
        del md["stages"]["fine"]
    else:
        md["stages"]["coarse"][key] = value
    (bundle / "model.json").write_text(json.dumps(md), encoding="utf-8")  # json writes inf as Infinity
    rc, _, err = run_cli(capsys, "segment", phantom_file, "-o", tmp_path / "o.nii.gz", "--model", bundle, "--device", "cpu", "--quiet")
    assert rc == 5 and err.count("\n") == 1, err


def test_a_resampled_grid_larger_than_memory_is_exit_6(tmp_path, forced_bundle, capsys):
    big = sitk.Image([16, 16, 16], sitk.sitkInt16)
    big.SetSpacing((100.0, 100.0, 100.0))  # to the model's 4 mm: 400^3 voxels per 16 here ...
    p = tmp_path / "big.nii.gz"
    sitk.WriteImage(big, str(p))
    from PancreasC2FLib.io import images

    real = images._physical_memory
    try:
        images._physical_memory = lambda: 10_000_000  # ... more than a 10 MB machine holds
        rc, _, err = run_cli(capsys, "segment", p, "-o", tmp_path / "o.nii.gz", "--model", forced_bundle, "--device", "cpu", "--quiet")
    finally:
        images._physical_memory = real
    assert rc == 6 and "would need" in err, err


# --- smaller items -------------------------------------------------------------------------------------------------

@pytest.mark.skipif(os.name != "posix", reason="umask")
def test_outputs_honour_the_umask(tmp_path, phantom_file, forced_bundle, capsys):
    old = os.umask(0o022)
    try:
        rc, _, err = run_cli(capsys, "segment", phantom_file, "-o", tmp_path / "s.nii.gz", "--seg-out", tmp_path / "s.seg.nrrd", "--report", tmp_path / "r.json", "--model", forced_bundle, "--quiet")
    finally:
        os.umask(old)
    assert rc == 0, err
    for name in ("s.nii.gz", "s.seg.nrrd", "r.json"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o644, name


def test_weights_linked_from_outside_the_bundle_are_refused(tmp_path, forced_bundle):
    import shutil

    from PancreasC2FLib.errors import ModelError
    from PancreasC2FLib.io.bundle import load_bundle

    bundle = tmp_path / "bundle"
    shutil.copytree(forced_bundle, bundle)
    outside = tmp_path / "outside.safetensors"
    (bundle / "coarse.safetensors").rename(outside)
    (bundle / "coarse.safetensors").symlink_to(outside)
    with pytest.raises(ModelError, match="link"):
        load_bundle(bundle)


def test_dicom_seg_without_sop_class_is_refused_before_the_work(tmp_path, dicom_volume, forced_bundle, monkeypatch, capsys):
    from PancreasC2FLib.pipelines import base

    series = tmp_path / "series"
    files = tu.write_dicom_series(series, dicom_volume, "1.2.826.0.1.3680043.8.498.52")
    for f in files:
        _edit_dicom(f, SOPClassUID="")
    monkeypatch.setattr(base.Pipeline, "prepare", lambda *a, **k: pytest.fail("the work started"))
    rc, _, err = run_cli(capsys, "segment", series, "--dicom-seg", tmp_path / "s.dcm", "--model", forced_bundle, "--quiet")
    assert rc == 2 and "SOPClassUID" in err, err


def test_volume_reason_has_enough_digits():
    from PancreasC2FLib.processing.quality import _digits

    assert _digits(19.97, 20, 200) == "19.97" and _digits(200.04, 20, 200) == "200.04" and _digits(12.3, 20, 200) == "12.3"


# --- 15. one line on stderr ---------------------------------------------------------------------------------------

def test_jpeg2000_marked_raw_dicom_is_one_line_from_a_real_process(tmp_path, dicom_volume, forced_bundle):
    """The decoder's own messages (231 lines of "Expected a SOC marker") go to the process's
    stderr from C code: only a real process shows them."""
    import subprocess
    import sys

    import pydicom
    from pydicom.encaps import encapsulate

    series = tmp_path / "series"
    for f in tu.write_dicom_series(series, dicom_volume, "1.2.826.0.1.3680043.8.498.53"):
        ds = pydicom.dcmread(str(f))
        raw = ds.PixelData
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.90"  # JPEG 2000, but the data is raw
        ds.PixelData = encapsulate([raw])
        ds["PixelData"].VR = "OB"
        ds.save_as(str(f), enforce_file_format=True)
    testing = os.path.dirname(__file__)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([testing, os.path.dirname(testing), os.environ.get("PYTHONPATH", "")]))
    code = "import c2f_testutils, sys; from PancreasC2FLib.apps.cli import main; sys.exit(main(sys.argv[1:]))"
    p = subprocess.run([sys.executable, "-c", code, "segment", str(series), "-o", str(tmp_path / "o.nii.gz"), "--model", str(forced_bundle), "--quiet"], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2 and len(p.stderr.splitlines()) == 1, p.stderr[-2000:]


def test_library_warnings_do_not_reach_stderr(tmp_path, phantom_file, forced_bundle, monkeypatch, capsys):
    import warnings

    from PancreasC2FLib.pipelines import base

    real = base.Pipeline.prepare

    def prepare_with_a_torch_warning(self, image):
        warnings.warn("TypedStorage is deprecated", UserWarning)
        return real(self, image)

    monkeypatch.setattr(base.Pipeline, "prepare", prepare_with_a_torch_warning)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # what the warning would do to the one-line promise
        rc, _, err = run_cli(capsys, "segment", phantom_file, "-o", tmp_path / "s.nii.gz", "--model", forced_bundle, "--quiet")
    assert rc == 0 and "TypedStorage" not in err, err


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
def test_a_second_ctrl_c_does_not_cut_the_clean_up_short(tmp_path, phantom_file, forced_bundle, monkeypatch, capsys):
    import signal

    from PancreasC2FLib.io import images as imageio_module
    from PancreasC2FLib.io.outputs import Outputs

    def interrupted_write(path, label, provenance=None, segment_name="Pancreas"):
        os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C, while writing

    real_rollback = Outputs.rollback

    def rollback_interrupted_again(self):
        os.kill(os.getpid(), signal.SIGINT)  # the user presses Ctrl-C again during the clean-up
        real_rollback(self)

    monkeypatch.setattr(imageio_module, "write_seg_nrrd", interrupted_write)
    monkeypatch.setattr(Outputs, "rollback", rollback_interrupted_again)
    out = tmp_path / "out"
    out.mkdir()
    rc, _, err = run_cli(capsys, "segment", phantom_file, "-o", out / "s.nii.gz", "--seg-out", out / "s.seg.nrrd", "--report", out / "r.json", "--model", forced_bundle, "--quiet")
    assert rc == 130 and files_in(out) == set() and "Traceback" not in err
