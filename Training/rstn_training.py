"""Training recipe of Yu et al. 2018 (``yu-rstn``, PancreasC2FLib/pipelines/yu_rstn.py, networks in PancreasC2FLib/networks/rstn.py).

The paper trains the coarse network, the saliency transformation and the fine network of a view
jointly ("such joint optimization is individually performed on three viewpoints"), so the training
stages of this recipe are the views: ``--stage coronal``, ``sagittal`` or ``axial`` each train one
``RSTNTrainingNet`` (arch ``rstn-joint``: ``RSTNJoint`` of one view). Export merges the views it is
given into the bundle's two stages, ``coarse`` and ``fine``, each one ``RSTNStage`` holding a
network per view (``RSTNRecipe.bundle_stages``); a bundle of one view (e.g. ``axial`` only) is a
valid, faster model.

* Data: the stage preparation of ``datasets.prepare_stage_volume``: the canonical volume normalised
  with whole-case statistics and, with the setting ``spacing`` (x, y, z mm), resampled to it (the
  label too), exactly what ``RSTN.grid`` feeds the networks at inference (``Pipeline.stage_input``:
  the same functions in the same order). ``spacing`` null (the default, the paper's way) keeps the
  input grid; e.g. [2, 2, 2] turns 512 x 512 slices of a 0.7 mm CT into about 180 x 180, some 8
  times less work per slice (the cache is shared with any other stage of the same spacing).
* Samples (``SliceSampler``): slice i of the view with slices i-1 and i+1 as channels
  (``rstn.neighbour_rows``, as at inference) and the label of slice i; whole slices, padded at the
  far ends to a multiple of the network's size with the volume's minimum (labels with 0), as at
  inference. A fraction ``foreground_fraction`` of the slices is drawn from those containing
  pancreas, the rest from all slices. Default 1: the paper does not say, the authors' released
  code (OrganSegRSTN) trains on slices containing pancreas, and with the soft DSC loss a slice
  without pancreas gives next to no gradient anyway. The paper names no augmentation, so
  ``--augment paper`` (the default) trains without; ``--augment flip`` applies the shared flips
  to the 3-slice stack.
* Forward and loss: ``RSTNJoint`` (coarse -> saliency -> crop of the ground-truth box + ``margin``
  pixels -> fine) and Eq. 2 with lambda = 1/3 (``losses_rstn_ggpfn.rstn_loss``). Setting
  ``crop_from: "coarse"`` crops from the thresholded coarse score instead, the paper's
  "fine-tuning with noisy data" (with ``init`` = the first run, a smaller learning rate).
* Validation: one test-like round per slice (the crop from the coarse score), DSC of the fine
  output summed over the fixed validation slices.

Settings recorded in the bundle: coarse ``threshold``; fine ``threshold``, ``margin`` (K, pixels of
the networks' grid, also the training crop margin), ``max_rounds``, ``stop_dsc``, ``margin_mm``;
both ``spacing`` when it is set. Training only: ``foreground_fraction``, ``crop_from``, ``init``,
``init_view`` (start from that view's networks of ``init`` or ``--init-from`` instead of this
view's: a new view begins from a trained one, as the paper's views all begin from ImageNet weights),
``dsc_over`` ("slice", the paper's per-slice DSC, or "batch": each DSC term over the whole batch,
so that pancreas marked on slices without it counts as false positive), ``coarse_bce_weight`` (W > 0
adds W * class-balanced BCE to the coarse term; default 0, the paper's loss; both in
``losses_rstn_ggpfn.py``).

No pre-training schedule: the paper (sections "Training and Testing", "Different Settings")
optimises Eq. 2 jointly from the start (FCN-8s, learning rate 1e-4, 80,000
iterations), then fine-tunes with crops from the coarse mask (``crop_from: "coarse"``); networks
trained individually appear only as the stage-wise baseline it compares with (I^C, I^F).

Deviations from the paper are those of PancreasC2FLib/pipelines/yu_rstn.py (a compact U-Net from scratch, not
FCN-8s from ImageNet); the optimiser is the shared trainer's (SGD, learning rate 0.01 with
polynomial decay, batches of 16 slices), where the paper's FCN-8s used a learning rate of 1e-4 for
80,000 iterations per view.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from PancreasC2FLib.networks import register_architecture
from PancreasC2FLib.networks.rstn import VIEW_AXES, VIEWS, RSTNJoint, RSTNStage, _pad_to, _round_up, neighbour_rows, to_view

from .datasets import StageVolume
from .losses import LOSSES
from .losses_rstn_ggpfn import RSTN_LAMBDA, rstn_loss
from .trainer import Trainer, dice_counts, load_checkpoint, resolve_checkpoint

COARSE_SETTINGS = ("threshold",)
FINE_SETTINGS = ("threshold", "margin", "max_rounds", "stop_dsc", "margin_mm")
RSTN_TRAINING_ONLY = ("crop_from", "init", "init_view", "dsc_over", "coarse_bce_weight")


# --- the network trained ---------------------------------------------------------------------

@register_architecture
class RSTNTrainingNet(RSTNJoint):
    """``RSTNJoint`` of one view, buildable from its arguments (checkpoints record them).

    ``forward(x, label)`` -> (B, 2, H, W): the coarse and the fine probability of the central slice.
    With ``label`` the crop is the ground truth's box + ``margin`` (training); without, the box of
    the thresholded coarse score (one test-time round)."""

    arch = "rstn-joint"

    def __init__(self, view: str = "axial", in_channels: int = 3, width: int = 16, levels: int = 4, saliency_kernel: int = 5, saliency_layers: int = 2):
        coarse = RSTNStage([view], in_channels, width, levels)
        fine = RSTNStage([view], in_channels, width, levels, saliency_kernel, saliency_layers)
        super().__init__(coarse, fine, view)  # margin and threshold: the trainer sets the stage's

    @property
    def size_multiple(self) -> int:
        return self.coarse_net.size_multiple

    def forward(self, x: torch.Tensor, label: torch.Tensor | None = None, with_aux: bool = False) -> torch.Tensor:
        return torch.cat(super().forward(x, label), dim=1)


def bundle_networks(nets: dict[str, RSTNTrainingNet], args: dict) -> tuple[RSTNStage, RSTNStage]:
    """The bundle's coarse and fine ``RSTNStage`` holding the trained views' networks."""
    views = list(nets)
    coarse = RSTNStage(views, args["in_channels"], args["width"], args["levels"])
    fine = RSTNStage(views, args["in_channels"], args["width"], args["levels"], args["saliency_kernel"], args["saliency_layers"])
    for view, net in nets.items():
        coarse.nets[view].load_state_dict(net.coarse_net.state_dict())
        fine.nets[view].load_state_dict(net.fine_net.state_dict())
        fine.saliency[view].load_state_dict(net.saliency.state_dict())
    return coarse.eval(), fine.eval()


# --- samples -----------------------------------------------------------------------------------

class SliceSampler:
    """Slices of one view with their two neighbours as channels: (3, H, W) image, (H, W) label of
    the central slice; a fraction ``foreground_fraction`` of them contains pancreas."""

    def __init__(self, view: str, foreground_fraction: float = 1.0):
        if view not in VIEWS:
            raise ValueError(f"view must be one of {VIEWS}, not {view!r}")
        self.view = view
        self.foreground_fraction = float(foreground_fraction)
        self._fg: dict[str, np.ndarray] = {}
        self._low: dict[str, float] = {}

    def slice_count(self, vol: StageVolume) -> int:
        return vol.image.shape[VIEW_AXES[self.view][0]]

    def foreground_slices(self, vol: StageVolume) -> np.ndarray:
        """Indices of the view's slices that contain pancreas (cached per case)."""
        if vol.name not in self._fg:
            axis = VIEW_AXES[self.view][0]
            self._fg[vol.name] = np.flatnonzero(np.asarray(vol.label).any(axis=tuple(a for a in range(3) if a != axis)))
        return self._fg[vol.name]

    def pad_value(self, vol: StageVolume) -> float:
        """The volume's minimum: what inference pads slices with."""
        if vol.name not in self._low:
            self._low[vol.name] = float(np.min(vol.image))
        return self._low[vol.name]

    def pick(self, vol: StageVolume, rng: np.random.Generator) -> int:
        fg = self.foreground_slices(vol)
        if len(fg) and rng.random() < self.foreground_fraction:
            return int(fg[rng.integers(len(fg))])
        return int(rng.integers(self.slice_count(vol)))

    def slice_at(self, vol: StageVolume, i: int) -> tuple[np.ndarray, np.ndarray]:
        image, label = to_view(vol.image, self.view), to_view(vol.label, self.view)
        x = np.stack([np.asarray(image[r], dtype=np.float32) for r in neighbour_rows(i, image.shape[0])])
        return x, np.array(label[i], dtype=np.uint8)

    def sample(self, vol: StageVolume, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        return self.slice_at(vol, self.pick(vol, rng))


def stack_slices(images: list[np.ndarray], labels: list[np.ndarray], pad_values: list[float], multiple: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, H, W) and (B, H, W): slices padded at the far ends to the largest of them rounded up
    to ``multiple`` (images with their volume's minimum, labels with 0), as inference pads."""
    size = (_round_up(max(i.shape[-2] for i in images), multiple), _round_up(max(i.shape[-1] for i in images), multiple))
    x = torch.stack([_pad_to(torch.from_numpy(i), size, v) for i, v in zip(images, pad_values)])
    y = torch.stack([_pad_to(torch.from_numpy(lab.astype(np.int64)), size, 0) for lab in labels])
    return x, y


def make_sampler(view: str, settings: dict) -> SliceSampler:
    if settings.get("window"):
        raise ValueError("yu-rstn trains on whole slices (of the input grid, or of the grid of 'spacing'), as it runs: no --window")
    if settings.get("crop_from", "truth") not in ("truth", "coarse"):
        raise ValueError(f"crop_from is 'truth' or 'coarse', not {settings['crop_from']!r}")
    return SliceSampler(view, settings.get("foreground_fraction", 1.0))


# --- loss and trainer --------------------------------------------------------------------------

class RSTNLoss(nn.Module):
    """Eq. 2 on ``RSTNTrainingNet``'s (B, 2, H, W) output: (total, the fine term); ``over``
    (setting ``dsc_over``): each DSC per slice (the paper) or over the batch;
    ``coarse_bce_weight`` (setting): class-balanced BCE added to the coarse term."""

    def __init__(self, lam: float = RSTN_LAMBDA, over: str = "slice", coarse_bce_weight: float = 0.0):
        super().__init__()
        self.lam, self.over, self.coarse_bce_weight = float(lam), over, float(coarse_bce_weight)

    def forward(self, outputs: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        terms = rstn_loss(outputs[:, :1], outputs[:, 1:], target, self.lam, self.over, self.coarse_bce_weight)
        return terms["loss"], terms["fine"].detach()


LOSSES.setdefault("rstn_dsc", RSTNLoss)


def _refuse_ensemble(bundle) -> None:
    if any(spec.get("network", {}).get("arch") == "ensemble" for spec in bundle.metadata["stages"].values()):
        raise ValueError(f"{bundle.path}: an ensemble of several models; use one of its members' bundles")


def init_from_bundle(net: RSTNTrainingNet, bundle, view: str) -> None:
    """Start from a yu-rstn bundle's coarse and fine networks of ``view`` (the inverse of
    ``bundle_networks``): fine-tuning a shipped model without its training run, or a new view
    started from another view's networks (``init_view``)."""
    coarse, fine = bundle.networks.get("coarse"), bundle.networks.get("fine")
    _refuse_ensemble(bundle)
    if bundle.pipeline != "yu-rstn" or coarse is None or fine is None or view not in coarse.nets:
        raise ValueError(f"{bundle.path}: not a yu-rstn bundle with the {view} view")
    try:
        net.coarse_net.load_state_dict(coarse.nets[view].state_dict())
        net.fine_net.load_state_dict(fine.nets[view].state_dict())
        net.saliency.load_state_dict(fine.saliency[view].state_dict())
    except (RuntimeError, AttributeError, TypeError) as exc:
        raise ValueError(f"{bundle.path}: its {view} networks differ from this one: {str(exc).splitlines()[0]}") from None


def load_init(net: nn.Module, path: str, network: dict, view: str | None = None) -> None:
    """Start from the weights of an earlier run of the same network, or of a yu-rstn bundle folder
    (setting ``init``); ``view`` (setting ``init_view``): that view's run or networks, default
    this network's own view."""
    from PancreasC2FLib.io.bundle import is_bundle, load_bundle

    view = view or network["args"]["view"]
    if is_bundle(path):
        init_from_bundle(net, load_bundle(Path(path).expanduser()), view)
        return
    ckpt = load_checkpoint(resolve_checkpoint(Path(path).expanduser()))
    wanted = {**network, "args": {**network["args"], "view": view}}
    if ckpt["info"].get("pipeline") != "yu-rstn" or ckpt["info"].get("network") != wanted:
        raise ValueError(f"init={path}: not a yu-rstn checkpoint of this network ({json.dumps(wanted)}), it has {json.dumps(ckpt['info'].get('network'))}")
    net.load_state_dict(ckpt["model"], strict=True)  # the view is an argument, not a weight


class RSTNTrainer(Trainer):
    """Batches of whole slices of one view; the label goes into the forward pass (for the crop)."""

    find_unused_parameters = True  # a batch without pancreas has no crop: the fine network idles

    def __init__(self, net, sampler, loss_fn, train, validation, config, out_dir, info, resume=False):
        s = info["settings"]
        net.margin, net.threshold = int(s["margin"]), float(s["threshold"])
        self.crop_from_truth = s.get("crop_from", "truth") == "truth"
        if s.get("init_view") and not (s.get("init") or info.get("init_from")):
            raise ValueError(f"init_view={s['init_view']}: give the weights to start from (--set init=RUN or --init-from BUNDLE)")
        if s.get("init"):
            load_init(net, s["init"], info["network"], s.get("init_view"))  # a resumed run then restores its own state
        if config.augment == "paper":  # the paper's augmentation: Yu et al. name none
            config = dataclasses.replace(config, augment="none")
        super().__init__(net, sampler, loss_fn, train, validation, config, out_dir, info, resume)

    def draw_batch(self, n: int, volumes: list[StageVolume] | None = None, rng=None, augment: bool = True):
        rng = rng if rng is not None else self.rng
        volumes = volumes or self.train_volumes
        images, labels, pads = [], [], []
        for _ in range(n):
            vol = volumes[int(rng.integers(len(volumes)))]
            img, lab = self.sampler.sample(vol, rng)
            if augment:  # the 3D augmentation on the 3-slice stack, the label copied to each slice
                img, lab3 = self.augment(img, np.repeat(lab[None], 3, axis=0), rng)
                lab = lab3[1]
            images.append(img)
            labels.append(lab)
            pads.append(self.sampler.pad_value(vol))
        x, y = stack_slices(images, labels, pads, self.net.size_multiple)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def forward_loss(self, x, y):
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
            outputs = self.model(x, label=y if self.crop_from_truth else None)
        return self.loss_fn(outputs, y)

    def validation_terms(self, outputs, y):
        a, b = dice_counts(outputs[:, 1] >= self.net.threshold, y)
        return float(self.loss_fn(outputs, y)[0]), a, b


# --- recipe ------------------------------------------------------------------------------------

# Built on recipes.py's classes and registered in registry.py (catalog.py imports this module).
from dataclasses import dataclass  # noqa: E402

from . import recipes as _recipes  # noqa: E402
from .registry import register  # noqa: E402


@dataclass(frozen=True)
class RSTNRecipe(_recipes.PipelineRecipe):
    """Training stages are views; the bundle's stages are ``coarse`` and ``fine``."""

    def required_checkpoints(self) -> set[str]:
        return set()  # any non-empty set of views (``bundle_stages`` checks)

    def stage_from_bundle(self, bundle, stage: str) -> tuple:
        """Export: a view taken over from a yu-rstn bundle, rebuilt as the joint network and
        settings its training run would have given (the inverse of ``bundle_stages``)."""
        _refuse_ensemble(bundle)
        coarse, fine = (bundle.metadata["stages"].get(k, {}) for k in ("coarse", "fine"))
        if bundle.pipeline != self.name or stage not in coarse.get("network", {}).get("args", {}).get("views", []):
            raise ValueError(f"view {stage!r} from {bundle.path}: that bundle ({bundle.pipeline}) has no yu-rstn view {stage!r}")
        if coarse.get("threshold") != fine.get("threshold"):
            raise ValueError(f"view {stage!r} from {bundle.path}: its coarse and fine thresholds differ ({coarse.get('threshold')}, {fine.get('threshold')}); a view's run has one")
        args = {"view": stage, **{k: v for k, v in fine["network"]["args"].items() if k != "views"}}
        net = RSTNTrainingNet(**args)
        init_from_bundle(net, bundle, stage)
        settings = {k: fine.get(k) for k in FINE_SETTINGS} | {"spacing": fine.get("spacing")}
        return net, {"network": {"arch": RSTNTrainingNet.arch, "args": args}, **settings}

    def bundle_stages(self, networks: dict, stages: dict) -> tuple[dict, dict]:
        """Export: the trained views' networks and settings -> the bundle's coarse and fine stages."""
        views = [v for v in VIEWS if v in networks]
        if not views:
            raise ValueError("yu-rstn: give a checkpoint for at least one view (coronal, sagittal, axial)")
        args = {v: {k: a for k, a in stages[v]["network"]["args"].items() if k != "view"} for v in views}
        settings = {v: {k: stages[v].get(k) for k in dict.fromkeys(COARSE_SETTINGS + FINE_SETTINGS + ("spacing",))} for v in views}
        for what, per_view in (("network arguments", args), ("settings", settings)):
            if len({json.dumps(d, sort_keys=True) for d in per_view.values()}) > 1:
                raise ValueError(f"yu-rstn: the views were trained with different {what}: {per_view}; the bundle's stages hold one for all")
        net_args, s = args[views[0]], settings[views[0]]
        coarse, fine = bundle_networks({v: networks[v] for v in views}, net_args)
        shared = {"views": views, "in_channels": net_args["in_channels"], "width": net_args["width"], "levels": net_args["levels"]}
        grid = {} if s["spacing"] is None else {"spacing": list(s["spacing"])}  # both stages work on it
        return (
            {"coarse": coarse, "fine": fine},
            {
                "coarse": {"network": {"arch": RSTNStage.arch, "args": shared}, **{k: s[k] for k in COARSE_SETTINGS}, **grid},
                "fine": {"network": {"arch": RSTNStage.arch, "args": {**shared, "saliency_kernel": net_args["saliency_kernel"], "saliency_layers": net_args["saliency_layers"]}}, **{k: s[k] for k in FINE_SETTINGS}, **grid},
            },
        )


_NETWORK = {"in_channels": 3, "width": 16, "levels": 4, "saliency_kernel": 5, "saliency_layers": 2}  # the paper's best saliency module
_SETTINGS = {"spacing": None, "foreground_fraction": 1.0, "crop_from": "truth", "init": None, "init_view": None, "dsc_over": "slice", "coarse_bce_weight": 0.0, "margin": 20, "threshold": 0.5, "max_rounds": 10, "stop_dsc": 0.95, "margin_mm": 20.0}


@dataclass(frozen=True)
class RSTNStageRecipe(_recipes.StageRecipe):
    """Builds Eq. 2 with the stage's ``dsc_over`` and ``coarse_bce_weight``."""

    def make_loss(self, settings: dict | None = None):
        settings = settings or {}
        if settings.get("class_weights"):
            raise ValueError("yu-rstn's loss is Eq. 2 (soft DSC), it takes no class weights; see --set dsc_over=batch")
        over = settings.get("dsc_over", "slice")
        if over not in ("slice", "batch"):
            raise ValueError(f"dsc_over is 'slice' (the paper) or 'batch', not {over!r}")
        return LOSSES[self.loss](over=over, coarse_bce_weight=_recipes.loss_weight(settings, "coarse_bce_weight"))


def _view_stage(view: str) -> _recipes.StageRecipe:
    return RSTNStageRecipe(
        sampler=lambda s: make_sampler(view, s), settings=dict(_SETTINGS), loss="rstn_dsc", arch=RSTNTrainingNet.arch,
        network_args={"view": view, **_NETWORK}, trainer=RSTNTrainer,
    )


YU_RSTN = RSTNRecipe(
    name="yu-rstn",
    stages={v: _view_stage(v) for v in VIEWS},
    postprocess={"min_island_fraction": 0.0, "coarse_min_island_fraction": 0.0},  # the paper: none
    presets={},
)

register(YU_RSTN, training_only=RSTN_TRAINING_ONLY)
