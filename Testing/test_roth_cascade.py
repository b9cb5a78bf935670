"""Roth et al. 2018 cascade: body mask, dilation radius, half-resolution round trip, the weighted
cross-entropy (Eq. 3-4), an end-to-end run with a tiny bundle, and the ROI workflow."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import c2f_testutils as tu
from PancreasC2FLib.io.bundle import load_bundle, save_bundle
from PancreasC2FLib.errors import EmptyCoarseResult
from PancreasC2FLib.processing.geometry import box_slices, mask_box
from PancreasC2FLib.pipelines import create_pipeline
from PancreasC2FLib.processing.postprocess import dice
from PancreasC2FLib.processing.preprocessing import resample_array
from PancreasC2FLib.pipelines.roth_cascade import RothCascade, body_mask, dilate_mask, downsample_volume, scaled_shape
from PancreasC2FLib.networks.unet3d import UNet3D
from Training.losses_variants import roth_class_weights, weighted_cross_entropy


def roth_metadata(specs: dict, name: str, preprocessing: dict, window1=(16, 16, 16), window2=(16, 16, 16)) -> dict:
    return tu.fixture_metadata("roth-cascade", name, preprocessing, {
        "stage1": {"network": specs["stage1"], "downsample": 2, "window": list(window1), "n": 0, "threshold": 0.5, "body_threshold_hu": -500, "dilation_radius": 3},
        "stage2": {"network": specs["stage2"], "downsample": 2, "window": list(window2), "n": 2, "threshold": 0.5},
    })


def band_roth_bundle(path: Path, stage1_band=tu.BAND_HU) -> Path:
    nets, specs = {}, {}
    for stage, (lo, hi) in (("stage1", stage1_band), ("stage2", tu.BAND_HU)):
        args = {"lo": tu.hu_to_fixed(lo), "hi": tu.hu_to_fixed(hi), "gain": 20.0}
        nets[stage] = tu.IntensityBandNet(**args)
        specs[stage] = {"arch": tu.IntensityBandNet.arch, "args": args}
    save_bundle(path, nets, roth_metadata(specs, path.name, tu.FIXED_PREPROCESSING))
    return path


@pytest.fixture(scope="module")
def band_bundle(tmp_path_factory) -> Path:
    return band_roth_bundle(tmp_path_factory.mktemp("roth") / "roth-band")


@pytest.fixture(scope="module")
def phantom():
    image, label = tu.phantom_case()
    return image, sitk.GetArrayFromImage(label)


# --- the paper's steps -------------------------------------------------------------------------

def test_body_mask_threshold_largest_component_and_holes():
    hu = np.full((6, 40, 40), -1000, np.int16)
    yy, xx = np.mgrid[:40, :40]
    body = ((yy - 18) / 14.0) ** 2 + ((xx - 20) / 16.0) ** 2 <= 1
    hu[:, body] = 40
    lung = ((yy - 16) / 5.0) ** 2 + ((xx - 14) / 4.0) ** 2 <= 1
    hu[:3, lung] = -850  # air inside the body, open to the top of the scan
    hu[:, 36:38, 5:35] = 300  # the table: bright but not touching the body
    hu[2, 2, 2] = 100  # noise speck
    mask = body_mask(hu)
    assert mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, np.broadcast_to(body, mask.shape).astype(np.uint8))
    assert body_mask(np.full((3, 8, 8), -1000, np.int16)).sum() == 0


def test_dilation_is_a_ball_of_radius_r():
    mask = np.zeros((15, 15, 15), np.uint8)
    mask[7, 7, 7] = 1
    zz, yy, xx = np.mgrid[:15, :15, :15]
    d2 = (zz - 7) ** 2 + (yy - 7) ** 2 + (xx - 7) ** 2
    for r in (1, 2, 3):
        out = dilate_mask(mask, r)
        np.testing.assert_array_equal(out, (d2 <= r * r).astype(np.uint8))
    assert dilate_mask(mask, 3).sum() == 123  # the r = 3 ball
    np.testing.assert_array_equal(dilate_mask(mask, 0), mask)
    # At the border the ball is clipped, not shifted; an empty mask stays empty.
    edge = np.zeros((8, 8, 8), np.uint8)
    edge[0, 0, 0] = 1
    out = dilate_mask(edge, 3)
    assert out[0, 0, 3] == 1 and out[0, 0, 4] == 0 and out[1, 2, 2] == 1 and out[2, 2, 2] == 0
    assert dilate_mask(np.zeros((4, 4, 4), np.uint8), 3).sum() == 0


def test_half_resolution_round_trip():
    assert scaled_shape((48, 64, 63), 2) == (24, 32, 32)
    assert scaled_shape((48, 64, 64), (4, 2, 1)) == (12, 32, 64)
    x = np.arange(4 * 6 * 8, dtype=np.float32).reshape(4, 6, 8)
    low = downsample_volume(x, (2, 3, 4))
    assert low[0, 0, 0] == pytest.approx(x[:2, :2, :2].mean())  # 2x2x2 averages
    # Labels: a block on the even grid survives half resolution and back (nearest) exactly.
    mask = np.zeros((16, 16, 16), np.uint8)
    mask[4:10, 2:8, 6:12] = 1
    low = resample_array(mask, scaled_shape(mask.shape, 2), "nearest")
    assert low.sum() == 27
    np.testing.assert_array_equal(resample_array(low, mask.shape, "nearest"), mask)
    # Probabilities: linear upsampling keeps a constant and stays within the range.
    prob = np.full((8, 8, 8), 0.25, np.float32)
    np.testing.assert_allclose(resample_array(prob, (16, 16, 16), "trilinear"), 0.25, atol=1e-6)


def test_weighted_cross_entropy_values():
    # Eq. 3 with K = 2: lambda_bg = N_fg / N_C, lambda_fg = N_bg / N_C.
    target = torch.tensor([0, 0, 0, 1]).reshape(1, 1, 1, 4)
    np.testing.assert_allclose(roth_class_weights(target, 2).numpy(), [0.25, 0.75])
    # K = 3: (1 - N_k / N_C) / 2, sums to 1.
    t3 = torch.tensor([0, 0, 1, 2]).reshape(1, 1, 1, 4)
    w3 = roth_class_weights(t3, 3).numpy()
    np.testing.assert_allclose(w3, [0.25, 0.375, 0.375])
    assert w3.sum() == pytest.approx(1.0)
    # Eq. 4 with equal logits (p = 1/2 everywhere): (1/4)(3 * 0.25 + 0.75) log 2.
    logits = torch.zeros(1, 2, 1, 1, 4)
    assert weighted_cross_entropy(logits, target).item() == pytest.approx(0.375 * math.log(2), rel=1e-6)
    # Confident logits: per-voxel terms -log p, weighted and averaged by hand.
    logits = torch.tensor([[2.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 3.0]]).reshape(1, 2, 1, 1, 4)
    nll = [math.log(1 + math.exp(-2.0)), math.log(1 + math.exp(-1.0)), math.log(1 + math.exp(1.0)), math.log(1 + math.exp(-3.0))]
    expected = (0.25 * (nll[0] + nll[1] + nll[2]) + 0.75 * nll[3]) / 4
    assert weighted_cross_entropy(logits, target).item() == pytest.approx(expected, rel=1e-6)
    # Only the candidate region counts (weights and N from it): region = voxels 1..3.
    region = torch.tensor([0, 1, 1, 1]).reshape(1, 1, 1, 4)
    w = roth_class_weights(target, 2, region).numpy()
    np.testing.assert_allclose(w, [1 / 3, 2 / 3])
    expected = (w[0] * (nll[1] + nll[2]) + w[1] * nll[3]) / 3
    assert weighted_cross_entropy(logits, target, region).item() == pytest.approx(expected, rel=1e-6)
    # Gradient flows; an empty region gives 0.
    logits.requires_grad_(True)
    weighted_cross_entropy(logits, target, region).backward()
    assert logits.grad.abs().sum() > 0
    assert weighted_cross_entropy(logits, target, torch.zeros_like(region)).item() == 0.0


# --- end to end --------------------------------------------------------------------------------

def test_end_to_end_with_stub_networks(band_bundle, phantom):
    image, truth = phantom
    pipe = create_pipeline(load_bundle(band_bundle), "roth-cascade", device="cpu")
    assert isinstance(pipe, RothCascade) and pipe.stages == ("stage1", "stage2")
    case = pipe.prepare(image)
    region = pipe.find_region(case)
    cand = region.candidate_mask
    assert region.box == mask_box(cand)  # the exported ROI is the candidate's bounding box
    assert cand[truth > 0].all()  # C2 covers the pancreas (recall 1)
    assert region.coarse_mask.shape == case.shape and region.coarse_mask.sum() > 0
    assert cand.sum() < 0.3 * cand.size
    # C2 is the dilated stage-1 labels: dilation grows the mask.
    assert cand.sum() > 1.5 * region.coarse_mask.sum()
    result = pipe.segment_region(case, region)
    assert result.mask.shape == case.shape
    assert not (result.mask & ~cand.astype(bool)).any()  # stage 2 only inside C2
    assert dice(result.mask, truth) > 0.9
    assert result.label.GetSize() == image.GetSize()
    assert {"coarse_s", "fine_s"} <= set(result.timings)


def test_end_to_end_tiny_unet(tmp_path, phantom):
    torch.manual_seed(0)
    nets = {s: UNet3D(width=2, levels=3).eval() for s in ("stage1", "stage2")}
    with torch.no_grad():  # stage 1 says "pancreas" everywhere so C2 is the body
        nets["stage1"].classifier.weight.zero_()
        nets["stage1"].classifier.bias.copy_(torch.tensor([-5.0, 5.0]))
    spec = {"arch": "unet3d", "args": {"in_channels": 1, "num_classes": 2, "width": 2, "levels": 3}}
    save_bundle(tmp_path / "tiny", nets, roth_metadata({"stage1": spec, "stage2": spec}, "tiny-roth", {"clip": [-100, 240], "normalize": "case_zscore"}))
    image, _ = phantom
    pipe = create_pipeline(load_bundle(tmp_path / "tiny"), device="cpu")
    result = pipe.run(image)
    body = resample_array(body_mask(downsample_volume(pipe.prepare(image).hu, (24, 32, 32))), result.mask.shape, "nearest")
    np.testing.assert_array_equal(result.region.candidate_mask, body)
    assert not (result.mask & ~body.astype(bool)).any()
    assert result.label.GetSize() == image.GetSize()


def test_empty_first_stage(tmp_path, phantom):
    bundle = band_roth_bundle(tmp_path / "empty", stage1_band=(5000.0, 6000.0))
    pipe = create_pipeline(load_bundle(bundle), device="cpu")
    with pytest.raises(EmptyCoarseResult):
        pipe.find_region(pipe.prepare(phantom[0]))


# --- the ROI workflow --------------------------------------------------------------------------

def test_roi_workflow(band_bundle, phantom):
    image, truth = phantom
    pipe = create_pipeline(load_bundle(band_bundle), device="cpu")
    case = pipe.prepare(image)
    region = pipe.find_region(case)
    roi = pipe.roi_for(case, region)
    # The exported ROI maps back to exactly the candidate's bounding box.
    again = pipe.region_from_roi(case, json.loads(json.dumps(roi)))
    assert again.box == region.box and again.candidate_mask is None
    # Without a candidate (a ROI file alone), stage 2 runs on the whole box.
    result = pipe.segment_region(case, again)
    outside = np.ones(case.shape, bool)
    outside[box_slices(again.box)] = False
    assert not result.mask[outside].any()
    assert dice(result.mask, truth) > 0.9
    # An adjusted ROI (cutting the pancreas in half along x) with the first stage's region:
    # stage 2 is limited to C2 inside the ROI.
    (z0, z1), (y0, y1), (x0, x1) = region.box
    half = ((z0, z1), (y0, y1), (x0, (x0 + x1) // 2))
    from PancreasC2FLib.io.roi import box_to_roi_dict

    adjusted = pipe.region_from_roi(case, box_to_roi_dict(case.image, case.orientation, half), previous=region)
    assert adjusted.box == half
    inside = np.zeros(case.shape, np.uint8)
    inside[box_slices(half)] = 1
    np.testing.assert_array_equal(adjusted.candidate_mask, region.candidate_mask & inside)
    result = pipe.segment_region(case, adjusted)
    assert not (result.mask & ~(adjusted.candidate_mask.astype(bool))).any()
    assert result.mask.sum() > 0 and result.flags["touches_box"]
    # Pipeline.run with a ROI skips stage 1.
    assert pipe.run(image, roi=roi).region.source == "roi"


def test_cli_coarse_only_then_roi(tmp_path, band_bundle, phantom):
    from PancreasC2FLib.apps.cli import main

    ct = tmp_path / "ct.nii.gz"
    sitk.WriteImage(phantom[0], str(ct))
    roi_path, out = tmp_path / "region.mrk.json", tmp_path / "seg.nii.gz"
    assert main(["segment", str(ct), "--model", str(band_bundle), "--pipeline", "roth-cascade", "--coarse-only", "--roi-out", str(roi_path), "--quiet", "--device", "cpu"]) == 0
    assert main(["segment", str(ct), "--model", str(band_bundle), "--roi", str(roi_path), "-o", str(out), "--quiet", "--device", "cpu"]) == 0
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    assert dice(seg, phantom[1]) > 0.9
    # A Roth model refuses to run as another pipeline.
    assert main(["segment", str(ct), "--model", str(band_bundle), "--pipeline", "zhao-two-stage", "-o", str(tmp_path / "x.nii.gz"), "--quiet"]) == 2


def test_pipeline_option_picks_its_shipped_model(tmp_path, monkeypatch, phantom):
    from PancreasC2FLib.io.bundle import resolve_model
    from PancreasC2FLib.apps.cli import main

    models = tmp_path / "models"
    band_roth_bundle(models / "demo-roth-cascade")
    monkeypatch.setenv("PANCREAS_C2F_MODELS", str(models))
    assert resolve_model(None, "roth-cascade") == models / "demo-roth-cascade"
    ct, out = tmp_path / "ct.nii.gz", tmp_path / "seg.nii.gz"
    sitk.WriteImage(phantom[0], str(ct))
    assert main(["segment", str(ct), "--pipeline", "roth-cascade", "-o", str(out), "--quiet", "--device", "cpu"]) == 0
    assert dice(sitk.GetArrayFromImage(sitk.ReadImage(str(out))), phantom[1]) > 0.9


# --- training: data preparation, sampler, and the CLI from training to a working bundle ---------

def test_training_data_sampler_and_loss():
    from Training.variants import IGNORE, IGNORE_INDEX, RegionSampler, RothWeightedCE, prepare_roth_stage1, prepare_roth_stage2

    image, label = tu.phantom_case()
    truth = sitk.GetArrayFromImage(label)
    settings = {"downsample": 2, "window": [16, 16, 16], "dilation_radius": 3}
    vol = prepare_roth_stage1("p", image, label, tu.FIXED_PREPROCESSING, settings)
    assert vol.image.shape == (24, 32, 32) and vol.spacing == (4.0, 4.0, 4.0)
    lab = np.asarray(vol.label)
    assert (lab == 1).any() and (lab == IGNORE).any() and set(np.unique(lab)) <= {0, 1, IGNORE}
    # Outside the body (air) is ignored, inside it counts.
    assert lab[:, 0, 0].tolist() == [IGNORE] * 24 and lab[12, 16, 16] != IGNORE
    # Stage 2 without a stage-1 network: the ground truth dilated by r on the stage-1 grid.
    vol2 = prepare_roth_stage2("p", image, label, tu.FIXED_PREPROCESSING, settings)
    lab2 = np.asarray(vol2.label)
    assert (lab2 == 1).sum() == pytest.approx((truth > 0).sum() / 8, rel=0.2)
    assert (lab2 == IGNORE).any() and (lab2 == 0).any()
    # Windows come from the candidate region, with IGNORE_INDEX outside it.
    sampler = RegionSampler((16, 16, 16), foreground_fraction=0.0)
    rng = np.random.default_rng(0)
    for _ in range(5):
        img, y = sampler.sample(vol, rng)
        assert img.shape == (16, 16, 16) and (y[8, 8, 8] != IGNORE_INDEX)
        assert set(np.unique(y)) <= {IGNORE_INDEX, 0, 1}
    # The loss module ignores the outside voxels.
    logits = torch.zeros(1, 2, 2, 2, 2)
    y = torch.tensor([[0, 1], [IGNORE_INDEX, IGNORE_INDEX]]).reshape(1, 2, 2, 1).expand(1, 2, 2, 2)
    total, main = RothWeightedCE()(logits, y)
    assert total.item() == pytest.approx(0.5 * math.log(2), rel=1e-6)  # weights 1/2, 1/2


def test_training_cli_to_bundle(tmp_path):
    """python -m Training train (stage 1, then stage 2 on stage 1's candidates), export, segment."""
    from Training.__main__ import main as training_main
    from Training.export import export_bundle

    images, labels = tu.phantom_dataset(tmp_path / "data")
    common = ["--pipeline", "roth-cascade", "--data", str(images), "--labels", str(labels), "--cache", str(tmp_path / "cache"), "--width", "2",
              "--window", "16", "--iterations", "2", "--batch", "2", "--effective-batch", "2", "--validate-every", "2", "--checkpoint-every", "2",
              "--validation-windows", "0", "--device", "cpu", "--augment", "none", "--normalize", "fixed"]
    assert training_main(["train", "--stage", "stage1", "--out", str(tmp_path / "s1"), *common]) == 0
    assert training_main(["train", "--stage", "stage2", "--out", str(tmp_path / "s2"), "--set", f"stage1={tmp_path / 's1'}", *common]) == 0
    # Stage 2's data came from the trained stage 1 (its checkpoint is part of the cache key).
    caches = [json.loads(p.read_text(encoding="utf-8")) for p in (tmp_path / "cache").glob("*/settings.json")]
    assert any(c.get("variant", {}).get("stage1_sha256") for c in caches)
    assert training_main(["export", "--stage", f"stage1={tmp_path / 's1'}", "--stage", f"stage2={tmp_path / 's2'}", "--out", str(tmp_path / "bundle"), "--name", "tiny-roth"]) == 0
    bundle = load_bundle(tmp_path / "bundle")
    assert bundle.pipeline == "roth-cascade" and bundle.metadata["stages"]["stage1"]["network"]["arch"] == "unet3d"
    assert "stage1" not in bundle.metadata["stages"]["stage2"]  # training-only settings stay out
    pipe = create_pipeline(bundle, device="cpu")
    image = sitk.ReadImage(str(images / "case0.nii.gz"))
    region = pipe.region_from_roi(pipe.prepare(image), tu_roi(pipe, image))
    assert pipe.segment_region(pipe.prepare(image), region).mask.shape == (32, 48, 48)

    # Fine-tuning stage 2 alone from the bundle: its stage 1 makes the candidate regions (the cache
    # key holds the bundle's stage-1 weights) and is taken over unchanged by the export.
    assert training_main(["train", "--stage", "stage2", "--out", str(tmp_path / "s2b"), "--set", f"stage1={tmp_path / 'bundle'}", "--init-from", str(tmp_path / "bundle"), *common]) == 0
    stage1_digest = hashlib.sha256((tmp_path / "bundle" / "model.json").read_bytes()).hexdigest()  # its settings and weights' sha256
    caches = [json.loads(p.read_text(encoding="utf-8"))["variant"] for p in (tmp_path / "cache").glob("*/settings.json")]
    assert any(c.get("stage1") == str((tmp_path / "bundle").resolve()) and stage1_digest.startswith(c["stage1_sha256"]) for c in caches)
    assert training_main(["export", "--stage", f"stage1={tmp_path / 'bundle'}", "--stage", f"stage2={tmp_path / 's2b'}", "--out", str(tmp_path / "bundle2"), "--name", "tiny-roth"]) == 0
    tuned = load_bundle(tmp_path / "bundle2")
    assert tuned.metadata["stages"]["stage1"] == bundle.metadata["stages"]["stage1"]  # same settings, same weights digest
    assert tuned.metadata["training"]["stages"]["stage1"]["from_bundle"]["model_sha256"] == bundle.sha256
    assert tuned.metadata["training"]["stages"]["stage2"]["init_from"]["model_sha256"] == bundle.sha256
    # A bundle of another pipeline cannot stand in for stage 1.
    with pytest.raises(ValueError, match="has no roth-cascade stage 'stage1'"):
        export_bundle({"stage1": tu.resdsn_bundle(tmp_path / "resdsn"), "stage2": tmp_path / "s2b"}, tmp_path / "bad", "bad")


def tu_roi(pipe, image):
    from PancreasC2FLib.io.roi import box_to_roi_dict

    case = pipe.prepare(image)
    return box_to_roi_dict(case.image, case.orientation, ((8, 24), (12, 36), (12, 36)))


def test_calibrate_sweeps_the_last_stage_with_one_first_stage_run(tmp_path, band_bundle, phantom, monkeypatch, capsys):
    """python -m Training calibrate: mean DSC per threshold, the best printed as an export option;
    the first stage runs once per case when the last stage's threshold is swept."""
    from Training.__main__ import main as training_main

    images, labels = tu.write_dataset(tmp_path, {"p0": (phantom[0], tu.image_from_canonical(phantom[1]))})
    calls = []
    original = RothCascade.find_region
    monkeypatch.setattr(RothCascade, "find_region", lambda self, case, *a, **k: calls.append(1) or original(self, case, *a, **k))
    out = tmp_path / "calibration.json"
    args = ["calibrate", "--model", str(band_bundle), "--stage", "stage2", "--thresholds", "0.3", "0.5", "1.5", "--data", str(images), "--labels", str(labels), "--out", str(out)]
    assert training_main(args) == 0
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["mean_dsc"]["1.5"] == 0.0 and report["mean_dsc"]["0.5"] > 0.9  # 1.5: nothing passes
    best = max(report["mean_dsc"], key=report["mean_dsc"].get)
    assert report["best"] == float(best) and report["bundle_threshold"] == 0.5
    assert len(calls) == 1
    assert f"--set stage2.threshold={float(best):g}" in capsys.readouterr().out
