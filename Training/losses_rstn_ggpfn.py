"""Losses of the two 2D/2.5D systems (PancreasC2FLib/pipelines/yu_rstn.py and fang_ggpfn.py).

Yu et al. 2018 (RSTN), after Zhou et al. 2016: the soft DSC loss
    L{Y, Z} = 1 - 2 * sum_i Y_i Z_i / sum_i (Y_i + Z_i)
on probabilities Z, per slice, and the joint loss of Eq. 2
    L = lambda * L{Y, Z^C} + (1 - lambda) * L{Y, Z^F},    lambda = 1/3.

Fang et al. 2019 (GGPFN), Eq. 1-2: binary cross-entropy C(P, G) (mean over pixels) and
    L = 1/N sum_k [C(P_k, G_k) + 1/4 sum_j C(P_k^(j), G_k^(j))] + alpha C(P^f, G^f) + beta C(P^f', G^f')
with G^(j) downsampled from the patch's ground truth G_k and G^f, G^f' from the ground truth of the
downsampled whole slice A_g. Downsampling here is area averaging (the fraction of foreground
pixels: a soft target); the paper does not say how it downsamples. alpha = beta = 0.5 while the
global branch trains alone, alpha = 0.01 and beta = 0 in the joint fine-tuning (Sec. 3.2).

Not the paper's: ``dice_weight`` adds dice_weight * (1 - soft DSC) of the main output over the
whole batch (``batch_dsc_loss``) to Eq. 2 (default 0: the paper's loss). With mostly-background
patches, plain BCE leaves the pancreas' probabilities low (about 0.2) after a short CPU run; the
Dice term counts the pancreas' pixels as much as the background's, so the demo's probabilities
cross 0.5 on the pancreas (Training/ggpfn_training.py, ``dice_weight``).

Not the paper's either: RSTN's ``dsc_over: "batch"`` takes each DSC term over the whole batch as
one region instead of per slice. Per slice, a slice without pancreas gives next to no gradient
(its DSC is 0 whatever the probabilities), so pancreas marked on such slices goes unpunished:
trained that way on a CPU budget, the coarse network marked pancreas on slices without it and
the test-time box covered most of the scan. Over the batch, those pixels add to the denominator
like any false positive (Training/rstn_training.py, ``dsc_over``). And ``coarse_bce_weight`` adds that
much class-balanced binary cross-entropy (the classes weighted as in Roth et al.'s Eq. 3,
``losses_variants.roth_class_weights``) to the coarse term: with the DSC alone, the demo's coarse
network on whole slices (pancreas about 0.5 % of the pixels) stayed at a near-uniform probability
of about 0.4, where the DSC's gradient per pixel is tiny.

Probabilities come as (B, 1, H, W) or (B, H, W); GGPFN's functions take logits (numerically
stable BCE); targets are binary (any integer or float type).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .losses_variants import roth_class_weights

RSTN_LAMBDA = 1.0 / 3.0


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).float()


def dsc_loss(prob: torch.Tensor, target: torch.Tensor, eps: float = 1e-6, over: str = "slice") -> torch.Tensor:
    """1 - soft DSC per sample (slice), averaged over the batch; 0 when both are empty. ``over``
    "batch": the DSC of the whole batch as one region."""
    z, y = _flat(prob), (_flat(target) > 0).float()
    if over == "batch":
        z, y = z.reshape(1, -1), y.reshape(1, -1)
    elif over != "slice":
        raise ValueError(f"the DSC is taken over 'slice' or 'batch', not {over!r}")
    inter = (z * y).sum(1)
    denom = z.sum(1) + y.sum(1)
    return (1.0 - (2.0 * inter + eps) / (denom + eps)).mean()


def balanced_bce(prob: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Binary cross-entropy of probabilities with Roth's class weights (each class about half of
    the total weight: the weighted mean over the pixels)."""
    z, y = prob.reshape(-1).float().clamp(eps, 1.0 - eps), (target.reshape(-1) > 0).long()
    w = roth_class_weights(y, 2)[y]
    return (w * F.binary_cross_entropy(z, y.float(), reduction="none")).sum() / w.sum().clamp(min=eps)


def rstn_loss(coarse_prob: torch.Tensor, fine_prob: torch.Tensor, target: torch.Tensor, lam: float = RSTN_LAMBDA, over: str = "slice", coarse_bce_weight: float = 0.0) -> dict:
    """Eq. 2 for ``RSTNJoint``'s outputs (the fine probability on the whole slice, zero outside the
    crop, so its DSC equals the DSC on the ground-truth crop). Returns the total and both terms.
    ``over``: each DSC per slice (the paper) or over the batch (``dsc_loss``);
    ``coarse_bce_weight``: that much ``balanced_bce`` added to the coarse term."""
    coarse, fine = dsc_loss(coarse_prob, target, over=over), dsc_loss(fine_prob, target, over=over)
    if coarse_bce_weight:
        coarse = coarse + float(coarse_bce_weight) * balanced_bce(coarse_prob, target)
    return {"loss": lam * coarse + (1.0 - lam) * fine, "coarse": coarse, "fine": fine}


def bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Eq. 1: mean binary cross-entropy over the pixels (and the batch)."""
    t = target.float()
    if t.dim() == logits.dim() - 1:
        t = t[:, None]
    return F.binary_cross_entropy_with_logits(logits.float(), t)


def downsample_target(target: torch.Tensor, size) -> torch.Tensor:
    """A ground truth (B, H, W) or (B, 1, H, W) on a coarser grid: the foreground fraction of each
    output pixel (area averaging)."""
    t = target.float()
    if t.dim() == 3:
        t = t[:, None]
    if tuple(t.shape[-2:]) == tuple(size):
        return t
    return F.adaptive_avg_pool2d(t, tuple(int(v) for v in size))


def batch_dsc_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - soft DSC of sigmoid(logits) over the whole batch as one region (patches without
    pancreas then add only to the denominator instead of each asking for all-zero output)."""
    z, y = torch.sigmoid(logits.float()).reshape(-1), (target.float().reshape(-1) >= 0.5).float()
    return 1.0 - (2.0 * (z * y).sum() + eps) / (z.sum() + y.sum() + eps)


def ggpfn_loss(outputs: dict, target: torch.Tensor, global_target: torch.Tensor | None = None, alpha: float = 0.5, beta: float = 0.5, dice_weight: float = 0.0) -> dict:
    """Eq. 2 for ``GGPFNet.forward_train``'s outputs. ``target``: the patches' central-slice ground
    truth (B, P, P); ``global_target``: the ground truth of the whole slices at A_g's size (B, h_g,
    w_g) (needed when alpha or beta is not 0). The batch mean over patches is the 1/N sum_k.

    The pieces outside ``outputs`` may be missing: with only ``main`` it is plain BCE.
    ``dice_weight`` > 0 adds that much of ``batch_dsc_loss`` of the main output (term ``dice``)."""
    main = bce(outputs["main"], downsample_target(target, outputs["main"].shape[-2:]))
    enc_maps = outputs.get("encoder") or []
    encoder = sum((bce(p, downsample_target(target, p.shape[-2:])) for p in enc_maps), torch.zeros((), device=main.device))
    encoder = encoder / 4.0  # the paper's 1/4 sum over its four scales
    terms = {"main": main, "encoder": encoder}
    total = main + encoder
    if dice_weight:
        main_target = downsample_target(target, outputs["main"].shape[-2:])
        terms["dice"] = batch_dsc_loss(outputs["main"], main_target)
        total = total + float(dice_weight) * terms["dice"]
    glob = outputs.get("global") or []
    for name, weight, logits in zip(("global", "global2"), (alpha, beta), glob):
        if weight == 0:
            terms[name] = torch.zeros((), device=main.device)
            continue
        if global_target is None:
            raise ValueError("alpha or beta is not 0: the global branch's ground truth is needed")
        term = bce(logits, downsample_target(global_target, logits.shape[-2:]))
        terms[name] = term
        total = total + weight * term
    terms["loss"] = total
    return terms
