"""Zhao et al. 2019 two-stage 3D U-Net: the two boxes and their margins, majority voting, the
Dice + centre loss and its schedule, an end-to-end run with a tiny bundle, and the ROI workflow."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import c2f_testutils as tu
from PancreasC2FLib.io.bundle import load_bundle, save_bundle
from PancreasC2FLib.processing.geometry import box_slices
from PancreasC2FLib.pipelines import create_pipeline
from PancreasC2FLib.processing.postprocess import dice
from PancreasC2FLib.io.roi import box_to_roi_dict
from PancreasC2FLib.networks.unet3d import UNet3D
from PancreasC2FLib.pipelines.zhao_two_stage import ZhaoTwoStage, majority_vote, two_boxes
from Training.losses_variants import centre_loss, centre_weight, dice_centre_loss, slice_centres, soft_dice_loss


def zhao_metadata(specs: dict, name: str, preprocessing: dict, window1=(16, 16, 16), window2=(16, 16, 16)) -> dict:
    return tu.fixture_metadata("zhao-two-stage", name, preprocessing, {
        "stage1": {"network": specs["stage1"], "downsample": 4, "window": list(window1), "n": 0, "threshold": 0.5, "low_margin": 2},
        "stage2": {"network": specs["stage2"], "window": list(window2), "n": 1, "threshold": 0.5, "margin": 10},
    })


@pytest.fixture(scope="module")
def band_bundle(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("zhao") / "zhao-band"
    args = {"lo": tu.hu_to_fixed(tu.BAND_HU[0]), "hi": tu.hu_to_fixed(tu.BAND_HU[1]), "gain": 20.0}
    nets = {s: tu.IntensityBandNet(**args) for s in ("stage1", "stage2")}
    spec = {"arch": tu.IntensityBandNet.arch, "args": args}
    save_bundle(path, nets, zhao_metadata({"stage1": spec, "stage2": spec}, path.name, tu.FIXED_PREPROCESSING))
    return path


@pytest.fixture(scope="module")
def phantom():
    # No stray island: the stub stage 1 would stretch the boxes to it.
    hu, label = tu.phantom_arrays(island=False)
    return tu.image_from_canonical(hu), label


# --- the paper's steps -------------------------------------------------------------------------

def test_two_boxes_and_margins():
    low = np.zeros((16, 16, 16), np.uint8)
    low[4:6, 5:8, 6:7] = 1
    box1, box2 = two_boxes(low, (64, 64, 64), low_margin=2, up_margin=10)
    # Box 1: low box +-2 low voxels, times R = 4.
    assert box1 == ((8, 32), (12, 40), (16, 36))
    # Box 2: the upsampled mask's box (16:24, 20:32, 24:28) +-10 voxels.
    assert box2 == ((6, 34), (10, 42), (14, 38))
    # Clamped at the image border; a grid that is not an exact multiple scales by the real ratio.
    low[:] = 0
    low[0:2, 14:16, 0:1] = 1
    box1, box2 = two_boxes(low, (64, 62, 64))
    assert box1 == ((0, 16), (46, 62), (0, 12))  # 12 * 62 / 16 = 46.5, rounded outward
    assert box2[0] == (0, 18) and box2[1][1] == 62 and box2[2][0] == 0
    with pytest.raises(ValueError):
        two_boxes(np.zeros((4, 4, 4), np.uint8), (16, 16, 16))


def test_majority_vote():
    a = np.array([1, 1, 0, 0, 1], np.uint8)
    b = np.array([1, 0, 1, 0, 0], np.uint8)
    c = np.array([0, 1, 1, 0, 0], bool)
    np.testing.assert_array_equal(majority_vote([a, b, c]), [1, 1, 1, 0, 0])
    np.testing.assert_array_equal(majority_vote([a]), a)
    np.testing.assert_array_equal(majority_vote([a, b]), [1, 0, 0, 0, 0])  # more than half


def _logits(p_fg: torch.Tensor) -> torch.Tensor:
    """Logits (B, 2, D, H, W) whose softmax foreground is ``p_fg`` (0 < p < 1)."""
    return torch.stack([torch.zeros_like(p_fg), torch.log(p_fg / (1 - p_fg))], dim=1)


def test_dice_and_centre_loss_values():
    target = torch.zeros(1, 2, 5, 5, dtype=torch.long)
    target[0, 0, 1:3, 1:3] = 1  # slice 0: centre (1.5, 1.5)
    p = torch.full((1, 2, 5, 5), 1e-6)
    p[0, 0, 1:3, 3:5] = 1 - 1e-6  # same shape, 2 voxels to the right: centre (1.5, 3.5)
    logits = _logits(p)
    # Dice: no overlap -> loss ~ 1; perfect -> ~ 0; half overlap -> 1 - 2*2/8.
    assert soft_dice_loss(logits, target).item() == pytest.approx(1.0, abs=1e-4)
    perfect = _logits(torch.where(target > 0, 1 - 1e-6, 1e-6).float())
    assert soft_dice_loss(perfect, target).item() == pytest.approx(0.0, abs=1e-4)
    half = torch.full((1, 2, 5, 5), 1e-6)
    half[0, 0, 1:3, 2:4] = 1 - 1e-6
    assert soft_dice_loss(_logits(half), target).item() == pytest.approx(0.5, abs=1e-4)
    # Centres are coordinate means per axial slice.
    centres, mass = slice_centres(p)
    np.testing.assert_allclose(centres[0, 0].numpy(), [1.5, 3.5], atol=1e-3)
    assert mass[0, 0].item() == pytest.approx(4.0, abs=1e-3)
    # Centre loss: distance 2 over the slice diagonal sqrt(4^2 + 4^2); slice 1 has no reference.
    assert centre_loss(logits, target).item() == pytest.approx(2 / math.sqrt(32), abs=1e-3)
    assert centre_loss(perfect, target).item() == pytest.approx(0.0, abs=1e-3)
    # L = L_dice + lambda * L_center.
    assert dice_centre_loss(logits, target, 0.5).item() == pytest.approx(1.0 + 0.5 * 2 / math.sqrt(32), abs=1e-3)
    assert dice_centre_loss(logits, target, 0.0).item() == pytest.approx(soft_dice_loss(logits, target).item())
    # Both terms are differentiable.
    logits = logits.clone().requires_grad_(True)
    centre_loss(logits, target).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    assert centre_loss(logits, torch.zeros_like(target)).item() == 0.0


def test_centre_weight_schedule():
    assert centre_weight(0, 1.0) == 1.0
    assert centre_weight(49, 1.0) == 1.0  # held for the first 50 epochs
    assert centre_weight(50, 1.0, decay_epochs=50) == pytest.approx(0.98)
    assert centre_weight(74, 1.0, decay_epochs=50) == pytest.approx(0.5)
    assert centre_weight(99, 1.0, decay_epochs=50) == 0.0
    assert centre_weight(500, 1.0) == 0.0
    assert centre_weight(50, 0.3, decay_epochs=0) == 0.0  # straight to 0
    assert centre_weight(3, 0.3, hold_epochs=5) == 0.3


# --- end to end --------------------------------------------------------------------------------

def test_end_to_end_with_stub_networks(band_bundle, phantom):
    image, truth = phantom
    pipe = create_pipeline(load_bundle(band_bundle), "zhao-two-stage", device="cpu")
    assert isinstance(pipe, ZhaoTwoStage) and pipe.stages == ("stage1", "stage2")
    case = pipe.prepare(image)
    region = pipe.find_region(case)
    box1, box2 = region.extra["box1"], region.extra["box2"]
    assert region.extra["stage1_grid"] == [12, 16, 16]  # 48 x 64 x 64 decimated by R = 4
    assert region.box == tuple((min(a[0], b[0]), max(a[1], b[1])) for a, b in zip(box1, box2))
    for b in (box1, box2):  # both boxes hold the pancreas
        inside = np.zeros(case.shape, bool)
        inside[box_slices(b)] = True
        assert truth[~inside].sum() == 0
    result = pipe.segment_region(case, region)
    assert dice(result.mask, truth) > 0.9
    # The result is the 2-of-3 vote of the two fine masks and the upsampled coarse mask.
    fines = []
    for b in (box1, box2):
        full = np.zeros(case.shape, np.uint8)
        full[box_slices(b)] = pipe.fine_mask(case, b)
        fines.append(full)
    np.testing.assert_array_equal(result.mask, majority_vote([fines[0], fines[1], region.coarse_mask]))
    assert result.label.GetSize() == image.GetSize()


def test_end_to_end_tiny_unet(tmp_path, phantom):
    torch.manual_seed(0)
    nets = {s: UNet3D(width=2, levels=3).eval() for s in ("stage1", "stage2")}
    with torch.no_grad():  # stage 1 says "pancreas" everywhere: both boxes are the whole image
        nets["stage1"].classifier.weight.zero_()
        nets["stage1"].classifier.bias.copy_(torch.tensor([-5.0, 5.0]))
    spec = {"arch": "unet3d", "args": {"in_channels": 1, "num_classes": 2, "width": 2, "levels": 3}}
    md = zhao_metadata({"stage1": spec, "stage2": spec}, "tiny-zhao", {"clip": [-100, 240], "normalize": "case_zscore"}, window2=(16, 32, 32))
    md["stages"]["stage2"]["n"] = 0
    save_bundle(tmp_path / "tiny", nets, md)
    image, _ = phantom
    pipe = create_pipeline(load_bundle(tmp_path / "tiny"), device="cpu")
    result = pipe.run(image)
    whole = ((0, 48), (0, 64), (0, 64))
    assert result.region.extra["box1"] == whole and result.region.extra["box2"] == whole
    assert result.mask.shape == (48, 64, 64)
    # With the coarse mask everywhere, the vote is the union of the two (identical) fine masks.
    np.testing.assert_array_equal(result.mask, pipe.fine_mask(pipe.prepare(image), whole))


# --- the ROI workflow --------------------------------------------------------------------------

def test_roi_workflow(band_bundle, phantom):
    image, truth = phantom
    pipe = create_pipeline(load_bundle(band_bundle), device="cpu")
    case = pipe.prepare(image)
    region = pipe.find_region(case)
    roi = json.loads(json.dumps(pipe.roi_for(case, region)))
    again = pipe.region_from_roi(case, roi)
    assert again.box == region.box and again.source == "roi"
    result = pipe.segment_region(case, again)
    assert dice(result.mask, truth) > 0.9
    # An adjusted ROI: the fine network runs there only (nothing outside it).
    (z0, z1), (y0, y1), (x0, x1) = region.box
    half = ((z0, z1), (y0, y1), (x0, (x0 + x1) // 2))
    adjusted = pipe.region_from_roi(case, box_to_roi_dict(case.image, case.orientation, half), previous=region)
    result = pipe.segment_region(case, adjusted)
    outside = np.ones(case.shape, bool)
    outside[box_slices(half)] = False
    assert not result.mask[outside].any() and result.mask.sum() > 0
    np.testing.assert_array_equal(result.mask[box_slices(half)], pipe.fine_mask(case, half))


def test_cli_coarse_only_then_roi(tmp_path, band_bundle, phantom):
    from PancreasC2FLib.apps.cli import main

    ct = tmp_path / "ct.nii.gz"
    sitk.WriteImage(phantom[0], str(ct))
    roi_path, coarse, out, report = tmp_path / "region.mrk.json", tmp_path / "coarse.nii.gz", tmp_path / "seg.nii.gz", tmp_path / "r.json"
    assert main(["segment", str(ct), "--model", str(band_bundle), "--pipeline", "zhao-two-stage", "--coarse-only", "--roi-out", str(roi_path), "-o", str(coarse), "--quiet", "--device", "cpu"]) == 0
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(coarse))).sum() > 0  # the upsampled stage-1 mask
    assert main(["segment", str(ct), "--model", str(band_bundle), "--roi", str(roi_path), "-o", str(out), "--report", str(report), "--quiet", "--device", "cpu"]) == 0
    assert dice(sitk.GetArrayFromImage(sitk.ReadImage(str(out))), phantom[1]) > 0.9
    rep = json.loads(report.read_text(encoding="utf-8"))
    assert rep["pipeline"] == "zhao-two-stage" and rep["region"]["source"] == "roi"


# --- training: data preparation, sampler, the schedule in the trainer, CLI to a working bundle -----

def test_training_data_and_sampler(phantom):
    from Training.variants import BoxSampler, prepare_zhao_stage1, prepare_zhao_stage2

    image, truth = phantom
    label = tu.image_from_canonical(truth)
    vol1 = prepare_zhao_stage1("p", image, label, tu.FIXED_PREPROCESSING, {"downsample": 4})
    assert vol1.image.shape == (12, 16, 16) and vol1.spacing == (8.0, 8.0, 8.0)
    # Fine data: the ground-truth box + 10 voxels, grown to one window (16) where smaller.
    vol2 = prepare_zhao_stage2("p", image, label, tu.FIXED_PREPROCESSING, {"downsample": 1, "window": [16, 16, 16], "margin": 10})
    from PancreasC2FLib.processing.geometry import mask_box

    expected = tuple(max(16, min(n, hi + 10) - max(0, lo - 10)) for (lo, hi), n in zip(mask_box(truth), truth.shape))
    assert vol2.image.shape == expected
    assert int(np.asarray(vol2.label).sum()) == int(truth.sum())
    sampler = BoxSampler((16, 16, 16), margin=10)
    rng = np.random.default_rng(0)
    hits = sum(sampler.sample(vol2, rng)[1].any() for _ in range(10))
    assert hits >= 5


def test_training_cli_to_bundle(tmp_path):
    from Training.__main__ import main as training_main

    images, labels = tu.phantom_dataset(tmp_path)
    common = ["--pipeline", "zhao-two-stage", "--data", str(images), "--labels", str(labels), "--cache", str(tmp_path / "cache"), "--width", "2",
              "--window", "16", "--iterations", "3", "--batch", "1", "--effective-batch", "1", "--validate-every", "3", "--checkpoint-every", "3",
              "--validation-windows", "0", "--device", "cpu", "--augment", "none", "--normalize", "fixed", "--set", "centre_hold_epochs=1", "--set", "centre_decay_epochs=0"]
    for stage in ("stage1", "stage2"):
        assert training_main(["train", "--stage", stage, "--out", str(tmp_path / stage), *common]) == 0
    from Training.trainer import load_checkpoint

    assert load_checkpoint(tmp_path / "stage1" / "final.pt")["info"]["settings"]["centre_hold_epochs"] == 1
    assert training_main(["export", "--stage", f"stage1={tmp_path / 'stage1'}", "--stage", f"stage2={tmp_path / 'stage2'}", "--out", str(tmp_path / "bundle"), "--name", "tiny-zhao"]) == 0
    bundle = load_bundle(tmp_path / "bundle")
    assert bundle.pipeline == "zhao-two-stage" and "centre_lambda" not in bundle.metadata["stages"]["stage1"]
    pipe = create_pipeline(bundle, device="cpu")
    image = sitk.ReadImage(str(images / "case0.nii.gz"))
    case = pipe.prepare(image)
    region = pipe.region_from_roi(case, box_to_roi_dict(case.image, case.orientation, ((8, 24), (12, 36), (12, 36))))
    assert pipe.segment_region(case, region).mask.shape == (32, 48, 48)


def test_zhao_trainer_sets_centre_weight(monkeypatch):
    from Training.trainer import Trainer
    from Training.variants import ZhaoDiceCentre, ZhaoTrainer

    class Stub(ZhaoTrainer):  # only the schedule logic: no data, no network
        def __init__(self):
            self.iteration, self.train_volumes, self.loss_fn = 0, [None] * 4, ZhaoDiceCentre()
            self.config = type("C", (), {"effective_batch": 2})()
            self.info = {"settings": {"centre_lambda": 0.5, "centre_hold_epochs": 2, "centre_decay_epochs": 2}}

    monkeypatch.setattr(Trainer, "train_step", lambda self: {"loss": 0.0})
    t = Stub()
    seen = []
    for it in range(8):
        t.iteration = it
        logs = t.train_step()
        assert logs["centre_lambda"] == t.loss_fn.centre_lambda
        seen.append(t.loss_fn.centre_lambda)
    # 4 cases, 2 windows a step: an epoch every 2 iterations; 2 epochs held, then 0.25, then 0.
    assert seen == [0.5, 0.5, 0.5, 0.5, 0.25, 0.25, 0.0, 0.0]


def test_evaluate_three_pipelines_side_by_side(tmp_path, forced_bundle, band_bundle, phantom):
    """python -m Training evaluate with one model per pipeline: one table, three rows."""
    from Training.__main__ import main as training_main

    args = {"lo": tu.hu_to_fixed(tu.BAND_HU[0]), "hi": tu.hu_to_fixed(tu.BAND_HU[1]), "gain": 20.0}
    spec = {"arch": tu.IntensityBandNet.arch, "args": args}
    md = zhao_metadata({"stage1": spec, "stage2": spec}, "roth-band", tu.FIXED_PREPROCESSING)
    md["pipeline"] = "roth-cascade"
    md["stages"] = {"stage1": {"network": spec, "downsample": 2, "window": [16, 16, 16], "n": 0}, "stage2": {"network": spec, "downsample": 2, "window": [16, 16, 16], "n": 1}}
    save_bundle(tmp_path / "roth-band", {s: tu.IntensityBandNet(**args) for s in ("stage1", "stage2")}, md)
    images, labels = tu.write_dataset(tmp_path, {"p0": (phantom[0], tu.image_from_canonical(phantom[1]))})
    out = tmp_path / "table"
    models = ["--model", str(forced_bundle), "--model", str(tmp_path / "roth-band"), "--model", str(band_bundle)]
    assert training_main(["evaluate", *models, "--data", str(images), "--labels", str(labels), "--out", str(out)]) == 0
    table = (out / "summary.md").read_text(encoding="utf-8")
    rows = [line for line in table.splitlines() if line.startswith("| ") and "Pipeline" not in line]
    assert len(rows) == 3 and "Roth" in rows[1] and "Zhao" in rows[2]
    summary = json.loads((out / "comparison.json").read_text(encoding="utf-8"))["summary"]
    assert [s["pipeline"] for s in summary] == ["resdsn-c2f", "roth-cascade", "zhao-two-stage"]
    assert all(s["mean_dsc"] > 90 and s["cases"] == 1 for s in summary)


def test_one_stage_pipeline_row_has_no_stage1_dsc():
    """fang-ggpfn's region mask is its result: the table says so instead of repeating the DSC."""
    from Training.compare import markdown_table, summarize

    rows = [{"model": "g", "dsc": 0.8, "precision": 0.9, "stage1_dsc": float("nan"), "seconds": 1.0, "note": ""}]
    table = markdown_table(summarize(rows, [{"name": "g", "pipeline": "fang-ggpfn", "sha256": "0" * 64}]))
    row = table.splitlines()[-1]
    assert "Fang et al. 2019" in row and "80.00 ± 0.00%" in row and "n/a (one stage)" in row
