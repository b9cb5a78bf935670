"""Yu et al. 2018 RSTN: 2D networks and the saliency module (size preservation, the product with
the input), crop boxes from thresholded maps, the joint training forward, the stopping rule of the
recurrent rounds, the DSC losses, an end-to-end run with a tiny bundle and the ROI workflow."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from torch import nn

import c2f_testutils as tu
from PancreasC2FLib.errors import ModelError
from PancreasC2FLib.io.bundle import load_bundle, save_bundle
from PancreasC2FLib.processing.geometry import box_slices
from PancreasC2FLib.pipelines import create_pipeline
from PancreasC2FLib.io.roi import box_to_roi_dict
from PancreasC2FLib.pipelines.yu_rstn import RSTN, Grid, RSTNRegion, recurrent_rounds
from PancreasC2FLib.networks.rstn import RSTNJoint, RSTNStage, SaliencyTransform, UNet2D, crop_box_2d, fine_on_crops, from_view, to_view
from Training.losses_rstn_ggpfn import dsc_loss, rstn_loss

ARGS = {"views": ["coronal", "sagittal", "axial"], "in_channels": 3, "width": 2, "levels": 3}


def rstn_metadata(name: str, max_rounds: int = 3) -> dict:
    return tu.fixture_metadata("yu-rstn", name, {"clip": [-100, 240], "normalize": "case_zscore"}, {
        "coarse": {"network": {"arch": "rstn-stage", "args": dict(ARGS)}, "threshold": 0.5, "batch": 16},
        "fine": {"network": {"arch": "rstn-stage", "args": {**ARGS, "saliency_kernel": 3, "saliency_layers": 2}},
                 "threshold": 0.5, "margin": 2, "max_rounds": max_rounds, "stop_dsc": 0.95, "margin_mm": 4.0, "batch": 16},
    })


@pytest.fixture(scope="module")
def rstn_bundle(tmp_path_factory) -> Path:
    """Random tiny networks whose classifiers say "pancreas" everywhere (weights 0, bias 5): the
    fine rounds always have a region to work on, and the fine mask is the union of the crops."""
    torch.manual_seed(0)
    coarse = RSTNStage(**ARGS)
    fine = RSTNStage(**ARGS, saliency_kernel=3, saliency_layers=2)
    with torch.no_grad():
        for net in [*coarse.nets.values(), *fine.nets.values()]:
            net.classifier.weight.zero_()
            net.classifier.bias.fill_(5.0)
    path = tmp_path_factory.mktemp("rstn") / "tiny-rstn"
    save_bundle(path, {"coarse": coarse.eval(), "fine": fine.eval()}, rstn_metadata(path.name))
    return path


@pytest.fixture(scope="module")
def small_image():
    hu, label = tu.phantom_arrays((16, 24, 24), radii_vox=(4, 5, 6), island=False)
    return tu.image_from_canonical(hu, flips=(True, False, False)), label


# --- networks and the saliency module ----------------------------------------------------------

def test_networks_preserve_size():
    net = UNet2D(in_channels=3, width=2, levels=3)
    assert net(torch.randn(2, 3, 16, 24)).shape == (2, 1, 16, 24)
    for kernel, layers in ((1, 1), (3, 1), (5, 2)):
        sal = SaliencyTransform(3, kernel, layers)
        assert sal(torch.rand(1, 1, 13, 17)).shape == (1, 3, 13, 17)  # size-preserving
    with pytest.raises(ValueError):
        SaliencyTransform(3, 4)
    stage = RSTNStage(**ARGS, saliency_kernel=5)
    assert set(stage.nets) == set(stage.saliency) == {"coronal", "sagittal", "axial"}
    assert stage(torch.randn(1, 3, 8, 8), "sagittal").shape == (1, 1, 8, 8)


def test_view_permutations_round_trip():
    vol = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    assert to_view(vol, "axial").shape == (2, 3, 4)
    assert to_view(vol, "coronal").shape == (3, 2, 4)  # slices along y
    assert to_view(vol, "sagittal").shape == (4, 2, 3)  # slices along x
    assert to_view(vol, "sagittal")[1, 0, 2] == vol[0, 2, 1]
    for v in ("axial", "coronal", "sagittal"):
        np.testing.assert_array_equal(from_view(to_view(vol, v), v), vol)


def test_saliency_multiplies_the_input():
    sal = SaliencyTransform(3, kernel=3, layers=1)
    with torch.no_grad():  # g(Z) = c * Z per channel, c = 1, 2, 3
        sal.body[0].weight.zero_()
        sal.body[0].weight[:, 0, 1, 1] = torch.tensor([1.0, 2.0, 3.0])
        sal.body[0].bias.zero_()
    x, z = torch.randn(1, 3, 6, 7), torch.rand(1, 1, 6, 7)
    expected = x * z * torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(sal.weight_input(x, z), expected)

    class Recorder(nn.Module):  # returns logit 0 (probability 0.5) and keeps its input
        size_multiple = 4

        def forward(self, inp):
            self.seen = inp.clone()
            return torch.zeros(inp.shape[0], 1, *inp.shape[-2:])

    rec = Recorder()
    box = (1, 4, 2, 7)
    out = fine_on_crops(rec, sal, x, z, [box])
    # X^F = Crop[X (x) g(Z)], zero-padded up to the network's size multiple.
    assert rec.seen.shape == (1, 3, 4, 8)
    torch.testing.assert_close(rec.seen[0, :, :3, :5], expected[0, :, 1:4, 2:7])
    assert rec.seen[0, :, 3:].abs().sum() == 0 and rec.seen[0, :, :, 5:].abs().sum() == 0
    # The probability goes back into the crop only.
    assert torch.all(out[0, 0, 1:4, 2:7] == 0.5) and out.sum() == pytest.approx(0.5 * 15)
    # No box (empty reference): no fine pass, zero probability.
    assert fine_on_crops(rec, sal, x, z, [None]).abs().sum() == 0


def test_crop_box_from_thresholded_score():
    score = np.zeros((20, 30), np.float32)
    score[5:9, 10:14] = 0.7
    score[12, 20] = 0.49  # below the threshold: ignored
    assert crop_box_2d(score, margin=3) == (2, 12, 7, 17)
    assert crop_box_2d(score, margin=0) == (5, 9, 10, 14)
    assert crop_box_2d(score, margin=3, threshold=0.4) == (2, 16, 7, 24)
    assert crop_box_2d(score, margin=10) == (0, 19, 0, 24)  # clamped to the slice
    assert crop_box_2d(np.zeros((4, 4)), margin=2) is None
    assert crop_box_2d(torch.from_numpy(score), margin=0) == (5, 9, 10, 14)


def test_joint_forward_crops_by_the_ground_truth():
    torch.manual_seed(0)
    coarse = RSTNStage(views=["axial"], width=2, levels=3)
    fine = RSTNStage(views=["axial"], width=2, levels=3, saliency_kernel=3)
    joint = RSTNJoint(coarse, fine, "axial", margin=2)
    shapes = []
    joint.fine_net.register_forward_hook(lambda m, i, o: shapes.append(tuple(i[0].shape)))
    x = torch.randn(2, 3, 20, 24, requires_grad=True)
    label = torch.zeros(2, 20, 24)
    label[0, 5:8, 6:9] = 1
    cp, fp = joint(x, label)
    assert cp.shape == fp.shape == (2, 1, 20, 24)
    assert shapes == [(1, 3, 8, 8)]  # one crop (the empty slice gets none): 3 + 2 * 2 = 7, padded to 8
    nz = fp[0, 0].detach().nonzero()
    assert nz.min(0).values.tolist() == [3, 4] and nz.max(0).values.tolist() == [9, 10]
    assert fp[1].abs().sum() == 0
    # Joint optimisation: the fine loss reaches the coarse network through the saliency module.
    loss = rstn_loss(cp, fp, label)["loss"]
    loss.backward()
    assert coarse.nets["axial"].classifier.weight.grad.abs().sum() > 0
    assert fine.saliency["axial"].body[0].weight.grad.abs().sum() > 0


# --- the recurrent rounds ----------------------------------------------------------------------

def _growing(n_total: int = 100):
    """A stub fine round that converges: the mask covers half of what is left each round."""

    def step(prev_prob, prev_mask):
        c = int(prev_mask.sum())
        c += (n_total - c) // 2
        out = np.zeros_like(prev_prob)
        out.reshape(-1)[:c] = 0.9
        return out

    return step


def test_rounds_stop_when_inter_iteration_dsc_exceeds_t():
    prob0 = np.zeros((1, 1, 100), np.float32)
    prob0[..., :20] = 0.8
    r = recurrent_rounds(prob0, _growing(), max_rounds=10, stop_dsc=0.95)
    # 20 -> 60 -> 80 -> 90 -> 95: DSCs 0.5, 0.857, 0.941, 0.973 (> 0.95: stop).
    assert r.rounds == 4 and r.converged
    np.testing.assert_allclose(r.inter_dsc, [40 / 80, 120 / 140, 160 / 170, 180 / 185], rtol=1e-6)
    assert int(r.mask.sum()) == 95
    # A stricter t needs more rounds; T caps them.
    r = recurrent_rounds(prob0, _growing(), max_rounds=3, stop_dsc=0.99)
    assert r.rounds == 3 and not r.converged and int(r.mask.sum()) == 90
    # A fixed point stops after one round.
    r = recurrent_rounds(prob0, lambda p, m: p, max_rounds=10, stop_dsc=0.95)
    assert r.rounds == 1 and r.converged and r.inter_dsc == [1.0]


def test_dsc_losses():
    z = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    y = torch.tensor([[1, 0, 1, 0]])
    assert dsc_loss(z, y).item() == pytest.approx(0.5, abs=1e-5)  # 1 - 2*1 / (2 + 2)
    assert dsc_loss(torch.full((1, 4), 0.5), y).item() == pytest.approx(0.5, abs=1e-5)  # 1 - 2*1 / (2 + 2)
    assert dsc_loss(y.float(), y).item() == pytest.approx(0.0, abs=1e-5)
    assert dsc_loss(torch.zeros(1, 4), torch.zeros(1, 4)).item() == pytest.approx(0.0, abs=1e-5)
    # Per slice, averaged over the batch.
    assert dsc_loss(torch.stack([z[0], y[0].float()]), torch.cat([y, y])).item() == pytest.approx(0.25, abs=1e-5)
    terms = rstn_loss(z, y.float(), y)  # coarse 0.5, fine 0: lambda = 1/3
    assert terms["loss"].item() == pytest.approx(0.5 / 3, abs=1e-5)
    assert rstn_loss(z, y.float(), y, lam=1.0)["loss"].item() == pytest.approx(0.5, abs=1e-5)


def test_batch_dsc_punishes_pancreas_marked_on_a_slice_without_it():
    # Slice 0 has pancreas and is segmented exactly; slice 1 has none but the network marks two
    # pixels. Per slice (the paper), slice 1 costs 1 whatever its probabilities: no gradient to
    # lower them. Over the batch they are false positives like any other.
    target = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]])
    prob = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.9, 0.8, 0.0, 0.0]], requires_grad=True)
    dsc_loss(prob, target).backward()
    assert prob.grad[1].abs().max().item() < 1e-4
    prob.grad = None
    loss = dsc_loss(prob, target, over="batch")
    assert loss.item() == pytest.approx(1 - 4 / (3.7 + 2), abs=1e-4)
    loss.backward()
    assert prob.grad[1, 0].item() > 0.05 and prob.grad[1, 1].item() > 0.05  # descent lowers them
    terms = rstn_loss(prob, prob, target, over="batch")
    assert terms["coarse"].item() == pytest.approx(loss.item(), abs=1e-6)
    with pytest.raises(ValueError, match="slice' or 'batch"):
        dsc_loss(prob, target, over="case")


def test_coarse_bce_gives_a_uniform_coarse_map_a_gradient():
    # A near-uniform coarse probability (what the DSC alone left the demo's coarse network at):
    # the class-balanced BCE pulls the rare pancreas pixels up as hard as the many others down.
    from Training.losses_rstn_ggpfn import balanced_bce

    target = torch.zeros(1, 100, dtype=torch.long)
    target[0, :2] = 1
    prob = torch.full((1, 100), 0.4, requires_grad=True)
    balanced_bce(prob, target).backward()
    up, down = -prob.grad[0, :2].sum().item(), prob.grad[0, 2:].sum().item()
    assert up > 0 and down > 0 and up == pytest.approx(down * (1 / 0.4) / (1 / 0.6), rel=1e-3)  # half the weight each
    assert balanced_bce(target.float(), target).item() < 1e-5
    # Added to the coarse term only, with its weight.
    fine = target.float()
    plain = rstn_loss(prob, fine, target, over="batch")
    both = rstn_loss(prob, fine, target, over="batch", coarse_bce_weight=2.0)
    assert both["fine"].item() == pytest.approx(plain["fine"].item())
    assert both["coarse"].item() == pytest.approx(plain["coarse"].item() + 2.0 * balanced_bce(prob, target).item(), rel=1e-5)


# --- the pipeline ------------------------------------------------------------------------------

def test_end_to_end_on_the_input_grid(rstn_bundle, small_image):
    image, _ = small_image
    bundle = load_bundle(rstn_bundle)
    assert isinstance(bundle.networks["fine"], RSTNStage)
    pipe = create_pipeline(bundle, "yu-rstn", device="cpu")
    assert isinstance(pipe, RSTN) and pipe.views() == ["coronal", "sagittal", "axial"]
    result = pipe.run(image)
    assert result.label.GetSize() == image.GetSize()
    assert result.label.GetOrigin() == image.GetOrigin() and result.label.GetDirection() == image.GetDirection()
    assert result.mask.shape == (16, 24, 24)
    assert result.region.box == ((0, 16), (0, 24), (0, 24))  # coarse everywhere
    assert 1 <= result.region.extra["rounds"] <= 3 and len(result.region.extra["inter_dsc"]) == result.region.extra["rounds"]
    np.testing.assert_array_equal(sitk.GetArrayFromImage(result.label), pipe.prepare(image).orientation.from_canonical(result.mask))
    # One view only (the speed setting), recorded in the parameters.
    fast = create_pipeline(bundle, device="cpu", overrides={"stages": {"coarse": {"views": ["axial"]}}})
    assert fast.views() == ["axial"] and fast.parameters()["stages"]["coarse"]["views"] == ["axial"]
    assert fast.run(image).mask.shape == (16, 24, 24)
    with pytest.raises(Exception, match="no network for the view"):
        create_pipeline(bundle, device="cpu", overrides={"stages": {"coarse": {"views": ["oblique"]}}}).views()


def test_comparison_reports_the_rounds_run(rstn_bundle, small_image):
    from Training.compare import fine_rounds, run_case

    image, label = small_image
    pipe = create_pipeline(load_bundle(rstn_bundle), device="cpu", overrides={"stages": {"coarse": {"views": ["axial"]}}})
    row = run_case(pipe, image, tu.image_from_canonical(label.astype(np.uint8), flips=(True, False, False)))
    n, _, flag = row["fine_rounds"].partition(", ")
    assert 1 <= int(n) <= 3 and flag in ("", "not converged")
    assert fine_rounds({"rounds": 10, "converged": False}) == "10, not converged"
    assert fine_rounds({"rounds": 2, "converged": True}) == "2" and fine_rounds({}) == ""


def test_fine_round_skips_slices_without_mask(rstn_bundle, small_image):
    image, _ = small_image
    pipe = create_pipeline(load_bundle(rstn_bundle), device="cpu", overrides={"stages": {"coarse": {"views": ["axial"]}}})
    case = pipe.prepare(image)
    grid = pipe.grid(case)
    assert grid.shape == case.shape  # no spacing: the input grid
    mask = np.zeros(case.shape, np.uint8)
    mask[5, 8:12, 8:12] = 1
    whole = ((0, 16), (0, 24), (0, 24))
    prob = pipe.fine_round(grid, whole, mask.astype(np.float32), mask)
    assert prob[np.arange(16) != 5].sum() == 0  # no previous mask on the other slices: no fine pass
    # Only inside the crop (mask box + K = 2 pixels).
    assert prob[5, :6].sum() == 0 and prob[5, 14:].sum() == 0 and prob[5, 6:14, 6:14].sum() > 0


def test_fine_round_crops_are_not_clipped_to_the_box(tmp_path, small_image):
    """Inside a box the round gives what it gives on the whole slice: each crop keeps its K pixels
    of context past the box's edge, as in training (clipped crops lost most of the pancreas)."""
    torch.manual_seed(1)  # random fine networks: their output depends on the crop's context
    path = tmp_path / "random-rstn"
    save_bundle(path, {"coarse": RSTNStage(**ARGS).eval(), "fine": RSTNStage(**ARGS, saliency_kernel=3, saliency_layers=2).eval()}, rstn_metadata(path.name))
    image, _ = small_image
    pipe = create_pipeline(load_bundle(path), device="cpu", overrides={"stages": {"coarse": {"views": ["axial"]}}})
    case = pipe.prepare(image)
    grid = pipe.grid(case)
    mask = np.zeros(case.shape, np.uint8)
    mask[4:7, 8:12, 8:12] = 1
    whole, box = ((0, 16), (0, 24), (0, 24)), ((4, 7), (9, 13), (9, 13))  # the box cuts the crops (mask + K = 2)
    everywhere = pipe.fine_round(grid, whole, mask.astype(np.float32), mask)
    inside = pipe.fine_round(grid, box, mask.astype(np.float32), mask)
    sl = (slice(4, 7), slice(9, 13), slice(9, 13))
    assert inside[sl].sum() > 0 and np.allclose(inside[sl], everywhere[sl], atol=1e-6)
    outside = np.ones(case.shape, bool)
    outside[sl] = False
    assert inside[outside].sum() == 0  # nothing labelled outside the box


def test_roi_workflow(rstn_bundle, small_image):
    image, _ = small_image
    pipe = create_pipeline(load_bundle(rstn_bundle), device="cpu")
    case = pipe.prepare(image)
    region = pipe.find_region(case)
    roi = json.loads(json.dumps(pipe.roi_for(case, region)))
    assert pipe.region_from_roi(case, roi).box == region.box
    inner = ((4, 12), (6, 18), (5, 15))
    user_roi = box_to_roi_dict(case.image, case.orientation, inner)
    outside = np.ones(case.shape, bool)
    outside[box_slices(inner)] = False
    # A user ROI alone: the coarse networks run on the slices crossing it, everything in the ROI.
    result = pipe.run(image, roi=user_roi)
    assert result.region.source == "roi" and result.region.box == inner
    assert not result.mask[outside].any() and result.mask[box_slices(inner)].all()
    # With the previous coarse result, its probability is reused inside the ROI.
    again = pipe.region_from_roi(case, user_roi, previous=region)
    assert isinstance(again, RSTNRegion) and again.coarse_prob is not None and not again.coarse_prob[outside].any()
    res2 = pipe.segment_region(case, again)
    assert not res2.mask[outside].any()
    np.testing.assert_array_equal(res2.mask, result.mask)  # coarse everywhere: the same start


# --- the stages' spacing -------------------------------------------------------------------------

SPACING = {"stages": {"coarse": {"spacing": [3.0, 3.0, 3.0]}, "fine": {"spacing": [3.0, 3.0, 3.0]}}}  # the phantom: 2 mm


def test_grid_boxes_cover_the_input_box():
    grid = Grid((16, 24, 24), (11, 16, 16), (3.0, 3.0, 3.0))
    assert grid.box_from_input(((0, 16), (0, 24), (0, 24))) == ((0, 11), (0, 16), (0, 16))
    # Input voxels 4..12 of 16 span 0.25..0.75 of the extent: grid voxels 2.75..8.25 -> 2..9.
    assert grid.box_from_input(((4, 12), (6, 18), (5, 15))) == ((2, 9), (4, 12), (3, 10))
    assert Grid((16, 24, 24), (16, 24, 24), (2.0, 2.0, 2.0)).box_from_input(((4, 12), (6, 18), (5, 15))) == ((4, 12), (6, 18), (5, 15))


def test_spacing_runs_resampled_and_lands_on_the_input_grid(rstn_bundle, small_image):
    image, _ = small_image
    pipe = create_pipeline(load_bundle(rstn_bundle), device="cpu", overrides=SPACING)
    case = pipe.prepare(image)
    grid = pipe.grid(case)
    assert grid.shape == (11, 16, 16) and grid.spacing == (3.0, 3.0, 3.0) and tuple(grid.volume.shape) == grid.shape
    x, _ = pipe.stage_input(case, None, [3.0, 3.0, 3.0])  # the one resampling, shared with the other pipelines
    np.testing.assert_array_equal(grid.volume.numpy(), x)
    region = pipe.find_region(case)
    assert region.coarse_prob.shape == (11, 16, 16) and region.coarse_mask.shape == case.shape
    assert region.box == ((0, 16), (0, 24), (0, 24)) and region.extra["grid"] == [11, 16, 16]
    result = pipe.segment_region(case, region)
    assert result.label.GetSize() == image.GetSize() and result.label.GetSpacing() == image.GetSpacing()
    assert result.label.GetOrigin() == image.GetOrigin() and result.label.GetDirection() == image.GetDirection()
    assert result.mask.shape == case.shape and result.mask.all()  # "pancreas everywhere", on every input voxel
    np.testing.assert_array_equal(sitk.GetArrayFromImage(result.label), case.orientation.from_canonical(result.mask))
    # A user ROI: the rounds run on the grid box covering it, the mask is exactly the ROI's voxels.
    inner = ((4, 12), (6, 18), (5, 15))
    outside = np.ones(case.shape, bool)
    outside[box_slices(inner)] = False
    for res in (pipe.run(image, roi=box_to_roi_dict(case.image, case.orientation, inner)),
                pipe.segment_region(case, pipe.region_from_roi(case, box_to_roi_dict(case.image, case.orientation, inner), previous=region))):
        assert res.region.box == inner and res.region.extra["grid"] == [11, 16, 16]
        assert res.mask[box_slices(inner)].all() and not res.mask[outside].any()


def test_coarse_and_fine_share_one_spacing(rstn_bundle, small_image):
    image, _ = small_image
    pipe = create_pipeline(load_bundle(rstn_bundle), device="cpu", overrides={"stages": {"fine": {"spacing": [3.0, 3.0, 3.0]}}})
    with pytest.raises(ModelError, match="one grid"):
        pipe.run(image)


def test_pipeline_rounds_stop_by_inter_iteration_dsc(rstn_bundle, small_image):
    """On the resampled grid too: a fixed point (pancreas everywhere) stops after one round at
    DSC 1 > t; with t = 1 (never exceeded) all T rounds run and the result says it did not converge."""
    image, _ = small_image
    result = create_pipeline(load_bundle(rstn_bundle), device="cpu", overrides=SPACING).run(image)
    assert result.region.extra["rounds"] == 1 and result.region.extra["converged"] and result.region.extra["inter_dsc"] == [1.0]
    never = {"stages": {**SPACING["stages"], "fine": {**SPACING["stages"]["fine"], "stop_dsc": 1.0, "max_rounds": 2}}}
    result = create_pipeline(load_bundle(rstn_bundle), device="cpu", overrides=never).run(image)
    assert result.region.extra["rounds"] == 2 and not result.region.extra["converged"] and result.region.extra["inter_dsc"] == [1.0, 1.0]
    assert any("did not converge in 2 rounds" in w for w in result.warnings)
