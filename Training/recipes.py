"""What each pipeline trains: its stages, and for each stage the sampler, the loss, the network
and the settings a bundle records. A new pipeline (e.g. a Roth cascade or a Zhao two-stage model)
is one more ``PipelineRecipe`` registered in registry.py; nothing else in the training code names
stages. Here: the base classes and the ResDSN C2F recipe.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .losses import LOSSES
from .registry import register
from .samplers import CoarseSampler, FineSampler, WindowSampler


def loss_weight(settings: dict, name: str) -> float:
    """A loss-term weight setting (default 0): a number in 0..100, else ValueError."""
    weight = settings.get(name, 0.0)
    if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not 0.0 <= weight <= 100.0:
        raise ValueError(f"{name} must be a number in 0..100, got {weight!r}")
    return float(weight)


@dataclass(frozen=True)
class StageRecipe:
    """How one stage is trained. ``settings`` are the stage's bundle entries (window, n, spacing,
    threshold, ...) with their defaults; ``sampler`` builds the window sampler from them."""

    sampler: Callable[[dict], WindowSampler]
    settings: dict
    whole_volume: bool = True  # False: train on a crop around the ground truth (fine stages)
    loss: str = "ce_deep_supervision"
    arch: str = "resdsn"
    network_args: dict = field(default_factory=lambda: {"width": 32})
    trainer: type | None = None  # a Trainer subclass for this stage (None: the shared Trainer)

    def make_loss(self, settings: dict | None = None):
        weights = (settings or {}).get("class_weights")
        if not weights:
            return LOSSES[self.loss]()
        if self.loss != "ce_deep_supervision":  # the other papers' losses set their own balance
            raise ValueError(f"the {self.loss} loss sets its own class balance; --class-weights is for resdsn-c2f")
        return LOSSES[self.loss](class_weights=tuple(weights))

    def crop_margin_mm(self, settings: dict) -> float | None:
        """How much context around the ground-truth box the training data keeps (None: all)."""
        if self.whole_volume:
            return None
        sampler = self.sampler(settings)
        half_window_mm = max(w * float(s) for w, s in zip(settings["window"], settings.get("spacing") or (1.0, 1.0, 1.0))) / 2
        return float(settings.get("margin_mm", 20.0)) * max(getattr(sampler, "jitter", (0, 1))) + half_window_mm


@dataclass(frozen=True)
class PipelineRecipe:
    name: str  # the bundle's "pipeline"
    stages: dict[str, StageRecipe]
    postprocess: dict
    presets: dict

    def required_checkpoints(self) -> set[str]:
        """The trained stages ``export`` needs: all of them, unless a recipe trains other units
        than the bundle's stages (yu-rstn: one joint model per view, any set of views)."""
        return set(self.stages)

    def bundle_stages(self, networks: dict, stages: dict) -> tuple[dict, dict]:
        """Export: the trained stages' networks and settings -> the bundle's (here: the same)."""
        return networks, stages

    def stage_from_bundle(self, bundle, stage: str) -> tuple:
        """Export: a training stage taken over unchanged from a bundle of this pipeline, as
        ``bundle_stages`` expects it: (network, settings)."""
        if bundle.pipeline != self.name or stage not in bundle.networks or stage not in self.stages:
            raise ValueError(f"stage {stage!r} from {bundle.path}: that bundle ({bundle.pipeline}, stages {', '.join(bundle.networks)}) has no {self.name} stage {stage!r}")
        return bundle.networks[stage].float(), {k: v for k, v in bundle.stage(stage).items() if k not in ("weights", "sha256")}


RESDSN_C2F = PipelineRecipe(
    name="resdsn-c2f",
    stages={
        "coarse": StageRecipe(
            sampler=lambda s: CoarseSampler(s["window"], s.get("foreground_fraction", 0.5)),
            settings={"window": [64, 64, 64], "n": 6, "spacing": None, "threshold": 0.5, "foreground_fraction": 0.5},
        ),
        "fine": StageRecipe(
            sampler=lambda s: FineSampler(s["window"], s.get("margin_mm", 20.0), tuple(s.get("margin_jitter", (0.0, 2.0))), foreground_centred=s.get("foreground_centred", 0.0)),
            settings={"window": [64, 64, 64], "n": 12, "spacing": None, "margin_mm": 20.0, "threshold": 0.5, "margin_jitter": [0.0, 2.0], "foreground_centred": 0.0},
            whole_volume=False,
        ),
    },
    postprocess={"min_island_fraction": 0.2, "coarse_min_island_fraction": 0.2},
    presets={"paper": {"stages": {"coarse": {"n": 6}, "fine": {"n": 12}}}, "fast": {"stages": {"coarse": {"n": 1}, "fine": {"n": 2}}}},
)

# Stage settings used only while training (kept in checkpoints, left out of bundles).
register(RESDSN_C2F, training_only=("foreground_fraction", "margin_jitter", "foreground_centred", "class_weights"))
