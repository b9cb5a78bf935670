"""Fang et al. 2019 GGPFN: the progressive fusion network's shapes, the global features sampled at
the patch's place (coordinate maps, and a hand-made volume through the whole pipeline with a stub
network), patch tiling, the Eq. 1-2 loss terms, an end-to-end run with a tiny bundle and the ROI
workflow."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from torch import nn

import c2f_testutils as tu
from PancreasC2FLib.io.bundle import load_bundle, save_bundle
from PancreasC2FLib.processing.geometry import box_slices
from PancreasC2FLib.networks import ARCHITECTURES, register_architecture
from PancreasC2FLib.pipelines import create_pipeline
from PancreasC2FLib.io.roi import box_to_roi_dict
from PancreasC2FLib.pipelines.fang_ggpfn import GGPFN, patch_starts
from PancreasC2FLib.networks.ggpfn import GGPFNet, GGPFNViews, global_input, pool_in_plane, sample_global
from Training.losses_rstn_ggpfn import batch_dsc_loss, bce, downsample_target, ggpfn_loss

NET_ARGS = {"width": 2, "convs": [1, 1, 1, 1], "global_width": 2, "global_convs": [1, 1, 1], "global_size": [16, 16]}


def ggpfn_metadata(name: str, network: dict, preprocessing: dict, patch=(16, 16), overlap=4) -> dict:
    return tu.fixture_metadata("fang-ggpfn", name, preprocessing, {
        "ggpfn": {"network": network, "patch": list(patch), "overlap": overlap, "threshold": 0.5, "margin_mm": 4.0, "batch": 16},
    })


# --- a stub whose output is the global feature map sampled at each pixel -------------------------

class _GlobalEcho(nn.Module):
    """F = A_g (the slice itself when global_size is the slice size); output logits = 40 * (F
    sampled at each patch pixel - level): the slice thresholded, if and only if the patch's
    global features are taken at the patch's place."""

    slices, patch_multiple = 3, 8

    def __init__(self, level: float, size):
        super().__init__()
        self.register_buffer("level", torch.tensor(float(level)))
        self.global_size = tuple(size)

    def global_features(self, a_g):
        return a_g

    def forward(self, x, global_feat, origin, slice_hw):
        assert x.shape[2] == 3
        g = sample_global(global_feat, origin, x.shape[-2:], 1, slice_hw)
        return 40.0 * (g - self.level)


class GlobalEchoViews(nn.Module):
    arch = "test-ggpfn-global-echo"

    def __init__(self, views, level: float, size):
        super().__init__()
        self.views = list(views)
        self.nets = nn.ModuleDict({v: _GlobalEcho(level, size) for v in self.views})


if GlobalEchoViews.arch not in ARCHITECTURES:
    register_architecture(GlobalEchoViews)


@pytest.fixture(scope="module")
def cube():
    """A 32^3 volume (air-free, 40 HU) with a bright (150 HU) block; "fixed" normalisation."""
    hu = np.full((32, 32, 32), 40, np.int16)
    hu[9:20, 5:13, 14:27] = 150
    label = (hu > 100).astype(np.uint8)
    return tu.image_from_canonical(hu, flips=(False, True, False)), label


@pytest.fixture(scope="module")
def echo_bundle(tmp_path_factory) -> Path:
    level = 0.5 * (tu.hu_to_fixed(40) + tu.hu_to_fixed(150))
    args = {"views": ["coronal", "sagittal", "axial"], "level": level, "size": [32, 32]}
    path = tmp_path_factory.mktemp("ggpfn") / "echo"
    save_bundle(path, {"ggpfn": GlobalEchoViews(**args)}, ggpfn_metadata(path.name, {"arch": GlobalEchoViews.arch, "args": args}, tu.FIXED_PREPROCESSING))
    return path


@pytest.fixture(scope="module")
def tiny_bundle_path(tmp_path_factory) -> Path:
    """Random tiny GGPFNets whose classifiers say "pancreas" everywhere (weights 0, bias 5)."""
    torch.manual_seed(0)
    net = GGPFNViews(views=["coronal", "sagittal", "axial"], **NET_ARGS)
    with torch.no_grad():
        for n in net.nets.values():
            n.classifier.weight.zero_()
            n.classifier.bias.fill_(5.0)
    path = tmp_path_factory.mktemp("ggpfn") / "tiny"
    spec = {"arch": "ggpfn-views", "args": {"views": ["coronal", "sagittal", "axial"], **NET_ARGS}}
    save_bundle(path, {"ggpfn": net.eval()}, ggpfn_metadata(path.name, spec, {"clip": [-100, 240], "normalize": "case_zscore"}))
    return path


# --- the network -----------------------------------------------------------------------------

def test_network_shapes_and_progressive_fusion():
    torch.manual_seed(0)
    net = GGPFNet(**NET_ARGS)
    assert net.slices == 9  # 2T + 1 with T = 4 slice-dropping convolutions
    out = net.forward_train(torch.randn(2, 1, 9, 16, 24), torch.randn(2, 1, 16, 16), torch.tensor([[0.0, 0.0], [8.0, 16.0]]), (32, 48))
    assert out["main"].shape == (2, 1, 16, 24)  # the central slice at the patch's size
    assert [tuple(p.shape[-2:]) for p in out["encoder"]] == [(16, 24), (8, 12), (4, 6), (2, 3)]
    assert [tuple(p.shape[-2:]) for p in out["global"]] == [(4, 4), (8, 8)]  # F at h_g / 4, F' at h_g / 2
    # Each 3D convolution drops the two outermost slices: 9 -> 7 -> 5 -> 3 -> 1.
    seen = []
    hooks = [g.register_forward_hook(lambda m, i, o: seen.append(o.shape[2])) for g in net.encoder]
    net(torch.randn(1, 1, 9, 16, 16), torch.zeros(1, 8, 4, 4), torch.zeros(1, 2), (16, 16))
    for h in hooks:
        h.remove()
    assert seen == [7, 5, 3, 1]
    with pytest.raises(ValueError, match="slices"):
        net(torch.randn(1, 1, 7, 16, 16), torch.zeros(1, 8, 4, 4), torch.zeros(1, 2), (16, 16))
    # Paper-sized defaults: 31 slices (T = 15), 13 global convolutions.
    big = GGPFNet()
    assert big.slices == 31 and sum(len([m for m in g if isinstance(m, nn.Conv2d)]) for g in big.global_groups) == 13


def test_global_features_sampled_at_the_patch_location():
    # F of an 8 x 8 grid over a 64 x 64 slice: channel 0 = row, channel 1 = column of F's pixel.
    u, v = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    feat = torch.stack([u, v])[None]
    # Local map of 2 x 3 pixels, stride 8, patch corner (16, 24): pixel (i, j) covers slice rows
    # 16 + 8i .. 16 + 8i + 7, i.e. F's row (16 + 8i + 4) / 8 - 0.5 = 2 + i (pixel-edge aligned).
    out = sample_global(feat, torch.tensor([[16.0, 24.0]]), (2, 3), 8, (64, 64))
    torch.testing.assert_close(out[0, 0], torch.tensor([[2.0, 2, 2], [3, 3, 3]]))
    torch.testing.assert_close(out[0, 1], torch.tensor([[3.0, 4, 5], [3, 4, 5]]))
    # Per sample origins; a non-square slice; stride 1 (sub-pixel positions).
    out = sample_global(feat.repeat(2, 1, 1, 1), torch.tensor([[0.0, 0.0], [4.0, 0.0]]), (1, 1), 1, (32, 64))
    assert out[0, 0].item() == pytest.approx(0.0)  # row 0.5 * 8 / 32 - 0.5 < 0: F's border value
    assert out[1, 0].item() == pytest.approx(4.5 * 8 / 32 - 0.5)
    assert out[1, 1].item() == pytest.approx(0.0)  # column 0.5 * 8 / 64 - 0.5 < 0: border value


def test_in_plane_pooling_is_max_pool3d():
    x = torch.randn(2, 3, 5, 12, 10)
    torch.testing.assert_close(pool_in_plane(x), torch.nn.functional.max_pool3d(x, (1, 2, 2)), rtol=0, atol=0)


def test_patch_starts():
    assert patch_starts(0, 32, 32, 16, 4) == [0, 8, 16]
    assert patch_starts(0, 10, 8, 16, 4) == [0]  # axis shorter than a patch: one padded patch
    assert patch_starts(3, 9, 32, 16, 4) == [3]  # a small box: one patch from its start
    assert patch_starts(25, 30, 32, 16, 4) == [16]  # kept inside the axis
    starts = patch_starts(10, 100, 128, 32, 8)
    assert starts[0] == 10 and starts[-1] + 32 >= 100 and all(b - a <= 24 for a, b in zip(starts, starts[1:]))


def test_hand_made_volume_through_the_pipeline(echo_bundle, cube):
    """Several overlapping patches per slice; each must get the global features of its own place."""
    image, label = cube
    pipe = create_pipeline(load_bundle(echo_bundle), "fang-ggpfn", device="cpu")
    assert isinstance(pipe, GGPFN)
    result = pipe.run(image)
    np.testing.assert_array_equal(result.mask, label)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(result.label), pipe.prepare(image).orientation.from_canonical(label))
    # A user ROI over part of the block: the patches run there only, the result stays in it.
    case = pipe.prepare(image)
    inner = ((12, 30), (0, 10), (10, 20))
    res = pipe.run(image, roi=box_to_roi_dict(case.image, case.orientation, inner))
    expected = np.zeros_like(label)
    expected[box_slices(inner)] = label[box_slices(inner)]
    np.testing.assert_array_equal(res.mask, expected)


def _dsc(a, b) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return 2.0 * (a & b).sum() / (a.sum() + b.sum())


def test_spacing_runs_on_the_resampled_grid_and_lands_on_the_input_grid(echo_bundle, cube, monkeypatch):
    """``spacing`` [4, 4, 2] mm (x, y, z) on the 2 mm cube: every view runs on the 16 x 16 x 32
    (x, y, z) grid, and the mask comes back on the exact input grid, close to the block (whose
    edges fall between coarse voxels)."""
    image, label = cube
    seen = []
    original = GGPFN.view_prob
    monkeypatch.setattr(GGPFN, "view_prob", lambda self, net, vol, *a, **k: seen.append(tuple(vol.shape)) or original(self, net, vol, *a, **k))
    native = create_pipeline(load_bundle(echo_bundle), device="cpu")
    native.run(image)
    assert sorted(seen) == [(32, 32, 32)] * 3  # null spacing: the input grid, as before
    seen.clear()
    pipe = create_pipeline(load_bundle(echo_bundle), device="cpu", overrides={"stages": {"ggpfn": {"spacing": [4.0, 4.0, 2.0]}}})
    assert pipe.parameters()["stages"]["ggpfn"]["spacing"] == [4.0, 4.0, 2.0]
    result = pipe.run(image)
    # canonical z, y, x = 32, 16, 16, in each view's order (slices first)
    assert sorted(seen) == sorted([(32, 16, 16), (16, 32, 16), (16, 32, 16)])
    assert result.mask.shape == label.shape and _dsc(result.mask, label) > 0.85
    for attr in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        assert getattr(result.label, attr)() == getattr(image, attr)()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(result.label), pipe.prepare(image).orientation.from_canonical(result.mask))
    # A user ROI: the resampled grid runs over the box's cover only, and the mask stays in the box.
    case = pipe.prepare(image)
    inner = ((12, 30), (0, 10), (10, 20))
    res = pipe.run(image, roi=box_to_roi_dict(case.image, case.orientation, inner))
    outside = np.ones(label.shape, bool)
    outside[box_slices(inner)] = False
    assert not res.mask[outside].any()
    assert _dsc(res.mask[box_slices(inner)], label[box_slices(inner)]) > 0.85
    # Inside the box the ROI's probabilities are the whole volume's (the box's cover is enough).
    whole = ((0, 32), (0, 32), (0, 32))
    np.testing.assert_allclose(pipe.probability(case, inner), pipe.probability(case, whole)[box_slices(inner)], atol=1e-6)


# --- losses ----------------------------------------------------------------------------------

def test_ggpfn_loss_terms():
    target = torch.zeros(2, 8, 8)
    target[:, :4, :4] = 1
    # Down-sampled ground truths are foreground fractions.
    torch.testing.assert_close(downsample_target(target, (2, 2))[0, 0], torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    torch.testing.assert_close(downsample_target(target, (4, 4))[0, 0, 1:3, 1:3], torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    log2 = math.log(2.0)
    assert bce(torch.zeros(2, 1, 8, 8), target).item() == pytest.approx(log2)
    zeros = {"main": torch.zeros(2, 1, 8, 8), "encoder": [torch.zeros(2, 1, 8 >> j, 8 >> j) for j in range(4)], "global": [torch.zeros(2, 1, 2, 2), torch.zeros(2, 1, 4, 4)]}
    gt_global = torch.zeros(2, 16, 16)
    terms = ggpfn_loss(zeros, target, gt_global, alpha=0.5, beta=0.25)
    for k in ("main", "encoder", "global", "global2"):
        assert terms[k].item() == pytest.approx(log2, rel=1e-5)  # logits 0: BCE = log 2 whatever the target
    assert terms["loss"].item() == pytest.approx(log2 * (1 + 1 + 0.5 + 0.25), rel=1e-5)
    # Fine-tuning setting (beta = 0): that term drops out; without a global ground truth only for alpha = beta = 0.
    assert ggpfn_loss(zeros, target, gt_global, 0.01, 0.0)["loss"].item() == pytest.approx(log2 * 2.01, rel=1e-5)
    assert ggpfn_loss(zeros, target, None, 0.0, 0.0)["loss"].item() == pytest.approx(log2 * 2, rel=1e-5)
    with pytest.raises(ValueError):
        ggpfn_loss(zeros, target, None, 0.5, 0.0)
    # Confident correct predictions: every term near 0.
    def logit(t):
        return (t.float() * 2 - 1)[:, None] * 30

    t16 = torch.zeros(2, 16, 16)
    t16[:, :8, :8] = 1  # binary at every scale down to 2 x 2
    good = {"main": logit(t16), "encoder": [logit(downsample_target(t16, (16 >> j, 16 >> j))[:, 0]) for j in range(4)]}
    assert ggpfn_loss(good, t16, None, 0.0, 0.0)["loss"].item() < 1e-6
    # The Dice option (not the paper's): 1 - soft DSC of the main output over the whole batch.
    torch.testing.assert_close(batch_dsc_loss(torch.zeros(2, 1, 8, 8), target), torch.tensor(1.0 - (2 * 0.5 * 32 + 1) / (64 + 32 + 1)))
    assert batch_dsc_loss(logit(t16), t16).item() < 1e-6
    plain = ggpfn_loss(zeros, target, gt_global, 0.5, 0.25)
    with_dice = ggpfn_loss(zeros, target, gt_global, 0.5, 0.25, dice_weight=2.0)
    assert "dice" not in plain and with_dice["dice"].item() == pytest.approx(batch_dsc_loss(zeros["main"], target).item())
    assert with_dice["loss"].item() == pytest.approx(plain["loss"].item() + 2.0 * with_dice["dice"].item(), rel=1e-6)
    assert with_dice["main"].item() == pytest.approx(plain["main"].item())  # the BCE terms unchanged
    # The training forward feeds the loss directly and every part gets gradients.
    torch.manual_seed(0)
    net = GGPFNet(**NET_ARGS)
    out = net.forward_train(torch.randn(2, 1, 9, 8, 8), global_input(torch.randn(2, 24, 24), net.global_size), torch.zeros(2, 2), (24, 24))
    loss = ggpfn_loss(out, target, torch.zeros(2, 16, 16), 0.5, 0.5)["loss"]
    loss.backward()
    assert net.global_groups[0][0].weight.grad.abs().sum() > 0 and net.encoder[0].body[0].weight.grad.abs().sum() > 0


# --- the pipeline with real (tiny) networks ---------------------------------------------------

def test_end_to_end_and_roi(tiny_bundle_path):
    hu, _ = tu.phantom_arrays((16, 24, 24), radii_vox=(4, 5, 6), island=False)
    image = tu.image_from_canonical(hu, flips=(True, False, True))
    bundle = load_bundle(tiny_bundle_path)
    assert isinstance(bundle.networks["ggpfn"], GGPFNViews)
    pipe = create_pipeline(bundle, device="cpu")
    assert pipe.stages == ("ggpfn",) and pipe.views() == ["coronal", "sagittal", "axial"]
    case = pipe.prepare(image)
    region = pipe.find_region(case)
    assert region.coarse_mask.all() and region.box == ((0, 16), (0, 24), (0, 24))
    result = pipe.segment_region(case, region)
    np.testing.assert_array_equal(result.mask, region.coarse_mask)  # end-to-end: no second pass
    assert result.label.GetSize() == image.GetSize() and result.label.GetDirection() == image.GetDirection()
    assert result.label.GetOrigin() == image.GetOrigin() and result.label.GetSpacing() == image.GetSpacing()
    # ROI: the patches inside the box only.
    inner = ((3, 10), (4, 20), (2, 9))
    res = pipe.run(image, roi=box_to_roi_dict(case.image, case.orientation, inner))
    outside = np.ones(case.shape, bool)
    outside[box_slices(inner)] = False
    assert res.region.source == "roi" and not res.mask[outside].any() and res.mask[box_slices(inner)].all()
    # Axial only, with the paper's MSD-style weights recorded in the parameters.
    fast = create_pipeline(bundle, device="cpu", overrides={"stages": {"ggpfn": {"views": ["axial"], "view_weights": {"axial": 0.8}}}})
    assert fast.views() == ["axial"] and fast.parameters()["stages"]["ggpfn"]["views"] == ["axial"]
    assert fast.run(image).mask.shape == (16, 24, 24)


def test_calibration_runs_the_one_stage_network_once_per_case(tmp_path, tiny_bundle_path, monkeypatch):
    """Training.calibrate on fang-ggpfn: one whole-volume probability per case serves every
    threshold, and each threshold's DSC is that of the thresholded probability."""
    from Training.calibrate import sweep
    from Training.datasets import open_dataset

    hu, lab = tu.phantom_arrays((16, 24, 24), radii_vox=(4, 5, 6), island=False)
    images, labels = tu.write_dataset(tmp_path, {"c0": (tu.image_from_canonical(hu), tu.image_from_canonical(lab))})
    calls = []
    original = GGPFN.probability
    monkeypatch.setattr(GGPFN, "probability", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    result = sweep(str(tiny_bundle_path), "ggpfn", [0.5, 1.01], open_dataset(str(images), str(labels)))
    assert len(calls) == 1
    # The tiny network says "pancreas" everywhere (p ~ 0.99): the DSC of the whole volume, then of nothing.
    assert result["mean_dsc"][0.5] == pytest.approx(2 * lab.sum() / (lab.sum() + lab.size), abs=1e-6)
    assert result["mean_dsc"][1.01] == 0.0 and result["best"] == 0.5
