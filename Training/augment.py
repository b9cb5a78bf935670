"""Augmentation of Sec. 4.1: rotations by 90, 180 or 270 degrees and flips about all three axes,
applied identically to the image and the label (no interpolation: voxels are only permuted).

Rotations need equal window sides in the rotation plane; planes where they differ are skipped.
"""

from __future__ import annotations

import numpy as np

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


AUGMENTATIONS = {
    "paper": lambda img, lab, rng: rotate_flip(img, lab, rng, rotate=True, flip=True),
    "flip": lambda img, lab, rng: rotate_flip(img, lab, rng, rotate=False, flip=True),
    "none": lambda img, lab, rng: (img, lab),
}
