"""Augmentation of Sec. 4.1: rotations by 90, 180 or 270 degrees and flips about all three axes,
applied identically to the image and the label (no interpolation: voxels are only permuted).

Rotations need equal window sides in the rotation plane; planes where they differ are skipped.

``+intensity`` adds nnU-Net-style intensity and resolution augmentation of the image only (the
windows are already normalised, so the changes are in normalised units: with the "fixed"
normalisation of the demo models, 0.1 is 17 HU): brightness shift, contrast, gamma, Gaussian
noise, Gaussian blur and low-resolution simulation, each with its own probability. Why: real
scans differ from any one training set in contrast, noise and sharpness (Training/README.md,
"Real CT").
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

PLANES = ((0, 1), (0, 2), (1, 2))


def rotate_flip(image: np.ndarray, label: np.ndarray, rng: np.random.Generator, rotate: bool = True, flip: bool = True):
    """A random element of the rotation/flip group applied to both arrays (z/y/x)."""
    if rotate:
        plane = PLANES[int(rng.integers(len(PLANES)))]
        k = int(rng.integers(4))  # 0, 90, 180 or 270 degrees
        if k and image.shape[plane[0]] == image.shape[plane[1]]:
            image, label = np.rot90(image, k, plane), np.rot90(label, k, plane)
    if flip:
        axes = tuple(ax for ax in range(3) if rng.random() < 0.5)
        if axes:
            image, label = np.flip(image, axes), np.flip(label, axes)
    return np.ascontiguousarray(image), np.ascontiguousarray(label)


# (probability, parameter range) of each intensity change
INTENSITY = {
    "shift": (0.3, (-0.12, 0.12)),      # added
    "contrast": (0.3, (0.7, 1.3)),      # about the window's mean
    "gamma": (0.2, (0.7, 1.5)),         # on the window rescaled to 0..1
    "noise": (0.2, (0.0, 0.1)),         # standard deviation
    "blur": (0.2, (0.5, 1.2)),          # sigma in voxels
    "low_resolution": (0.2, (0.5, 1.0)),  # zoom factor down, then back up
}


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = max(1, int(round(2.5 * sigma)))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float32) / sigma) ** 2)
    k = k / k.sum()
    for axis in range(3):  # separable: one 1D convolution per axis
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = k.numel()
        pad = [0, 0] * 3
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = r
        x = F.conv3d(F.pad(x, pad, mode="replicate"), k.view(shape))
    return x


def intensity(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One random draw of the intensity changes of ``INTENSITY`` applied to a (z, y, x) window."""
    x = image.astype(np.float32, copy=True)

    def draw(name):
        prob, (lo, hi) = INTENSITY[name]
        return float(rng.uniform(lo, hi)) if rng.random() < prob else None

    if (v := draw("shift")) is not None:
        x += v
    if (v := draw("contrast")) is not None:
        m = float(x.mean())
        x = (x - m) * v + m
    if (v := draw("gamma")) is not None:
        lo, hi = float(x.min()), float(x.max())
        if hi > lo:
            x = ((x - lo) / (hi - lo)) ** v * (hi - lo) + lo
    if (v := draw("noise")) is not None:
        x += v * rng.standard_normal(x.shape, dtype=np.float32)
    blur, zoom = draw("blur"), draw("low_resolution")
    if blur is not None or zoom is not None:
        t = torch.from_numpy(np.ascontiguousarray(x))[None, None]
        with torch.no_grad():
            if blur is not None:
                t = _blur(t, blur)
            if zoom is not None:
                small = [max(2, int(round(n * zoom))) for n in x.shape]
                t = F.interpolate(F.interpolate(t, size=small, mode="trilinear", align_corners=False), size=x.shape, mode="trilinear", align_corners=False)
        x = t[0, 0].numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def _with_intensity(geometric):
    def aug(img, lab, rng):
        img, lab = geometric(img, lab, rng)
        return intensity(img, rng), lab
    return aug


AUGMENTATIONS = {
    "paper": lambda img, lab, rng: rotate_flip(img, lab, rng, rotate=True, flip=True),
    "flip": lambda img, lab, rng: rotate_flip(img, lab, rng, rotate=False, flip=True),
    "none": lambda img, lab, rng: (img, lab),
}
AUGMENTATIONS["paper+intensity"] = _with_intensity(AUGMENTATIONS["paper"])
AUGMENTATIONS["flip+intensity"] = _with_intensity(AUGMENTATIONS["flip"])
