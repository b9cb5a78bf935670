"""Batch processing: the library command (``pancreas-c2f batch``) and the Slicer batch script run
in plain Python with slicer-core. Three cases, one of them a corrupt file: ok/failed rows, outputs
on each input's grid, ``--resume`` skipping what is done, exit codes."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

import c2f_testutils as tu
from PancreasC2FLib.apps import batch as libbatch
from PancreasC2FLib.apps.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
SLICER_BATCH = ROOT / "PancreasC2F" / "batch.py"


@pytest.fixture(scope="module")
def cases_dir(tmp_path_factory) -> Path:
    """Two phantom CTs on different grids (LPS; permuted and flipped) and one corrupt file."""
    d = tmp_path_factory.mktemp("cases")
    img_a, lab_a = tu.phantom_case(shape_zyx=(40, 56, 56))
    img_b, lab_b = tu.phantom_case(shape_zyx=(40, 56, 56), axes=(1, 0, 2), flips=(True, False, True), origin=(10.0, -5.0, 50.0))
    sitk.WriteImage(img_a, str(d / "case_a.nii.gz"))
    sitk.WriteImage(img_b, str(d / "case_b.nrrd"))
    sitk.WriteImage(lab_a, str(d.parent / "label_a.nii.gz"))
    sitk.WriteImage(lab_b, str(d.parent / "label_b.nrrd"))
    (d / "case_c.nii.gz").write_bytes(b"\x1f\x8b this is not a gzip stream at all")
    (d / "notes.txt").write_text("not an image", encoding="utf-8")
    return d


def read_rows(out: Path) -> list[dict]:
    with open(out / libbatch.CSV_NAME, newline="") as f:
        return list(csv.DictReader(f))


def check_seg_on_grid(seg_path: Path, image_path: Path, label_path: Path | None = None) -> np.ndarray:
    """The .seg.nrrd lies on the input's exact grid; returns its mask in (k, j, i) order."""
    image = sitk.ReadImage(str(image_path))
    seg = slicerio.read_segmentation(str(seg_path))
    d = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())[None, :]
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = d
    ijk_to_lps[:3, 3] = image.GetOrigin()
    assert np.allclose(seg["ijkToLPS"], ijk_to_lps, atol=1e-4)
    assert seg["voxels"].shape[:3] == image.GetSize()
    assert [s["name"] for s in seg["segments"]] == ["Pancreas"]
    assert seg["segments"][0]["terminology"]["type"][1] == "15776009"
    mask = np.transpose(seg["voxels"] > 0, (2, 1, 0)).astype(np.uint8)
    if label_path is not None:
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(label_path)))
        assert int((mask != truth).sum()) == 0
    return mask


def test_discovery_skips_outputs_and_non_images(cases_dir, tmp_path):
    cases = libbatch.discover_cases(cases_dir)
    assert [c.name for c in cases] == ["case_a", "case_b", "case_c"]
    single = libbatch.discover_cases(cases_dir / "case_b.nrrd")
    assert [c.name for c in single] == ["case_b"]
    # A results folder inside the input folder is not a case, nor are segmentations.
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.seg.nrrd").write_text("", encoding="utf-8")
    (tmp_path / "in" / "ct.mha").write_text("", encoding="utf-8")
    (tmp_path / "in" / "out").mkdir()
    assert [c.name for c in libbatch.discover_cases(tmp_path / "in", exclude=[tmp_path / "in" / "out"])] == ["ct"]


def test_library_batch_keeps_going_and_resumes(cases_dir, forced_bundle, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["batch", "--input", str(cases_dir), "--output", str(out), "--model", str(forced_bundle), "--device", "cpu"]
    assert cli_main(args) == 7  # finished, one case failed
    rows = read_rows(out)
    assert [(r["case"], r["status"]) for r in rows] == [("case_a", "ok"), ("case_b", "ok"), ("case_c", "failed")]
    assert "cannot read" in rows[2]["error"] and rows[2]["output"] == ""
    sha = rows[0]["model_sha256"]
    assert len(sha) == 64 and rows[1]["model_sha256"] == sha
    for r, image, label in (
        (rows[0], cases_dir / "case_a.nii.gz", cases_dir.parent / "label_a.nii.gz"),
        (rows[1], cases_dir / "case_b.nrrd", cases_dir.parent / "label_b.nrrd"),
    ):
        mask = check_seg_on_grid(Path(r["output"]), image, label)
        spacing = sitk.ReadImage(str(image)).GetSpacing()
        assert float(r["volume_ml"]) == pytest.approx(mask.sum() * np.prod(spacing) / 1000, rel=1e-4)
        assert float(r["mean_hu"]) == pytest.approx(tu.PANCREAS_HU, abs=2)
        report = json.loads((out / f"{r['case']}.report.json").read_text(encoding="utf-8"))
        assert report["model_sha256"] == sha and report["tool_version"]
        seg = slicerio.read_segmentation(r["output"])
        assert json.loads(seg["PancreasC2F_provenance"])["model_sha256"] == sha
    assert not (out / "case_c.seg.nrrd").exists()
    # Per-case lines show the quality flag; the summary counts and says where things are.
    captured = capsys.readouterr()
    assert "case_a: ok" in captured.err and "quality review (volume" in captured.err
    assert "3 case(s): 0 ok, 2 review, 1 failed, 0 empty" in captured.out
    assert f"table: {out / libbatch.CSV_NAME}" in captured.out

    # Running again without --resume or --overwrite replaces nothing: exit 4 before any work.
    before = tu.file_fingerprint(out / "case_a.seg.nrrd")
    table_before = (out / libbatch.CSV_NAME).read_bytes()
    assert cli_main(args) == 4
    assert tu.file_fingerprint(out / "case_a.seg.nrrd") == before and (out / libbatch.CSV_NAME).read_bytes() == table_before

    # --resume: done cases are skipped (untouched, their rows kept), the failed one is tried again;
    # one current row per case.
    assert cli_main(args + ["--resume"]) == 7
    rows2 = read_rows(out)
    assert [(r["case"], r["status"]) for r in rows2] == [("case_a", "ok"), ("case_b", "ok"), ("case_c", "failed")]
    assert rows2[:2] == rows[:2] and rows2[2]["finished"] >= rows[2]["finished"]
    assert tu.file_fingerprint(out / "case_a.seg.nrrd") == before
    assert "2 skipped (done earlier)" in capsys.readouterr().out

    # An output removed by hand is redone on resume.
    (out / "case_b.seg.nrrd").unlink()
    assert cli_main(args + ["--resume"]) == 7
    assert [(r["case"], r["status"]) for r in read_rows(out)] == [("case_a", "ok"), ("case_b", "ok"), ("case_c", "failed")]
    assert (out / "case_b.seg.nrrd").is_file()

    # --overwrite redoes every case.
    assert cli_main(args + ["--overwrite"]) == 7
    assert read_rows(out)[0]["finished"] >= rows[0]["finished"] and len(read_rows(out)) == 3


def test_library_batch_exit_codes(cases_dir, forced_bundle, empty_bundle, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.nii.gz").write_bytes(b"garbage")
    (bad / "broken2.nrrd").write_bytes(b"NRRD0004\ngarbage")
    base = ["--model", str(forced_bundle), "--device", "cpu"]
    # Every case failed: exit 7 ("finished, some cases failed"), and both rows are there.
    assert cli_main(["batch", "--input", str(bad), "--output", str(tmp_path / "o1")] + base) == 7
    assert [r["status"] for r in read_rows(tmp_path / "o1")] == ["failed", "failed"]
    # Usage errors: no cases, bad model, --roi with --coarse-only.
    empty_dir = tmp_path / "nothing"
    empty_dir.mkdir()
    assert cli_main(["batch", "--input", str(empty_dir), "--output", str(tmp_path / "o2")] + base) == 2
    assert cli_main(["batch", "--input", str(cases_dir), "--output", str(tmp_path / "o3"), "--model", str(tmp_path)]) == 5
    assert not (tmp_path / "o3").exists()  # a rejected model leaves no empty output folder
    assert cli_main(["batch", "--input", str(cases_dir), "--output", str(tmp_path / "o4"), "--coarse-only", "--roi", str(bad)] + base) == 2
    # A coarse stage that finds nothing: "empty", not a failure of the batch.
    assert cli_main(["batch", "--input", str(cases_dir / "case_a.nii.gz"), "--output", str(tmp_path / "o5"), "--model", str(empty_bundle), "--device", "cpu"]) == 0
    (row,) = read_rows(tmp_path / "o5")
    assert row["status"] == "empty" and "coarse stage found no pancreas" in row["error"]


def test_library_batch_coarse_only_then_roi(cases_dir, forced_bundle, tmp_path):
    rois = tmp_path / "rois"
    base = ["--model", str(forced_bundle), "--device", "cpu"]
    assert cli_main(["batch", "--input", str(cases_dir / "case_a.nii.gz"), "--output", str(rois), "--coarse-only"] + base) == 0
    roi_file = rois / "case_a.mrk.json"
    assert json.loads(roi_file.read_text(encoding="utf-8"))["markups"][0]["type"] == "ROI"
    # The candidate regions folder drives a second batch that skips the coarse stage.
    out = tmp_path / "fine"
    assert cli_main(["batch", "--input", str(cases_dir / "case_a.nii.gz"), "--output", str(out), "--roi", str(rois)] + base) == 0
    (row,) = read_rows(out)
    assert row["status"] == "ok" and row["region_source"] == "roi" and row["coarse_s"] == ""
    check_seg_on_grid(Path(row["output"]), cases_dir / "case_a.nii.gz", cases_dir.parent / "label_a.nii.gz")


def _run_slicer_batch(args, cwd):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    # The stub architecture of the forced bundle is registered by c2f_testutils in a tiny wrapper.
    code = "import sys, runpy, c2f_testutils; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    return subprocess.run([sys.executable, "-c", code, str(SLICER_BATCH)] + args, cwd=cwd, env=env, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300)


def test_slicer_batch_script_with_slicer_core(cases_dir, forced_bundle, tmp_path):
    pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core)")
    out = tmp_path / "slicer_out"
    args = ["--", "--input", str(cases_dir), "--output", str(out), "--model", str(forced_bundle), "--device", "cpu"]
    proc = _run_slicer_batch(args, tmp_path)
    assert proc.returncode == 7, proc.stderr[-3000:]  # case_c failed
    rows = read_rows(out)
    assert [(r["case"], r["status"]) for r in rows] == [("case_a", "ok"), ("case_b", "ok"), ("case_c", "failed")]
    # Written by MRML's segmentation storage node, on each input's grid, same masks as the library.
    check_seg_on_grid(out / "case_a.seg.nrrd", cases_dir / "case_a.nii.gz", cases_dir.parent / "label_a.nii.gz")
    check_seg_on_grid(out / "case_b.seg.nrrd", cases_dir / "case_b.nrrd", cases_dir.parent / "label_b.nrrd")
    seg = slicerio.read_segmentation(str(out / "case_a.seg.nrrd"))
    assert seg["segments"][0]["tags"]["PancreasC2F.modelSha256"] == rows[0]["model_sha256"]
    report = json.loads((out / "case_a.report.json").read_text(encoding="utf-8"))
    assert report["pancreas_volume_ml"] == pytest.approx(float(rows[0]["volume_ml"]))
    assert "1 failed" in proc.stdout and "table:" in proc.stdout

    # The same script in this process (faster than a new interpreter): --resume, and exit codes.
    import runpy

    script = runpy.run_path(str(SLICER_BATCH), run_name="pancreas_c2f_slicer_batch")
    assert script["main"](args + ["--resume"]) == 7
    assert [r["status"] for r in read_rows(out)] == ["ok", "ok", "failed"]
    # Every case failed -> 7; a usage error -> 2; options are checked like the CLI's; a rejected
    # model leaves no empty output folder.
    assert script["main"](["--input", str(cases_dir / "case_c.nii.gz"), "--output", str(tmp_path / "o2"), "--model", str(forced_bundle)]) == 7
    assert script["main"](["--input", str(tmp_path / "missing"), "--output", str(tmp_path / "o3"), "--model", str(forced_bundle)]) == 2
    for bad in (["--margin-mm", "nan"], ["--margin-mm", "inf"], ["--min-island-fraction", "2"]):
        assert script["main"](["--input", str(cases_dir), "--output", str(tmp_path / "o4"), "--model", str(forced_bundle)] + bad) == 2
    assert script["main"](["--input", str(cases_dir), "--output", str(tmp_path / "o5"), "--model", str(tmp_path)]) == 5
    assert not (tmp_path / "o4").exists() and not (tmp_path / "o5").exists()
