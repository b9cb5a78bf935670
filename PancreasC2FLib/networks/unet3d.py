"""3D U-Net (Çiçek et al. 2016) as used by Roth et al. 2018 (Sec. 2, Fig. 2) and Zhao et al. 2019
(Fig. 3): an analysis path and a synthesis path with ``levels`` resolution levels each, joined by
skip connections that *concatenate* encoder features onto the upsampled decoder features.

Analysis level l: two 3x3x3 conv + BatchNorm + ReLU (w*2^l then w*2^(l+1) channels, the first level
starting at w), then 2x2x2 max pooling. Synthesis level: 2x2x2 up-convolution (stride 2),
concatenation with the encoder level, two 3x3x3 conv + BatchNorm + ReLU. A 1x1x1 convolution gives
the class scores. With ``width = 32`` and ``levels = 4`` this is the paper's network (19 M weights).

One deliberate difference: convolutions are zero-padded ("same") instead of "valid", so a tile's
output covers its whole input and the library's sliding window (processing/sliding_window.py) can average
overlapping tiles directly. Input sizes must be multiples of 2^(levels - 1).
"""

from __future__ import annotations

import torch
from torch import nn

from . import register_architecture


def _double_conv(cin: int, cmid: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(cin, cmid, 3, padding=1, bias=False),
        nn.BatchNorm3d(cmid),
        nn.ReLU(inplace=True),
        nn.Conv3d(cmid, cout, 3, padding=1, bias=False),
        nn.BatchNorm3d(cout),
        nn.ReLU(inplace=True),
    )


@register_architecture
class UNet3D(nn.Module):
    """3D U-Net with concatenation skips; ``width`` channels in the first convolution (paper: 32)
    and ``levels`` resolution levels (paper: 4)."""

    arch = "unet3d"

    def __init__(self, in_channels: int = 1, num_classes: int = 2, width: int = 32, levels: int = 4):
        super().__init__()
        if levels < 2:
            raise ValueError("a U-Net needs at least 2 resolution levels")
        if width < 1:
            raise ValueError("width must be positive")
        self.levels = levels
        w = width
        self.down = nn.ModuleList()
        skip_channels = []
        cin = in_channels
        for level in range(levels):
            cmid = w * 2**level
            cout = 2 * cmid
            self.down.append(_double_conv(cin, cmid, cout))
            skip_channels.append(cout)
            cin = cout
        self.pool = nn.MaxPool3d(2, 2)
        self.up = nn.ModuleList()
        self.up_conv = nn.ModuleList()
        for level in reversed(range(levels - 1)):
            # Up-convolution keeps the channel count; concatenation adds the encoder's.
            self.up.append(nn.ConvTranspose3d(cin, cin, 2, stride=2))
            cout = w * 2 ** (level + 1)
            self.up_conv.append(_double_conv(cin + skip_channels[level], cout, cout))
            cin = cout
        self.classifier = nn.Conv3d(cin, num_classes, 1)

    @property
    def size_multiple(self) -> int:
        return 2 ** (self.levels - 1)

    def forward(self, x: torch.Tensor, with_aux: bool = False) -> torch.Tensor:
        """Class scores at the input size (no auxiliary heads: ``with_aux`` is accepted so the
        trainer can call every architecture alike, and changes nothing)."""
        skips = []
        for level, block in enumerate(self.down):
            x = block(x)
            if level < self.levels - 1:
                skips.append(x)
                x = self.pool(x)
        for up, conv in zip(self.up, self.up_conv):
            x = up(x)
            x = conv(torch.cat([skips.pop(), x], dim=1))
        return self.classifier(x)
