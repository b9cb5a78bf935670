"""Averaging several predictions of the 3D softmax networks (ResDSN, 3D U-Net), as nnU-Net does:

* ``Ensemble`` (arch ``"ensemble"``): the networks of several trainings of one stage (e.g. the
  folds of a cross-validation) in one bundle entry, ``{"arch": "ensemble", "args": {"member":
  {"arch": ..., "args": ...}, "count": K}}``; its weights are the members' under ``members.<i>.``.
* ``FlipAverage``: test-time augmentation by mirroring, the prediction averaged over the 8
  combinations of flips along z, y and x (the stage setting ``"tta": "flips"``); 8 times the
  network's work.

Both average the softmax probabilities and return their logarithm, so that the caller's softmax
(as for any network) gives back the average; they compose (flips of an ensemble).
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from . import build_network, register_architecture

# The 2-class softmax networks an ensemble may hold (RSTN and GGPFN have sigmoid outputs and
# their own inference loops).
SOFTMAX_ARCHITECTURES = ("resdsn", "unet3d")
FLIP_SETS = [axes for k in range(4) for axes in itertools.combinations((2, 3, 4), k)]  # (), (2,), ... (2, 3, 4)


def _log_mean(probabilities: list[torch.Tensor]) -> torch.Tensor:
    return torch.log(torch.stack(probabilities).mean(0).clamp_min(1e-12))


@register_architecture
class Ensemble(nn.Module):
    arch = "ensemble"

    def __init__(self, member: dict, count: int):
        super().__init__()
        if member.get("arch") not in SOFTMAX_ARCHITECTURES:
            raise ValueError(f"an ensemble holds {' or '.join(SOFTMAX_ARCHITECTURES)} networks, not {member.get('arch')!r}")
        if not 1 <= int(count) <= 64:
            raise ValueError(f"an ensemble holds 1-64 networks, not {count}")
        self.members = nn.ModuleList(build_network(member["arch"], dict(member.get("args", {}))) for _ in range(int(count)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _log_mean([torch.softmax(m(x).float(), dim=1) for m in self.members])


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
