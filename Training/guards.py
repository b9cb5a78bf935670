"""Up-front checks of ``python -m Training train``: its arguments and its output folder, before any
data is read, so a mistake costs a one-line error (exit 2 or 4) instead of an hour of preparation
or a crash deep in the network.
"""

from __future__ import annotations

import math
from pathlib import Path

from PancreasC2FLib.errors import InputError, OutputError

from .trainer import FINAL_CHECKPOINT, LAST_CHECKPOINT, load_checkpoint, poly_lr

# What a training folder holds (``--overwrite`` removes exactly these, nothing else).
RUN_FILES = (LAST_CHECKPOINT, FINAL_CHECKPOINT, "log.csv", "curves.png", "config.json", "best.pt", "validation.csv")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise InputError(message)


def check_numbers(values: dict[str, tuple]) -> None:
    """``{"--option": (value, lowest, highest, lowest_allowed_equal)}``: finite and in range (None: unset)."""
    for option, (value, low, high, closed) in values.items():
        if value is None:
            continue
        ok = isinstance(value, (int, float)) and math.isfinite(value) and (value >= low if closed else value > low) and value <= high
        _require(ok, f"{option} {value}: must be {'>=' if closed else '>'} {low:g}" + (f" and <= {high:g}" if high != math.inf else ""))


def check_train_arguments(a, settings: dict, network) -> None:
    """The train command's numbers, and stage settings against the network (window multiples)."""
    inf = math.inf
    check_numbers({
        "--iterations": (a.iterations, 1, inf, True), "--batch": (a.batch, 1, inf, True), "--effective-batch": (a.effective_batch, 1, inf, True),
        "--lr": (a.lr, 0, inf, False), "--weight-decay": (a.weight_decay, 0, inf, True), "--momentum": (a.momentum, 0, 1, True),
        "--checkpoint-every": (a.checkpoint_every, 1, inf, True), "--validate-every": (a.validate_every, 1, inf, True),
        "--validation-windows": (a.validation_windows, 0, inf, True), "--workers": (a.workers, 1, inf, True), "--loader-threads": (getattr(a, "loader_threads", 0), 0, 64, True), "--threads": (a.threads, 1, inf, True),
        "--width": (a.width, 1, inf, True), "--time-limit-min": (a.time_limit_min, 0, inf, False), "--seed": (a.seed, 0, 2**32 - 1, True),
        "--n": (a.n, 1, inf, True), "--margin-mm": (a.margin_mm, 0, inf, True),  # given ones: recipes' own defaults vary
        "--foreground-fraction": (a.foreground_fraction, 0, 1, True), "--foreground-centred": (a.foreground_centred, 0, 1, True),
        "--validate-cases-every": (getattr(a, "validate_cases_every", None), 0, inf, True),
    })
    if a.clip is not None:  # None: the plan's or the paper's window (train.py fills it in)
        _require(all(math.isfinite(v) for v in a.clip) and a.clip[0] < a.clip[1], f"--clip {a.clip[0]:g} {a.clip[1]:g}: needs LO < HI")
    for w in a.class_weights or []:
        check_numbers({"--class-weights": (w, 0, inf, False)})
    spacing = settings.get("spacing")
    if spacing:
        _require(all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in spacing), f"--spacing {spacing}: every value must be > 0 mm")
    window = settings.get("window")
    if window is not None:
        multiple = getattr(network, "size_multiple", 1)
        ok = len(window) == 3 and all(float(v) == int(v) and int(v) > 0 and int(v) % multiple == 0 for v in window)
        _require(ok, f"--window {' '.join(f'{v:g}' for v in window)}: three positive sizes, multiples of {multiple} for the {getattr(network, 'arch', 'stage')} network")


def prepare_out_folder(out: str | Path, resume: bool, overwrite: bool, iterations: int, log=print) -> None:
    """What training into ``out`` does, said or refused before any work:

    * ``--resume`` needs OUT/checkpoint_last.pt (exit 2 without one); a different ``--iterations``
      than the checkpoint's plan re-times the learning-rate decay: said in one line;
    * a folder holding a run, without ``--resume``: refused (exit 4) unless ``--overwrite``, which
      removes that run's files (and nothing else) first."""
    out = Path(out)
    if resume and overwrite:
        raise InputError("--resume and --overwrite exclude each other (continue the run, or start afresh)")
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out}: exists and is not a folder")
    present = [f for f in RUN_FILES if (out / f).exists()]
    if resume:
        last = out / LAST_CHECKPOINT
        if not last.is_file():
            raise InputError(f"--resume: no {LAST_CHECKPOINT} in {out} (nothing to continue; leave out --resume to start a new run)")
        ckpt = load_checkpoint(last)
        cfg, done = ckpt["config"], int(ckpt["iteration"])
        planned = int(cfg["iterations"])
        if done >= iterations:
            log(f"note: the checkpoint is at iteration {done}, --iterations is {iterations}: nothing left to train (final.pt is rewritten)")
        elif planned != iterations:
            before = poly_lr(cfg["lr"], done / planned, cfg["poly_power"])
            after = poly_lr(cfg["lr"], done / iterations, cfg["poly_power"])
            log(f"note: resuming a {planned}-iteration run at iteration {done} with --iterations {iterations}: the learning rate goes from {before:.3g} to {after:.3g} (the decay is re-timed)")
        else:
            log(f"resuming at iteration {done} of {iterations}")
        return
    if present and not overwrite:
        raise OutputError(f"--out {out} holds a training run ({', '.join(present)}): continue it with --resume, or start afresh with --overwrite")
    for f in present:
        (out / f).unlink()
    if present:
        log(f"--overwrite: removed {', '.join(present)} from {out}")


def check_bundle_out(out: str | Path, overwrite: bool) -> None:
    """``export`` never replaces a bundle (or writes into a non-empty folder) without ``--overwrite``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        what = "a bundle" if (out / "model.json").exists() else "files"
        raise OutputError(f"--out {out} already holds {what}: choose another folder or add --overwrite")
