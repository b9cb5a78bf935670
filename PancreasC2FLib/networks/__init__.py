"""The networks and their registry: a bundle names its networks by ``arch`` and ``build_network``
rebuilds them. ResDSN (resdsn.py) is built in; the 3D U-Net (unet3d.py), RSTN's 2D networks
(rstn.py) and GGPFN (ggpfn.py) register themselves when first needed. Networks know nothing of
pipelines or files.
"""

from __future__ import annotations

import torch
from torch import nn

from .resdsn import ResDSN

ARCHITECTURES: dict[str, type[nn.Module]] = {"resdsn": ResDSN}
# Architectures in their own modules, imported on first use: arch name -> module.
OPTIONAL_ARCHITECTURES = {"unet3d": ".unet3d", "rstn-stage": ".rstn", "ggpfn-views": ".ggpfn", "ensemble": ".ensemble"}


def register_architecture(cls: type[nn.Module]) -> type[nn.Module]:
    """Class decorator: make an architecture buildable from a bundle's ``arch`` name."""
    ARCHITECTURES[cls.arch] = cls
    return cls


def build_network(arch: str, args: dict) -> nn.Module:
    """Rebuild a network from the name and arguments a bundle records."""
    if arch not in ARCHITECTURES and arch in OPTIONAL_ARCHITECTURES:
        import importlib

        importlib.import_module(OPTIONAL_ARCHITECTURES[arch], __package__)  # registers itself
    try:
        cls = ARCHITECTURES[arch]
    except KeyError:
        from ..errors import ModelError

        raise ModelError(f"unknown network architecture {arch!r}; known: {sorted(ARCHITECTURES)}")
    return cls(**args)


def gflop_per_window(net: nn.Module, window: tuple[int, int, int]) -> float:
    """Multiply-adds x2 of the convolutions for one window (forward pass, no aux heads)."""
    flops = 0

    def hook(mod, inp, out):
        nonlocal flops
        if isinstance(mod, nn.ConvTranspose3d):
            # Each input voxel scatters into kernel-size outputs.
            k = mod.kernel_size[0] * mod.kernel_size[1] * mod.kernel_size[2]
            flops += 2 * inp[0].numel() // inp[0].shape[0] * k * mod.out_channels
        elif isinstance(mod, nn.Conv3d):
            k = mod.kernel_size[0] * mod.kernel_size[1] * mod.kernel_size[2]
            flops += 2 * out.numel() // out.shape[0] * k * mod.in_channels // mod.groups

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))]
    try:
        was_training = net.training
        net.eval()
        with torch.inference_mode():
            p = next(net.parameters())
            net(torch.zeros((1, 1, *window), dtype=p.dtype, device=p.device))
        net.train(was_training)
    finally:
        for h in handles:
            h.remove()
    return flops / 1e9
