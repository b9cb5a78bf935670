"""``--preset paper`` for each of the five pipelines (issue 17): it exists for every bundle, sets
the paper's test-time settings and only those, and changes what the pipeline does (windows, tiles,
patches, rounds). Also the settings behind it: Roth's per-voxel tile coverage and Fang's per-view
patch and global sizes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import c2f_testutils as tu
from PancreasC2FLib.errors import InputError
from PancreasC2FLib.io.bundle import load_bundle, save_bundle
from PancreasC2FLib.networks.ggpfn import GGPFNViews
from PancreasC2FLib.networks.rstn import RSTNStage
from PancreasC2FLib.pipelines import create_pipeline
from PancreasC2FLib.processing.sliding_window import coverage_counts, n_for_coverage, window_count
from test_ggpfn import NET_ARGS, ggpfn_metadata
from test_roth_cascade import band_roth_bundle
from test_rstn import ARGS as RSTN_ARGS, rstn_metadata
from test_zhao_two_stage import zhao_metadata

VIEWS = ["coronal", "sagittal", "axial"]


def _band_spec():
    args = {"lo": tu.hu_to_fixed(tu.BAND_HU[0]), "hi": tu.hu_to_fixed(tu.BAND_HU[1]), "gain": 20.0}
    return tu.IntensityBandNet(**args), {"arch": tu.IntensityBandNet.arch, "args": args}


def _zhao(path: Path) -> Path:
    net, spec = _band_spec()
    md = zhao_metadata({"stage1": spec, "stage2": spec}, path.name, tu.FIXED_PREPROCESSING)
    md["stages"]["stage1"]["low_margin"], md["stages"]["stage2"]["margin"] = 1, 4  # not the paper's
    md["postprocess"] = {"min_island_fraction": 0.3, "coarse_min_island_fraction": 0.3}
    save_bundle(path, {"stage1": net, "stage2": net}, md)
    return path


def _rstn(path: Path) -> Path:
    torch.manual_seed(0)
    coarse, fine = RSTNStage(**RSTN_ARGS), RSTNStage(**RSTN_ARGS, saliency_kernel=3, saliency_layers=2)
    with torch.no_grad():
        for net in [*coarse.nets.values(), *fine.nets.values()]:
            net.classifier.weight.zero_()
            net.classifier.bias.fill_(5.0)
    md = rstn_metadata(path.name, max_rounds=3)
    md["stages"]["coarse"]["views"] = ["axial"]  # a fast model setting; the paper uses all views
    save_bundle(path, {"coarse": coarse.eval(), "fine": fine.eval()}, md)
    return path


def _ggpfn(path: Path, per_view: dict | None = None, patch=(16, 16)) -> Path:
    torch.manual_seed(0)
    extra = {"per_view": per_view} if per_view else {}
    net = GGPFNViews(views=VIEWS, **NET_ARGS, **extra)
    with torch.no_grad():
        for n in net.nets.values():
            n.classifier.weight.zero_()
            n.classifier.bias.fill_(5.0)
    md = ggpfn_metadata(path.name, {"arch": "ggpfn-views", "args": {"views": VIEWS, **NET_ARGS, **extra}}, {"clip": [-100, 240], "normalize": "case_zscore"})
    md["stages"]["ggpfn"]["patch"] = patch if isinstance(patch, dict) else list(patch)
    md["stages"]["ggpfn"]["view_weights"] = {"axial": 0.8, "sagittal": 0.1, "coronal": 0.1}
    save_bundle(path, {"ggpfn": net.eval()}, md)
    return path


BUILDERS = {
    "resdsn-c2f": lambda p: tu.band_bundle(p, name=p.name),
    "roth-cascade": band_roth_bundle,
    "zhao-two-stage": _zhao,
    "yu-rstn": _rstn,
    "fang-ggpfn": _ggpfn,
}

# What ``paper`` must set, per pipeline (settings the tiny bundles give other values).
PAPER = {
    "resdsn-c2f": {"stages": {"coarse": {"n": 6}, "fine": {"n": 12}}},
    "roth-cascade": {"stages": {"stage1": {"n": 0}, "stage2": {"coverage": 4}}, "postprocess": {"min_island_fraction": 0.0}},
    "zhao-two-stage": {"stages": {"stage1": {"low_margin": 2}, "stage2": {"margin": 10}}, "postprocess": {"min_island_fraction": 0.0, "coarse_min_island_fraction": 0.0}},
    "yu-rstn": {"stages": {"coarse": {"views": VIEWS}, "fine": {"max_rounds": 10, "stop_dsc": 0.95, "margin": 20}}},
    "fang-ggpfn": {"stages": {"ggpfn": {"whole_slice": True, "views": VIEWS, "view_weights": {v: 1.0 for v in VIEWS}}}},
}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("paper")
    return {name: build(root / name) for name, build in BUILDERS.items()}


def _image(shape=(16, 24, 24)):
    hu, label = tu.phantom_arrays(shape, radii_vox=(4, 5, 6), island=False)
    return tu.image_from_canonical(hu), label


def _contains(config: dict, expected: dict) -> bool:
    return all(_contains(config[k], v) if isinstance(v, dict) else config.get(k) == v for k, v in expected.items())


def _messages(pipe, image) -> list[str]:
    seen = []
    pipe.run(image, progress=lambda stage, frac, msg: seen.append(msg))
    return seen


@pytest.mark.parametrize("name", list(BUILDERS))
def test_paper_preset_exists_sets_the_paper_and_runs(bundles, name):
    bundle = load_bundle(bundles[name])
    assert "presets" not in bundle.metadata or "paper" not in bundle.metadata["presets"]  # the pipeline's own
    default = create_pipeline(bundle, device="cpu", preset="default")
    paper = create_pipeline(bundle, device="cpu", preset="paper")
    assert not _contains(default.config, PAPER[name]) and _contains(paper.config, PAPER[name])
    # Only test-time settings: what the networks were trained on stays the bundle's.
    for stage, cfg in default.config["stages"].items():
        for key in ("window", "spacing", "downsample", "threshold", "patch"):
            assert paper.config["stages"][stage].get(key) == cfg.get(key)
    assert paper.preprocessing == default.preprocessing
    params = paper.parameters()
    assert params["preset"] == "paper" and _contains(params["preset_settings"], PAPER[name])
    image, _ = _image()
    assert paper.run(image).label.GetSize() == image.GetSize()


def test_paper_windows_resdsn_and_roth(bundles):
    image, _ = tu.phantom_case()
    count = lambda msgs, stage: [int(m.split()[1]) for m in msgs if m.startswith(f"{stage}: ") and m.endswith("windows on cpu")]  # noqa: E731
    res = load_bundle(bundles["resdsn-c2f"])
    small = {"stages": {"fine": {"window": [16, 16, 16]}}}  # the band stub works on any window; the box spans several
    d = _messages(create_pipeline(res, device="cpu", preset="default", overrides=small), image)
    p = _messages(create_pipeline(res, device="cpu", preset="paper", overrides=small), image)
    assert count(p, "fine")[0] > count(d, "fine")[0]
    roth = load_bundle(bundles["roth-cascade"])
    small = {"stages": {"stage2": {"window": [8, 8, 8]}}}  # C2's box spans several tiles
    d = _messages(create_pipeline(roth, device="cpu", preset="default", overrides={"stages": {"stage2": {"n": 0, "window": [8, 8, 8]}}}), image)
    p = _messages(create_pipeline(roth, device="cpu", preset="paper", overrides=small), image)
    # Stage 2: each voxel sampled about 4 times where stage 1's side-by-side tiles sample it once.
    assert count(p, "stage2")[0] >= 2 * count(d, "stage2")[0]


def test_paper_fang_one_patch_per_slice_and_yu_rounds(bundles):
    image, _ = _image()
    bundle = load_bundle(bundles["fang-ggpfn"])
    # 24 x 24 slices, 16-pixel patches: 2 x 2 patches per slice; the paper's N = 1: one.
    jobs = lambda msgs: max(int(m.rsplit("/", 1)[1]) for m in msgs if "axial: patch" in m)  # noqa: E731
    assert jobs(_messages(create_pipeline(bundle, device="cpu", preset="default"), image)) == 16 * 4
    assert jobs(_messages(create_pipeline(bundle, device="cpu", preset="paper"), image)) == 16
    rstn = create_pipeline(load_bundle(bundles["yu-rstn"]), device="cpu", preset="paper")
    assert rstn.views() == VIEWS
    assert rstn.run(image).region.extra["views"] == VIEWS


def test_cli_preset_paper_records_what_it_changed(tmp_path, bundles):
    from PancreasC2FLib.apps.cli import main

    image, _ = _image()
    ct, out, report = tmp_path / "ct.nii.gz", tmp_path / "seg.nii.gz", tmp_path / "report.json"
    sitk.WriteImage(image, str(ct))
    assert main(["segment", str(ct), "--model", str(bundles["zhao-two-stage"]), "--preset", "paper", "-o", str(out), "--report", str(report), "--quiet", "--device", "cpu"]) == 0
    params = json.loads(report.read_text())["parameters"]
    assert params["preset"] == "paper" and params["preset_settings"]["stages"]["stage2"]["margin"] == 10
    # An unknown preset is still a usage error naming the ones the model has.
    with pytest.raises(InputError, match="paper"):
        create_pipeline(load_bundle(bundles["zhao-two-stage"]), device="cpu", preset="fast")


def test_coverage_n_samples_each_voxel_four_times():
    for shape in [(200, 180, 90), (100, 40, 300), (130, 130, 130)]:
        n = n_for_coverage(shape, (64, 64, 64), 4)
        assert coverage_counts(shape, (64, 64, 64), n).mean() >= 4
        assert n == 0 or coverage_counts(shape, (64, 64, 64), n - 1).mean() < 4  # the smallest
        assert window_count(shape, (64, 64, 64), n) > window_count(shape, (64, 64, 64), 0)
    # Too small for 4: every position used, no endless search.
    n = n_for_coverage((66, 64, 64), (64, 64, 64), 4)
    assert window_count((66, 64, 64), (64, 64, 64), n) == 3


def test_fang_per_view_patch_and_global_size(tmp_path):
    """The paper's MSD setting: other patch and h_g for sagittal and coronal than for axial."""
    per_view = {v: {"global_size": [8, 16]} for v in ("sagittal", "coronal")}
    path = _ggpfn(tmp_path / "msd", per_view=per_view, patch={"axial": [16, 16], "sagittal": [8, 16], "coronal": [8, 16]})
    bundle = load_bundle(path)
    net = bundle.networks["ggpfn"]
    assert net.nets["axial"].global_size == (16, 16) and net.nets["sagittal"].global_size == (8, 16)
    image, _ = _image()
    msgs = _messages(create_pipeline(bundle, device="cpu", preset="default"), image)
    jobs = {v: max(int(m.rsplit("/", 1)[1]) for m in msgs if f"{v}: patch" in m) for v in VIEWS}
    # 16 x 24 x 24 volume: axial 24 x 24 slices in 2 x 2 patches of 16; sagittal/coronal 16 x 24
    # slices in 8 x 16 patches overlapping by 4: 3 x 2 per slice (24 slices each).
    assert jobs == {"axial": 16 * 4, "sagittal": 24 * 6, "coronal": 24 * 6}
    with pytest.raises(ValueError, match="per_view"):
        GGPFNViews(views=["axial"], per_view={"sagittal": {}}, **NET_ARGS)
    # Training draws each view's own patch size.
    from Training.ggpfn_training import SliceSampler
    from Training.datasets import StageVolume

    hu, label = tu.phantom_arrays((16, 24, 24), radii_vox=(4, 5, 6), island=False)
    sampler = SliceSampler({"axial": [16, 16], "sagittal": [8, 16], "coronal": [8, 16]})
    vol = StageVolume("p", hu.astype(np.float32), label.astype(np.uint8), (1.0, 1.0, 1.0))
    rng = np.random.default_rng(0)
    assert sampler.sample(vol, "axial", rng, 9, (16, 16))["x"].shape == (9, 16, 16)
    assert sampler.sample(vol, "sagittal", rng, 9, (8, 16))["x"].shape == (9, 8, 16)
