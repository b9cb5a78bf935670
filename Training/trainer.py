"""The training loop: one ``Trainer`` with hooks, shared by every stage of every pipeline.

Sec. 4.2 of Zhu et al. 2018: SGD, momentum 0.9, base learning rate 0.01 with polynomial decay
(power 0.9), weight decay 5e-4, mini-batch 16, 80,000 iterations. An iteration is one optimiser
step on ``effective_batch`` windows: with fewer windows per step and process (``batch``) the
gradients of several steps are accumulated, and under ``torchrun`` the processes share the batch
(DistributedDataParallel; gloo on the CPU, nccl on GPUs). Mixed precision is used on CUDA only.

Hooks, in order: ``on_start`` -> per iteration ``train_step`` (micro-batches from ``draw_batch``
through ``forward_loss``; + ``validate`` every ``validate_every``, per batch
``validation_logits`` and ``validation_terms``) -> ``on_iteration_end`` -> ``on_end``. Stage
differences (which windows, which loss) come from the sampler and loss handed in, so subclasses
only override a hook when a new pipeline needs something else.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .augment import AUGMENTATIONS
from .datasets import StageVolume
from .samplers import WindowSampler

CHECKPOINT_FORMAT = "pancreas-c2f-checkpoint"
LAST_CHECKPOINT = "checkpoint_last.pt"
FINAL_CHECKPOINT = "final.pt"
BEST_CHECKPOINT = "best.pt"  # the best whole-case validation (case_validation.py)


@dataclass
class TrainConfig:
    iterations: int = 80_000
    batch: int = 16  # windows per forward pass and process
    effective_batch: int = 16  # windows per optimiser step, all processes together
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    poly_power: float = 0.9
    seed: int = 0
    augment: str = "paper"
    checkpoint_every: int = 1000
    validate_every: int = 500
    validation_windows: int = 32
    # Whole-case validation (the inference pipeline on the validation cases) every this many
    # iterations and at the end; None: every checkpoint_every; 0: off.
    validate_cases_every: int | None = None
    loader_threads: int = 0  # threads drawing batches ahead (loader.py); 0: in the training loop
    tensorboard: bool = False  # also log to OUT/tensorboard (needs the optional tensorboard package)
    log_every: int = 10
    amp: bool = True  # CUDA only
    device: str = "auto"
    threads: int | None = None
    # Time budget: the polynomial decay runs over the iterations or this many minutes of training,
    # whichever ends first, and training stops there (for shared or time-boxed machines).
    time_limit_min: float | None = None


def tensorboard_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


def summary_writer(folder: Path):
    """TensorBoard's writer (``--tensorboard``; ``pip install tensorboard``), beside log.csv."""
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(folder))


def poly_lr(base: float, progress: float, power: float) -> float:
    """Polynomial decay; ``progress`` runs from 0 to 1 (iteration / iterations)."""
    return base * (1.0 - min(max(progress, 0.0), 1.0)) ** power


@dataclass
class Distributed:
    """This process's place in a ``torchrun`` launch (world size 1 without one)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @staticmethod
    def from_env(device_type: str) -> "Distributed":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return Distributed()
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
        return Distributed(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (all devices) before anything random is built: the network's
    initial weights come from torch's global generator, which data preparation may have used."""
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(spec: str, local_rank: int = 0) -> torch.device:
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(spec)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """A training checkpoint (tensors and plain data only: never unpickles code)."""
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a PancreasC2F training checkpoint")
    return ckpt


def dice_counts(pred: torch.Tensor, target: torch.Tensor) -> tuple[int, int]:
    """(2|P n Y|, |P| + |Y|) so that DSC over many windows is the ratio of the sums."""
    p, t = pred.bool(), target.bool()
    return int(2 * (p & t).sum()), int(p.sum() + t.sum())


class Trainer:
    # DDP: a network whose forward leaves some parameters unused in a step (e.g. a crop that
    # finds nothing) needs DistributedDataParallel(find_unused_parameters=True).
    find_unused_parameters = False

    def __init__(
        self,
        net: torch.nn.Module,
        sampler: WindowSampler,
        loss_fn: torch.nn.Module,
        train: list[StageVolume],
        validation: list[StageVolume],
        config: TrainConfig,
        out_dir: str | Path,
        info: dict,
        resume: bool = False,
    ):
        if not train:
            raise ValueError("no training cases")
        self.config = config
        self.out = Path(out_dir)
        self.info = info  # pipeline, stage, settings, network spec, preprocessing, data: for export
        self.sampler, self.loss_fn = sampler, loss_fn
        self.train_volumes, self.val_volumes = train, validation
        if config.threads:
            torch.set_num_threads(int(config.threads))
        self.device = pick_device(config.device)
        self.ddp = Distributed.from_env(self.device.type)
        if self.device.type == "cuda":
            self.device = pick_device(config.device, self.ddp.local_rank)
            torch.cuda.set_device(self.device)
        micro = config.batch * self.ddp.world
        self.accumulation = max(1, math.ceil(config.effective_batch / micro))
        torch.manual_seed(config.seed)
        self.rng = np.random.default_rng([config.seed, self.ddp.rank])
        self.net = net.to(self.device)
        self.model = self.net
        if self.ddp.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(self.net, device_ids=ids, find_unused_parameters=self.find_unused_parameters)
        self.optimizer = torch.optim.SGD(self.net.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
        self.use_amp = config.amp and self.device.type == "cuda"
        self.amp_dtype = torch.bfloat16 if self.use_amp and torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp and self.amp_dtype == torch.float16)
        self.augment = AUGMENTATIONS[config.augment]
        self.iteration = 0
        self.elapsed = 0.0
        self.history: list[dict] = []
        self.stopped_early = False
        self.case_validator = None  # set by train.py: callable(net) -> {"case_dsc": ...}
        self.best: dict = {}  # {"iteration", "case_dsc"} of best.pt
        if resume and (self.out / LAST_CHECKPOINT).is_file():
            self.restore(load_checkpoint(self.out / LAST_CHECKPOINT, self.device))

    # --- data ------------------------------------------------------------------------------

    def draw_batch(self, n: int, volumes: list[StageVolume] | None = None, rng=None, augment: bool = True):
        rng = rng if rng is not None else self.rng
        volumes = volumes or self.train_volumes
        images, labels = [], []
        for _ in range(n):
            vol = volumes[int(rng.integers(len(volumes)))]
            img, lab = self.sampler.sample(vol, rng)
            if augment:
                img, lab = self.augment(img, lab, rng)
            images.append(img)
            labels.append(lab)
        x = torch.from_numpy(np.stack(images)[:, None].astype(np.float32))
        y = torch.from_numpy(np.stack(labels).astype(np.int64))
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def next_batch(self):
        """The next training micro-batch: from the prefetching threads when ``loader_threads`` is
        set and the trainer samples with the shared ``draw_batch`` (subclasses that keep state
        while drawing, like GGPFN's view rotation, draw in the loop)."""
        if self.config.loader_threads and type(self).draw_batch is Trainer.draw_batch:
            if getattr(self, "_prefetch", None) is None:
                from .loader import Prefetcher

                self._prefetch = Prefetcher(lambda rng: self.draw_batch(self.config.batch, rng=rng), self.rng, self.config.loader_threads)
            return self._prefetch.next()
        return self.draw_batch(self.config.batch)

    def progress(self) -> float:
        """Fraction of the schedule done: iterations, or the time budget if that ends first."""
        done = self.iteration / self.config.iterations
        if self.config.time_limit_min:
            done = max(done, self.elapsed / (60.0 * self.config.time_limit_min))
        return done

    # --- hooks -----------------------------------------------------------------------------

    def on_start(self) -> None:
        """Fix the validation windows once, so every validation measures the same thing."""
        self.val_batches = []
        if self.ddp.main and self.val_volumes and self.config.validation_windows > 0:
            rng = np.random.default_rng(12345)
            left = self.config.validation_windows
            while left > 0:
                n = min(left, self.config.batch)
                self.val_batches.append(tuple(t.cpu() for t in self.draw_batch(n, self.val_volumes, rng, augment=False)))
                left -= n
        if self.ddp.main:
            self.out.mkdir(parents=True, exist_ok=True)
            if self.config.tensorboard:
                self.tensorboard = summary_writer(self.out / "tensorboard")
            (self.out / "config.json").write_text(json.dumps({"config": asdict(self.config), "info": self.info, "world_size": self.ddp.world, "accumulation": self.accumulation}, indent=2), encoding="utf-8")

    def train_step(self) -> dict:
        """One optimiser step over ``effective_batch`` windows (accumulated micro-batches)."""
        self.model.train()
        lr = poly_lr(self.config.lr, self.progress(), self.config.poly_power)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        total = main = 0.0
        for k in range(self.accumulation):
            x, y = self.next_batch()
            sync = k == self.accumulation - 1 or self.ddp.world == 1
            ctx = self.model.no_sync() if not sync else contextlib.nullcontext()
            with ctx:
                loss, loss_main = self.forward_loss(x, y)
                self.scaler.scale(loss / self.accumulation).backward()
            total += float(loss.detach()) / self.accumulation
            main += float(loss_main) / self.accumulation
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return {"lr": lr, "loss": total, "loss_main": main}

    def forward_loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hook: one training micro-batch through the model, its (total, main) loss."""
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
            outputs = self.model(x, with_aux=True)
        return self.loss_fn(outputs, y)

    @torch.no_grad()
    def validate(self) -> dict:
        """Loss and DSC (summed over the fixed validation windows) of the main output."""
        if not self.val_batches:
            return {}
        self.net.eval()
        num = den = 0
        losses = []
        for x, y in self.val_batches:
            x, y = x.to(self.device), y.to(self.device)
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
                logits = self.validation_logits(x)
            loss, a, b = self.validation_terms(logits.float(), y)
            losses.append(loss)
            num, den = num + a, den + b
        # No pancreas in the windows and none predicted measures nothing: NaN, never a perfect 1.0.
        return {"val_loss": float(np.mean(losses)), "val_dsc": num / den if den else float("nan")}

    def validation_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Hook: the main output for one validation batch's inputs."""
        return self.net(x, with_aux=False)

    def validation_terms(self, logits: torch.Tensor, y: torch.Tensor) -> tuple[float, int, int]:
        """Hook: one validation batch's loss and DSC counts (numerator, denominator)."""
        a, b = dice_counts(logits.argmax(1), y)
        return float(torch.nn.functional.cross_entropy(logits, y)), a, b

    def validate_cases(self) -> dict:
        """Whole-case validation; a new best is saved as best.pt (weights and provenance)."""
        logs = self.case_validator(self.net)
        if logs["case_dsc"] == logs["case_dsc"] and logs["case_dsc"] > self.best.get("case_dsc", -1.0):  # NaN never wins
            self.best = {"iteration": self.iteration, "case_dsc": logs["case_dsc"]}
            self.save_checkpoint(self.out / BEST_CHECKPOINT, weights_only=True)
        return logs

    def on_iteration_end(self, logs: dict) -> None:
        it = self.iteration
        if not self.ddp.main:
            return
        if it % self.config.log_every == 0 or "val_dsc" in logs:
            row = {"iteration": it, "elapsed_s": round(self.elapsed, 1), **{k: round(v, 6) for k, v in logs.items()}}
            self.history.append(row)
            self._append_csv(row)
            if getattr(self, "tensorboard", None) is not None:
                for k, v in logs.items():
                    self.tensorboard.add_scalar(k, v, it)
        if it % self.config.checkpoint_every == 0:
            self.save_checkpoint(self.out / LAST_CHECKPOINT)
        if "val_dsc" in logs:
            self.plot()

    def on_end(self) -> None:
        if getattr(self, "tensorboard", None) is not None:
            self.tensorboard.close()
        if self.ddp.main:
            self.save_checkpoint(self.out / LAST_CHECKPOINT)
            # Also after a time-limit stop (recorded as such): the model is usable, and --resume
            # finishes the schedule and replaces it.
            self.save_checkpoint(self.out / FINAL_CHECKPOINT, weights_only=True)
            self.plot()
        self.ddp.barrier()

    # --- loop --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _interruptible(self):
        """SIGINT/SIGTERM set a flag that the loop reads after each iteration (a step is never cut
        in half); a second signal interrupts at once."""
        self.interrupted = 0
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            if self.interrupted:
                raise KeyboardInterrupt
            self.interrupted = signum

        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def _stop_requested(self) -> bool:
        """Whether any process was interrupted (under torchrun all stop at the same iteration)."""
        if self.ddp.world == 1:
            return bool(self.interrupted)
        flag = torch.tensor([float(bool(self.interrupted))], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def on_interrupt(self) -> None:
        """Hook: Ctrl-C or SIGTERM: keep the state at this iteration, exit 130 (resumable)."""
        from PancreasC2FLib.errors import Cancelled

        if self.ddp.main:
            self.save_checkpoint(self.out / LAST_CHECKPOINT)
            self.plot()
        raise Cancelled(f"interrupted at iteration {self.iteration}: {self.out / LAST_CHECKPOINT} saved, continue with --resume")

    def fit(self) -> dict:
        try:
            with self._interruptible():
                return self._fit()
        finally:
            if getattr(self, "_prefetch", None) is not None:
                self._prefetch.close()
                self._prefetch = None

    def _fit(self) -> dict:
        from tqdm import tqdm

        self.on_start()
        cfg = self.config
        bar = tqdm(total=cfg.iterations, initial=self.iteration, disable=not self.ddp.main, desc=f"{self.info.get('stage', 'train')}", mininterval=1.0 if os.isatty(2) else 30.0, dynamic_ncols=True)
        last = time.perf_counter()
        while self.iteration < cfg.iterations:
            logs = self.train_step()
            self.iteration += 1
            now = time.perf_counter()
            self.elapsed += now - last
            last = now
            last_step = self.iteration >= cfg.iterations or self.progress() >= 1.0
            if self.ddp.main and (self.iteration % cfg.validate_every == 0 or last_step):
                logs.update(self.validate())
                last = time.perf_counter()  # validation time is not training time
            every = cfg.checkpoint_every if cfg.validate_cases_every is None else cfg.validate_cases_every
            if self.ddp.main and self.case_validator is not None and every and (self.iteration % every == 0 or last_step):
                logs.update(self.validate_cases())
                last = time.perf_counter()
            self.on_iteration_end(logs)
            bar.update(1)
            bar.set_postfix({k: f"{v:.3f}" for k, v in logs.items() if k in ("loss", "val_dsc")}, refresh=False)
            if self._stop_requested():
                bar.close()
                self.on_interrupt()
            if self.iteration < cfg.iterations and self.progress() >= 1.0:
                self.stopped_early = self._agree_to_stop()
                if self.stopped_early:
                    if self.ddp.main:
                        bar.write(f"time budget of {cfg.time_limit_min} min used up at iteration {self.iteration} of {cfg.iterations}: stopping")
                    break
        bar.close()
        self.on_end()
        return {"iterations": self.iteration, "elapsed_s": round(self.elapsed, 1), "stopped_early": self.stopped_early, "last": self.history[-1] if self.history else {}, **({"best": self.best} if self.best else {})}

    def _agree_to_stop(self) -> bool:
        if self.ddp.world == 1:
            return True
        flag = torch.tensor([1.0 if self.ddp.main else 0.0])
        dist.broadcast(flag, 0)
        return bool(flag.item())

    # --- persistence ---------------------------------------------------------------------------

    def save_checkpoint(self, path: Path, weights_only: bool = False) -> None:
        ckpt = {
            "format": CHECKPOINT_FORMAT,
            "iteration": self.iteration,
            "elapsed_s": self.elapsed,
            "model": {k: v.detach().cpu() for k, v in self.net.state_dict().items()},
            "config": asdict(self.config),
            "info": self.info,
            "world_size": self.ddp.world,
            "stopped_early": self.stopped_early,
            "last_log": self.history[-1] if self.history else {},
            "best": self.best,
        }
        if not weights_only:
            ckpt["optimizer"] = self.optimizer.state_dict()
            ckpt["scaler"] = self.scaler.state_dict()
            ckpt["rng"] = {"numpy": json.dumps(self.rng.bit_generator.state), "torch": torch.get_rng_state()}
        tmp = path.with_suffix(".tmp")
        torch.save(ckpt, tmp)
        os.replace(tmp, path)

    def restore(self, ckpt: dict) -> None:
        self.net.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.iteration = int(ckpt["iteration"])
        self.elapsed = float(ckpt.get("elapsed_s", 0.0))
        self.best = dict(ckpt.get("best") or {})
        if "rng" in ckpt and self.ddp.rank == 0:
            self.rng.bit_generator.state = json.loads(ckpt["rng"]["numpy"])
            torch.set_rng_state(ckpt["rng"]["torch"])
        log = self.out / "log.csv"
        if log.is_file() and self.ddp.main:
            # Rows written after the checkpoint are dropped: the log continues where training does.
            with open(log, newline="", encoding="utf-8") as f:
                self.history = [{k: float(v) for k, v in r.items() if v != ""} for r in csv.DictReader(f) if float(r["iteration"]) <= self.iteration]
            log.unlink()
            for row in self.history:
                self._append_csv(row)

    def _append_csv(self, row: dict) -> None:
        path = self.out / "log.csv"
        fields = ["iteration", "elapsed_s", "lr", "loss", "loss_main", "val_loss", "val_dsc", "case_dsc"]
        new = not path.is_file()
        with open(path, "a", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow(row)

    def plot(self) -> None:
        """Loss and validation DSC curves as PNG (matplotlib is only needed here)."""
        if self.history:
            draw_curves(self.history, self.out / "curves.png", self.info.get("pipeline", ""), self.info.get("stage", ""))


def draw_curves(history: list[dict], path: Path, pipeline: str = "", stage: str = "") -> bool:
    """``curves.png``: training loss (left) and the stage's validation DSC (right). Points are
    drawn as markers as well as lines, so a run with a single logged point still shows it.
    False when matplotlib is missing (nothing drawn)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return False
    it = np.array([r["iteration"] for r in history if "loss" in r])
    loss = np.array([r["loss"] for r in history if "loss" in r])
    val = np.array([(r["iteration"], r["val_dsc"]) for r in history if "val_dsc" in r]).reshape(-1, 2)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    axes[0].plot(it, loss, "o-", lw=0.8, ms=4 if len(loss) < 50 else 1.5, alpha=0.6, label=f"loss ({len(loss)} logged)")
    if len(loss) >= 10:
        k = max(len(loss) // 20, 2)
        axes[0].plot(it[k - 1 :], np.convolve(loss, np.ones(k) / k, mode="valid"), lw=1.5, label=f"mean of {k}")
    axes[0].set(xlabel="iteration", ylabel="training loss (with deep supervision)", title="training loss")
    if len(loss) and loss.min() > 0:
        axes[0].set_yscale("log")
    if len(loss):
        axes[0].legend()
    name = f"{stage} stage" if stage else "validation"
    if len(val):
        axes[1].plot(val[:, 0], val[:, 1], "o-", color="tab:green", ms=5, label=f"{name}: last {val[-1, 1]:.3f}, best {val[:, 1].max():.3f}")
        best = int(np.argmax(val[:, 1]))
        axes[1].plot(val[best, 0], val[best, 1], "*", color="tab:orange", ms=12)
        axes[1].legend(loc="lower right")
    else:
        axes[1].text(0.5, 0.5, "no validation yet", ha="center", va="center", transform=axes[1].transAxes, color="0.5")
    axes[1].set(xlabel="iteration", ylabel="validation DSC (windows)", ylim=(0, 1), title=f"validation DSC, {name}")
    axes[1].grid(alpha=0.3)
    for ax in axes:
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    fig.suptitle(f"{pipeline} {stage}".strip())
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a training output folder: its best.pt (best whole-case validation)
    if it has one, else its final.pt."""
    path = Path(path)
    if path.is_dir():
        path = path / (BEST_CHECKPOINT if (path / BEST_CHECKPOINT).is_file() else FINAL_CHECKPOINT)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path} (training not finished? use its checkpoint_last.pt explicitly)")
    return path
