"""Where training windows come from (Sec. 4.1 of Zhu et al. 2018).

* ``CoarseSampler``: windows anywhere in the whole volume, so many contain no pancreas at all
  (hard negatives that teach the coarse network to reject the rest of the abdomen); a fraction
  ``foreground_fraction`` is forced to contain a foreground voxel so the pancreas is not too rare.
* ``FineSampler``: windows centred inside the ground-truth box enlarged by a random (jittered)
  margin, like the box the coarse stage hands to the fine one at inference; every window contains
  foreground.

Windows always lie inside the volume, except that a volume smaller than the window is padded at its
far end with its minimum (the padding ``PancreasC2FLib.processing.sliding_window`` uses at inference).
"""

from __future__ import annotations

import numpy as np

from .datasets import StageVolume

Window = tuple[int, int, int]


def extract(array: np.ndarray, corner: tuple[int, int, int], window: Window, pad_value: float) -> np.ndarray:
    """``array[corner : corner + window]``, padded with ``pad_value`` where it runs past the end."""
    sl = tuple(slice(c, min(c + w, s)) for c, w, s in zip(corner, window, array.shape))
    part = np.asarray(array[sl])
    if part.shape == tuple(window):
        return np.array(part)  # a copy: memory-mapped sources stay untouched
    out = np.full(window, pad_value, dtype=part.dtype)
    out[tuple(slice(0, n) for n in part.shape)] = part
    return out


def _clamp_corner(corner, window, shape) -> tuple[int, int, int]:
    return tuple(int(min(max(c, 0), max(s - w, 0))) for c, w, s in zip(corner, window, shape))


class WindowSampler:
    """Draws (image, label) windows from a stage volume; subclasses choose the corner."""

    def __init__(self, window: Window):
        self.window = tuple(int(w) for w in window)

    def corner(self, vol: StageVolume, rng: np.random.Generator) -> tuple[int, int, int]:
        raise NotImplementedError

    def sample(self, vol: StageVolume, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        c = self.corner(vol, rng)
        pad = float(vol.image.min()) if any(s < w for s, w in zip(vol.image.shape, self.window)) else 0.0
        return extract(vol.image, c, self.window, pad), extract(vol.label, c, self.window, 0)

    def corner_around(self, point, vol: StageVolume, rng: np.random.Generator) -> tuple[int, int, int]:
        """A corner whose window contains ``point`` at a uniformly random position."""
        offset = [int(rng.integers(0, w)) for w in self.window]
        return _clamp_corner([p - o for p, o in zip(point, offset)], self.window, vol.image.shape)


class CoarseSampler(WindowSampler):
    def __init__(self, window: Window, foreground_fraction: float = 0.5):
        super().__init__(window)
        self.foreground_fraction = float(foreground_fraction)

    def corner(self, vol, rng):
        fg = vol.foreground()
        if len(fg) and rng.random() < self.foreground_fraction:
            return self.corner_around(fg[rng.integers(len(fg))], vol, rng)
        # Centre uniform over the volume, window clamped inside: the borders (where every sliding
        # window grid has a window at inference) are sampled as often as the middle.
        centre = [int(rng.integers(0, s)) for s in vol.image.shape]
        return _clamp_corner([c - w // 2 for c, w in zip(centre, self.window)], self.window, vol.image.shape)


class FineSampler(WindowSampler):
    """Window centres uniform in the ground-truth box grown by ``margin_mm * U(jitter)``.

    ``foreground_centred`` (0 in the paper) is the fraction of windows whose centre is instead a
    random pancreas voxel moved by up to a quarter window: a thin pancreas fills little of its
    box, and small networks on a short schedule learn faster when it fills more of the windows.
    """

    def __init__(self, window: Window, margin_mm: float = 20.0, jitter: tuple[float, float] = (0.0, 2.0), tries: int = 10, foreground_centred: float = 0.0):
        super().__init__(window)
        self.margin_mm = float(margin_mm)
        self.jitter = tuple(float(j) for j in jitter)
        self.tries = int(tries)
        self.foreground_centred = float(foreground_centred)
        self._boxes: dict[str, tuple] = {}

    def _box(self, vol: StageVolume):
        if vol.name not in self._boxes:
            fg = vol.foreground()
            if not len(fg):
                raise ValueError(f"{vol.name}: no foreground; the fine stage trains on cases with a pancreas")
            self._boxes[vol.name] = (fg.min(axis=0), fg.max(axis=0) + 1)
        return self._boxes[vol.name]

    def corner(self, vol, rng):
        lo, hi = self._box(vol)
        shape = vol.image.shape
        if self.foreground_centred and rng.random() < self.foreground_centred:
            fg = vol.foreground()
            centre = fg[rng.integers(len(fg))] + rng.integers(-(np.array(self.window) // 4), np.array(self.window) // 4 + 1)
            return _clamp_corner([int(p) - w // 2 for p, w in zip(centre, self.window)], self.window, shape)
        for _ in range(self.tries):
            centre = []
            for ax in range(3):
                m = self.margin_mm * rng.uniform(*self.jitter) / vol.spacing[ax]
                a, b = max(0, int(lo[ax] - m)), min(shape[ax], int(np.ceil(hi[ax] + m)))
                centre.append(int(rng.integers(a, max(b, a + 1))))
            c = _clamp_corner([p - w // 2 for p, w in zip(centre, self.window)], self.window, shape)
            if np.asarray(vol.label[tuple(slice(ci, ci + w) for ci, w in zip(c, self.window))]).any():
                return c
        fg = vol.foreground()
        return self.corner_around(fg[rng.integers(len(fg))], vol, rng)
