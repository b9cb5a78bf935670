"""GGPFN's network (Fang et al. 2019): the global guidance branch, the progressive fusion encoder,
the decoder (``GGPFNet``) and one of them per view (``GGPFNViews``, arch ``ggpfn-views``). The
method and its deviations from the paper: pipelines/fang_ggpfn.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import register_architecture
from .rstn import VIEWS


# --- shared by training and inference ----------------------------------------------------------

def global_input(slices: torch.Tensor, size) -> torch.Tensor:
    """A_g: whole slices (B, H, W) downsampled to ``size`` (h_g, w_g) -> (B, 1, h_g, w_g)
    (bilinear with antialiasing; training data must go through this same function)."""
    x = slices[:, None].float()
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(int(v) for v in size), mode="bilinear", align_corners=False, antialias=True)


def neighbour_slices(i: int, half: int, n: int) -> list[int]:
    """Slice i's 2T + 1 neighbourhood (``half`` = T) in a view of n slices, the volume's end
    slices repeated (Training/ggpfn_training.py builds its samples with this too)."""
    return [min(max(j, 0), n - 1) for j in range(i - half, i + half + 1)]


def sample_global(features: torch.Tensor, origin: torch.Tensor, out_hw, stride: int, slice_hw) -> torch.Tensor:
    """F_k: the global feature map of each sample's whole slice (B, C, h_F, w_F) sampled
    (bilinear, sub-pixel) at the slice positions of a local feature map's pixels.

    The local map has ``out_hw`` pixels, each covering ``stride`` x ``stride`` pixels of the patch
    whose top-left corner is at ``origin`` (B, 2: row, column) in a slice of ``slice_hw`` pixels
    ((h, w), or (B, 2) when the samples' slices differ, as in training batches).
    F covers the whole slice (pixel edges aligned), so the normalised coordinate of a slice position
    is the same in F. Positions beyond the slice (a padded patch) take F's border values."""
    oh, ow = (int(v) for v in out_hw)
    dev = features.device
    hw = torch.as_tensor(slice_hw, dtype=torch.float32).to(dev).reshape(-1, 2)
    h, w = hw[:, :1], hw[:, 1:]
    origin = origin.to(dev, torch.float32)
    cy = origin[:, :1] + stride * torch.arange(oh, device=dev, dtype=torch.float32)[None] + stride / 2.0  # pixel-centre + 0.5
    cx = origin[:, 1:] + stride * torch.arange(ow, device=dev, dtype=torch.float32)[None] + stride / 2.0
    ny, nx = 2.0 * cy / h - 1.0, 2.0 * cx / w - 1.0
    grid = torch.stack(torch.broadcast_tensors(nx[:, None, :], ny[:, :, None]), dim=-1)  # (B, oh, ow, 2) as (x, y)
    return F.grid_sample(features.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)


def _bn_relu2d(cin: int, cout: int, k: int = 3) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def _block2d(cin: int, cout: int, n: int = 2) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(n):
        layers += _bn_relu2d(cin if i == 0 else cout, cout)
    return nn.Sequential(*layers)


class FusionGroup(nn.Module):
    """``n`` 3D convolutions (3x3x3, no padding along the slices: each drops the two outermost)
    with a residual 1x1x1 projection of the input's central slices."""

    def __init__(self, cin: int, cout: int, n: int):
        super().__init__()
        if n < 1:
            raise ValueError("every fusion group needs at least one 3D convolution")
        layers: list[nn.Module] = []
        for i in range(n):
            layers += [nn.Conv3d(cin if i == 0 else cout, cout, 3, padding=(0, 1, 1), bias=False), nn.BatchNorm3d(cout), nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*layers)
        self.skip = nn.Sequential(nn.Conv3d(cin, cout, 1, bias=False), nn.BatchNorm3d(cout))
        self.n = n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.shape[2]
        return F.relu(self.body(x) + self.skip(x[:, :, self.n : s - self.n]))


def pool_in_plane(x: torch.Tensor) -> torch.Tensor:
    """2 x 2 max pooling of every slice of a (B, C, S, H, W) map: ``max_pool3d(x, (1, 2, 2))``
    computed as a 2D pooling (about 10x faster on a CPU, the same values)."""
    b, c, s, h, w = x.shape
    return F.max_pool2d(x.reshape(b, c * s, h, w), 2).reshape(b, c, s, h // 2, w // 2)


def _central(x: torch.Tensor) -> torch.Tensor:
    """The central slice of a (B, C, S, H, W) feature map (the skip connections' central crop)."""
    return x[:, :, x.shape[2] // 2]


class GGPFNet(nn.Module):
    """One view's network: progressive fusion encoder (4 groups of 3D convolutions, ``convs`` per
    group, T = sum(convs), input 2T + 1 slices), global guidance branch (2D, ``global_convs`` per
    group with max pooling between groups) and a 2D decoder. Logits of the central slice."""

    def __init__(self, width: int = 16, convs=(3, 4, 4, 4), global_width: int = 16, global_convs=(2, 2, 3, 3, 3), global_size=(224, 224)):
        super().__init__()
        convs, global_convs = [int(c) for c in convs], [int(c) for c in global_convs]
        if len(convs) != 4:
            raise ValueError("the progressive fusion encoder has 4 groups")
        if len(global_convs) < 2:
            raise ValueError("the global branch needs at least 2 groups")
        self.convs, self.global_size = convs, tuple(int(v) for v in global_size)
        self.slices = 2 * sum(convs) + 1
        chans = [width * 2**g for g in range(4)]
        self.encoder = nn.ModuleList(FusionGroup(1 if g == 0 else chans[g - 1], chans[g], n) for g, n in enumerate(convs))
        self.encoder_heads = nn.ModuleList(nn.Conv2d(c, 1, 1) for c in chans)  # deep supervision P^(j)
        gchans = [global_width * min(2**g, 8) for g in range(len(global_convs))]
        self.global_groups = nn.ModuleList(_block2d(1 if g == 0 else gchans[g - 1], gchans[g], n) for g, n in enumerate(global_convs))
        self.global_head = nn.Conv2d(gchans[-1], 1, 1)  # P^f
        self.global_head2 = nn.Conv2d(gchans[-2], 1, 1)  # P^f'
        self.global_stride = 2 ** (len(global_convs) - 1)
        self.bottom = _block2d(chans[3] + gchans[-1], chans[3])
        self.up = nn.ModuleList(nn.ConvTranspose2d(chans[g + 1], chans[g], 2, stride=2) for g in (2, 1, 0))
        self.decoder = nn.ModuleList(_block2d(2 * chans[g], chans[g]) for g in (2, 1, 0))
        self.classifier = nn.Conv2d(chans[0], 1, 1)

    patch_multiple = 8  # three in-plane poolings in the encoder
    local_stride = 8

    def global_features(self, a_g: torch.Tensor, with_aux: bool = False):
        """F (and, with ``with_aux``, the logits of P^f and P^f') from A_g (B, 1, h_g, w_g)."""
        x, prev = a_g, None
        for g, block in enumerate(self.global_groups):
            if g:
                prev = x  # F': the second-last group's output
                x = F.max_pool2d(x, 2)
            x = block(x)
        if not with_aux:
            return x
        return x, self.global_head(x), self.global_head2(prev)

    def forward(self, x: torch.Tensor, global_feat: torch.Tensor, origin: torch.Tensor, slice_hw, with_aux: bool = False):
        """x: (B, 1, 2T + 1, P, P) local patches; global_feat: F of each sample's slice; origin:
        (B, 2) patch corners in the slice; logits (B, 1, P, P) of the central slice (and, with
        ``with_aux``, the logits of the four encoder scales P^(1..4))."""
        if x.shape[2] != self.slices:
            raise ValueError(f"the network takes {self.slices} slices, got {x.shape[2]}")
        feats = []
        for g, group in enumerate(self.encoder):
            if g:
                x = pool_in_plane(x)
            x = group(x)
            feats.append(x)
        e = _central(feats[3])
        fk = sample_global(global_feat, origin, e.shape[-2:], self.local_stride, slice_hw).to(e.dtype)
        d = self.bottom(torch.cat([e, fk], dim=1))
        for up, dec, g in zip(self.up, self.decoder, (2, 1, 0)):
            d = dec(torch.cat([_central(feats[g]), up(d)], dim=1))
        logits = self.classifier(d)
        if not with_aux:
            return logits
        return logits, [head(_central(f)) for head, f in zip(self.encoder_heads, feats)]

    def forward_train(self, x: torch.Tensor, a_g: torch.Tensor, origin: torch.Tensor, slice_hw) -> dict:
        """Everything Eq. 2 needs: ``main`` (B, 1, P, P), ``encoder`` (4 maps at 1/1..1/8),
        ``global`` (P^f, P^f' logits on F's and F''s grids); all logits."""
        feat, pf, pf2 = self.global_features(a_g, with_aux=True)
        main, enc = self.forward(x, feat, origin, slice_hw, with_aux=True)
        return {"main": main, "encoder": enc, "global": [pf, pf2]}


@register_architecture
class GGPFNViews(nn.Module):
    """A GGPFNet per view (the paper trains one model per view), as one module: one weights file.
    ``per_view`` overrides arguments for some views, e.g. ``{"sagittal": {"global_size": [128,
    224]}, "coronal": {"global_size": [128, 224]}}`` (the paper's h_g = 128 for those views on MSD)."""

    arch = "ggpfn-views"

    def __init__(self, views=VIEWS, per_view: dict | None = None, **net_args):
        super().__init__()
        views = list(views)
        if not views or any(v not in VIEWS for v in views):
            raise ValueError(f"views must be a non-empty subset of {VIEWS}")
        per_view = dict(per_view or {})
        if any(v not in views for v in per_view):
            raise ValueError(f"per_view names views the network does not have: {sorted(set(per_view) - set(views))}")
        self.views = views
        self.nets = nn.ModuleDict({v: GGPFNet(**{**net_args, **per_view.get(v, {})}) for v in views})

    def forward(self, x, global_feat, origin, slice_hw, view: str | None = None):
        return self.nets[view or self.views[0]](x, global_feat, origin, slice_hw)
