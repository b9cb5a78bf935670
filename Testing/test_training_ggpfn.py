"""Training Fang et al. 2019's GGPFN (Training/ggpfn_training.py): the samples of every view are
the inputs the inference code builds, the three phases train what the schedule says with the
alpha and beta it says, and the command line goes from image folders to a bundle the library runs.

Everything is tiny (width-2 networks with 9-slice inputs, 16 x 16 global inputs, phantoms of a few
ten thousand voxels), so the file takes a few seconds."""

from __future__ import annotations

import csv

import c2f_testutils as tu
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from PancreasC2FLib.io.bundle import load_bundle
from PancreasC2FLib.processing.geometry import mask_box
from PancreasC2FLib.pipelines.fang_ggpfn import GGPFN
from PancreasC2FLib.networks.ggpfn import GGPFNViews, global_input, sample_global
from PancreasC2FLib.pipelines import create_pipeline
from PancreasC2FLib.processing.preprocessing import normalize
from PancreasC2FLib.networks.rstn import VIEWS, box_to_view, to_view
from Training.datasets import prepare_stage_volume
from Training.ggpfn_training import GGPFNLoss, GGPFNTrainer, SliceSampler, phase_at
from Training.catalog import recipe
from Training.trainer import TrainConfig, load_checkpoint

NET_ARGS = {"width": 2, "convs": [1, 1, 1, 1], "global_width": 2, "global_convs": [1, 1, 1], "global_size": [16, 16]}
SLICES = 9  # 2T + 1 with T = 4 slice-dropping convolutions
GLOBAL_PART = ("global_groups", "global_head", "global_head2")


@pytest.fixture(scope="module")
def volumes():
    """Two phantoms (24 x 40 x 36, flipped grids) prepared as the recipe prepares them."""
    stage = recipe("fang-ggpfn").stages["ggpfn"]
    settings = dict(stage.settings)
    out = []
    for seed in range(2):
        hu, lab = tu.phantom_arrays((24, 40, 36), radii_vox=(4, 6, 7), seed=seed, island=False)
        image, label = (tu.image_from_canonical(a, flips=(True, False, True)) for a in (hu, lab))
        out.append(prepare_stage_volume(f"p{seed}", image, label, tu.FIXED_PREPROCESSING, settings.get("spacing"), stage.crop_margin_mm(settings)))
    return out


# --- (a) samples --------------------------------------------------------------------------------

def _expected_patch(array, i, corner, size, pad):
    """The 9 slices around i (end slices repeated) cut at corner, padded at the far end."""
    n = array.shape[0]
    out = np.full((SLICES, *size), pad, np.float32)
    for j in range(SLICES):
        part = array[min(max(i - SLICES // 2 + j, 0), n - 1), corner[0] : corner[0] + size[0], corner[1] : corner[1] + size[1]]
        out[j, : part.shape[0], : part.shape[1]] = part
    return out


@pytest.mark.parametrize("patch", [(16, 20), (32, 32)])  # (32, 32) is taller than the coronal and sagittal slices
def test_samples_are_the_inference_inputs_for_every_view(volumes, patch):
    vol = volumes[0]
    box = mask_box(vol.label)
    sampler = SliceSampler(patch, box_fraction=1.0)
    ph, pw = sampler.patch
    assert sampler.patch == tuple(-(-p // 8) * 8 for p in patch)  # rounded up as at inference
    rng = np.random.default_rng(0)
    for view in VIEWS:
        img, lab = to_view(vol.image, view), to_view(vol.label, view)
        _, h, w = img.shape
        inputs, targets = sampler.batch([vol], 3, view, rng, SLICES, (16, 16))
        x, a_g, origin, slice_hw, views = inputs
        g_k, g_slice = targets
        assert x.shape == (3, 1, SLICES, ph, pw) and a_g.shape == (3, 1, 16, 16) and g_k.shape == (3, ph, pw) and g_slice.shape == (3, 16, 16)
        assert origin.shape == (3, 2) and slice_hw.tolist() == [[h, w]] * 3 and views.tolist() == [VIEWS.index(view)] * 3
        for _ in range(4):
            s = sampler.sample(vol, view, rng, SLICES, (16, 16))
            i, cy, cx = s["centre"]
            py, px = s["origin"]
            # Centres in the ground-truth box (box_fraction 1); the patch holds the centre and stays in the slice.
            assert all(lo <= c < hi for c, (lo, hi) in zip((i, cy, cx), box_to_view(box, view)))
            assert 0 <= py <= max(h - ph, 0) and 0 <= px <= max(w - pw, 0)
            assert (py <= cy < py + ph or h < ph) and (px <= cx < px + pw or w < pw)
            np.testing.assert_array_equal(s["x"], _expected_patch(img, i, (py, px), (ph, pw), float(vol.image.min())))
            np.testing.assert_array_equal(s["g_k"], _expected_patch(lab, i, (py, px), (ph, pw), 0)[SLICES // 2])
            whole = global_input(torch.from_numpy(np.ascontiguousarray(img[i], np.float32))[None], (16, 16))[0, 0]
            torch.testing.assert_close(s["a_g"], whole)
            torch.testing.assert_close(s["g_slice"], global_input(torch.from_numpy(lab[i].astype(np.float32))[None], (16, 16))[0, 0])
            assert 0.0 <= float(s["g_slice"].min()) and float(s["g_slice"].max()) <= 1.0


def test_a_batch_mixes_slice_sizes():
    """Training batches mix slices of different sizes: F_k per sample with its own slice size."""
    feat = torch.randn(3, 4, 5, 6)
    origin = torch.tensor([[0.0, 0.0], [8.0, 16.0], [3.0, 5.0]])
    sizes = [(32, 48), (40, 40), (24, 64)]
    together = sample_global(feat, origin, (4, 4), 8, torch.tensor(sizes, dtype=torch.float32))
    for b, hw in enumerate(sizes):
        torch.testing.assert_close(together[b : b + 1], sample_global(feat[b : b + 1], origin[b : b + 1], (4, 4), 8, hw))


def test_without_box_fraction_centres_cover_the_volume(volumes):
    vol = volumes[0]
    box = mask_box(vol.label)
    rng = np.random.default_rng(1)
    centres = [SliceSampler((16, 16), box_fraction=0.0).sample(vol, "axial", rng, SLICES, (16, 16))["centre"] for _ in range(100)]
    inside = sum(all(lo <= c < hi for c, (lo, hi) in zip(ctr, box)) for ctr in centres)
    assert inside < 50 and {c[0] for c in centres} - set(range(*box[0]))  # slices without pancreas too


# --- (b) the schedule in the trainer ------------------------------------------------------------

class SpyTrainer(GGPFNTrainer):
    """Records every step's logs and which entries of the state dict it changed."""

    def train_step(self):
        before = {k: v.clone() for k, v in self.net.state_dict().items()}
        logs = super().train_step()
        after = self.net.state_dict()
        self.steps = getattr(self, "steps", []) + [(logs, {k for k in before if not torch.equal(before[k], after[k])})]
        return logs


def test_phases_train_what_and_with_the_weights_the_settings_say(volumes, tmp_path):
    defaults = recipe("fang-ggpfn").stages["ggpfn"].settings
    # The paper's 1000 / 1000 / 800 epochs as fractions of the iterations.
    assert [phase_at(i, 2800, defaults) for i in (0, 999, 1000, 1999, 2000, 2799)] == ["global", "global", "fusion", "fusion", "joint", "joint"]
    settings = {**defaults, "patch": [16, 16], "global_fraction": 1 / 3, "fusion_fraction": 1 / 3}
    views = ["axial", "coronal"]
    info = {"pipeline": "fang-ggpfn", "stage": "ggpfn", "settings": settings, "network": {"arch": "ggpfn-views", "args": {"views": views, **NET_ARGS}}, "preprocessing": tu.FIXED_PREPROCESSING}
    cfg = TrainConfig(iterations=6, batch=2, effective_batch=2, lr=0.05, validate_every=6, checkpoint_every=6, validation_windows=2, device="cpu", log_every=1)
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="augmentation"):
        GGPFNTrainer(GGPFNViews(views, **NET_ARGS), SliceSampler([16, 16]), GGPFNLoss(), volumes[:1], [], TrainConfig(augment="flip", device="cpu"), tmp_path / "x", info)
    trainer = SpyTrainer(GGPFNViews(views, **NET_ARGS), SliceSampler([16, 16]), GGPFNLoss(), volumes[:1], volumes[1:], cfg, tmp_path / "run", info)
    assert trainer.config.augment == "none"  # recorded as what was done
    result = trainer.fit()
    assert result["iterations"] == 6
    assert [(logs["phase"], logs["alpha"], logs["beta"]) for logs, _ in trainer.steps] == [(0, 0.5, 0.5)] * 2 + [(1, 0.0, 0.0)] * 2 + [(2, 0.01, 0.0)] * 2
    for step, (_, changed) in enumerate(trainer.steps):
        view = views[step % 2]  # micro-batches take the views in turn
        assert changed and all(k.startswith(f"nets.{view}.") for k in changed), step
        in_global = {k for k in changed if k.split(".")[2] in GLOBAL_PART}
        if step < 2:  # the global branch alone
            assert in_global == changed
        elif step < 4:  # the rest, on the frozen global branch (BatchNorm statistics too)
            assert not in_global
        else:  # everything (P^f' has beta = 0: its head stays)
            assert in_global and changed - in_global and not any(".global_head2." in k for k in changed)
    run = tmp_path / "run"
    ckpt = load_checkpoint(run / "final.pt")
    assert ckpt["iteration"] == 6 and ckpt["info"]["settings"]["global_fraction"] == pytest.approx(1 / 3)
    assert (run / "checkpoint_last.pt").is_file()
    with open(run / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and 0.0 <= float(rows[-1]["val_dsc"]) <= 1.0


# --- (c) command line: folders -> training -> bundle -> the library's pipeline -------------------

def test_cli_train_export_and_run(tmp_path, phantom_ct):
    from Training.__main__ import main as training_main

    images, labels = tu.phantom_dataset(tmp_path, shape_zyx=(24, 40, 36), radii_vox=(4, 6, 7))
    net_args = [a for k, v in NET_ARGS.items() if k != "width" for a in ("--network-arg", f"{k}={v}")]
    run = tmp_path / "run"
    assert training_main([
        "train", "--pipeline", "fang-ggpfn", "--stage", "ggpfn", "--data", str(images), "--labels", str(labels), "--val-count", "1",
        "--out", str(run), "--cache", str(tmp_path / "cache"), "--width", "2", *net_args, "--normalize", "fixed",
        "--set", "patch=[32, 32]", "--set", "overlap=8", "--set", "global_fraction=0.34", "--set", "fusion_fraction=0.33", "--set", "dice_weight=0.5",
        "--iterations", "3", "--batch", "2", "--effective-batch", "2", "--validate-every", "3", "--checkpoint-every", "3",
        "--validation-windows", "2", "--device", "cpu",
    ]) == 0
    assert training_main(["export", "--stage", f"ggpfn={run}", "--out", str(tmp_path / "bundle"), "--name", "tiny-ggpfn", "--set", "ggpfn.batch=64"]) == 0
    bundle = load_bundle(tmp_path / "bundle")
    stage = bundle.metadata["stages"]["ggpfn"]
    assert bundle.pipeline == "fang-ggpfn" and stage["network"] == {"arch": "ggpfn-views", "args": {"views": list(VIEWS), **NET_ARGS}}
    assert stage["patch"] == [32, 32] and stage["overlap"] == 8 and stage["batch"] == 64
    assert not {"box_fraction", "global_fraction", "fusion_fraction", "global_alpha_beta", "joint_alpha_beta", "dice_weight"} & set(stage)  # training only
    assert bundle.metadata["training"]["stages"]["ggpfn"]["augment"] == "none"
    assert bundle.metadata["training"]["stages"]["ggpfn"]["sampler"]["dice_weight"] == 0.5  # the loss option, recorded
    assert stage["spacing"] is None  # the input grid (the paper's)
    trained = load_checkpoint(run / "final.pt")["model"]
    assert all(torch.equal(v, trained[k]) for k, v in bundle.networks["ggpfn"].state_dict().items())
    pipe = create_pipeline(bundle, device="cpu")
    assert isinstance(pipe, GGPFN)
    # The training data is the array the pipeline runs on (same orientation, normalisation).
    case = pipe.prepare(sitk.ReadImage(str(images / "case0.nii.gz")))
    cached = next((tmp_path / "cache").glob("*/case0/image.npy"))
    np.testing.assert_array_equal(np.load(cached), normalize(case.hu, pipe.preprocessing, case.stats))
    # End to end on another CT: a label map on its grid. Threshold 0 keeps the barely trained
    # network's whole volume, so the run is defined; its probabilities are real ones.
    image = phantom_ct.image
    pipe = create_pipeline(bundle, device="cpu", overrides={"stages": {"ggpfn": {"threshold": 0.0}}})
    result = pipe.run(image)
    assert result.mask.shape == image.GetSize()[::-1] and result.mask.all()
    for attr in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        assert getattr(result.label, attr)() == getattr(image, attr)()
    prob = pipe.probability(pipe.prepare(image), ((20, 28), (24, 40), (24, 40)))
    assert prob.shape == (8, 16, 16) and 0.0 < prob.min() < prob.max() < 1.0


# --- (d) CPU options: a coarser grid, the Dice term -----------------------------------------------

def test_training_with_spacing_prepares_the_array_the_pipeline_runs_on(tmp_path, tiny_ggpfn_job):
    """--spacing: the cached volumes are resampled to it (its own cache entry), and are the very
    array the pipeline's ``spacing`` gives the networks."""
    from PancreasC2FLib.io.bundle import save_bundle
    from Training.train import prepare

    job, images = tiny_ggpfn_job
    job.settings["spacing"] = [4.0, 3.0, 2.5]
    train, val, cache = prepare(job, log=lambda *a: None)
    vol = train[0]
    assert vol.spacing == (2.5, 3.0, 4.0)  # z, y, x
    assert cache.settings["spacing"] == [4.0, 3.0, 2.5]
    # the phantom is 24 x 40 x 36 voxels of 2 mm (z, y, x)
    assert vol.image.shape == vol.label.shape == (round(24 * 2 / 2.5), round(40 * 2 / 3), round(36 * 2 / 4))
    assert vol.label.any()
    native, _, native_cache = prepare(_with_settings(job, spacing=None), log=lambda *a: None)
    assert native_cache.folder != cache.folder and native[0].image.shape == (24, 40, 36)
    # The pipeline with the same spacing feeds the networks exactly this array.
    net = GGPFNViews(["axial"], **NET_ARGS)
    meta = tu.fixture_metadata("fang-ggpfn", "t", tu.FIXED_PREPROCESSING, {"ggpfn": {"network": {"arch": "ggpfn-views", "args": {"views": ["axial"], **NET_ARGS}}, "patch": [16, 16], "spacing": [4.0, 3.0, 2.5]}})
    save_bundle(tmp_path / "b", {"ggpfn": net.eval()}, meta)
    pipe = create_pipeline(load_bundle(tmp_path / "b"), device="cpu")
    case = pipe.prepare(sitk.ReadImage(str(images / "case0.nii.gz")))
    x, _ = pipe.stage_input(case, None, pipe.stage_config("ggpfn")["spacing"])
    np.testing.assert_allclose(np.asarray(vol.image), x, atol=1e-5)


def _with_settings(job, **settings):
    import copy

    out = copy.deepcopy(job)
    out.settings.update(settings)
    return out


@pytest.fixture
def tiny_ggpfn_job(tmp_path):
    from Training.train import StageJob

    images, labels = tu.phantom_dataset(tmp_path, shape_zyx=(24, 40, 36), radii_vox=(4, 6, 7))
    job = StageJob(stage="ggpfn", data=str(images), labels=str(labels), out=str(tmp_path / "run"), pipeline="fang-ggpfn", val_count=1,
                   settings={"patch": [16, 16]}, network_args=dict(NET_ARGS), preprocessing=dict(tu.FIXED_PREPROCESSING), cache=str(tmp_path / "cache"), check=False)
    return job, images


def test_dice_weight_makes_the_loss():
    """The recipe builds Eq. 2 alone by default and adds the Dice term for ``dice_weight``."""
    stage = recipe("fang-ggpfn").stages["ggpfn"]
    assert stage.settings["dice_weight"] == 0.0 and stage.make_loss(stage.settings).dice_weight == 0.0
    weighted = stage.make_loss({**stage.settings, "dice_weight": 1.5})
    assert weighted.dice_weight == 1.5
    torch.manual_seed(0)
    out = {"main": torch.randn(2, 1, 8, 8), "encoder": [torch.randn(2, 1, 8 >> j, 8 >> j) for j in range(4)]}
    target = torch.zeros(2, 8, 8)
    target[:, 2:6, 2:6] = 1
    plain = stage.make_loss(stage.settings)
    plain.alpha = plain.beta = weighted.alpha = weighted.beta = 0.0
    from Training.losses_rstn_ggpfn import batch_dsc_loss

    assert weighted(out, target, None)[0].item() == pytest.approx(plain(out, target, None)[0].item() + 1.5 * batch_dsc_loss(out["main"], target).item(), rel=1e-6)
    with pytest.raises(ValueError, match="dice_weight"):
        stage.make_loss({"dice_weight": -1})
