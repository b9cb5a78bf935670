"""Training package: samplers, augmentation, loss, splits, a short training run exported to a
bundle that the inference pipeline runs, a 2-process DDP run, and the evaluation table.

Everything is tiny (networks of width 2, windows of 16 voxels, 96 x 96 x 64 synthetic cases) so the
file runs in well under a minute on two CPU cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from Training.augment import rotate_flip
from Training.datasets import StageVolume, open_dataset
from Training.losses import DeepSupervisionCE
from Training.samplers import CoarseSampler, FineSampler
from Training.splits import kfold, read_fold, write_splits

ROOT = Path(__file__).resolve().parent.parent
SMALL = {"spacing": [2.0, 2.0, 2.0], "size": [96, 96, 64], "center_on_pancreas": True}


def blob_volume(shape=(40, 50, 60), centre=(20, 30, 25), radii=(5, 6, 8), spacing=(2.0, 1.0, 1.5)) -> StageVolume:
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    r = sum(((g - c) / r) ** 2 for g, c, r in zip((z, y, x), centre, radii))
    label = (r <= 1).astype(np.uint8)
    image = np.random.default_rng(0).normal(size=shape).astype(np.float32) + 2 * label
    return StageVolume("blob", image, label, spacing)


# --- samplers ----------------------------------------------------------------------------------

def test_fine_windows_always_contain_foreground():
    vol = blob_volume()
    sampler = FineSampler((16, 16, 16), margin_mm=20.0)
    rng = np.random.default_rng(1)
    for _ in range(300):
        img, lab = sampler.sample(vol, rng)
        assert img.shape == lab.shape == (16, 16, 16)
        assert lab.any()


def test_coarse_windows_cover_the_volume_and_include_negatives():
    vol = blob_volume(shape=(24, 28, 32), centre=(3, 4, 4), radii=(2, 2, 2))
    sampler = CoarseSampler((16, 16, 16), foreground_fraction=0.5)
    rng = np.random.default_rng(2)
    covered = np.zeros(vol.image.shape, bool)
    with_fg = 0
    for _ in range(2000):
        c = sampler.corner(vol, rng)
        assert all(0 <= ci <= s - 16 for ci, s in zip(c, vol.image.shape))
        covered[c[0] : c[0] + 16, c[1] : c[1] + 16, c[2] : c[2] + 16] = True
        with_fg += bool(vol.label[c[0] : c[0] + 16, c[1] : c[1] + 16, c[2] : c[2] + 16].any())
    assert covered.all()
    assert 0.5 * 2000 <= with_fg < 2000  # forced foreground windows, and hard negatives too


def test_window_larger_than_volume_is_padded_with_the_minimum():
    vol = blob_volume(shape=(10, 50, 60), centre=(5, 30, 25), radii=(3, 6, 8))
    img, lab = CoarseSampler((16, 16, 16)).sample(vol, np.random.default_rng(0))
    assert img.shape == (16, 16, 16)
    assert np.all(img[10:] == vol.image.min()) and not lab[10:].any()


# --- augmentation --------------------------------------------------------------------------------

def test_rotations_and_flips_keep_image_and_label_aligned():
    rng = np.random.default_rng(3)
    image = rng.normal(size=(12, 12, 12)).astype(np.float32)
    label = (image > 0.3).astype(np.uint8)  # label = f(image), voxel by voxel
    seen = set()
    for _ in range(60):
        img, lab = rotate_flip(image, label, rng)
        np.testing.assert_array_equal(lab, (img > 0.3).astype(np.uint8))
        np.testing.assert_array_equal(np.sort(img, axis=None), np.sort(image, axis=None))
        seen.add(img.tobytes())
    assert len(seen) > 10  # many distinct elements of the group


def test_deep_supervision_loss_weights():
    torch.manual_seed(0)
    target = torch.randint(0, 2, (2, 8, 8, 8))
    outs = tuple(torch.randn(2, 2, 8, 8, 8) for _ in range(3))
    total, main = DeepSupervisionCE()(outs, target)
    ce = [torch.nn.functional.cross_entropy(o, target) for o in outs]
    assert torch.isclose(total, ce[0] + 0.2 * ce[1] + 0.4 * ce[2])
    assert torch.isclose(main, ce[0])


# --- splits ------------------------------------------------------------------------------------

def test_four_folds_of_82_cases(tmp_path):
    names = [f"PANCREAS_{i:04d}" for i in range(1, 83)]
    folds = kfold(names, 4, seed=0)
    assert [len(f["test"]) for f in folds] == [21, 21, 20, 20]
    tests = [set(f["test"]) for f in folds]
    assert set().union(*tests) == set(names) and sum(map(len, tests)) == 82
    for f in folds:
        assert set(f["train"]) | set(f["test"]) == set(names) and not set(f["train"]) & set(f["test"])
    write_splits(tmp_path / "s.json", names, 4, 0)
    assert read_fold(tmp_path / "s.json", 2) == folds[2]


def test_splits_command(tmp_path):
    from Training.__main__ import main

    assert main(["splits", "--data", "synthetic:10:5", "--folds", "3", "--out", str(tmp_path / "s.json")]) == 0
    doc = json.loads((tmp_path / "s.json").read_text(encoding="utf-8"))
    assert [len(s["test"]) for s in doc["splits"]] == [4, 3, 3]


# --- training, export, inference, evaluation ----------------------------------------------------

def tiny_job(stage, out, cache, iterations=25, **config):
    from Training.train import StageJob
    from Training.trainer import TrainConfig

    settings = {
        "coarse": {"window": [16, 16, 16], "spacing": [4.0, 4.0, 4.0], "n": 1},
        "fine": {"window": [16, 16, 16], "spacing": [3.0, 3.0, 3.0], "n": 1, "margin_mm": 10.0},
    }[stage]
    cfg = dict(iterations=iterations, batch=4, effective_batch=4, lr=0.05, augment="none", validate_every=iterations, checkpoint_every=iterations, validation_windows=4, device="cpu", threads=2, log_every=1, validate_cases_every=0)
    cfg.update(config)
    return StageJob(
        stage=stage, data="synthetic:2:7", val_data="synthetic:1:99", out=str(out), settings=settings,
        network_args={"width": 2}, preprocessing={"clip": [-100.0, 240.0], "normalize": "fixed"},
        synthetic_options=SMALL, cache=str(cache), config=TrainConfig(**cfg),
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Both stages trained briefly on two small synthetic cases, and exported."""
    from Training.export import export_bundle
    from Training.train import train_stage

    work = tmp_path_factory.mktemp("train")
    results = {s: train_stage(tiny_job(s, work / s, work / "cache"), log=lambda *_: None) for s in ("coarse", "fine")}
    bundle = export_bundle({s: work / s for s in results}, work / "bundle", "tiny-test", license="test only")
    return work, results, bundle


def test_training_lowers_the_loss(trained):
    work, results, _ = trained
    for stage in ("coarse", "fine"):
        rows = [json.loads(json.dumps(r)) for r in _read_log(work / stage / "log.csv")]
        losses = [r["loss"] for r in rows]
        assert np.mean(losses[-5:]) < np.mean(losses[:5]), stage
        assert "val_dsc" in rows[-1]
        assert (work / stage / "final.pt").is_file() and (work / stage / "curves.png").is_file()


def _read_log(path):
    import csv

    with open(path, newline="") as f:
        return [{k: float(v) for k, v in r.items() if v} for r in csv.DictReader(f)]


def test_exported_bundle_runs_in_the_pipeline(trained):
    from PancreasC2FLib.io.bundle import load_bundle
    from PancreasC2FLib.pipelines import create_pipeline
    from PancreasC2FLib.synthetic import generate_small_case

    work, _, _ = trained
    bundle = load_bundle(work / "bundle")
    md = bundle.metadata
    assert md["trained"] and md["preprocessing"]["normalize"] == "fixed"
    assert md["stages"]["coarse"]["spacing"] == [4.0, 4.0, 4.0] and md["stages"]["fine"]["network"]["args"] == {"width": 2}
    assert "foreground_fraction" not in md["stages"]["coarse"]  # training-only settings stay out
    assert md["training"]["stages"]["fine"]["iterations"] == 25
    case = generate_small_case(123)
    # A threshold of 0 makes the (barely trained) coarse stage keep everything: the run is defined.
    p = create_pipeline(bundle, device="cpu", overrides={"stages": {"coarse": {"threshold": 0.0}}})
    result = p.run(case.image)
    assert result.label.GetSize() == case.image.GetSize()


def test_export_replaces_the_default_post_processing(trained, tmp_path):
    """A recipe's own island removal (e.g. demo-zhao-two-stage's) lands in model.json; the rest
    of the pipeline's defaults stay."""
    from Training.export import export_bundle

    work, _, _ = trained
    plain = export_bundle({s: work / s for s in ("coarse", "fine")}, tmp_path / "a", "a").metadata["postprocess"]
    changed = export_bundle({s: work / s for s in ("coarse", "fine")}, tmp_path / "b", "b", postprocess={"min_island_fraction": 0.35}).metadata["postprocess"]
    assert changed["min_island_fraction"] == 0.35 and plain["min_island_fraction"] != 0.35
    assert {k: v for k, v in changed.items() if k != "min_island_fraction"} == {k: v for k, v in plain.items() if k != "min_island_fraction"}


def test_evaluation_table_on_two_cases(trained, tmp_path):
    from Training.evaluate import evaluate

    work, _, _ = trained
    cases = open_dataset("synthetic:2:300", synthetic_options=SMALL)
    out = evaluate(work / "bundle", cases, tmp_path, log=lambda *_: None)
    assert [s["method"] for s in out["summary"]] == ["C2F", "Coarse", "Fine"]
    table = (tmp_path / "summary.md").read_text(encoding="utf-8")
    assert "| Method | Mean DSC | Max DSC | Min DSC | n | Time per case (s) |" in table
    rows = (tmp_path / "cases.csv").read_text(encoding="utf-8").strip().splitlines()
    assert len(rows) == 3 and rows[0].startswith("case,")
    assert {"c2f_hd95", "c2f_nsd", "c2f_vol_err_ml", "fine_hd95"} <= set(rows[0].split(","))  # metrics.py
    assert "Mean HD95 (mm)" in table and all("mean_nsd" in s for s in out["summary"])
    for s in out["summary"]:
        assert 0 <= s["min_dsc"] <= s["mean_dsc"] <= s["max_dsc"] <= 100


def test_resume_continues_from_the_checkpoint(trained, tmp_path):
    from Training.train import train_stage

    work, _, _ = trained
    job = tiny_job("coarse", tmp_path / "c", work / "cache", iterations=4, checkpoint_every=2)
    job.config.time_limit_min = 1e-9  # stop after the first iteration
    first = train_stage(job, log=lambda *_: None)
    assert first["stopped_early"] and first["iterations"] == 1
    job.config.time_limit_min = None
    job.resume = True
    second = train_stage(job, log=lambda *_: None)
    assert second["iterations"] == 4 and not second["stopped_early"]


def test_ddp_two_cpu_processes(trained, tmp_path):
    """torchrun with 2 processes (gloo): the batch is shared, rank 0 writes the checkpoint."""
    work, _, _ = trained
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "Training", "train",
        "--stage", "coarse", "--data", "synthetic:2:7", "--out", str(tmp_path / "ddp"), "--cache", str(work / "cache"),
        "--window", "16", "--spacing", "4", "--width", "2", "--normalize", "fixed", "--iterations", "3",
        "--batch", "2", "--effective-batch", "4", "--augment", "none", "--device", "cpu", "--threads", "1",
        "--validate-every", "3", "--checkpoint-every", "3", "--synthetic-options", json.dumps(SMALL),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((tmp_path / "ddp" / "config.json").read_text(encoding="utf-8"))
    assert config["world_size"] == 2 and config["accumulation"] == 1
    assert (tmp_path / "ddp" / "final.pt").is_file()


def test_tensorboard_logs_what_log_csv_logs(tmp_path, monkeypatch):
    """--tensorboard: the same scalars as log.csv go to OUT/tensorboard (writer faked: the
    package is optional); without the package the command refuses up front, exit 2."""
    from Training import trainer as trainer_module
    from Training.__main__ import main
    from Training.train import train_stage

    written, closed = [], []

    class FakeWriter:
        def __init__(self, folder):
            self.folder = folder

        def add_scalar(self, key, value, step):
            written.append((key, step))

        def close(self):
            closed.append(self.folder)

    monkeypatch.setattr(trainer_module, "summary_writer", FakeWriter)
    out = tmp_path / "coarse"
    train_stage(tiny_job("coarse", out, tmp_path / "cache", iterations=3, tensorboard=True), log=lambda *_: None)
    assert {("loss", 1), ("loss", 3), ("lr", 2)} <= set(written) and any(k == "val_dsc" for k, _ in written)
    assert closed == [out / "tensorboard"]
    monkeypatch.setattr(trainer_module, "tensorboard_available", lambda: False)
    rc = main(["train", "--stage", "coarse", "--data", "synthetic:2:7", "--out", str(tmp_path / "x"), "--tensorboard", "--iterations", "1"])
    assert rc == 2 and not (tmp_path / "x").exists()
