"""Dataset planning (Training/plan.py, ``python -m Training plan``; ``train --plan``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import c2f_testutils as tu
from Training import plan as P
from Training.__main__ import build_parser, main as training_main
from Training.datasets import open_dataset


def _case_folder(root: Path, name: str, spacing_xyz=(2.0, 2.0, 2.0), shape_zyx=(48, 64, 64)) -> Path:
    image, label = tu.phantom_case(shape_zyx=shape_zyx, spacing_xyz=spacing_xyz)
    d = root / name
    (d / "segmentations").mkdir(parents=True)
    sitk.WriteImage(image, str(d / "ct.nii.gz"))
    sitk.WriteImage(label, str(d / "segmentations" / "pancreas.nii.gz"))
    return d


def test_fingerprint_measures_what_is_there(tmp_path: Path) -> None:
    _case_folder(tmp_path, "a", (2.0, 2.0, 2.0))
    _case_folder(tmp_path, "b", (1.0, 1.0, 3.0))
    cases = open_dataset(str(tmp_path))  # a folder of ct.nii.gz + segmentations/pancreas.nii.gz
    assert [c.name for c in cases] == ["a", "b"] and [c.name for c in open_dataset(str(tmp_path / "a"))] == ["a"]
    fp = P.fingerprint(cases, log=lambda m: None)
    assert fp["cases"] == 2 and fp["size_xyz"]["median"] == [64, 64, 48]
    assert fp["spacing_mm_xyz"]["median"] == [1.5, 1.5, 2.5]
    for c, sp in zip(fp["per_case"], ((2, 2, 2), (1, 1, 3))):
        image, label = (sitk.ReadImage(str(tmp_path / c["name"] / f)) for f in ("ct.nii.gz", "segmentations/pancreas.nii.gz"))
        lab = sitk.GetArrayFromImage(label) > 0
        assert c["pancreas_voxels"] == int(lab.sum())
        assert c["pancreas_ml"] == pytest.approx(lab.sum() * np.prod(sp) / 1000, abs=0.01)
        idx = np.argwhere(lab)
        assert c["pancreas_extent_mm_xyz"] == pytest.approx(list((idx.max(0) - idx.min(0) + 1)[::-1] * np.array(sp)))
        hu = sitk.GetArrayFromImage(image)[lab]
        assert c["pancreas_median_hu"] == pytest.approx(float(np.median(hu)), abs=1)
    pooled = np.concatenate([sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / n / "ct.nii.gz")))[sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / n / "segmentations/pancreas.nii.gz"))) > 0] for n in "ab"])
    assert fp["pancreas_hu"]["percentiles"]["50"] == pytest.approx(float(np.median(pooled)), abs=3)
    settings = P.derive_settings(fp)
    pct = fp["pancreas_hu"]["percentiles"]
    assert settings["preprocessing"] == {"clip": [pct["0.5"], pct["99.5"]], "normalize": "fixed"}


def test_stage_rules() -> None:
    fp = {"spacing_mm_xyz": {"median": [0.8, 0.8, 5.0], "p10": [0.7, 0.7, 2.5]}}
    assert P.fine_spacing(fp) == [0.8, 0.8, 2.5]  # anisotropic: the coarse axis at the 10th percentile
    fp = {"spacing_mm_xyz": {"median": [0.8, 0.8, 2.0], "p10": [0.7, 0.7, 1.0]}}
    assert P.fine_spacing(fp) == [0.8, 0.8, 2.0]
    win = P.fine_window([150.0, 90.0, 80.0], 20.0, [0.8, 0.8, 2.0])
    assert all(w % 8 == 0 and w >= 32 for w in win) and np.prod(win) <= 64 ** 3
    mm = np.array(win) * [0.8, 0.8, 2.0]
    assert np.prod(win) > 64 ** 3 / 2 and mm.max() / mm.min() < 1.3  # shrunk along the longest axis in mm
    assert win == [88, 88, 32]
    assert P.fine_window([60.0, 30.0, 30.0], 10.0, [1.0, 1.0, 1.0]) == [80, 56, 56]  # fits: no shrinking
    assert P.fine_window([20.0, 20.0, 20.0], 0.0, [1.0, 1.0, 1.0]) == [32, 32, 32]
    fp = {"extent_mm_xyz": {"median": [400.0, 300.0, 160.0]}}
    spacing, window = P.coarse_stage(fp, [0.8, 0.8, 2.0])
    assert spacing == [3.12, 2.34, 2.0] and window == [64, 64, 64]
    spacing, window = P.coarse_stage({"extent_mm_xyz": {"median": [400.0, 300.0, 60.0]}}, [0.8, 0.8, 2.0])
    assert window == [64, 64, 32]  # a short scan (30 voxels at 2 mm) gets a smaller window, never under 32


def test_plan_command_and_train_uses_it(tmp_path: Path, monkeypatch, capsys) -> None:
    data = _case_folder(tmp_path, "ct1")
    out = tmp_path / "plan.json"
    assert training_main(["plan", "--data", str(data), "--out", str(out)]) == 0
    plan = json.loads(out.read_text(encoding="utf-8"))
    assert plan["format"] == P.PLAN_FORMAT and plan["fingerprint"]["cases"] == 1 and plan["tool_version"]
    assert "fine:" in capsys.readouterr().out

    import Training.train as train_mod

    jobs = []
    monkeypatch.setattr(train_mod, "train_stage", lambda job: jobs.append(job) or {})
    base = ["train", "--data", "synthetic:1", "--out", str(tmp_path / "run"), "--plan", str(out)]
    assert training_main(base + ["--stage", "fine"]) == 0
    job = jobs[-1]
    assert job.preprocessing == plan["preprocessing"]
    assert job.settings["window"] == plan["stages"]["fine"]["window"]
    assert job.settings["spacing"] == plan["stages"]["fine"]["spacing"] and job.settings["margin_mm"] == plan["stages"]["fine"]["margin_mm"]
    # options on the command line win over the plan
    assert training_main(base + ["--stage", "coarse", "--window", "32", "--clip", "-100", "240", "--spacing", "native"]) == 0
    job = jobs[-1]
    assert job.settings["window"] == [32, 32, 32] and job.settings["spacing"] is None
    assert job.preprocessing == {"clip": [-100.0, 240.0], "normalize": "fixed"}
    # without a plan: the paper's preprocessing, as before
    assert training_main(["train", "--data", "synthetic:1", "--out", str(tmp_path / "r2"), "--stage", "coarse"]) == 0
    assert jobs[-1].preprocessing == {"clip": [-100.0, 240.0], "normalize": "case_zscore"}


def test_bad_plan_file(tmp_path: Path) -> None:
    bad = tmp_path / "x.json"
    bad.write_text("{}", encoding="utf-8")
    with pytest.raises(P.DatasetError, match="not a plan"):
        P.read_plan(bad)
    assert build_parser().parse_args(["plan", "--data", "d", "--out", "o"]).command == "plan"
