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
