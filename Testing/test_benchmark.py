"""``pancreas-c2f benchmark`` and the inference fast paths it justifies (tiny sizes: fast on CPU).

The fast paths (BatchNorm folded into the convolutions, channels-last 3D, batched windows,
islands labelled only inside the mask's box) must give the plain path's result: DSC >= 0.999 on a
fixed case, with the threshold put where half the region is foreground so that any drift shows.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from PancreasC2FLib.apps import benchmark
from PancreasC2FLib.io.bundle import load_bundle, save_bundle
from PancreasC2FLib.apps.cli import main
from PancreasC2FLib.processing.geometry import expand_box, mask_box
from PancreasC2FLib.networks.resdsn import ResDSN
from PancreasC2FLib.pipelines.base import Region, remove_small_islands_in
from PancreasC2FLib.pipelines.resdsn_c2f import ResDSNC2F
from PancreasC2FLib.processing.postprocess import dice, remove_small_components
from PancreasC2FLib.processing.sliding_window import InferenceSettings, fold_batchnorm, predict_foreground, prepare_network, window_starts

REQUIRED_KEYS = {
    "c2f_seconds",
    "fine_everywhere_seconds",
    "monai_seconds",
    "ratio_c2f_to_fine_everywhere",
    "ratio_to_monai",
    "gflop_per_window",
    "achieved_gflops",
    "matmul_peak_gflops",
    "peak_rss_mb",
    "device",
}


def _random_resdsn(width: int = 4, seed: int = 0) -> ResDSN:
    """A ResDSN whose BatchNorm layers have non-trivial statistics (as after training)."""
    torch.manual_seed(seed)
    net = ResDSN(width=width)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return net.eval()


@pytest.fixture(scope="module")
def random_bundle(tmp_path_factory):
    nets = {"coarse": _random_resdsn(seed=1), "fine": _random_resdsn(seed=2)}
    spec = {"arch": "resdsn", "args": {"in_channels": 1, "num_classes": 2, "width": 4}}
    md = {
        "name": "fast-path-test",
        "pipeline": "resdsn-c2f",
        "preprocessing": {"clip": [-100.0, 240.0], "normalize": "case_zscore"},
        "stages": {
            "coarse": {"network": spec, "window": [32, 32, 32], "n": 1, "spacing": [4.0, 4.0, 4.0], "threshold": 0.5},
            "fine": {"network": spec, "window": [32, 32, 32], "n": 2, "spacing": None, "margin_mm": 10.0, "threshold": 0.5},
        },
        "postprocess": {"min_island_fraction": 0.2, "coarse_min_island_fraction": 0.2},
    }
    path = tmp_path_factory.mktemp("bundles") / "fast-path-test"
    save_bundle(path, nets, md)
    return load_bundle(path)


def test_folded_network_matches_and_leaves_the_original_alone():
    net = _random_resdsn()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    folded = fold_batchnorm(net)
    assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in folded.modules())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    x = torch.randn(2, 1, 32, 32, 32)
    fast = prepare_network(net, InferenceSettings(channels_last=True))
    with torch.inference_mode():
        ref = torch.softmax(net(x), 1)
        got = torch.softmax(fast(x.contiguous(memory_format=torch.channels_last_3d)), 1)
    assert torch.allclose(ref, got, atol=1e-4)


def test_fast_paths_match_the_plain_path(random_bundle, small_ct):
    """The whole fine stage (crop, windows, stitching, threshold, Eq. 5, islands) both ways."""
    plain = ResDSNC2F(random_bundle, device="cpu", preset="default")
    plain.inference = InferenceSettings.plain()
    case = plain.prepare(small_ct.image)
    truth = case.orientation.to_canonical(sitk.GetArrayViewFromImage(small_ct.label))
    box = expand_box(mask_box(truth), 10.0, case.spacing, case.shape)
    x, _ = plain.stage_input(case, box, None)
    # Put the threshold at the median foreground probability: half the region flips on any drift.
    threshold = float(np.median(plain.predict("fine", x, None, None)))
    overrides = {"stages": {"fine": {"threshold": threshold}}}
    results = {}
    for name, settings in (("plain", InferenceSettings.plain()), ("fast", None)):
        p = ResDSNC2F(random_bundle, device="cpu", preset="default", overrides=overrides)
        if settings is not None:
            p.inference = settings
        else:
            p.inference.batch_size = 3  # uneven batches on purpose
            assert p.inference.fold_batchnorm and p.inference.channels_last
        region = Region(box, "roi", coarse_mask=truth.astype(np.uint8))
        results[name] = p.segment_region(p.prepare(small_ct.image), region).mask
    fg = int(results["plain"].sum())
    assert 0.2 * np.prod([hi - lo for lo, hi in box]) < fg  # a real test: many voxels at stake
    assert dice(results["plain"], results["fast"]) >= 0.999


def test_islands_in_box_equal_islands_everywhere():
    rng = np.random.default_rng(0)
    mask = np.zeros((40, 50, 60), np.uint8)
    box = ((5, 30), (10, 45), (3, 50))
    mask[5:30, 10:45, 3:50] = rng.random((25, 35, 47)) > 0.6
    for fraction in (0.0, 0.01, 0.2, 1.0):
        assert np.array_equal(remove_small_islands_in(mask, box, fraction), remove_small_components(mask, fraction))


def test_sampled_windows_are_not_averaged():
    net = torch.nn.Conv3d(1, 2, 1)
    vol = np.zeros((40, 40, 40), np.float32)
    out = predict_foreground(net, vol, (16, 16, 16), 1, InferenceSettings(), corners=[(0, 0, 0)])
    assert out[:16, :16, :16].min() > 0 and out[16:, 16:, 16:].max() == 0


@pytest.mark.parametrize("size", [64, 65, 100, 136, 140, 230, 240, 512])
@pytest.mark.parametrize("n", [0, 1, 2, 12])
def test_monai_gets_our_number_of_windows_when_it_can(size, n):
    def monai_count(interval):  # MONAI's dense_patch_slices along one axis
        return 1 + next(d for d in range(size) if d * interval + 64 >= size)

    ours = len(window_starts(size, 64, n))
    overlap, got = benchmark.monai_windows_per_axis(size, 64, ours)
    assert 0 <= overlap < 1
    if size > 64:
        assert monai_count(int(64 * (1 - overlap))) == got
        # MONAI's steps are whole voxels: some of our counts (n = 12) have no MONAI equivalent.
        assert got == ours or all(monai_count(i) != ours for i in range(1, 65))
    else:
        assert got == ours == 1


def test_benchmark_command_writes_the_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["benchmark", "--size", "80", "48", "32", "--spacing", "3", "3", "3", "--width", "2", "--fine-everywhere-windows", "2", "--workdir", str(tmp_path / "work"), "--json", str(out)])
    assert rc == 0
    r = json.loads(out.read_text(encoding="utf-8"))
    assert REQUIRED_KEYS <= set(r)
    assert r["c2f_seconds"] > 0 and r["fine_everywhere_seconds"] > 0
    assert r["fine_everywhere"]["estimated"] and r["fine_everywhere"]["windows_measured"] == 2
    assert set(r["presets"]) == {"paper", "fast"}
    assert r["presets"]["fast"]["coarse"]["windows"] <= r["presets"]["paper"]["coarse"]["windows"]
    assert r["peak_rss_mb"] is None or r["peak_rss_mb"] > 0
    assert (r["monai_seconds"] is None) == (r["ratio_to_monai"] is None)
    printed = capsys.readouterr().out
    assert "C2F end to end" in printed and "fast" in printed and "paper" in printed


def test_ablation_prices_test_time_flips_and_ensembles(tmp_path, capsys):
    """The benchmark reports what --tta and a 4-fold ensemble cost per window (figures, not asserted)."""
    out = tmp_path / "bench.json"
    rc = main(["benchmark", "--size", "80", "48", "32", "--spacing", "3", "3", "3", "--width", "2", "--fine-everywhere-windows", "1", "--ablation", "--workdir", str(tmp_path / "work"), "--json", str(out)])
    assert rc == 0
    times = json.loads(out.read_text(encoding="utf-8"))["ablation"]["seconds_per_window"]
    assert {"test-time flips (--tta, 8 passes)", "ensemble of 4 fold models", "all fast paths"} <= set(times)
    assert all(v > 0 for v in times.values())
    assert "test-time flips" in capsys.readouterr().out


def test_fine_everywhere_samples_windows_of_the_fine_grid(tiny_bundle, phantom_ct):
    """A model whose fine stage works at its own spacing (demo-synthetic: 1.5 mm) tiles the
    resampled grid: sampled windows used to be taken from the input grid and, on a coarser fine
    grid, fell outside it (a crash)."""
    from PancreasC2FLib.processing.preprocessing import resampled_shape
    from PancreasC2FLib.processing.sliding_window import window_grid

    bundle = load_bundle(tiny_bundle)
    bundle.metadata["stages"]["fine"]["spacing"] = [3.0, 3.0, 3.0]  # coarser than the phantom's 2 mm
    c2f = {"stages_s": dict.fromkeys(("read_s", "model_s", "prepare_s", "statistics_s", "write_s"), 0.0), "box": [[0, 8], [0, 8], [0, 8]]}
    r = benchmark.fine_everywhere(bundle, phantom_ct.image, "cpu", 1, 2, 2, c2f)
    resampled = resampled_shape((48, 64, 64), (2.0, 2.0, 2.0), (3.0, 3.0, 3.0))
    padded = tuple(max(s, 32) for s in resampled)
    assert r["estimated"] and r["windows_measured"] == 2
    assert r["windows_total"] == len(window_grid(padded, (32, 32, 32), benchmark.PAPER_FINE_N)) > 2
