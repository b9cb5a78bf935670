"""Training CLI: one-line errors with the library's exit codes, arguments checked before any data
is read, what training into an existing folder does (resume, overwrite), and --seed reproducing a
run (issues 14 and 18)."""

from __future__ import annotations

import json

import pytest
import torch

from test_training import SMALL, tiny_job

from Training.__main__ import main


def run_cli(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def train_args(tmp_path, *extra):
    return ["train", "--stage", "coarse", "--data", "synthetic:2:7", "--synthetic-options", json.dumps(SMALL), "--out", str(tmp_path / "run"),
            "--cache", str(tmp_path / "cache"), "--window", "16", "--spacing", "4", "--width", "2", "--iterations", "2", "--batch", "2",
            "--effective-batch", "2", "--validation-windows", "0", "--device", "cpu", "--threads", "1", *extra]


@pytest.mark.parametrize("argv, code, words", [
    (["train", "--stage", "coarse", "--data", "/no/such/folder", "--out", "x"], 2, "not a folder"),
    (["export", "--stage", "coarse=/no/such/run", "--out", "b", "--name", "n"], 2, "no checkpoint"),
    (["train", "--stage", "middle", "--data", "synthetic:1", "--out", "x"], 2, "has stages"),
    (["export", "--stage", "coarse", "--out", "b", "--name", "n"], 2, "STAGE=CHECKPOINT"),
])
def test_user_errors_are_one_line_with_an_exit_code(argv, code, words, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    got, err = run_cli(argv, capsys)
    assert got == code
    assert len(err) == 1 and words in err[0] and "Traceback" not in err[0]


@pytest.mark.parametrize("option, value, words", [
    ("--window", "30", "multiples of 8"),
    ("--iterations", "0", "--iterations"),
    ("--lr", "nan", "--lr"),
    ("--foreground-fraction", "1.5", "--foreground-fraction"),
    ("--spacing", "0", "--spacing"),
])
def test_arguments_are_checked_before_any_data_is_read(option, value, words, capsys, tmp_path):
    code, err = run_cli(train_args(tmp_path, option, value), capsys)
    assert code == 2 and len(err) == 1 and words in err[0]
    assert not (tmp_path / "cache").exists()  # refused before preparing anything


def test_out_folder_resume_and_overwrite(capsys, tmp_path):
    # --resume with nothing to resume: refused, not a silent fresh start
    code, err = run_cli(train_args(tmp_path, "--resume"), capsys)
    assert code == 2 and "no checkpoint_last.pt" in err[0]
    assert run_cli(train_args(tmp_path), capsys)[0] == 0
    final = (tmp_path / "run" / "final.pt").read_bytes()
    # the same OUT again without --resume: refused (exit 4), nothing touched
    code, err = run_cli(train_args(tmp_path), capsys)
    assert code == 4 and "--resume" in err[0] and "--overwrite" in err[0]
    assert (tmp_path / "run" / "final.pt").read_bytes() == final
    # a longer schedule on resume: said, with the learning-rate jump
    code, err = run_cli(train_args(tmp_path, "--resume", "--iterations", "4"), capsys)
    assert code == 0 and any("re-timed" in line and "learning rate goes from" in line for line in err)
    assert torch.load(tmp_path / "run" / "final.pt", weights_only=True)["iteration"] == 4
    # --overwrite: a fresh run (2 iterations, not a continuation of the 4)
    code, err = run_cli(train_args(tmp_path, "--overwrite"), capsys)
    assert code == 0 and any("removed" in line for line in err)
    assert torch.load(tmp_path / "run" / "final.pt", weights_only=True)["iteration"] == 2


def test_export_refuses_an_existing_bundle(capsys, tmp_path):
    assert run_cli(train_args(tmp_path), capsys)[0] == 0
    fine = train_args(tmp_path)
    fine[fine.index("coarse")] = "fine"
    fine[fine.index(str(tmp_path / "run"))] = str(tmp_path / "fine")
    assert run_cli(fine, capsys)[0] == 0
    export = ["export", "--stage", f"coarse={tmp_path / 'run'}", "--stage", f"fine={tmp_path / 'fine'}", "--name", "t", "--out", str(tmp_path / "bundle")]
    assert run_cli(export, capsys)[0] == 0
    before = (tmp_path / "bundle" / "model.json").read_bytes()
    code, err = run_cli(export, capsys)
    assert code == 4 and len(err) == 1 and "--overwrite" in err[0]
    assert (tmp_path / "bundle" / "model.json").read_bytes() == before
    assert run_cli(export + ["--overwrite"], capsys)[0] == 0


def test_seed_reproduces_a_run(tmp_path):
    from Training.train import train_stage

    def weights(out, seed):
        job = tiny_job("coarse", tmp_path / out, tmp_path / "cache", iterations=3, seed=seed, validation_windows=0)
        torch.rand(7)  # whatever ran before must not matter
        train_stage(job, log=lambda *_: None)
        return torch.load(tmp_path / out / "final.pt", weights_only=True)["model"]

    a, b, c = weights("a", 0), weights("b", 0), weights("c", 1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


# --- dataset check (issue 18, item 1) ------------------------------------------------------------

def _write_pair(images, labels, name, label_origin=None, label_value=1, shift=0):
    import numpy as np
    import SimpleITK as sitk

    arr = np.random.default_rng(len(name) + shift).normal(0, 50, (20, 24, 24)).astype(np.int16)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((2.0, 2.0, 3.0))
    img.SetOrigin((-150.0, -120.0, -300.0))
    lab = np.zeros(arr.shape, np.uint8)
    lab[5:15, 6:18, 6:18] = label_value  # 10 * 12 * 12 voxels of 12 mm^3: 17.3 mL
    label = sitk.GetImageFromArray(lab)
    label.CopyInformation(img)
    if label_origin is not None:  # e.g. an empty header: origin 0
        label.SetOrigin(label_origin)
    images.mkdir(exist_ok=True)
    labels.mkdir(exist_ok=True)
    sitk.WriteImage(img, str(images / f"{name}.nii.gz"))
    sitk.WriteImage(label, str(labels / f"{name}.nii.gz"))


def test_check_finds_what_training_would_silently_get_wrong(tmp_path, capsys):
    import shutil

    images, labels = tmp_path / "images", tmp_path / "labels"
    _write_pair(images, labels, "good")
    _write_pair(images, labels, "good2", shift=1)
    _write_pair(images, labels, "badheader", label_origin=(0.0, 0.0, 0.0))
    _write_pair(images, labels, "empty", label_value=0)
    shutil.copy(images / "good.nii.gz", images / "copy.nii.gz")
    shutil.copy(labels / "good.nii.gz", labels / "copy.nii.gz")
    shutil.copy(images / "good.nii.gz", images / "nolabel.nii.gz")
    code = main(["check", "--data", str(images), "--labels", str(labels), "--out", str(tmp_path / "check.json")])
    out, err = capsys.readouterr()
    assert code == 2
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert any("badheader" in e and "does not lie on its image" in e for e in errors)
    assert any("empty" in e and "empty label" in e for e in errors)
    assert any("copy" in e and "same image as" in e for e in errors) or any("good" in e and "same image as copy" in e for e in errors)
    assert not any(e.startswith("error: good2") for e in errors)
    assert "nolabel" in err  # images without a label are named, not dropped silently
    report = json.loads((tmp_path / "check.json").read_text(encoding="utf-8"))
    assert report["unlabelled"] == ["nolabel"] and len(report["cases"]) == 5
    # training refuses the dataset before preparing anything, in one line
    code, lines = run_cli(["train", "--stage", "coarse", "--data", str(images), "--labels", str(labels), "--out", str(tmp_path / "run"), "--cache", str(tmp_path / "cache"),
                           "--window", "16", "--width", "2", "--iterations", "1", "--device", "cpu"], capsys)
    assert code == 2 and lines[-1].startswith("python -m Training: error: dataset check failed")
    assert not (tmp_path / "run" / "final.pt").exists()


def test_validation_without_pancreas_is_not_a_perfect_score():
    import math

    import numpy as np

    from Training.datasets import StageVolume
    from Training.samplers import CoarseSampler
    from Training.trainer import TrainConfig, Trainer
    from Training.losses import DeepSupervisionCE
    from PancreasC2FLib.networks import build_network

    vol = StageVolume("empty", np.zeros((16, 16, 16), np.float32), np.zeros((16, 16, 16), np.uint8), (1.0, 1.0, 1.0))
    net = build_network("resdsn", {"width": 2})
    cfg = TrainConfig(iterations=1, batch=1, effective_batch=1, validation_windows=1, device="cpu", augment="none")
    t = Trainer(net, CoarseSampler((16, 16, 16)), DeepSupervisionCE(), [vol], [vol], cfg, "unused", {})
    t.val_batches = [t.draw_batch(1, [vol], np.random.default_rng(0), augment=False)]
    t.validation_logits = lambda x: torch.stack([torch.ones_like(x[:, 0]), torch.zeros_like(x[:, 0])], 1)  # background everywhere
    assert math.isnan(t.validate()["val_dsc"])


# --- calibrate honours the fold (issue 18, item 2) ----------------------------------------------

def test_calibrate_uses_the_folds_validation_cases_and_refuses_test_cases(tiny_bundle, tmp_path, monkeypatch, capsys):
    import Training.calibrate as calibrate
    from Training.calibrate import calibration_cases
    from Training.datasets import open_dataset
    from Training.splits import read_fold, write_splits

    cases = open_dataset("synthetic:8")
    splits = tmp_path / "s.json"
    write_splits(splits, [c.name for c in cases], 4, 0)
    fold = read_fold(splits, 1)
    seen = {}

    def fake_sweep(model, stage, thresholds, cases, *args, **kwargs):
        seen["cases"] = [c.name for c in cases]
        return {"stage": stage, "best": 0.5, "mean_dsc": {0.5: 0.8}, "cases": seen["cases"], "bundle_threshold": 0.5}

    monkeypatch.setattr(calibrate, "sweep", fake_sweep)
    assert main(["calibrate", "--model", str(tiny_bundle), "--stage", "fine", "--data", "synthetic:8", "--splits", str(splits), "--fold", "1", "--val-count", "2"]) == 0
    assert seen["cases"] == [n for n in [c.name for c in cases] if n in fold["train"]][-2:]
    assert not set(seen["cases"]) & set(fold["test"])
    # a bundle trained on fold 1 of this splits file: its test cases are refused, whatever --data says
    training = {"stages": {"coarse": {"splits": str(splits), "fold": 1}}}
    with pytest.raises(ValueError, match="refuses test cases"):
        calibration_cases(cases, None, 0, 0, training, log=lambda *_: None)
    kept = calibration_cases([c for c in cases if c.name not in fold["test"]], None, 0, 0, training, log=lambda *_: None)
    assert len(kept) == 8 - len(fold["test"])


# --- Ctrl-C (issue 18, item 7) --------------------------------------------------------------------

def test_ctrl_c_saves_a_checkpoint_and_exits_130(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    argv = train_args(tmp_path, "--iterations", "100000", "--checkpoint-every", "100000")
    proc = subprocess.Popen([sys.executable, "-m", "Training", *argv], cwd=Path(__file__).resolve().parent.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "run" / "config.json").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        time.sleep(1.0)  # a few iterations
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert "interrupted at iteration" in last and "--resume" in last and "Traceback" not in err
    ckpt = torch.load(tmp_path / "run" / "checkpoint_last.pt", weights_only=True)
    assert ckpt["iteration"] >= 1 and str(ckpt["iteration"]) in last
    assert os.path.getsize(tmp_path / "run" / "checkpoint_last.pt") > 0


# --- metrics beyond Dice (issue 18, item 10) ------------------------------------------------------

def test_surface_metrics_on_shifted_boxes():
    import math

    import numpy as np

    from Training.metrics import case_metrics

    truth = np.zeros((30, 40, 40), np.uint8)
    truth[10:20, 10:30, 10:30] = 1
    spacing = (2.0, 1.0, 1.0)  # z, y, x mm
    same = case_metrics("m", truth, truth, spacing)
    assert same["m_hd95"] == 0.0 and same["m_nsd"] == 1.0 and same["m_vol_err_ml"] == 0.0
    shifted = np.roll(truth, 3, axis=2)  # 3 mm along x
    m = case_metrics("m", shifted, truth, spacing)
    assert m["m_hd95"] == pytest.approx(3.0, abs=0.01)
    assert 0.0 < m["m_nsd"] < 1.0 and m["m_vol_err_ml"] == 0.0
    assert case_metrics("m", shifted, truth, spacing, tolerance_mm=3.0)["m_nsd"] == 1.0
    bigger = truth.copy()
    bigger[20:22] = truth[19]  # 2 more slices of 400 voxels of 2 mm^3: +1.6 mL
    assert case_metrics("m", bigger, truth, spacing)["m_vol_err_ml"] == pytest.approx(1.6)
    empty = np.zeros_like(truth)
    assert math.isinf(case_metrics("m", empty, truth, spacing)["m_hd95"]) and case_metrics("m", empty, truth, spacing)["m_nsd"] == 0.0
    both = case_metrics("m", empty, empty, spacing)
    assert math.isnan(both["m_hd95"]) and math.isnan(both["m_nsd"])


# --- whole-case validation and the best checkpoint (issue 18, item 9) ----------------------------

def test_whole_case_validation_keeps_and_exports_the_best(tmp_path):
    import csv

    from Training.export import export_bundle
    from Training.train import train_stage
    from Training.trainer import resolve_checkpoint

    runs = {}
    for stage in ("coarse", "fine"):
        job = tiny_job(stage, tmp_path / stage, tmp_path / "cache", iterations=4, validate_cases_every=2, checkpoint_every=4)
        runs[stage] = train_stage(job, log=lambda *_: None)
        with open(tmp_path / stage / "log.csv", newline="") as f:
            scored = [r for r in csv.DictReader(f) if r["case_dsc"]]
        assert [r["iteration"] for r in scored] == ["2", "4"]  # every 2 iterations, whole cases
        best = max(scored, key=lambda r: float(r["case_dsc"]))
        ckpt = torch.load(tmp_path / stage / "best.pt", weights_only=True)
        assert ckpt["best"]["iteration"] == int(best["iteration"]) and ckpt["iteration"] == int(best["iteration"])
        assert 0.0 <= ckpt["best"]["case_dsc"] <= 1.0
        assert resolve_checkpoint(tmp_path / stage).name == "best.pt"
    bundle = export_bundle({s: tmp_path / s for s in runs}, tmp_path / "bundle", "t")
    rec = bundle.metadata["training"]["stages"]["coarse"]
    assert rec["checkpoint"] == "best.pt" and rec["best_case_validation"]["case_dsc"] == pytest.approx(runs["coarse"]["best"]["case_dsc"])


# --- cross-validation with --fold all (issue 18, item 8) ------------------------------------------

def test_fold_all_trains_exports_and_evaluates_every_fold_into_one_table(tmp_path, capsys):
    import csv

    import SimpleITK as sitk

    from PancreasC2FLib.synthetic import generate_small_case

    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    for seed in range(3):
        case = generate_small_case(seed)
        sitk.WriteImage(case.image, str(images / f"c{seed}.nii.gz"))
        sitk.WriteImage(case.label, str(labels / f"c{seed}.nii.gz"))
    data = ["--data", str(images), "--labels", str(labels)]
    assert main(["splits", *data, "--folds", "3", "--out", str(tmp_path / "s.json")]) == 0
    folds = ["--splits", str(tmp_path / "s.json"), "--fold", "all"]
    common = [*data, *folds, "--cache", str(tmp_path / "cache"), "--window", "16", "--width", "2", "--iterations", "2", "--batch", "2", "--effective-batch", "2",
              "--validation-windows", "0", "--device", "cpu", "--threads", "1", "--normalize", "fixed"]
    assert main(["train", "--stage", "coarse", "--out", str(tmp_path / "coarse"), "--spacing", "4", *common]) == 0
    assert main(["train", "--stage", "fine", "--out", str(tmp_path / "fine"), "--spacing", "3", *common]) == 0
    assert sorted(p.name for p in (tmp_path / "coarse").iterdir()) == ["fold0", "fold1", "fold2"]
    assert main(["export", "--stage", f"coarse={tmp_path / 'coarse'}", "--stage", f"fine={tmp_path / 'fine'}", "--name", "cv", "--out", str(tmp_path / "models"), *folds]) == 0
    assert main(["evaluate", "--model", str(tmp_path / "models"), *data, *folds, "--out", str(tmp_path / "eval"), "--methods", "c2f,coarse", "--threads", "1"]) == 0
    with open(tmp_path / "eval" / "cases.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["case"] for r in rows) == ["c0", "c1", "c2"]  # every case once
    assert {r["fold"] for r in rows} == {"0", "1", "2"}
    for k in range(3):  # each fold's model saw only its own test case
        test = json.loads((tmp_path / "s.json").read_text(encoding="utf-8"))["splits"][k]["test"]
        assert [r["case"] for r in rows if r["fold"] == str(k)] == test
        ckpt = torch.load(tmp_path / "coarse" / f"fold{k}" / "final.pt", weights_only=True)
        assert ckpt["info"]["data"]["fold"] == k and ckpt["info"]["data"]["training_cases"] == 2
    assert "3 cases over 3 folds" in (tmp_path / "eval" / "summary.md").read_text(encoding="utf-8")


# --- batches drawn ahead in threads (issue 18, item 12) -------------------------------------------

def test_loader_threads_train_and_stay_reproducible(tmp_path):
    from Training.train import train_stage

    def weights(out):
        job = tiny_job("fine", tmp_path / out, tmp_path / "cache", iterations=3, validation_windows=0, loader_threads=2)
        train_stage(job, log=lambda *_: None)
        return torch.load(tmp_path / out / "final.pt", weights_only=True)["model"]

    a, b = weights("a"), weights("b")
    assert all(torch.equal(a[k], b[k]) for k in a)  # the threads' timing does not change the run
    import threading

    assert not any(t.name.startswith("batches") for t in threading.enumerate())  # threads ended with the run
