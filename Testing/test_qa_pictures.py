"""The annotated QA pictures (PancreasC2FLib.apps.overlay, matplotlib): one case's overlay and the
batch overview. Checked through their pixels and PNG text chunks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import c2f_testutils as tu
from PancreasC2FLib.apps import overlay
from PancreasC2FLib.apps.cli import main as cli_main

pytest.importorskip("matplotlib")
from PIL import Image  # noqa: E402  (comes with matplotlib)

ORANGE = np.array([255 * c for c in overlay.RESULT_RGB])
YELLOW = np.array([255 * c for c in overlay.BOX_RGB])


def _near(rgb: np.ndarray, colour: np.ndarray, tol: float = 60) -> np.ndarray:
    return np.abs(rgb.astype(float) - colour).sum(-1) < tol


def _box_of(label: sitk.Image, margin: int = 3) -> list[list[int]]:
    idx = np.argwhere(sitk.GetArrayFromImage(label) > 0)
    lo, hi = idx.min(0)[::-1] - margin, idx.max(0)[::-1] + 1 + margin
    return [[int(a), int(b)] for a, b in zip(lo, hi)]


def test_lps_volume_centre_and_radiological_letters() -> None:
    """Views go through the mask's centre; patient left is on the image right in the axial view."""
    image, label = tu.phantom_case()
    vol = overlay._LPSVolume(image, [label], None)
    m = sitk.GetArrayFromImage(sitk.DICOMOrient(label, "LPS")) > 0
    assert vol.center == tuple(int(round(c)) for c in np.argwhere(m).mean(0)[::-1])
    assert overlay._AXIS_LETTERS[0] == ("R", "L")  # LPS x grows towards the patient's left
    # the same volume stored RAS (x and y flipped) gives the same axial cut
    flipped = sitk.Flip(image, [True, True, False])
    vol2 = overlay._LPSVolume(flipped, [sitk.Flip(label, [True, True, False])], None)
    assert np.array_equal(vol.cut(vol.ct, "axial"), vol2.cut(vol2.ct, "axial"))


def test_qa_overlay_shows_result_box_and_provenance(tmp_path: Path) -> None:
    case = tu.phantom_case()
    image, label = case
    path = tmp_path / "overlay.png"
    report = {"pancreas_volume_ml": 12.5, "quality": "review", "quality_reasons": ["odd volume"],
              "region": {"box_ijk": _box_of(label)}, "model_name": "m", "model_sha256": "ab" * 32,
              "tool_version": "9.9"}
    assert overlay.write_report_overlay(path, image, label, report, reference=label, title="case X")
    png = Image.open(path)
    assert png.mode == "RGB"
    desc = json.loads(png.text["Description"])
    assert desc["model_sha256"] == "ab" * 32 and desc["window_width_hu"] == 400 and desc["quality"] == "review"
    rgb = np.asarray(png)
    # two rows of three views (whole field, zoomed): the filled result and the box in both rows
    top, bottom = rgb[: rgb.shape[0] // 2], rgb[rgb.shape[0] // 2:]
    for half in (top, bottom):
        assert _near(half, ORANGE).sum() > 200
        assert _near(half, YELLOW, 40).sum() > 50
    # without a mask and a box there is nothing to zoom on: one row, no orange
    path2 = tmp_path / "plain.png"
    overlay.write_qa_overlay(path2, image, None)
    rgb2 = np.asarray(Image.open(path2))
    assert rgb2.shape[0] < rgb.shape[0] * 0.7 and _near(rgb2, ORANGE).sum() < 20


def test_overlay_without_matplotlib_falls_back(tmp_path: Path, monkeypatch) -> None:
    image, label = tu.phantom_case()
    monkeypatch.setattr(overlay, "have_matplotlib", lambda: False)
    path = tmp_path / "o.png"
    assert overlay.write_report_overlay(path, image, label, {}) is False
    rgb = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    assert np.all(rgb == (60, 255, 60), axis=2).any()  # the plain panels, result outlined green
    assert overlay.batch_overview(tmp_path / "ov.png", [], [], lambda n: tmp_path / n, log=lambda m: None) == []
    assert not (tmp_path / "ov.png").exists()


def test_batch_overview_pages_and_unreadable_case(tmp_path: Path) -> None:
    image, label = tu.phantom_case()
    rows = [{"case": f"c{i}", "status": "ok", "volume_ml": 10 + i, "quality": "ok"} for i in range(3)]
    rows.append({"case": "bad", "status": "empty", "error": "coarse stage found nothing"})

    def load(row):
        if row["case"] == "bad":
            raise OSError("no such file")
        return image, label, _box_of(label)

    one = overlay.write_batch_overview(tmp_path / "overview.png", rows, load)
    assert one == [tmp_path / "overview.png"]
    rgb = np.asarray(Image.open(one[0]))
    band = rgb.shape[0] / 4  # about one band of rows per case
    for r in range(3):
        assert _near(rgb[int(r * band + 20): int((r + 1) * band), rgb.shape[1] // 4:], ORANGE).sum() > 100
    assert _near(rgb[int(3 * band + 20):, rgb.shape[1] // 4:], ORANGE).sum() == 0  # unreadable: text only
    pages = overlay.write_batch_overview(tmp_path / "many.png", rows, load, rows_per_page=3)
    assert [p.name for p in pages] == ["many-1.png", "many-2.png"] and all(p.is_file() for p in pages)


def test_batch_writes_overview(tmp_path: Path, forced_bundle, capsys) -> None:
    cases = tmp_path / "in"
    cases.mkdir()
    image, _ = tu.phantom_case(shape_zyx=(40, 56, 56))
    sitk.WriteImage(image, str(cases / "a.nii.gz"))
    (cases / "b.nii.gz").write_bytes(b"not an image")
    out = tmp_path / "out"
    base = ["batch", "--input", str(cases), "--model", str(forced_bundle), "--device", "cpu"]
    assert cli_main(base + ["--output", str(out)]) == 7  # b failed: "finished, some cases failed"
    assert "overview picture: " in capsys.readouterr().err
    rgb = np.asarray(Image.open(out / "overview.png"))
    assert _near(rgb[: rgb.shape[0] // 2, rgb.shape[1] // 4:], ORANGE).sum() > 100  # case a, segmented
    assert cli_main(base + ["--output", str(tmp_path / "out2"), "--no-overview"]) == 7
    assert not (tmp_path / "out2" / "overview.png").exists()


def test_segment_overlay_option(tmp_path: Path, phantom_file: Path, forced_bundle) -> None:
    base = ["segment", str(phantom_file), "-o", str(tmp_path / "seg.nii.gz"), "--model", str(forced_bundle), "--device", "cpu", "--quiet"]
    assert cli_main(base + ["--overlay", str(tmp_path / "qa.jpg")]) == 2  # a PNG only
    assert not (tmp_path / "seg.nii.gz").exists()
    assert cli_main(base + ["--overlay", str(tmp_path / "qa.png")]) == 0
    png = Image.open(tmp_path / "qa.png")
    assert json.loads(png.text["Description"])["model_name"] and _near(np.asarray(png), ORANGE).sum() > 200
