"""RSTN's networks (Yu et al. 2018): the views, the 2D U-Net, the saliency transformation, a stage
(``RSTNStage``, arch ``rstn-stage``), the fine stage on crops and the joint model for training.
The method, its test-time rounds and its deviations from the paper: pipelines/yu_rstn.py.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..processing.geometry import Box
from . import register_architecture

VIEWS = ("coronal", "sagittal", "axial")
# Canonical (z, y, x) -> (slice, row, column) of a view: axial slices are along z, coronal along y
# (anterior-posterior), sagittal along x (left-right).
VIEW_AXES = {"axial": (0, 1, 2), "coronal": (1, 0, 2), "sagittal": (2, 0, 1)}


def to_view(volume: np.ndarray, view: str) -> np.ndarray:
    """The canonical volume with the view's slice axis first (a view, no copy)."""
    return np.transpose(volume, VIEW_AXES[view])


def from_view(volume: np.ndarray, view: str) -> np.ndarray:
    return np.transpose(volume, np.argsort(VIEW_AXES[view]))


def box_to_view(box: Box, view: str) -> Box:
    return tuple(box[a] for a in VIEW_AXES[view])


# --- networks ----------------------------------------------------------------------------------

def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class UNet2D(nn.Module):
    """Compact 2D U-Net: ``levels`` resolution levels, ``width`` channels at the top, doubling per
    level; one logit channel (sigmoid score). Input sizes must be multiples of 2^(levels-1)."""

    def __init__(self, in_channels: int = 3, width: int = 16, levels: int = 4):
        super().__init__()
        if levels < 2 or width < 1:
            raise ValueError("UNet2D needs levels >= 2 and width >= 1")
        self.levels = levels
        chans = [width * 2**i for i in range(levels)]
        self.down = nn.ModuleList()
        cin = in_channels
        for c in chans:
            self.down.append(_conv_block(cin, c))
            cin = c
        self.up = nn.ModuleList()
        self.up_conv = nn.ModuleList()
        for c in reversed(chans[:-1]):
            self.up.append(nn.ConvTranspose2d(cin, c, 2, stride=2))
            self.up_conv.append(_conv_block(2 * c, c))
            cin = c
        self.classifier = nn.Conv2d(cin, 1, 1)

    @property
    def size_multiple(self) -> int:
        return 2 ** (self.levels - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x)
            if i < self.levels - 1:
                skips.append(x)
                x = F.max_pool2d(x, 2)
        for up, conv in zip(self.up, self.up_conv):
            x = conv(torch.cat([skips.pop(), up(x)], dim=1))
        return self.classifier(x)


class SaliencyTransform(nn.Module):
    """g(Z; theta^T): a size-preserving convolution of the score map (B, 1, H, W) giving one spatial
    weight per input channel (B, channels, H, W); ``layers`` = 2 stacks two convolutions with a ReLU
    between them (the paper's best variant)."""

    def __init__(self, channels: int = 3, kernel: int = 5, layers: int = 2):
        super().__init__()
        if kernel % 2 == 0 or kernel < 1:
            raise ValueError("the saliency kernel must be odd (size-preserving)")
        if layers not in (1, 2):
            raise ValueError("the saliency transformation has 1 or 2 layers")
        mods: list[nn.Module] = [nn.Conv2d(1, channels, kernel, padding=kernel // 2)]
        if layers == 2:
            mods += [nn.ReLU(inplace=False), nn.Conv2d(channels, channels, kernel, padding=kernel // 2)]
        self.body = nn.Sequential(*mods)

    def forward(self, score: torch.Tensor) -> torch.Tensor:
        return self.body(score)

    def weight_input(self, x: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        """X (x) g(Z): the input multiplied pixel by pixel by the spatial weights."""
        return x * self.forward(score)


@register_architecture
class RSTNStage(nn.Module):
    """One stage of RSTN for every view: ``nets[view]`` (UNet2D) and, for the fine stage
    (``saliency_kernel`` > 0), ``saliency[view]``. One module, so one weights file per stage."""

    arch = "rstn-stage"

    def __init__(self, views=VIEWS, in_channels: int = 3, width: int = 16, levels: int = 4, saliency_kernel: int = 0, saliency_layers: int = 2):
        super().__init__()
        views = list(views)
        if not views or any(v not in VIEWS for v in views):
            raise ValueError(f"views must be a non-empty subset of {VIEWS}")
        self.views = views
        self.nets = nn.ModuleDict({v: UNet2D(in_channels, width, levels) for v in views})
        self.saliency = nn.ModuleDict({v: SaliencyTransform(in_channels, saliency_kernel, saliency_layers) for v in views}) if saliency_kernel else None

    @property
    def size_multiple(self) -> int:
        return next(iter(self.nets.values())).size_multiple

    def forward(self, x: torch.Tensor, view: str | None = None) -> torch.Tensor:
        return self.nets[view or self.views[0]](x)


# --- crops -------------------------------------------------------------------------------------

Box2D = tuple[int, int, int, int]  # y0, y1, x0, x1 (end exclusive)


def crop_box_2d(score: np.ndarray | torch.Tensor, margin: int, threshold: float = 0.5) -> Box2D | None:
    """Crop[.; Z]: the smallest rectangle covering ``score >= threshold``, K = ``margin`` pixels
    added on each side, clamped to the slice. None when nothing is above it."""
    s = score.detach().cpu().numpy() if isinstance(score, torch.Tensor) else np.asarray(score)
    on = s >= threshold
    rows, cols = np.flatnonzero(on.any(axis=1)), np.flatnonzero(on.any(axis=0))
    if rows.size == 0:
        return None
    h, w = on.shape
    box = (max(0, rows[0] - margin), min(h, rows[-1] + 1 + margin), max(0, cols[0] - margin), min(w, cols[-1] + 1 + margin))
    return tuple(int(v) for v in box)


def _pad_to(x: torch.Tensor, hw: tuple[int, int], value: float = 0.0) -> torch.Tensor:
    """Pad the last two axes at the end up to ``hw``."""
    ph, pw = hw[0] - x.shape[-2], hw[1] - x.shape[-1]
    return F.pad(x, (0, pw, 0, ph), value=value) if ph or pw else x


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def fine_on_crops(fine_net: nn.Module, saliency: SaliencyTransform, x: torch.Tensor, score: torch.Tensor, boxes: list[Box2D | None]) -> torch.Tensor:
    """The fine stage on a batch of slices: X^F = Crop[X (x) g(Z); box] (Eq. 1), the fine network on
    the crops (zero-padded together to a common size), its probabilities put back into
    otherwise-zero slices. ``x``: (B, C, H, W) input; ``score``: (B, 1, H, W) reference score map
    (the saliency module's input); ``boxes``: each slice's crop, None for no fine pass."""
    out = torch.zeros((x.shape[0], 1, *x.shape[-2:]), dtype=x.dtype, device=x.device)
    todo = [(i, b) for i, b in enumerate(boxes) if b is not None]
    if not todo:
        return out
    rows = [i for i, _ in todo]
    weighted = saliency.weight_input(x[rows], score[rows])  # on whole slices, then cropped
    crops = [weighted[k : k + 1, :, y0:y1, x0:x1] for k, (_, (y0, y1, x0, x1)) in enumerate(todo)]
    m = getattr(fine_net, "size_multiple", 1)
    size = (_round_up(max(c.shape[-2] for c in crops), m), _round_up(max(c.shape[-1] for c in crops), m))
    probs = torch.sigmoid(fine_net(torch.cat([_pad_to(c, size) for c in crops])))
    for (i, (y0, y1, x0, x1)), p in zip(todo, probs):
        out[i, :, y0:y1, x0:x1] = p[:, : y1 - y0, : x1 - x0]
    return out


# --- the joint model for training -------------------------------------------------------------

class RSTNJoint(nn.Module):
    """Coarse network, saliency transformation and fine network of one view, trained jointly.

    ``forward(x, label)``: x (B, 3, H, W) normalised slices, label (B, H, W) of the central slice.
    Returns (coarse probability, fine probability), both (B, 1, H, W); the fine probability is the
    fine network's output on the crop put back into a zero slice. The crop is the ground truth's
    box + ``margin`` (training); without a label, the thresholded coarse score's box (testing)."""

    def __init__(self, coarse: RSTNStage, fine: RSTNStage, view: str, margin: int = 20, threshold: float = 0.5):
        super().__init__()
        if fine.saliency is None:
            raise ValueError("the fine stage needs a saliency transformation (saliency_kernel > 0)")
        self.coarse_net, self.fine_net, self.saliency = coarse.nets[view], fine.nets[view], fine.saliency[view]
        self.view, self.margin, self.threshold = view, int(margin), float(threshold)

    def forward(self, x: torch.Tensor, label: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        coarse = torch.sigmoid(self.coarse_net(x))
        ref = label[:, None].float() if label is not None else coarse.detach()
        boxes = [crop_box_2d(r[0], self.margin, self.threshold) for r in ref]
        fine = fine_on_crops(self.fine_net, self.saliency, x, coarse, boxes)
        return coarse, fine


def neighbour_rows(i: int, n: int) -> list[int]:
    """The 3 input channels of slice i of n: slices i-1, i, i+1 (edge slices repeated at the
    volume's ends). Training (Training/rstn_training.py) stacks its slices with this too."""
    return [max(i - 1, 0), i, min(i + 1, n - 1)]


def _neighbours(vol: torch.Tensor, idx: list[int]) -> torch.Tensor:
    """(B, 3, H, W): ``neighbour_rows`` of each slice in ``idx``."""
    n = vol.shape[0]
    rows = [neighbour_rows(i, n) for i in idx]
    return vol[torch.tensor(rows).reshape(-1)].reshape(len(idx), 3, *vol.shape[1:])
