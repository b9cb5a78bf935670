"""Losses of the two other 3D systems (the ResDSN loss lives in losses.py).

Roth et al. 2018, Eq. 3-4: voxel-wise cross-entropy with class weights
    lambda_k = (1 - N_k / N_C) / (K - 1),    L = -1/N * sum_k lambda_k * sum_{x in S_k} log p_k(x),
counted only over the candidate region C (the body mask C1 in stage 1, the dilated stage-1 mask C2
in stage 2); N = N_C is the number of voxels in C.

Zhao et al. 2019, Sec. 2.3: L = L_dice + lambda * L_center, with the soft Dice loss and a centre
loss comparing, slice by slice, the centre of mass of the prediction with that of the reference,
divided by a spatial normalisation factor (here the slice diagonal). lambda is held for the first
50 epochs and then brought down to 0. The stored text of the paper lost lambda's value; we hold
lambda_0 = 1 and let it fall linearly to 0 over the next 50 epochs (both configurable).

All functions take logits (B, K, D, H, W) and integer targets (B, D, H, W); axial slices are
along D (the canonical z axis).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


# --- Roth: weighted cross-entropy ------------------------------------------------------------

def roth_class_weights(target: torch.Tensor, num_classes: int, region: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 3: lambda_k = (1 - N_k / N_C) / (K - 1) over the voxels of ``region`` (all if None);
    the weights sum to 1 and favour the rarer classes."""
    if num_classes < 2:
        raise ValueError("weighted cross-entropy needs at least 2 classes")
    t = target if region is None else target[region.bool()]
    n_c = t.numel()
    counts = torch.bincount(t.reshape(-1).long(), minlength=num_classes)[:num_classes].to(torch.float64)
    if n_c == 0:
        return torch.full((num_classes,), 1.0 / num_classes, dtype=torch.float32, device=target.device)
    return ((1.0 - counts / n_c) / (num_classes - 1)).to(torch.float32)


def weighted_cross_entropy(logits: torch.Tensor, target: torch.Tensor, region: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 4 over the candidate region (batch-wide counts; 0 when the region is empty)."""
    k = logits.shape[1]
    weights = roth_class_weights(target, k, region).to(logits.device)
    logp = F.log_softmax(logits.float(), dim=1)
    nll = -logp.gather(1, target.long().unsqueeze(1)).squeeze(1)  # -log p_{label}(x)
    per_voxel = weights[target.long()] * nll
    if region is None:
        return per_voxel.mean()
    r = region.to(per_voxel.dtype)
    n = r.sum()
    if n == 0:
        return logits.sum() * 0.0
    return (per_voxel * r).sum() / n


# --- Zhao: Dice + centre loss ------------------------------------------------------------------

def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """1 - soft Dice of the foreground probability, averaged over the batch."""
    p = torch.softmax(logits.float(), dim=1)[:, 1]
    y = (target > 0).to(p.dtype)
    dims = tuple(range(1, p.ndim))
    inter = (p * y).sum(dims)
    denom = p.sum(dims) + y.sum(dims)
    return (1.0 - (2.0 * inter + eps) / (denom + eps)).mean()


def slice_centres(mask: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre of mass (y, x) of each axial slice of a soft or binary mask (B, D, H, W) as the
    weighted mean of the voxel coordinates, and each slice's mass. Returns (B, D, 2), (B, D)."""
    _, _, h, w = mask.shape
    ys = torch.arange(h, dtype=mask.dtype, device=mask.device)
    xs = torch.arange(w, dtype=mask.dtype, device=mask.device)
    mass = mask.sum(dim=(2, 3))
    cy = (mask.sum(dim=3) * ys).sum(dim=2) / (mass + eps)
    cx = (mask.sum(dim=2) * xs).sum(dim=2) / (mass + eps)
    return torch.stack([cy, cx], dim=-1), mass


def centre_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Mean over the slices that contain reference foreground of the distance between the
    predicted and the reference slice centre, divided by the slice diagonal (0 without any)."""
    p = torch.softmax(logits.float(), dim=1)[:, 1]
    y = (target > 0).to(p.dtype)
    cp, _ = slice_centres(p, eps)
    cy, mass_y = slice_centres(y, eps)
    h, w = y.shape[-2:]
    norm = max(float(((h - 1) ** 2 + (w - 1) ** 2) ** 0.5), 1.0)
    valid = mass_y > 0
    if not bool(valid.any()):
        return logits.sum() * 0.0
    dist = torch.sqrt(((cp - cy) ** 2).sum(-1) + eps) / norm
    return dist[valid].mean()


def centre_weight(epoch: int, lambda0: float = 1.0, hold_epochs: int = 50, decay_epochs: int = 50) -> float:
    """Zhao's schedule: lambda0 for the first ``hold_epochs`` epochs (counted from 0), then a
    linear fall to 0 over ``decay_epochs`` (0: straight to 0)."""
    if epoch < hold_epochs:
        return float(lambda0)
    if decay_epochs <= 0:
        return 0.0
    return float(lambda0) * max(0.0, 1.0 - (epoch - hold_epochs + 1) / decay_epochs)


def dice_centre_loss(logits: torch.Tensor, target: torch.Tensor, centre_lambda: float) -> torch.Tensor:
    """L = L_dice + lambda * L_center."""
    loss = soft_dice_loss(logits, target)
    if centre_lambda > 0:
        loss = loss + centre_lambda * centre_loss(logits, target)
    return loss
