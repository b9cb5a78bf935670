"""The command line: exit codes, one-line errors, no traceback, no output left on error,
end-to-end runs on a small synthetic CT, and the demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import c2f_testutils as tu
from PancreasC2FLib import __version__
from PancreasC2FLib.apps import cli
from PancreasC2FLib.io.bundle import load_bundle

TESTING = Path(__file__).parent


def run_cli(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(err: str):
    assert err.startswith("pancreas-c2f: error: "), err
    assert err.count("\n") == 1, err
    assert "Traceback" not in err


def files_in(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


# --- bad input: exit 2, one line, nothing written -------------------------------------------------

def _write_bad_inputs(folder: Path, phantom_file: Path) -> dict[str, Path]:
    folder.mkdir()
    data = phantom_file.read_bytes()
    raw = {
        "empty.nii.gz": b"",
        "truncated.nii.gz": data[: len(data) // 3],
        "not_an_image.nii.gz": b"%PDF-1.4 this is a document, not a CT\n" * 30,
        "not_an_image.nrrd": b"<html><body>404</body></html>",
        "huge_header.mha": b"ObjectType = Image\nNDims = 3\nDimSize = 90000 90000 90000\nElementType = MET_FLOAT\nElementDataFile = LOCAL\n",
        "huge_header.nhdr": b"NRRD0004\ntype: float\ndimension: 3\nsizes: 90000 90000 90000\nencoding: raw\ndata file: nothing.raw\n\n",
    }
    paths = {}
    for name, content in raw.items():
        (folder / name).write_bytes(content)
        paths[name] = folder / name
    images = {
        "flat_2d.nrrd": sitk.Image([64, 64], sitk.sitkInt16),
        "series_4d.nii.gz": sitk.Image([16, 16, 16, 4], sitk.sitkInt16),
        "rgb.nrrd": sitk.Image([16, 16, 16], sitk.sitkVectorUInt8, 3),
        "tiny_5x5x5.nii.gz": sitk.Image([5, 5, 5], sitk.sitkInt16),
    }
    for name, img in images.items():
        sitk.WriteImage(img, str(folder / name))
        paths[name] = folder / name
    paths["missing.nii.gz"] = folder / "missing.nii.gz"
    return paths


BAD_INPUTS = ["empty.nii.gz", "truncated.nii.gz", "not_an_image.nii.gz", "not_an_image.nrrd", "huge_header.mha", "huge_header.nhdr", "flat_2d.nrrd", "series_4d.nii.gz", "rgb.nrrd", "tiny_5x5x5.nii.gz", "missing.nii.gz"]


def test_bad_inputs_exit_2(tmp_path, phantom_file, forced_bundle, capsys):
    inputs = _write_bad_inputs(tmp_path / "in", phantom_file)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for name in BAD_INPUTS:
        rc, out, err = run_cli(capsys, "segment", inputs[name], "-o", out_dir / "seg.nii.gz", "--seg-out", out_dir / "seg.seg.nrrd", "--report", out_dir / "r.json", "--model", forced_bundle, "--quiet")
        assert rc == 2, (name, err)
        assert_one_line_error(err)
        assert files_in(out_dir) == set(), name


@pytest.mark.parametrize(
    "extra, match",
    [
        ([], "give an output"),
        (["-o", "{out}/a.nii.gz", "--coarse-only"], "needs --roi-out"),
        (["--coarse-only", "--roi", "{out}/r.mrk.json", "--roi-out", "{out}/b.mrk.json"], "exclude each other"),
        (["-o", "{out}/a.png"], "unsupported output extension"),
        (["-o", "{out}/a.nii.gz", "--seg-out", "{out}/b.nii.gz"], "--seg-out must end"),
        (["-o", "{out}/a.nii.gz", "--report", "{out}/a.nii.gz"], "twice"),
        (["-o", "{out}/a.nii.gz", "--device", "quantum"], "unknown device"),
        (["-o", "{out}/a.nii.gz", "--preset", "nonexistent"], "unknown preset"),
        (["-o", "{out}/a.nii.gz", "--pipeline", "roth-cascade"], "resdsn-c2f"),
        (["-o", "{out}/a.nii.gz", "--roi", "{out}/missing.mrk.json"], "ROI file not found"),
    ],
)
def test_usage_errors_exit_2(extra, match, tmp_path, phantom_file, forced_bundle, capsys):
    out = tmp_path / "out"
    out.mkdir()
    argv = ["segment", phantom_file, "--model", forced_bundle, "--quiet"] + [a.format(out=out) for a in extra]
    rc, _, err = run_cli(capsys, *argv)
    assert rc == 2 and match in err
    assert_one_line_error(err)
    assert files_in(out) == set()


@pytest.mark.parametrize("argv", [[], ["segment"], ["frobnicate"], ["segment", "x.nii.gz", "--coarse-n", "many"], ["segment", "x", "--pipeline", "unet"]])
def test_argparse_usage_errors_are_systemexit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_version_and_info(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0 and __version__ in capsys.readouterr().out
    rc, out, _ = run_cli(capsys, "info")
    assert rc == 0 and "exit codes:" in out and "torch" in out


def test_models_lists_and_flags_bundles(tmp_path, forced_bundle, monkeypatch, capsys):
    import shutil

    shutil.copytree(forced_bundle, tmp_path / "good")
    shutil.copytree(forced_bundle, tmp_path / "broken")
    (tmp_path / "broken" / "fine.safetensors").write_bytes(b"garbage")
    monkeypatch.setenv("PANCREAS_C2F_MODELS", str(tmp_path))
    rc, out, _ = run_cli(capsys, "models")
    assert rc == 0
    line = {ln.split()[0]: ln for ln in out.splitlines()}
    assert "UNTRAINED" in line["good"] and load_bundle(tmp_path / "good").sha256[:16] in line["good"]
    assert "INVALID" in line["broken"]


# --- outputs --------------------------------------------------------------------------------------

def test_existing_output_without_overwrite_exit_4(tmp_path, phantom_file, forced_bundle, capsys):
    out = tmp_path / "seg.nii.gz"
    out.write_bytes(b"precious")
    before = tu.file_fingerprint(out)
    rc, _, err = run_cli(capsys, "segment", phantom_file, "-o", out, "--report", tmp_path / "r.json", "--model", forced_bundle, "--quiet")
    assert rc == 4 and "--overwrite" in err
    assert_one_line_error(err)
    assert tu.file_fingerprint(out) == before and not (tmp_path / "r.json").exists()
    rc, _, _ = run_cli(capsys, "segment", phantom_file, "-o", out, "--overwrite", "--model", forced_bundle, "--quiet")
    assert rc == 0 and sitk.ReadImage(str(out)).GetSize() == (64, 64, 48)


def test_output_folder_missing_exit_4(tmp_path, phantom_file, forced_bundle, capsys):
    rc, _, err = run_cli(capsys, "segment", phantom_file, "-o", tmp_path / "nope" / "seg.nii.gz", "--model", forced_bundle, "--quiet")
    assert rc == 4
    assert_one_line_error(err)


def test_output_may_not_replace_the_input_even_with_overwrite(tmp_path, phantom_file, forced_bundle, capsys):
    before = tu.file_fingerprint(phantom_file)
    rc, _, err = run_cli(capsys, "segment", phantom_file, "-o", phantom_file, "--overwrite", "--model", forced_bundle, "--quiet")
    assert rc == 4 and "input" in err
    assert tu.file_fingerprint(phantom_file) == before
    # nor the ROI file given as input
    from PancreasC2FLib.processing.geometry import Orientation
    from PancreasC2FLib.io.roi import box_to_roi_dict, write_roi

    image = sitk.ReadImage(str(phantom_file))
    roi = tmp_path / "roi.mrk.json"
    write_roi(roi, box_to_roi_dict(image, Orientation.of(image), ((10, 40), (20, 50), (10, 50))))
    roi_before = tu.file_fingerprint(roi)
    rc, _, err = run_cli(capsys, "segment", phantom_file, "--roi", roi, "--roi-out", roi, "-o", tmp_path / "s.nii.gz", "--overwrite", "--model", forced_bundle, "--quiet")
    assert rc == 4 and tu.file_fingerprint(roi) == roi_before and not (tmp_path / "s.nii.gz").exists()


def test_empty_coarse_result_exit_3(tmp_path, phantom_file, empty_bundle, capsys):
    rc, _, err = run_cli(capsys, "segment", phantom_file, "-o", tmp_path / "seg.nii.gz", "--report", tmp_path / "r.json", "--model", empty_bundle, "--quiet")
    assert rc == 3 and "--roi" in err
    assert_one_line_error(err)
    assert files_in(tmp_path) == {phantom_file.name}


def test_untrained_resdsn_runs_and_fails_cleanly(tmp_path, phantom_file, tiny_bundle, capsys):
    """The real (random, width-4) ResDSN through both the CLI and the sliding window: an untrained
    coarse net finds nothing here, which must be exit 3, never a silently empty mask."""
    rc, _, err = run_cli(capsys, "segment", phantom_file, "-o", tmp_path / "seg.nii.gz", "--model", tiny_bundle, "--device", "cpu", "--quiet")
    assert rc == 3
    assert_one_line_error(err)
    assert not (tmp_path / "seg.nii.gz").exists()


# --- end to end ---------------------------------------------------------------------------------

def test_end_to_end_on_small_synthetic_ct(tmp_path, small_ct, forced_bundle, capsys):
    import slicerio

    ct = tmp_path / "ct.nrrd"
    sitk.WriteImage(small_ct.image, str(ct))
    before = tu.file_fingerprint(ct)
    label, seg, report = tmp_path / "pancreas.nii.gz", tmp_path / "pancreas.seg.nrrd", tmp_path / "report.json"
    rc, out, err = run_cli(capsys, "segment", ct, "-o", label, "--seg-out", seg, "--report", report, "--model", forced_bundle, "--device", "cpu", "--quiet")
    assert rc == 0, err
    assert "pancreas:" in out and "mL" in out
    assert files_in(tmp_path) == {"ct.nrrd", "pancreas.nii.gz", "pancreas.seg.nrrd", "report.json"}  # no temporaries
    assert tu.file_fingerprint(ct) == before
    lab = sitk.ReadImage(str(label))
    image = small_ct.image
    assert lab.GetSize() == image.GetSize()
    np.testing.assert_allclose(lab.GetSpacing(), image.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(lab.GetOrigin(), image.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(lab.GetDirection(), image.GetDirection(), atol=1e-6)
    arr = sitk.GetArrayFromImage(lab)
    assert set(np.unique(arr)) <= {0, 1} and arr.sum() > 0
    # the stub marks voxels in the 100..200 HU band: the result is made of such voxels
    hu = sitk.GetArrayFromImage(image)
    assert (hu[arr > 0] > tu.BAND_HU[0] - 1).all() and (hu[arr > 0] < tu.BAND_HU[1] + 1).all()
    s = slicerio.read_segmentation(str(seg))
    assert [x["name"] for x in s["segments"]] == ["Pancreas"]
    np.testing.assert_array_equal(np.transpose(np.asarray(s["voxels"]), (2, 1, 0)) > 0, arr > 0)
    r = json.loads(report.read_text(encoding="utf-8"))
    assert r["pancreas_voxels"] == int(arr.sum())
    assert r["input_geometry"]["size"] == list(image.GetSize())


def test_demo(tmp_path, small_ct, forced_bundle, monkeypatch, capsys):
    """``pancreas-c2f demo -o DIR`` with the bundled synthetic case swapped for the small one (the
    clinical-size demo case takes a minute to generate on 2 cores)."""
    from types import SimpleNamespace

    from PancreasC2FLib.apps import demo

    monkeypatch.setattr(demo, "demo_case", lambda seed=None: SimpleNamespace(image=small_ct.image, label=small_ct.label, params={"seed": seed, "small": True}))
    out = tmp_path / "demo"
    rc, stdout, err = run_cli(capsys, "demo", "-o", out, "--model", forced_bundle, "--device", "cpu", "--quiet")
    assert rc == 0, err
    expected = {"demo_ct.nii.gz", "demo_reference.nii.gz", "pancreas.nii.gz", "pancreas.seg.nrrd", "pancreas_region.mrk.json", "report.json", "overlay.png"}
    assert files_in(out) == expected
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert 0.0 <= report["dsc"] <= 1.0 and "DSC" in stdout
    assert "UNTRAINED" in err
    png = sitk.ReadImage(str(out / "overlay.png"))
    assert png.GetNumberOfComponentsPerPixel() == 3 and min(png.GetSize()) > 16
    # a second run simply works again (it replaces its own results) ...
    rc, _, err = run_cli(capsys, "demo", "-o", out, "--model", forced_bundle, "--device", "cpu", "--quiet")
    assert rc == 0, err
    assert files_in(out) == expected
    # ... but a folder holding other files of those names needs --overwrite
    other = tmp_path / "other"
    other.mkdir()
    (other / "report.json").write_text("{}", encoding="utf-8")
    rc, _, err = run_cli(capsys, "demo", "-o", other, "--model", forced_bundle, "--device", "cpu", "--quiet")
    assert rc == 4 and (other / "report.json").read_text(encoding="utf-8") == "{}"
    rc, _, err = run_cli(capsys, "demo", "-o", other, "--model", forced_bundle, "--device", "cpu", "--quiet", "--overwrite")
    assert rc == 0, err


# --- as a real process ------------------------------------------------------------------------------

def _subprocess(*argv, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(TESTING) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "PancreasC2FLib", *map(str, argv)], cwd=cwd, capture_output=True, text=True, encoding="utf-8", errors="replace", env=env, timeout=120)


def test_real_process_exit_codes_and_one_line_stderr(tmp_path, tiny_bundle):
    huge = tmp_path / "huge.mha"
    huge.write_text("ObjectType = Image\nNDims = 3\nDimSize = 1500 1500 1500\nElementType = MET_DOUBLE\nElementDataFile = LOCAL\n", encoding="utf-8")
    p = _subprocess("segment", huge, "-o", tmp_path / "seg.nii.gz", "--model", tiny_bundle, "--quiet", cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    assert_one_line_error(p.stderr)  # also: nothing from ITK printed straight to the process's stderr
    assert files_in(tmp_path) == {"huge.mha"}
    p = _subprocess("segment", "--coarse-n", cwd=tmp_path)
    assert p.returncode == 2 and "usage:" in p.stderr and "Traceback" not in p.stderr
