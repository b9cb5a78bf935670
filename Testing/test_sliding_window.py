"""Sliding-window inference (Sec. 4.1): the window grid, overlap averaging, padding, batching."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from PancreasC2FLib.errors import Cancelled
from PancreasC2FLib.networks.resdsn import ResDSN
from PancreasC2FLib.processing.sliding_window import InferenceSettings, coverage_counts, predict_foreground, window_count, window_grid, window_starts

CPU = InferenceSettings(device=torch.device("cpu"), batch_size=2)


class SigmoidNet(torch.nn.Module):
    """Foreground probability sigmoid(x) at every voxel: the same value from every window."""

    def forward(self, x):
        return torch.cat([torch.zeros_like(x), x], 1)


class LocalRampNet(torch.nn.Module):
    """Foreground probability depends only on the position inside the window (not the input)."""

    def forward(self, x):
        b, _, d, h, w = x.shape
        z, y, xx = torch.meshgrid(torch.arange(d), torch.arange(h), torch.arange(w), indexing="ij")
        logit = (0.05 * z + 0.03 * y - 0.02 * xx - 0.5).float()[None, None].expand(b, 1, d, h, w)
        return torch.cat([torch.zeros_like(logit), logit], 1)


class ConstantNet(torch.nn.Module):
    def __init__(self, p: float):
        super().__init__()
        self.logit = float(np.log(p / (1 - p)))

    def forward(self, x):
        return torch.cat([torch.zeros_like(x), torch.full_like(x, self.logit)], 1)


@pytest.mark.parametrize(
    "size, window, n, expected",
    [
        (100, 32, 1, [0, 23, 45, 68]),  # floor(100/32) + 1 = 4 windows, evenly spread
        (64, 64, 6, [0]),  # exactly one window
        (20, 32, 3, [0]),  # smaller than a window: padded, one window
        (128, 64, 0, [0, 64]),  # n = 0 still covers everything
        (65, 64, 6, [0, 1]),  # only 2 distinct starts exist; duplicates dropped
    ],
)
def test_window_starts_examples(size, window, n, expected):
    assert window_starts(size, window, n) == expected


@settings(max_examples=150, deadline=None, database=None, derandomize=True)
@given(size=st.integers(1, 700), window=st.integers(1, 96), n=st.integers(0, 14))
def test_window_starts_formula_and_coverage(size, window, n):
    starts = window_starts(size, window, n)
    assert starts[0] == 0
    assert starts == sorted(set(starts))
    if size <= window:
        assert starts == [0]
        return
    # The paper's count (floor(S/w) + n), capped by the number of distinct positions.
    paper = max(size // window + n, -(-size // window))
    assert len(starts) == min(paper, size - window + 1)
    assert starts[-1] == size - window  # the last window ends at the border
    # Evenly spread: consecutive steps differ by at most one voxel (rounding).
    steps = np.diff(starts)
    assert steps.max() - steps.min() <= 1
    covered = np.zeros(size, int)
    for s in starts:
        covered[s : s + window] += 1
    assert covered.min() >= 1


def test_window_grid_is_the_product_of_the_axes():
    shape, window = (100, 70, 64), (32, 32, 32)
    grid = window_grid(shape, window, 2)
    per_axis = [window_starts(s, w, 2) for s, w in zip(shape, window)]
    assert len(grid) == window_count(shape, window, 2) == np.prod([len(a) for a in per_axis])
    assert len(grid) == (100 // 32 + 2) * (70 // 32 + 2) * (64 // 32 + 2)  # the paper's formula
    assert all(z + 32 <= 100 and y + 32 <= 70 and x + 32 <= 64 for z, y, x in grid)
    counts = coverage_counts(shape, window, 2)
    brute = np.zeros(shape)
    for z, y, x in grid:
        brute[z : z + 32, y : y + 32, x : x + 32] += 1
    np.testing.assert_array_equal(counts, brute)


def test_constant_field_averages_to_itself():
    vol = np.random.default_rng(0).normal(size=(40, 50, 37)).astype(np.float32)
    out = predict_foreground(ConstantNet(0.3), vol, (16, 16, 16), 3, CPU)
    assert out.shape == vol.shape and out.dtype == np.float32
    np.testing.assert_allclose(out, 0.3, atol=1e-6)


@pytest.mark.parametrize("shape", [(40, 50, 37), (10, 50, 20), (5, 6, 7)])
def test_windows_are_stitched_in_place_and_padding_is_cropped(shape):
    """Every window predicts sigmoid(x) at each voxel: any misplaced window breaks equality."""
    vol = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    out = predict_foreground(SigmoidNet(), vol, (16, 16, 16), 2, CPU)
    assert out.shape == shape
    np.testing.assert_allclose(out, 1 / (1 + np.exp(-vol)), rtol=1e-5, atol=1e-6)


def test_overlaps_are_averaged_exactly():
    shape, window, n = (30, 26, 21), (12, 10, 8), 2
    vol = np.zeros(shape, np.float32)
    out = predict_foreground(LocalRampNet(), vol, window, n, CPU)
    # Expected: mean over the windows covering each voxel of the window-local probability.
    d, h, w = window
    z, y, x = np.meshgrid(np.arange(d), np.arange(h), np.arange(w), indexing="ij")
    local = 1 / (1 + np.exp(-(0.05 * z + 0.03 * y - 0.02 * x - 0.5)))
    total, count = np.zeros(shape), np.zeros(shape)
    for cz in window_starts(shape[0], d, n):
        for cy in window_starts(shape[1], h, n):
            for cx in window_starts(shape[2], w, n):
                total[cz : cz + d, cy : cy + h, cx : cx + w] += local
                count[cz : cz + d, cy : cy + h, cx : cx + w] += 1
    np.testing.assert_allclose(out, total / count, rtol=1e-5, atol=1e-6)
    assert len(np.unique(np.round(out, 5))) > 50  # not trivially constant


def test_batch_size_does_not_change_the_result():
    torch.manual_seed(0)
    net = ResDSN(width=4).eval()
    vol = np.random.default_rng(2).normal(size=(40, 36, 33)).astype(np.float32)
    outs = [predict_foreground(net, vol, (16, 16, 16), 1, InferenceSettings(batch_size=b)) for b in (1, 3, 64)]
    for o in outs[1:]:
        np.testing.assert_allclose(o, outs[0], atol=1e-5)


def test_progress_and_cancel():
    calls = []
    vol = np.zeros((40, 40, 40), np.float32)
    predict_foreground(ConstantNet(0.5), vol, (16, 16, 16), 1, InferenceSettings(batch_size=4), lambda d, t: calls.append((d, t)))
    total = window_count(vol.shape, (16, 16, 16), 1)
    assert calls[-1] == (total, total) and [c[0] for c in calls] == sorted(c[0] for c in calls)

    cancel = threading.Event()

    def progress(done, total):
        cancel.set()  # the user presses Cancel after the first batch

    with pytest.raises(Cancelled):
        predict_foreground(ConstantNet(0.5), vol, (16, 16, 16), 1, InferenceSettings(batch_size=1, cancel=cancel), progress)
