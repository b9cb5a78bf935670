"""Eq. 3 of Zhu et al. 2018: cross-entropy on the main output plus weighted cross-entropy on the
auxiliary (deep-supervision) outputs; the L2 term is the optimiser's weight decay."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class DeepSupervisionCE(torch.nn.Module):
    """``CE(main) + sum_d xi_d * CE(aux_d)``; the paper's xi are 0.2 (Conv2b) and 0.4 (Conv3b)."""

    def __init__(self, aux_weights: tuple[float, ...] = (0.2, 0.4)):
        super().__init__()
        self.aux_weights = tuple(float(w) for w in aux_weights)

    def forward(self, outputs, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(total loss, main loss); ``outputs`` is the network's (main, aux...) tuple or the main logits."""
        if isinstance(outputs, torch.Tensor):
            outputs = (outputs,)
        main = F.cross_entropy(outputs[0].float(), target)
        total = main
        for w, aux in zip(self.aux_weights, outputs[1:]):
            total = total + w * F.cross_entropy(aux.float(), target)
        return total, main.detach()


LOSSES = {"ce_deep_supervision": DeepSupervisionCE}
