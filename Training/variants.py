"""Training recipes of the two other 3D systems: Roth et al. 2018 (``roth-cascade``) and Zhao et
al. 2019 (``zhao-two-stage``). Each stage is a ``StageRecipe`` with its own data preparation, window
sampler, loss and (small) ``Trainer`` subclass; everything else is the shared training code.

Data preparation uses the inference code's own functions (``PancreasC2FLib.pipelines.roth_cascade`` and
``zhao_two_stage``), so training and inference see the same grids, masks and boxes:

* Roth stage 1: the whole CT on the half-resolution grid; voxels outside the body mask C1 are
  labelled ``IGNORE`` (not in the loss; windows are drawn from C1).
* Roth stage 2: the bounding box of C2 (grown to a window), on the half-resolution grid; voxels
  outside C2 are ``IGNORE``. C2 is the trained stage-1 network's prediction dilated by r, computed
  with ``RothCascade`` itself (setting ``stage1``: the stage-1 checkpoint or training folder, as in
  the paper, or a roth-cascade bundle); without it, the ground truth dilated by r on the stage-1 grid stands in.
* Zhao stage 1: the whole CT decimated by R; labels as usual.
* Zhao stage 2: the ground-truth box + 10 voxels (grown to one window of real context), on the
  input grid; windows are centred inside the box + margin.

Losses: Roth's weighted cross-entropy over the candidate region (Eq. 3-4); Zhao's Dice + centre
loss with lambda held for 50 epochs then falling to 0 (an epoch = as many windows as training cases).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from torch import nn

from PancreasC2FLib.processing.geometry import Orientation, crop, mask_box
from PancreasC2FLib.pipelines.base import grow_box_to
from PancreasC2FLib.processing.preprocessing import normalization_stats, normalize, resample_array
from PancreasC2FLib.pipelines.roth_cascade import body_mask, dilate_mask, downsample_volume, min_native_size, stage_shape

from .datasets import DatasetError, StageVolume
from .losses import LOSSES
from .losses_variants import centre_weight, dice_centre_loss, weighted_cross_entropy
from .samplers import CoarseSampler, WindowSampler, _clamp_corner
from .trainer import Trainer, dice_counts

IGNORE = 255  # label value outside the candidate region (stored); -100 in training batches
IGNORE_INDEX = -100

# Stage settings used only while training (left out of bundles).
VARIANT_TRAINING_ONLY = ("stage1", "stage1_grid", "centre_lambda", "centre_hold_epochs", "centre_decay_epochs")


# --- data preparation --------------------------------------------------------------------------

def _canonical(image: sitk.Image, label: sitk.Image):
    o = Orientation.of(image)
    hu = o.to_canonical(sitk.GetArrayViewFromImage(image))
    lab = (o.to_canonical(sitk.GetArrayViewFromImage(label)) > 0).astype(np.uint8)
    return hu, lab, o.spacing_zyx(image)


def _on_grid(hu, lab, spacing, preprocessing, stats, shape):
    """Normalised image and label (linear, >= 0.5) on ``shape``, and the grid's spacing."""
    x = downsample_volume(normalize(hu, preprocessing, stats), shape)
    y = (resample_array(lab.astype(np.float32), shape, "trilinear") >= 0.5).astype(np.uint8)
    out_spacing = tuple(float(s) * n / g for s, n, g in zip(spacing, hu.shape, shape))
    return x, y, out_spacing


def prepare_roth_stage1(name, image, label, preprocessing: dict, settings: dict) -> StageVolume:
    hu, lab, spacing = _canonical(image, label)
    stats = normalization_stats(hu, preprocessing)
    shape = stage_shape(hu.shape, spacing, settings, 2)
    body = body_mask(downsample_volume(hu, shape), float(settings.get("body_threshold_hu", -500.0)))
    x, y, out_spacing = _on_grid(hu, lab, spacing, preprocessing, stats, shape)
    if body.any():
        y[(body == 0) & (y == 0)] = IGNORE
    return StageVolume(name, x, y, out_spacing)


def checkpoint_file(path) -> Path:
    """A checkpoint file, or a training folder's ``final.pt`` (its last checkpoint when the run
    stopped at a time limit)."""
    from .trainer import FINAL_CHECKPOINT, LAST_CHECKPOINT

    p = Path(path).expanduser()
    if p.is_dir():
        p = p / FINAL_CHECKPOINT if (p / FINAL_CHECKPOINT).is_file() else p / LAST_CHECKPOINT
    if not p.is_file():
        raise DatasetError(f"no stage-1 checkpoint at {path} (train stage 1 first)")
    return p


def stage1_file(path) -> Path:
    """The file that stands for stage 1 (cache keys, digests): the checkpoint file, or a bundle's
    model.json (it holds the stage-1 settings that shape C2 and the weights' sha256)."""
    from PancreasC2FLib.io.bundle import is_bundle

    return Path(path).expanduser() / "model.json" if is_bundle(path) else checkpoint_file(path)


def _stage1_pipeline(path: str, preprocessing: dict):
    """A ``RothCascade`` running the trained stage 1 of a checkpoint or of a roth-cascade bundle
    (a bundle lets stage 2 be fine-tuned from a shipped model without its training run)."""
    from PancreasC2FLib.io.bundle import Bundle, is_bundle, load_bundle
    from PancreasC2FLib.networks import build_network
    from PancreasC2FLib.pipelines.roth_cascade import RothCascade

    from .trainer import load_checkpoint

    if is_bundle(path):
        bundle = load_bundle(Path(path).expanduser())
        if bundle.pipeline != "roth-cascade":
            raise DatasetError(f"{path}: a {bundle.pipeline} bundle, not roth-cascade")
        if dict(bundle.metadata["preprocessing"]) != dict(preprocessing):
            raise DatasetError(f"{path}: its stage 1 runs with preprocessing {bundle.metadata['preprocessing']}, stage 2 asks for {preprocessing}")
        return RothCascade(bundle, device="cpu")
    ckpt = load_checkpoint(checkpoint_file(path))
    info = ckpt["info"]
    if info.get("pipeline") != "roth-cascade" or info.get("stage") != "stage1":
        raise DatasetError(f"{path}: not a roth-cascade stage1 checkpoint")
    if dict(info["preprocessing"]) != dict(preprocessing):
        raise DatasetError(f"{path}: stage 1 was trained with preprocessing {info['preprocessing']}, stage 2 asks for {preprocessing}")
    net = build_network(info["network"]["arch"], dict(info["network"]["args"]))
    net.load_state_dict(ckpt["model"], strict=True)
    settings = {k: v for k, v in info["settings"].items() if k not in ("foreground_fraction",) + VARIANT_TRAINING_ONLY}
    md = {"name": "stage1", "pipeline": "roth-cascade", "preprocessing": preprocessing, "stages": {"stage1": settings, "stage2": {}}, "postprocess": {}}
    return RothCascade(Bundle(Path(path), md, {"stage1": net.eval()}), device="cpu")


_STAGE1_CACHE: dict = {}


def roth_candidate(image: sitk.Image, lab: np.ndarray, spacing, preprocessing: dict, settings: dict) -> np.ndarray:
    """C2 on the input grid: the stage-1 network's labels dilated by r (``settings['stage1']``),
    or the ground truth dilated by r on the stage-1 grid when no stage-1 network is given or it
    finds nothing."""
    stage1 = settings.get("stage1")
    if stage1:
        ckpt = stage1_file(stage1)
        key = (str(ckpt.resolve()), ckpt.stat().st_mtime_ns, str(sorted(preprocessing.items())))
        if key not in _STAGE1_CACHE:
            _STAGE1_CACHE[key] = _stage1_pipeline(stage1, preprocessing)
        pipe = _STAGE1_CACHE[key]
        case = pipe.prepare(image)
        cand = pipe.stage1_masks(case)["candidate"]
        if cand.any():
            return resample_array(cand, lab.shape, "nearest")
    cfg1 = settings.get("stage1_grid") or {"downsample": settings.get("downsample") or 2, "spacing": settings.get("spacing")}
    low_shape = stage_shape(lab.shape, spacing, cfg1, 2)
    low = resample_array(lab, low_shape, "nearest")
    return resample_array(dilate_mask(low, int(settings.get("dilation_radius", 3))), lab.shape, "nearest")


def prepare_roth_stage2(name, image, label, preprocessing: dict, settings: dict) -> StageVolume:
    hu, lab, spacing = _canonical(image, label)
    stats = normalization_stats(hu, preprocessing)
    cand = roth_candidate(image, lab, spacing, preprocessing, settings)
    box = mask_box(cand)
    if box is None:
        raise DatasetError(f"{name}: empty candidate region and empty label")
    window = tuple(int(v) for v in settings["window"])
    run_box = grow_box_to(box, min_native_size(window, hu.shape, spacing, settings, 2), hu.shape)
    hu_c, lab_c, cand_c = crop(hu, run_box), crop(lab, run_box), crop(cand, run_box)
    shape = stage_shape(hu_c.shape, spacing, settings, 2)
    x, y, out_spacing = _on_grid(hu_c, lab_c, spacing, preprocessing, stats, shape)
    c_low = resample_array(np.ascontiguousarray(cand_c), shape, "nearest")
    y[(c_low == 0) & (y == 0)] = IGNORE
    return StageVolume(name, x, y, out_spacing)


def prepare_zhao_stage1(name, image, label, preprocessing: dict, settings: dict) -> StageVolume:
    hu, lab, spacing = _canonical(image, label)
    stats = normalization_stats(hu, preprocessing)
    x, y, out_spacing = _on_grid(hu, lab, spacing, preprocessing, stats, stage_shape(hu.shape, spacing, settings, 4))
    return StageVolume(name, x, y, out_spacing)


def prepare_zhao_stage2(name, image, label, preprocessing: dict, settings: dict) -> StageVolume:
    """The ground-truth box + ``margin`` input-grid voxels (paper: 10), grown to one window of real
    context as at inference."""
    hu, lab, spacing = _canonical(image, label)
    stats = normalization_stats(hu, preprocessing)
    box = mask_box(lab)
    if box is None:
        raise DatasetError(f"{name}: empty label, the fine stage trains on cases with a pancreas")
    m = int(settings.get("margin", 10))
    box = tuple((max(0, lo - m), min(n, hi + m)) for (lo, hi), n in zip(box, hu.shape))
    window = tuple(int(v) for v in settings["window"])
    run_box = grow_box_to(box, min_native_size(window, hu.shape, spacing, settings, 1), hu.shape)
    hu_c, lab_c = crop(hu, run_box), crop(lab, run_box)
    x, y, out_spacing = _on_grid(hu_c, lab_c, spacing, preprocessing, stats, stage_shape(hu_c.shape, spacing, settings, 1))
    return StageVolume(name, x, y, out_spacing)


def _file_digest(path) -> str:
    return hashlib.sha256(stage1_file(path).read_bytes()).hexdigest()[:16]


# Which settings change the prepared data (the cache key), per preparation.
DATA_SETTINGS = {
    "roth-stage1": ("downsample", "spacing", "body_threshold_hu"),
    "roth-stage2": ("downsample", "spacing", "window", "dilation_radius", "stage1", "stage1_grid"),
    "zhao-stage1": ("downsample", "spacing"),
    "zhao-stage2": ("downsample", "spacing", "window", "margin"),
}
PREPARERS = {"roth-stage1": prepare_roth_stage1, "roth-stage2": prepare_roth_stage2, "zhao-stage1": prepare_zhao_stage1, "zhao-stage2": prepare_zhao_stage2}


def data_key(prepare: str, settings: dict) -> dict:
    """What goes into the cache key for a preparation (a checkpoint counts by its content)."""
    key = {"prepare": prepare}
    for k in DATA_SETTINGS[prepare]:
        key[k] = settings.get(k)
    if key.get("stage1"):
        key["stage1"] = str(Path(key["stage1"]).expanduser().resolve())
        key["stage1_sha256"] = _file_digest(key["stage1"])
    return key


def prepare_volume(case_name: str, image, label, cache_settings: dict) -> StageVolume:
    """The stage caches' preparation (``StageCache.prepare``): the one named in a cache's settings (``variant``
    holds the settings it reads, see ``data_key``)."""
    v = cache_settings["variant"]
    return PREPARERS[v["prepare"]](case_name, image, label, cache_settings["preprocessing"], v)


# --- samplers ----------------------------------------------------------------------------------

class RegionSampler(WindowSampler):
    """Roth: windows centred on random voxels of the candidate region (labels != IGNORE), a
    fraction ``foreground_fraction`` on the pancreas; labels come out with IGNORE_INDEX outside."""

    def __init__(self, window, foreground_fraction: float = 0.5, max_points: int = 200_000):
        super().__init__(window)
        self.foreground_fraction = float(foreground_fraction)
        self.max_points = max_points
        self._points: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def points(self, vol: StageVolume):
        if vol.name not in self._points:
            lab = np.asarray(vol.label)
            rng = np.random.default_rng(0)
            out = []
            for sel in (lab == 1, lab != IGNORE):
                pts = np.argwhere(sel)
                if len(pts) > self.max_points:
                    pts = pts[rng.choice(len(pts), self.max_points, replace=False)]
                out.append(pts.astype(np.int32))
            self._points[vol.name] = tuple(out)
        return self._points[vol.name]

    def corner(self, vol, rng):
        fg, region = self.points(vol)
        pool = fg if len(fg) and rng.random() < self.foreground_fraction else region
        if not len(pool):
            return tuple(int(rng.integers(0, max(s - w, 0) + 1)) for s, w in zip(vol.image.shape, self.window))
        centre = pool[rng.integers(len(pool))]
        return _clamp_corner([int(c) - w // 2 for c, w in zip(centre, self.window)], self.window, vol.image.shape)

    def sample(self, vol, rng):
        img, lab = super().sample(vol, rng)
        out = lab.astype(np.int16)
        out[lab == IGNORE] = IGNORE_INDEX
        return img, out


class BoxSampler(WindowSampler):
    """Zhao stage 2: window centres uniform in the ground-truth box + ``margin`` voxels."""

    def __init__(self, window, margin: int = 10):
        super().__init__(window)
        self.margin = int(margin)
        self._boxes: dict = {}

    def corner(self, vol, rng):
        if vol.name not in self._boxes:
            box = mask_box(np.asarray(vol.label) > 0)
            if box is None:
                raise DatasetError(f"{vol.name}: no foreground")
            self._boxes[vol.name] = box
        centre = [int(rng.integers(max(0, lo - self.margin), min(s, hi + self.margin))) for (lo, hi), s in zip(self._boxes[vol.name], vol.image.shape)]
        return _clamp_corner([c - w // 2 for c, w in zip(centre, self.window)], self.window, vol.image.shape)


# --- losses (the trainer's signature: (outputs, target) -> (total, main)) ----------------------

def _main(outputs):
    return outputs[0] if isinstance(outputs, (tuple, list)) else outputs


class RothWeightedCE(nn.Module):
    """Eq. 3-4 over the candidate region (target >= 0)."""

    def forward(self, outputs, target):
        region = target >= 0
        loss = weighted_cross_entropy(_main(outputs), target.clamp(min=0), region)
        return loss, loss.detach()


class ZhaoDiceCentre(nn.Module):
    """L_dice + lambda * L_center; the trainer sets ``centre_lambda`` every step."""

    def __init__(self, centre_lambda: float = 1.0):
        super().__init__()
        self.centre_lambda = float(centre_lambda)

    def forward(self, outputs, target):
        logits = _main(outputs)
        loss = dice_centre_loss(logits, target, self.centre_lambda)
        return loss, loss.detach()


LOSSES.setdefault("roth_weighted_ce", RothWeightedCE)
LOSSES.setdefault("zhao_dice_centre", ZhaoDiceCentre)


# --- trainers -----------------------------------------------------------------------------------

class RegionTrainer(Trainer):
    """Validation loss and DSC only inside the candidate region (targets < 0 are outside)."""

    def validation_terms(self, logits: torch.Tensor, y: torch.Tensor) -> tuple[float, int, int]:
        inside = y >= 0
        a, b = dice_counts(logits.argmax(1) * inside, y.clamp(min=0))
        return float(self.loss_fn(logits, y)[1]), a, b


class ZhaoTrainer(Trainer):
    """Sets the centre-loss weight from the epoch before every step (Zhao's schedule)."""

    def epoch(self) -> int:
        return self.iteration * self.config.effective_batch // max(1, len(self.train_volumes))

    def train_step(self) -> dict:
        s = self.info.get("settings", {})
        lam = centre_weight(self.epoch(), float(s.get("centre_lambda", 1.0)), int(s.get("centre_hold_epochs", 50)), int(s.get("centre_decay_epochs", 50)))
        self.loss_fn.centre_lambda = lam
        logs = super().train_step()
        logs["centre_lambda"] = lam
        return logs


# --- recipes ------------------------------------------------------------------------------------

# Built on recipes.py's classes and registered in registry.py (catalog.py imports this module).
from dataclasses import dataclass  # noqa: E402

from . import recipes as _recipes  # noqa: E402
from .registry import register  # noqa: E402

PipelineRecipe, StageRecipe = _recipes.PipelineRecipe, _recipes.StageRecipe


@dataclass(frozen=True)
class VariantStageRecipe(StageRecipe):
    """A stage with its own data preparation (a ``PREPARERS`` name)."""

    prepare: str = ""

    def data_key(self, settings: dict) -> dict:
        return data_key(self.prepare, settings)

    # The cache's preparation (a module-level function: caches travel to worker processes).
    prepare_volume = staticmethod(prepare_volume)


_CENTRE = {"centre_lambda": 1.0, "centre_hold_epochs": 50, "centre_decay_epochs": 50}
_UNET = {"width": 32, "levels": 4}  # the paper's 3D U-Net (19 M weights)

ROTH_CASCADE = PipelineRecipe(
    name="roth-cascade",
    stages={
        "stage1": VariantStageRecipe(
            sampler=lambda s: RegionSampler(s["window"], s.get("foreground_fraction", 0.5)),
            settings={"window": [64, 64, 64], "n": 0, "downsample": 2, "spacing": None, "threshold": 0.5, "body_threshold_hu": -500.0, "dilation_radius": 3, "foreground_fraction": 0.5},
            loss="roth_weighted_ce", arch="unet3d", network_args=dict(_UNET), prepare="roth-stage1", trainer=RegionTrainer,
        ),
        "stage2": VariantStageRecipe(
            sampler=lambda s: RegionSampler(s["window"], s.get("foreground_fraction", 0.5)),
            settings={"window": [64, 64, 64], "n": 1, "downsample": 2, "spacing": None, "threshold": 0.5, "dilation_radius": 3, "foreground_fraction": 0.5, "stage1": None},
            loss="roth_weighted_ce", arch="unet3d", network_args=dict(_UNET), prepare="roth-stage2", trainer=RegionTrainer,
        ),
    },
    postprocess={"min_island_fraction": 0.0, "coarse_min_island_fraction": 0.0},  # the paper: none
    presets={},
)

ZHAO_TWO_STAGE = PipelineRecipe(
    name="zhao-two-stage",
    stages={
        "stage1": VariantStageRecipe(
            sampler=lambda s: CoarseSampler(s["window"], s.get("foreground_fraction", 0.5)),
            settings={"window": [64, 64, 64], "n": 0, "downsample": 4, "spacing": None, "threshold": 0.5, "low_margin": 2, "foreground_fraction": 0.5, **_CENTRE},
            loss="zhao_dice_centre", arch="unet3d", network_args=dict(_UNET), prepare="zhao-stage1", trainer=ZhaoTrainer,
        ),
        "stage2": VariantStageRecipe(
            sampler=lambda s: BoxSampler(s["window"], int(s.get("margin", 10))),
            settings={"window": [64, 64, 64], "n": 1, "downsample": 1, "spacing": None, "threshold": 0.5, "margin": 10, **_CENTRE},
            loss="zhao_dice_centre", arch="unet3d", network_args=dict(_UNET), prepare="zhao-stage2", trainer=ZhaoTrainer,
        ),
    },
    postprocess={"min_island_fraction": 0.0, "coarse_min_island_fraction": 0.0},
    presets={},
)

VARIANT_RECIPES = {r.name: r for r in (ROTH_CASCADE, ZHAO_TWO_STAGE)}
register(*VARIANT_RECIPES.values(), training_only=VARIANT_TRAINING_ONLY)
