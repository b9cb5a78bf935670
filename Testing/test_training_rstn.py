"""Training of Yu et al. 2018 RSTN (``yu-rstn``, Training/rstn_training.py): the slice sampler per
view, the padding of a batch, a short joint training run per view, export of the views into one
bundle that the library runs, and the network seeing in training exactly what it sees at inference.

Tiny: phantoms of 16 x 24 x 24 voxels, U-Nets of width 2 with 3 levels, tens of iterations."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import c2f_testutils as tu
from PancreasC2FLib.networks.rstn import VIEWS, _neighbours, to_view
from Training.datasets import StageVolume
from Training.rstn_training import RSTNTrainingNet, SliceSampler, make_sampler, stack_slices

NET = {"width": 2, "levels": 3}  # size multiple 4


def blob_volume(shape=(10, 12, 14)) -> StageVolume:
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    label = (((z - 5) / 2.5) ** 2 + ((y - 6) / 3) ** 2 + ((x - 8) / 3.5) ** 2 <= 1).astype(np.uint8)
    image = np.random.default_rng(0).normal(size=shape).astype(np.float32) + 2 * label
    return StageVolume("blob", image, label, (2.0, 1.0, 1.0))


# --- samples -----------------------------------------------------------------------------------

@pytest.mark.parametrize("view, hw, axis", [("axial", (12, 14), 0), ("coronal", (10, 14), 1), ("sagittal", (10, 12), 2)])
def test_slices_with_neighbours_as_inference_stacks_them(view, hw, axis):
    vol = blob_volume()
    sampler = SliceSampler(view, foreground_fraction=1.0)
    n = vol.image.shape[axis]
    fg = sampler.foreground_slices(vol)
    assert set(fg) == {i for i in range(n) if np.take(vol.label, i, axis=axis).any()} and 0 < len(fg) < n
    for i in (0, int(fg[len(fg) // 2]), n - 1):
        x, lab = sampler.slice_at(vol, i)
        assert x.shape == (3, *hw) and x.dtype == np.float32 and lab.shape == hw
        np.testing.assert_array_equal(lab, np.take(vol.label, i, axis=axis))  # the central slice's label
        np.testing.assert_array_equal(x[1], np.take(vol.image, i, axis=axis))
        np.testing.assert_array_equal(x[0], np.take(vol.image, max(i - 1, 0), axis=axis))
        np.testing.assert_array_equal(x[2], np.take(vol.image, min(i + 1, n - 1), axis=axis))
        # The very stack the pipeline feeds its networks.
        np.testing.assert_array_equal(x, _neighbours(torch.from_numpy(np.ascontiguousarray(to_view(vol.image, view))), [i])[0].numpy())
    rng = np.random.default_rng(1)
    assert all(sampler.pick(vol, rng) in set(fg) for _ in range(30))  # all on the pancreas
    i = sampler.pick(vol, np.random.default_rng(2))
    x, lab = sampler.sample(vol, np.random.default_rng(2))
    np.testing.assert_array_equal(x, sampler.slice_at(vol, i)[0])
    assert lab.any()
    anywhere = SliceSampler(view, foreground_fraction=0.0)
    assert {anywhere.pick(vol, rng) for _ in range(60)} - set(fg)  # the rest: any slice


def test_batch_is_padded_like_inference():
    a, b = np.ones((3, 5, 7), np.float32), np.full((3, 9, 6), 2.0, np.float32)
    la, lb = np.ones((5, 7), np.uint8), np.ones((9, 6), np.uint8)
    x, y = stack_slices([a, b], [la, lb], [-1.0, -3.0], multiple=4)
    assert x.shape == (2, 3, 12, 8) and y.shape == (2, 12, 8) and y.dtype == torch.int64
    assert x[0, :, :5, :7].eq(1).all() and x[0, :, 5:].eq(-1).all() and x[0, :, :, 7:].eq(-1).all()  # the volume's minimum
    assert x[1, :, 9:].eq(-3).all() and int(y[0].sum()) == 35 and int(y[1].sum()) == 54  # labels padded with 0


def test_settings_that_inference_cannot_follow_are_refused():
    with pytest.raises(ValueError, match="no --window"):
        make_sampler("axial", {"window": [64, 64, 64]})
    assert make_sampler("axial", {"spacing": [2.0, 2.0, 2.0]}).view == "axial"  # whole slices of that grid
    with pytest.raises(ValueError, match="crop_from"):
        make_sampler("axial", {"crop_from": "oracle"})
    with pytest.raises(ValueError, match="view"):
        SliceSampler("oblique")


def test_loss_settings_build_the_loss_and_stay_out_of_bundles():
    from Training import registry
    from Training.rstn_training import YU_RSTN

    stage = YU_RSTN.stages["axial"]
    assert stage.make_loss({}).over == "slice"  # the paper's Eq. 2
    assert stage.make_loss({"dsc_over": "batch"}).over == "batch"
    with pytest.raises(ValueError, match="dsc_over"):
        stage.make_loss({"dsc_over": "volume"})
    with pytest.raises(ValueError, match="no class weights"):
        stage.make_loss({"class_weights": [1, 3]})
    assert stage.make_loss({"coarse_bce_weight": 1.0}).coarse_bce_weight == 1.0
    for bad in (-1, "1", True):
        with pytest.raises(ValueError, match="coarse_bce_weight"):
            stage.make_loss({"coarse_bce_weight": bad})
    assert {"dsc_over", "coarse_bce_weight"} <= set(registry.TRAINING_ONLY_SETTINGS)


# --- training, export, inference ------------------------------------------------------------------

def _job(view, work: Path, out: Path, iterations=4, settings=None, network=None, **config):
    from Training.train import StageJob
    from Training.trainer import TrainConfig

    cfg = dict(iterations=iterations, batch=4, effective_batch=4, lr=0.05, augment="none", validate_every=iterations, checkpoint_every=iterations,
               validation_windows=4, device="cpu", threads=1, log_every=1)
    cfg.update(config)
    return StageJob(
        stage=view, pipeline="yu-rstn", data=str(work / "images"), labels=str(work / "labels"), val_count=1, out=str(out),
        settings={"margin": 2, **(settings or {})}, network_args={**(network or NET)}, preprocessing=dict(tu.FIXED_PREPROCESSING),
        cache=str(work / "cache"), config=TrainConfig(**cfg),
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Three phantom cases (two for training, one for validation); every view trained briefly."""
    from Training.train import train_stage

    work = tmp_path_factory.mktemp("rstn-train")
    for d in ("images", "labels"):
        (work / d).mkdir()
    for i in range(3):
        hu, lab = tu.phantom_arrays((16, 24, 24), radii_vox=(4, 5, 6), seed=i, island=False)
        sitk.WriteImage(tu.image_from_canonical(hu), str(work / "images" / f"case{i}.nii.gz"))
        sitk.WriteImage(tu.image_from_canonical(lab), str(work / "labels" / f"case{i}.nii.gz"))
    results = {v: train_stage(_job(v, work, work / v, iterations=30 if v == "axial" else 4), log=lambda *_: None) for v in VIEWS}
    return work, results


def _log(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return [{k: float(v) for k, v in r.items() if v} for r in csv.DictReader(f)]


def test_joint_training_lowers_the_loss_and_checkpoints(trained):
    from Training.trainer import load_checkpoint

    work, results = trained
    rows = _log(work / "axial" / "log.csv")
    losses = [r["loss"] for r in rows]
    assert len(losses) == 30 and np.mean(losses[-5:]) < np.mean(losses[:5])
    assert 0 <= rows[-1]["val_dsc"] <= 1 and "val_loss" in rows[-1]
    assert results["coronal"]["iterations"] == 4 and (work / "coronal" / "final.pt").is_file()
    ckpt = load_checkpoint(work / "axial" / "final.pt")
    assert ckpt["info"]["network"] == {"arch": "rstn-joint", "args": {"view": "axial", "in_channels": 3, "width": 2, "levels": 3, "saliency_kernel": 5, "saliency_layers": 2}}
    assert {k.split(".")[0] for k in ckpt["model"]} == {"coarse_net", "fine_net", "saliency"}


def test_export_runs_in_the_library_as_trained(trained, tmp_path):
    """Views -> one bundle; the pipeline runs on a CT of another size (padding), its coarse map of
    a view equals the trained network on the training sampler's slices (no preprocessing drift)."""
    from PancreasC2FLib.io.bundle import load_bundle
    from PancreasC2FLib.pipelines import create_pipeline
    from Training.__main__ import main as training_main
    from Training.datasets import prepare_stage_volume
    from Training.trainer import load_checkpoint

    work, _ = trained
    stages = [f"--stage={v}={work / v}" for v in VIEWS]
    assert training_main(["export", *stages, "--out", str(tmp_path / "bundle"), "--name", "tiny-rstn", "--set", "fine.max_rounds=2"]) == 0
    bundle = load_bundle(tmp_path / "bundle")
    md = bundle.metadata
    assert bundle.pipeline == "yu-rstn" and md["trained"] and set(md["stages"]) == {"coarse", "fine"}
    assert md["stages"]["coarse"]["network"] == {"arch": "rstn-stage", "args": {"views": list(VIEWS), "in_channels": 3, "width": 2, "levels": 3}}
    assert md["stages"]["fine"]["network"]["args"]["saliency_kernel"] == 5
    assert md["stages"]["fine"]["margin"] == 2 and md["stages"]["fine"]["max_rounds"] == 2
    assert not {"foreground_fraction", "crop_from", "init", "spacing"} & (set(md["stages"]["coarse"]) | set(md["stages"]["fine"]))
    assert set(md["training"]["stages"]) == set(VIEWS)
    axial = load_checkpoint(work / "axial" / "final.pt")["model"]
    torch.testing.assert_close(bundle.networks["coarse"].nets["axial"].classifier.weight, axial["coarse_net.classifier.weight"])
    torch.testing.assert_close(bundle.networks["fine"].saliency["axial"].body[0].weight, axial["saliency.body.0.weight"])

    hu, truth = tu.phantom_arrays((18, 26, 30), radii_vox=(4, 5, 6), seed=5, island=False)
    image = tu.image_from_canonical(hu, flips=(True, False, False))
    pipe = create_pipeline(bundle, device="cpu", overrides={"stages": {"coarse": {"threshold": 0.0}}})  # barely trained: keep all
    result = pipe.run(image)
    assert result.label.GetSize() == image.GetSize() and result.label.GetOrigin() == image.GetOrigin()
    assert result.label.GetDirection() == image.GetDirection() and result.mask.shape == (18, 26, 30)
    assert 1 <= result.region.extra["rounds"] <= 2

    one = create_pipeline(bundle, device="cpu", overrides={"stages": {"coarse": {"views": ["axial"]}}})
    case = one.prepare(image)
    vol = prepare_stage_volume("p", image, tu.image_from_canonical(truth, flips=(True, False, False)), md["preprocessing"], None)
    net = RSTNTrainingNet("axial", **NET)
    net.load_state_dict(axial)
    sampler = SliceSampler("axial")
    idx = [0, 9, 17]
    samples = [sampler.slice_at(vol, i) for i in idx]
    x, _ = stack_slices([s[0] for s in samples], [s[1] for s in samples], [sampler.pad_value(vol)] * 3, net.size_multiple)
    assert x.shape[-2:] == (28, 32)  # padded
    with torch.no_grad():
        trained_prob = torch.sigmoid(net.eval().coarse_net(x))[:, 0, :26, :30].numpy()
    np.testing.assert_allclose(one.coarse_prob(one.grid(case))[idx], trained_prob, atol=1e-5)


def test_fine_tuning_from_coarse_crops_starts_from_init(trained, tmp_path):
    """The paper's second phase: crops from the coarse mask, weights from the first run."""
    from Training.train import train_stage
    from Training.trainer import load_checkpoint

    work, _ = trained
    job = _job("axial", work, tmp_path / "ft", iterations=2, settings={"crop_from": "coarse", "init": str(work / "axial")}, lr=0.0, weight_decay=0.0, validation_windows=0)
    train_stage(job, log=lambda *_: None)
    start, end = load_checkpoint(work / "axial" / "final.pt")["model"], load_checkpoint(tmp_path / "ft" / "final.pt")["model"]
    for k in start:
        if "running_" not in k and "num_batches" not in k:  # BatchNorm statistics move in training mode
            torch.testing.assert_close(end[k], start[k])
    wider = _job("axial", work, tmp_path / "bad", iterations=1, settings={"init": str(work / "axial")}, network={"width": 4, "levels": 3})
    with pytest.raises(ValueError, match="init="):
        train_stage(wider, log=lambda *_: None)


def test_fine_tuning_starts_from_a_bundle(trained, tmp_path):
    """--init-from BUNDLE (or the setting init=BUNDLE): each view's joint network starts from the
    bundle's coarse and fine networks of that view, so a shipped model can be fine-tuned."""
    from Training.__main__ import main as training_main
    from Training.train import train_stage
    from Training.trainer import load_checkpoint

    work, _ = trained
    assert training_main(["export", f"--stage=axial={work / 'axial'}", "--out", str(tmp_path / "bundle"), "--name", "tiny-rstn"]) == 0
    start = load_checkpoint(work / "axial" / "final.pt")["model"]
    for how in ({"init_from": str(tmp_path / "bundle")}, {"settings": {"init": str(tmp_path / "bundle")}}):
        out = tmp_path / f"ft{len(how)}{next(iter(how))}"
        job = _job("axial", work, out, iterations=1, lr=0.0, weight_decay=0.0, validation_windows=0, **{k: v for k, v in how.items() if k == "settings"})
        job.init_from = how.get("init_from")
        train_stage(job, log=lambda *_: None)
        end = load_checkpoint(out / "final.pt")["model"]
        assert set(end) == set(start)
        for k in start:
            if "running_" not in k and "num_batches" not in k:  # BatchNorm statistics move in training mode
                torch.testing.assert_close(end[k], start[k], atol=2e-3, rtol=1e-3)  # the bundle stores float16
    wider = _job("axial", work, tmp_path / "bad", iterations=1, network={"width": 4, "levels": 3})
    wider.init_from = str(tmp_path / "bundle")
    with pytest.raises(ValueError, match="networks differ from this one"):
        train_stage(wider, log=lambda *_: None)
    coronal = _job("axial", work, tmp_path / "bad2", iterations=1)
    coronal.settings["init"] = str(tmp_path / "bundle")
    coronal.stage, coronal.network_args = "coronal", {**NET}
    with pytest.raises(ValueError, match="with the coronal view"):
        train_stage(coronal, log=lambda *_: None)


def test_views_with_different_settings_do_not_merge():
    from Training.catalog import recipe

    net = {"arch": "rstn-joint", "args": {"view": "axial", "in_channels": 3, **NET, "saliency_kernel": 3, "saliency_layers": 1}}
    nets = {v: RSTNTrainingNet(v, **NET, saliency_kernel=3, saliency_layers=1) for v in ("axial", "coronal")}
    stages = {v: {"network": {**net, "args": {**net["args"], "view": v}}, "margin": 20, "threshold": 0.5} for v in nets}
    networks, bundle_stages = recipe("yu-rstn").bundle_stages(nets, stages)
    assert networks["fine"].views == ["coronal", "axial"] and bundle_stages["fine"]["network"]["args"]["saliency_layers"] == 1
    stages["coronal"]["margin"] = 10
    with pytest.raises(ValueError, match="different settings"):
        recipe("yu-rstn").bundle_stages(nets, stages)


def test_paper_augmentation_is_none_for_yu(trained, tmp_path):
    """``--augment paper`` (the default) means the paper's: Yu et al. name no augmentation."""
    import json

    from Training.train import train_stage

    work, _ = trained
    train_stage(_job("axial", work, tmp_path / "aug", iterations=1, augment="paper", validation_windows=0), log=lambda *_: None)
    assert json.loads((tmp_path / "aug" / "config.json").read_text())["config"]["augment"] == "none"


def test_spacing_prepares_the_slices_inference_sees(trained, tmp_path):
    """``spacing``: the cached volumes are on that grid, the bundle records it, and the pipeline
    feeds the networks exactly the cached image (the same preparation)."""
    from PancreasC2FLib.io.bundle import load_bundle
    from PancreasC2FLib.pipelines import create_pipeline
    from Training.__main__ import main as training_main
    from Training.train import stage_cache, stage_settings, train_stage

    work, _ = trained
    job = _job("axial", work, tmp_path / "axial", iterations=2, settings={"spacing": [3.0, 3.0, 3.0]}, validation_windows=0)
    train_stage(job, log=lambda *_: None)
    cache = stage_cache(job, stage_settings(job))
    cached = cache.read("case0", mmap=False)
    assert cached.image.shape == (11, 16, 16) and cached.label.shape == (11, 16, 16) and cached.spacing == (3.0, 3.0, 3.0)  # 16 x 24 x 24 at 2 mm
    assert cached.label.any()
    assert training_main(["export", f"--stage=axial={tmp_path / 'axial'}", "--out", str(tmp_path / "bundle"), "--name", "tiny-rstn-3mm"]) == 0
    bundle = load_bundle(tmp_path / "bundle")
    assert bundle.metadata["stages"]["coarse"]["spacing"] == [3.0, 3.0, 3.0] == bundle.metadata["stages"]["fine"]["spacing"]
    pipe = create_pipeline(bundle, device="cpu", overrides={"stages": {"coarse": {"threshold": 0.0}}})  # barely trained: keep all
    image = sitk.ReadImage(str(work / "images" / "case0.nii.gz"))
    grid = pipe.grid(pipe.prepare(image))
    np.testing.assert_allclose(grid.volume.numpy(), cached.image, atol=1e-6)
    result = pipe.run(image)
    assert result.mask.shape == (16, 24, 24) and result.label.GetSize() == image.GetSize() and result.region.extra["grid"] == [11, 16, 16]


def test_a_new_view_starts_from_another_and_joins_its_bundle(trained, tmp_path, capsys):
    """init_view: a view's run starts from another view's networks (of a bundle or a run); export
    then takes the bundle's view over unchanged beside the new one (the demo's three views)."""
    from PancreasC2FLib.io.bundle import load_bundle
    from Training.__main__ import main as training_main
    from Training.train import train_stage
    from Training.trainer import load_checkpoint

    work, _ = trained
    axial_only = tmp_path / "axial-only"
    assert training_main(["export", f"--stage=axial={work / 'axial'}", "--out", str(axial_only), "--name", "tiny-rstn"]) == 0
    start = load_checkpoint(work / "axial" / "final.pt")["model"]
    for source, init in (("bundle", {"init_from": str(axial_only)}), ("run", {"settings": {"init": str(work / "axial")}})):
        job = _job("coronal", work, tmp_path / source, iterations=1, lr=0.0, weight_decay=0.0, validation_windows=0)
        job.settings.update({"init_view": "axial", **init.get("settings", {})})
        job.init_from = init.get("init_from")
        train_stage(job, log=lambda *_: None)
        end = load_checkpoint(tmp_path / source / "final.pt")
        assert end["info"]["network"]["args"]["view"] == "coronal"
        for k in start:
            if "running_" not in k and "num_batches" not in k:
                torch.testing.assert_close(end["model"][k], start[k], atol=2e-3, rtol=1e-3)  # the bundle stores float16
    assert load_checkpoint(tmp_path / "bundle" / "final.pt")["info"]["init_from"]["view"] == "axial"
    alone = _job("coronal", work, tmp_path / "alone", iterations=1, settings={"init_view": "axial"})
    with pytest.raises(ValueError, match="init_view=axial: give the weights"):
        train_stage(alone, log=lambda *_: None)

    both = tmp_path / "two-views"
    assert training_main(["export", f"--stage=axial={axial_only}", f"--stage=coronal={tmp_path / 'run'}", "--out", str(both), "--name", "tiny-rstn-2"]) == 0
    bundle, first = load_bundle(both), load_bundle(axial_only)
    assert bundle.metadata["stages"]["coarse"]["network"]["args"]["views"] == ["coronal", "axial"]
    assert bundle.metadata["stages"]["fine"]["margin"] == first.metadata["stages"]["fine"]["margin"]
    for stage in ("coarse", "fine"):
        for k, v in first.networks[stage].nets["axial"].state_dict().items():
            torch.testing.assert_close(bundle.networks[stage].nets["axial"].state_dict()[k], v)
    assert bundle.metadata["training"]["stages"]["axial"]["from_bundle"]["model_name"] == "tiny-rstn"
    assert training_main(["export", f"--stage=sagittal={axial_only}", f"--stage=coronal={tmp_path / 'run'}", "--out", str(tmp_path / "bad"), "--name", "x"]) != 0
    assert "has no yu-rstn view 'sagittal'" in capsys.readouterr().err and not (tmp_path / "bad").exists()
