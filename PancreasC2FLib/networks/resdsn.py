"""ResDSN (Zhu et al. 2018, Sec. 3.4 and Fig. 3): a 3D encoder-decoder with long residual sums
and two deep-supervision branches.

Encoder: Conv1a | pool | Conv2a, Conv2b | pool | Conv3a, Conv3b | pool | Conv4a, Conv4b.
Decoder: DeConv3a (4x4x4, stride 2) + Conv3b -> Conv3c, Conv3d; DeConv2a + Conv2b -> Conv2c,
Conv2d; DeConv1a + Conv1a -> Conv1b; 1x1x1 classifier. Auxiliary heads on Conv2b and Conv3b are
upsampled to the input size and only computed when asked for (training).
"""

from __future__ import annotations

import torch
from torch import nn


def conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm3d(cout), nn.ReLU(inplace=True)
    )


def deconv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    # 4x4x4 kernel, stride 2, padding 1 doubles the size exactly.
    return nn.Sequential(
        nn.ConvTranspose3d(cin, cout, 4, stride=2, padding=1, bias=False),
        nn.BatchNorm3d(cout),
        nn.ReLU(inplace=True),
    )


class ResDSN(nn.Module):
    """ResDSN with base width ``width`` (paper: 32). Input sizes must be multiples of 8."""

    arch = "resdsn"
    size_multiple = 8  # three poolings: window sizes the training CLI accepts

    def __init__(self, in_channels: int = 1, num_classes: int = 2, width: int = 32):
        super().__init__()
        w = width
        self.conv1a = conv_bn_relu(in_channels, w)
        self.conv2 = nn.Sequential(conv_bn_relu(w, 2 * w), conv_bn_relu(2 * w, 2 * w))
        self.conv3 = nn.Sequential(conv_bn_relu(2 * w, 4 * w), conv_bn_relu(4 * w, 4 * w))
        self.conv4 = nn.Sequential(conv_bn_relu(4 * w, 8 * w), conv_bn_relu(8 * w, 8 * w))
        self.pool = nn.MaxPool3d(2, 2)
        self.deconv3 = deconv_bn_relu(8 * w, 4 * w)
        self.conv3_up = nn.Sequential(conv_bn_relu(4 * w, 4 * w), conv_bn_relu(4 * w, 4 * w))
        self.deconv2 = deconv_bn_relu(4 * w, 2 * w)
        self.conv2_up = nn.Sequential(conv_bn_relu(2 * w, 2 * w), conv_bn_relu(2 * w, 2 * w))
        self.deconv1 = deconv_bn_relu(2 * w, w)
        self.conv1b = conv_bn_relu(w, w)
        self.classifier = nn.Conv3d(w, num_classes, 1)
        # Deep supervision: Conv2b (1/2 resolution) and Conv3b (1/4 resolution) to full size.
        self.aux2 = nn.ConvTranspose3d(2 * w, num_classes, 4, stride=2, padding=1)
        self.aux3 = nn.ConvTranspose3d(4 * w, num_classes, 8, stride=4, padding=2)

    def forward(self, x: torch.Tensor, with_aux: bool = False):
        c1 = self.conv1a(x)
        c2 = self.conv2(self.pool(c1))
        c3 = self.conv3(self.pool(c2))
        c4 = self.conv4(self.pool(c3))
        u3 = self.conv3_up(self.deconv3(c4) + c3)
        u2 = self.conv2_up(self.deconv2(u3) + c2)
        u1 = self.conv1b(self.deconv1(u2) + c1)
        main = self.classifier(u1)
        if not with_aux:
            return main
        return main, self.aux2(c2), self.aux3(c3)
