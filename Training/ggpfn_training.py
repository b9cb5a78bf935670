"""Training recipe of Fang et al. 2019's GGPFN (``fang-ggpfn``, PancreasC2FLib/pipelines/fang_ggpfn.py, network in PancreasC2FLib/networks/ggpfn.py): one stage
``ggpfn`` whose network (``GGPFNViews``) holds a ``GGPFNet`` per view.

Data: the whole CT, normalised with whole-case statistics, on the input grid or resampled to the
stage's ``spacing``: the shared ``prepare_stage_volume`` without crop, i.e. the very array
``GGPFN.probability`` runs on.

Samples (Sec. 3.2, ``SliceSampler``), for one view per micro-batch (the views take turns): a centre
point drawn uniformly in the ground-truth box with probability ``box_fraction`` (0.5: the paper's
"second patch", centred in the box encompassing the pancreas), else uniformly in the whole volume
(its "first patch"). Around it, built with the inference code's own functions:

* the patch A_k: ``patch`` pixels of the 2T + 1 slices around the centre's slice
  (``neighbour_slices``: end slices repeated), kept inside the slice and padded at the far end with
  the volume's minimum where the slice is smaller, as ``GGPFN.view_prob`` cuts its patches;
* A_g: the whole central slice through ``global_input``;
* targets: the central slice's ground truth in the patch (G_k; the loss takes G_k^(j) from it) and
  the whole slice's ground truth through the same ``global_input`` (soft, at A_g's size; the loss
  takes G^f and G^f' from it by area averaging).

Schedule (Sec. 3.2: global branch alone for 1000 epochs with alpha = beta = 0.5, the progressive
fusion network alone for 1000, then everything for 800 with alpha = 0.01, beta = 0), as three
phases of one run, by iteration (``phase_at``):

* ``global``: the first ``global_fraction`` of the iterations: only the global guidance branch runs
  and learns, loss alpha C(P^f, G^f) + beta C(P^f', G^f') with ``global_alpha_beta`` (0.5, 0.5);
* ``fusion``: the next ``fusion_fraction``: the global branch is frozen (no gradient, BatchNorm in
  eval mode) and feeds F_k; the rest learns from C(P_k, G_k) + 1/4 sum_j C(P_k^(j), G_k^(j));
* ``joint``: the rest: everything, Eq. 2 with ``joint_alpha_beta`` (0.01, 0).

Loss option (not the paper's, recorded with the training-only settings in the bundle's
``training.stages.ggpfn.sampler``): ``dice_weight`` (default 0: Eq. 2 alone) adds dice_weight *
(1 - soft DSC of the main output over the batch) in the fusion and joint phases. The paper's BCE
on mostly-background patches converges slowly to calibrated pancreas probabilities; in a short
CPU run they stay near 0.2, and the Dice term lifts them over 0.5 (the demo uses 1.0).

Grid: the input grid (the paper's), or ``spacing`` (x, y, z mm) as the pipeline's stage setting:
the cached volumes are then resampled to it by the shared preparation, as inference resamples
the case.

The defaults 0.3571 / 0.3571 are the paper's 1000 / 1000 / 800 epochs. The phase follows the
iteration count (the same in every DDP process), not ``--time-limit-min``.

Deviations from the paper:
- The shared trainer's SGD with polynomial decay over the whole run (the paper: Adam, 1e-4) and one
  batch size throughout (the paper: 32 in the first phase, 4 after).
- No augmentation (the paper: random rotations and elastic deformations). The trainer's flips and
  90-degree rotations would break the global branch's cue of where the pancreas lies in the body, so
  ``--augment paper`` (the default) trains without and is recorded as ``none``; ``flip`` is refused.
- "The progressive fusion network trained alone" is read as: with the trained global branch frozen.
- Patches are always ``patch`` pixels (padded); inference shrinks them to a smaller slice (the
  padding it then needs is the same).
- Validation measures the main output (BCE, DSC at 0.5) on fixed samples of every view; the final
  weights are exported (the paper picks the best on validation).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from PancreasC2FLib.processing.geometry import mask_box
from PancreasC2FLib.networks.ggpfn import GGPFNet, global_input, neighbour_slices
from PancreasC2FLib.networks.rstn import VIEWS, box_to_view, to_view
from PancreasC2FLib.pipelines.fang_ggpfn import view_setting

from . import recipes as _recipes
from .registry import register
from .datasets import StageVolume
from .losses import LOSSES
from .losses_rstn_ggpfn import bce, downsample_target, ggpfn_loss
from .samplers import extract
from .trainer import Trainer, dice_counts

PHASES = ("global", "fusion", "joint")

# Stage settings used only while training (left out of bundles).
GGPFN_TRAINING_ONLY = ("box_fraction", "global_fraction", "fusion_fraction", "global_alpha_beta", "joint_alpha_beta", "dice_weight")


# --- samples ------------------------------------------------------------------------------------

class Tensors(tuple):
    """Tensors that travel together: a sample's several inputs (or targets) pass through the
    Trainer's hooks (``.to(device)``, ``.cpu()``) like one tensor."""

    def to(self, *args, **kwargs) -> Tensors:
        return Tensors(t.to(*args, **kwargs) for t in self)

    def cpu(self) -> Tensors:
        return Tensors(t.cpu() for t in self)


class SliceSampler:
    """Samples of one view of a stage volume (see the module docstring). ``batch`` returns
    ``Tensors(x, a_g, origin, slice_hw, view)`` and ``Tensors(g_k, g_slice)``:
    x (B, 1, 2T + 1, P_h, P_w), a_g (B, 1, h_g, w_g), origin (B, 2) patch corners (row, column),
    slice_hw (B, 2), view (B,) index into ``VIEWS``; g_k (B, P_h, P_w) 0/1, g_slice (B, h_g, w_g)."""

    def __init__(self, patch, box_fraction: float = 0.5):
        m = GGPFNet.patch_multiple

        def rounded(p):  # rounded up as at inference
            return tuple(-(-int(v) // m) * m for v in p)

        # [h, w] for every view, or {view: [h, w]} (the paper's MSD patches)
        self.patch = {v: rounded(p) for v, p in patch.items()} if isinstance(patch, dict) else rounded(patch)
        self.box_fraction = float(box_fraction)
        self._volumes: dict[str, tuple] = {}

    def _volume(self, vol: StageVolume):
        """(padding value, ground-truth box or None) of a volume, computed once."""
        if vol.name not in self._volumes:
            self._volumes[vol.name] = (float(np.min(vol.image)), mask_box(np.asarray(vol.label) > 0))
        return self._volumes[vol.name]

    def sample(self, vol: StageVolume, view: str, rng: np.random.Generator, slices: int, global_size) -> dict:
        low, box = self._volume(vol)
        img, lab = to_view(vol.image, view), to_view(vol.label, view)
        n, h, w = img.shape
        ranges = box_to_view(box, view) if box is not None and rng.random() < self.box_fraction else ((0, n), (0, h), (0, w))
        i, cy, cx = (int(rng.integers(lo, hi)) for lo, hi in ranges)
        ph, pw = view_setting(self.patch, view)
        py, px = min(max(cy - ph // 2, 0), max(h - ph, 0)), min(max(cx - pw // 2, 0), max(w - pw, 0))
        x = extract(img[neighbour_slices(i, slices // 2, n), py : py + ph, px : px + pw], (0, 0, 0), (slices, ph, pw), low)
        whole = torch.from_numpy(np.stack([np.array(img[i], np.float32), np.array(lab[i], np.float32)]))
        a_g, g_slice = global_input(whole, global_size)[:, 0]
        return {
            "x": x.astype(np.float32, copy=False),
            "a_g": a_g,
            "origin": (py, px),
            "slice_hw": (h, w),
            "g_k": extract(lab[i, py : py + ph, px : px + pw], (0, 0), (ph, pw), 0),
            "g_slice": g_slice,
            "centre": (i, cy, cx),
        }

    def batch(self, volumes: list[StageVolume], n: int, view: str, rng: np.random.Generator, slices: int, global_size) -> tuple[Tensors, Tensors]:
        s = [self.sample(volumes[int(rng.integers(len(volumes)))], view, rng, slices, global_size) for _ in range(n)]
        inputs = Tensors((
            torch.from_numpy(np.stack([d["x"] for d in s])[:, None]),
            torch.stack([d["a_g"] for d in s])[:, None],
            torch.tensor([d["origin"] for d in s], dtype=torch.float32),
            torch.tensor([d["slice_hw"] for d in s], dtype=torch.float32),
            torch.full((n,), VIEWS.index(view), dtype=torch.int64),
        ))
        targets = Tensors((torch.from_numpy(np.stack([d["g_k"] for d in s]).astype(np.float32)), torch.stack([d["g_slice"] for d in s])))
        return inputs, targets


# --- schedule and loss --------------------------------------------------------------------------

def phase_at(iteration: int, iterations: int, settings: dict) -> str:
    """The schedule's phase of an iteration (counted from 0): ``global`` for the first
    round(global_fraction * iterations), then ``fusion`` for round(fusion_fraction * iterations),
    then ``joint``."""
    end_global = round(float(settings.get("global_fraction", 0.0)) * iterations)
    end_fusion = round((float(settings.get("global_fraction", 0.0)) + float(settings.get("fusion_fraction", 0.0))) * iterations)
    return "global" if iteration < end_global else "fusion" if iteration < end_fusion else "joint"


def phase_weights(phase: str, settings: dict) -> tuple[float, float]:
    """(alpha, beta) of Eq. 2 in a phase."""
    if phase == "global":
        return tuple(float(v) for v in settings.get("global_alpha_beta", (0.5, 0.5)))
    if phase == "fusion":
        return 0.0, 0.0  # the global branch is frozen
    return tuple(float(v) for v in settings.get("joint_alpha_beta", (0.01, 0.0)))


class GGPFNLoss(nn.Module):
    """Eq. 2 (``ggpfn_loss``) with the phase's alpha and beta (the trainer sets them every step)
    and the optional Dice term (``dice_weight``); for the global branch alone (no ``main`` output)
    only its two terms. Returns (total, main)."""

    def __init__(self, alpha: float = 0.5, beta: float = 0.5, dice_weight: float = 0.0):
        super().__init__()
        self.alpha, self.beta, self.dice_weight = float(alpha), float(beta), float(dice_weight)

    def forward(self, outputs: dict, target: torch.Tensor, global_target: torch.Tensor):
        if "main" in outputs:
            terms = ggpfn_loss(outputs, target, global_target, self.alpha, self.beta, self.dice_weight)
            return terms["loss"], terms["main"].detach()
        pf, pf2 = outputs["global"]
        loss = self.alpha * bce(pf, downsample_target(global_target, pf.shape[-2:])) + self.beta * bce(pf2, downsample_target(global_target, pf2.shape[-2:]))
        return loss, loss.detach()


LOSSES.setdefault("ggpfn", GGPFNLoss)


class TrainingForward(nn.Module):
    """One view's network as a phase trains it (the module DDP wraps): ``global``: the global
    branch only; ``fusion``: the rest on the frozen branch's F; ``joint``: ``forward_train``."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, view: str, phase: str, x, a_g, origin, slice_hw) -> dict:
        net = self.net.nets[view]
        if phase == "global":
            _, pf, pf2 = net.global_features(a_g, with_aux=True)
            return {"global": [pf, pf2]}
        if phase == "fusion":
            with torch.no_grad():
                feat = net.global_features(a_g)
            main, enc = net(x, feat, origin, slice_hw, with_aux=True)
            return {"main": main, "encoder": enc}
        return net.forward_train(x, a_g, origin, slice_hw)


# --- trainer ------------------------------------------------------------------------------------

class GGPFNTrainer(Trainer):
    """Slice samples instead of windows (``draw_batch``), the phase's forward and alpha/beta
    (``train_step``, ``forward_loss``), the main output's BCE and DSC in validation."""

    find_unused_parameters = True  # a step runs one view's network, in the first phases part of it

    def __init__(self, net, sampler, loss_fn, train, validation, config, out_dir, info, resume: bool = False):
        if config.augment not in ("none", "paper"):
            raise ValueError(f"fang-ggpfn trains without augmentation (flips and 90-degree rotations would break the global branch's position cue); got --augment {config.augment}")
        super().__init__(net, sampler, loss_fn, train, validation, dataclasses.replace(config, augment="none"), out_dir, info, resume)
        self.views = list(self.net.views)
        self.settings = self.info.get("settings", {})
        self.phase = phase_at(self.iteration, self.config.iterations, self.settings)
        self._micro = self._val_draws = 0
        self.model = TrainingForward(self.net)
        if self.ddp.world > 1:
            # DDP syncs the gradients of the module whose forward runs: the training forward here
            # (the base class wrapped the network's inference forward).
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids, find_unused_parameters=True)

    def draw_batch(self, n: int, volumes=None, rng=None, augment: bool = True):
        """Training micro-batches take the views in turn (by micro-batch number, so every
        process and a resumed run agree); validation batches too (by their own count)."""
        if volumes is None:
            view, self._micro = self.views[self._micro % len(self.views)], self._micro + 1
        else:
            view, self._val_draws = self.views[self._val_draws % len(self.views)], self._val_draws + 1
        net = self.net.nets[view]
        x, y = self.sampler.batch(volumes or self.train_volumes, n, view, rng if rng is not None else self.rng, net.slices, net.global_size)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def train_step(self) -> dict:
        self.phase = phase_at(self.iteration, self.config.iterations, self.settings)
        self.loss_fn.alpha, self.loss_fn.beta = phase_weights(self.phase, self.settings)
        self._micro = self.iteration * self.accumulation
        logs = super().train_step()
        logs.update(phase=float(PHASES.index(self.phase)), alpha=self.loss_fn.alpha, beta=self.loss_fn.beta)
        return logs

    def forward_loss(self, x, y):
        patch, a_g, origin, slice_hw, view = x
        name = VIEWS[int(view[0])]
        if self.phase == "fusion":
            self.net.nets[name].global_groups.eval()  # frozen: BatchNorm statistics too
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
            outputs = self.model(name, self.phase, patch, a_g, origin, slice_hw)
        return self.loss_fn(outputs, *y)

    def validation_logits(self, x) -> torch.Tensor:
        patch, a_g, origin, slice_hw, view = x
        net = self.net.nets[VIEWS[int(view[0])]]
        return net(patch, net.global_features(a_g), origin, slice_hw)

    def validation_terms(self, logits: torch.Tensor, y) -> tuple[float, int, int]:
        target = y[0]
        a, b = dice_counts(logits[:, 0] >= 0, target >= 0.5)
        return float(bce(logits, target)), a, b


# --- recipe -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GGPFNStageRecipe(_recipes.StageRecipe):
    """Checks the stage's grid settings (whole slices on the input grid or at ``spacing``) and
    builds the loss with the stage's ``dice_weight``."""

    def make_loss(self, settings: dict | None = None):
        settings = settings or {}
        if settings.get("class_weights"):
            raise ValueError("fang-ggpfn's loss is Eq. 2 (BCE); its class-balance option is --set dice_weight=W")
        return LOSSES[self.loss](dice_weight=_recipes.loss_weight(settings, "dice_weight"))

    def crop_margin_mm(self, settings: dict) -> float | None:
        """Whole volumes (no crop), on the input grid or resampled to ``spacing`` by the shared
        preparation, as the pipeline runs (checked before any data is prepared)."""
        if settings.get("window"):
            raise ValueError("fang-ggpfn takes its patch size as --set patch=[H,W], not --window")
        return None


# Widths 32 / 32: 14.4 M weights per view, the paper's 1.4e7 (Table 1, GGPFN-A); T = 15 (31 slices),
# 13 global convolutions, h_g = w_g = 224 (Sec. 2.2, 2.3, 3.2).
_NET = {"views": list(VIEWS), "width": 32, "convs": [3, 4, 4, 4], "global_width": 32, "global_convs": [2, 2, 3, 3, 3], "global_size": [224, 224]}

FANG_GGPFN = _recipes.PipelineRecipe(
    name="fang-ggpfn",
    stages={
        "ggpfn": GGPFNStageRecipe(
            sampler=lambda s: SliceSampler(s["patch"], s.get("box_fraction", 0.5)),
            settings={"patch": [256, 256], "overlap": 64, "threshold": 0.5, "margin_mm": 20.0, "box_fraction": 0.5, "global_fraction": 0.3571, "fusion_fraction": 0.3571, "global_alpha_beta": [0.5, 0.5], "joint_alpha_beta": [0.01, 0.0], "spacing": None, "dice_weight": 0.0},
            loss="ggpfn", arch="ggpfn-views", network_args=_NET, trainer=GGPFNTrainer,
        ),
    },
    postprocess={"min_island_fraction": 0.0, "coarse_min_island_fraction": 0.0},  # the paper: none
    presets={},
)

register(FANG_GGPFN, training_only=GGPFN_TRAINING_ONLY)
