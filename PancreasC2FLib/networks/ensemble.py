"""Averaging several predictions of the 3D softmax networks (ResDSN, 3D U-Net), as nnU-Net does:

* ``Ensemble`` (arch ``"ensemble"``): the networks of several trainings of one stage (e.g. the
  folds of a cross-validation, or runs of one recipe with other seeds) in one bundle entry,
  ``{"arch": "ensemble", "args": {"member": {"arch": ..., "args": ...}, "count": K}}``; its
  weights are the members' under ``members.<i>.``. A 3D softmax ensemble is called like its
  members; RSTN's and GGPFN's sigmoid networks run inside their pipelines' own slice loops, which
  take ``members_of(net)`` and average the members' probabilities at each step.
* ``FlipAverage``: test-time augmentation by mirroring, the prediction averaged over the 8
  combinations of flips along z, y and x (the stage setting ``"tta": "flips"``); 8 times the
  network's work.

Called as networks, both average the softmax probabilities and return their logarithm, so that
the caller's softmax (as for any network) gives back the average; they compose (flips of an
ensemble).
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from . import build_network, register_architecture

# The 2-class softmax networks, which an ensemble averages when called.
SOFTMAX_ARCHITECTURES = ("resdsn", "unet3d")
# Sigmoid networks whose pipelines run them slice by slice with their own inputs (RSTN's saliency
# rounds, GGPFN's global branch): their ensembles are not called, the pipelines average members_of().
MEMBERWISE_ARCHITECTURES = ("rstn-stage", "ggpfn-views")
FLIP_SETS = [axes for k in range(4) for axes in itertools.combinations((2, 3, 4), k)]  # (), (2,), ... (2, 3, 4)


def _log_mean(probabilities: list[torch.Tensor]) -> torch.Tensor:
    return torch.log(torch.stack(probabilities).mean(0).clamp_min(1e-12))


@register_architecture
class Ensemble(nn.Module):
    arch = "ensemble"

    def __init__(self, member: dict, count: int):
        super().__init__()
        known = SOFTMAX_ARCHITECTURES + MEMBERWISE_ARCHITECTURES
        if member.get("arch") not in known:
            raise ValueError(f"an ensemble holds {', '.join(known)} networks, not {member.get('arch')!r}")
        if not 1 <= int(count) <= 64:
            raise ValueError(f"an ensemble holds 1-64 networks, not {count}")
        self.member_arch = member["arch"]
        self.members = nn.ModuleList(build_network(member["arch"], dict(member.get("args", {}))) for _ in range(int(count)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.member_arch not in SOFTMAX_ARCHITECTURES:
            raise TypeError(f"an ensemble of {self.member_arch} networks is run by its pipeline (members_of), not called")
        return _log_mean([torch.softmax(m(x).float(), dim=1) for m in self.members])


def members_of(net: nn.Module) -> list[nn.Module]:
    """The networks whose probabilities a pipeline averages: an ensemble's members, else ``net``."""
    return list(net.members) if isinstance(net, Ensemble) else [net]


class FlipAverage(nn.Module):
    """``net``'s prediction averaged over the mirrored inputs (inference only, not a bundle arch)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = []
        for axes in FLIP_SETS:
            y = self.net(x.flip(axes) if axes else x)
            probs.append(torch.softmax(y.float(), dim=1).flip(axes) if axes else torch.softmax(y.float(), dim=1))
        return _log_mean(probs)
