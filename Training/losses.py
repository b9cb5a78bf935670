"""Eq. 3 of Zhu et al. 2018: cross-entropy on the main output plus weighted cross-entropy on the
auxiliary (deep-supervision) outputs; the L2 term is the optimiser's weight decay."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class DeepSupervisionCE(torch.nn.Module):
    """``CE(main) + sum_d xi_d * CE(aux_d)``; the paper's xi are 0.2 (Conv2b) and 0.4 (Conv3b)."""

    def __init__(self, aux_weights: tuple[float, ...] = (0.2, 0.4), class_weights: tuple[float, ...] | None = None):
        super().__init__()
        self.aux_weights = tuple(float(w) for w in aux_weights)
        # Optional per-class weights (the paper: none). A stage that works on a coarse grid sees
        # the pancreas in well under 1 % of its voxels; weighting it up gets a small network past
        # "all background" quickly (its probabilities are then biased up: raise the threshold).
        self.register_buffer("class_weights", None if class_weights is None else torch.tensor(class_weights, dtype=torch.float32), persistent=False)

    def forward(self, outputs, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(total loss, main loss); ``outputs`` is the network's (main, aux...) tuple or the main logits."""
        if isinstance(outputs, torch.Tensor):
            outputs = (outputs,)
        cw = None if self.class_weights is None else self.class_weights.to(outputs[0].device)
        main = F.cross_entropy(outputs[0].float(), target, weight=cw)
        total = main
        for w, aux in zip(self.aux_weights, outputs[1:]):
            total = total + w * F.cross_entropy(aux.float(), target, weight=cw)
        return total, main.detach()


LOSSES = {"ce_deep_supervision": DeepSupervisionCE}
