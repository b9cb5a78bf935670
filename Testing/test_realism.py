"""Real-CT realism: generator version 2, the realism report, the region figures of evaluate, the
one-case folder layout, intensity augmentation and fine-tuning from a bundle (Training/README.md,
"Real CT")."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from PancreasC2FLib.synthetic import generate_small_case
from PancreasC2FLib.synthetic.case import atrophy_draws, realism_draws
from PancreasC2FLib.synthetic.intensities import _SOFT, _TI, _TISSUES
from PancreasC2FLib.synthetic.render import _realistic_soft_tissue


def _arr(img):
    return sitk.GetArrayFromImage(img)


@pytest.fixture(scope="module")
def v2_case():
    return generate_small_case(3, with_labels=True)


def test_version_2_is_the_default_and_version_1_is_kept(v2_case):
    v1 = generate_small_case(3, version=1)
    assert v2_case.params["generator_version"] == 2 and "realism" in v2_case.params
    assert v1.params["generator_version"] == 1 and "realism" not in v1.params
    # same anatomy draw (the version-2 draws come from their own stream), another rendering
    assert v1.params["anatomy"] == v2_case.params["anatomy"] and v1.params["scale"] == v2_case.params["scale"]
    assert not np.array_equal(_arr(v1.image), _arr(v2_case.image))
    again = generate_small_case(3, version=1)
    assert np.array_equal(_arr(v1.image), _arr(again.image))


def test_version_3_makes_some_pancreases_atrophic():
    """Version 3: in some cases the pancreas keeps only part of its volume, its lost surface turned
    to fat in the image and gone from the label; other cases are version 2's, voxel for voxel."""
    draws = {s: atrophy_draws(s)["pancreas_kept"] for s in range(20)}
    atrophic = [s for s, k in draws.items() if k < 1.0]
    assert 0 < len(atrophic) < 20 and all(0.35 <= draws[s] <= 0.85 for s in atrophic)
    seed = atrophic[0]
    full, small = generate_small_case(seed, version=2), generate_small_case(seed, version=3)
    a2, a3 = _arr(full.label) > 0, _arr(small.label) > 0
    assert small.params["generator_version"] == 3 and small.params["pancreas_atrophy_kept"] == pytest.approx(draws[seed], abs=0.01)
    assert a3.sum() / a2.sum() == pytest.approx(draws[seed], abs=0.1)
    assert (a3 & ~a2).sum() <= 0.02 * a3.sum()  # inside the full pancreas
    lost = a2 & ~a3
    assert _arr(small.image)[lost].mean() < _arr(full.image)[lost].mean() - 30  # now fat
    same = next(s for s, k in draws.items() if k == 1.0)
    assert np.array_equal(_arr(generate_small_case(same, version=3).image), _arr(generate_small_case(same, version=2).image))


def test_labels_are_the_source_structures_on_the_output_grid(v2_case):
    labels = v2_case.labels
    assert labels is not None and labels.GetSize() == v2_case.image.GetSize()
    assert labels.GetOrigin() == v2_case.image.GetOrigin() and labels.GetDirection() == v2_case.image.GetDirection()
    panc = _arr(v2_case.label) > 0
    src = _arr(labels)
    # the pancreas label is an iso-contour of the same structure: nearly the same voxels
    agreement = (src[panc] == 7).mean()
    assert agreement > 0.8
    assert len(np.unique(src)) > 5  # liver, vessels, bowel, ... around the pancreas
    assert generate_small_case(3).labels is None


def test_realism_draws_cover_pelvis_archives_and_randomised_intensities():
    draws = [realism_draws(s) for s in range(200)]
    fovs = {d["fov"] for d in draws}
    assert fovs == {"upper-abdomen", "abdomen", "abdomen-pelvis"}
    archive = [d["archive_xy"] for d in draws if d["archive_xy"] is not None]
    assert 0.15 < len(archive) / len(draws) < 0.35 and min(archive) >= 1.2 and max(archive) <= 3.0
    assert 0.1 < np.mean([d["randomize"] for d in draws]) < 0.3
    a, b = realism_draws(5), realism_draws(5)  # reproducible
    assert np.array_equal(a.pop("jitter"), b.pop("jitter")) and a == b


def test_soft_tissues_overlap_fat_and_air_do_not_move():
    base = np.array([np.mean(t[1]) for t in _TISSUES], np.float32)  # non-contrast midpoints
    soft = [_TI[n] for n in _SOFT]
    hard = [i for i in range(len(_TISSUES)) if i not in soft]
    rand = base.copy()
    _realistic_soft_tissue(rand, {**realism_draws(0), "randomize": True, "randomize_seed": 1})
    assert np.all((rand[soft] >= -40) & (rand[soft] <= 160)) and np.array_equal(rand[hard], base[hard])
    comp = base.copy()
    draw = {**realism_draws(0), "randomize": False, "soft_tissue_compression": 0.5, "soft_tissue_level": 30.0, "jitter": np.zeros(64)}
    _realistic_soft_tissue(comp, draw)
    assert np.ptp(comp[soft]) == pytest.approx(0.5 * np.ptp(base[soft]), rel=1e-5)
    assert np.array_equal(comp[hard], base[hard])


def test_realism_report_on_a_real_layout_and_synthetic_cases(tmp_path, v2_case):
    from Training.realism import measure, real_cases, realism_report, synthetic_cases

    real_dir = tmp_path / "real"
    real_dir.mkdir()
    sitk.WriteImage(v2_case.image, str(real_dir / "ct.nii.gz"))
    sitk.WriteImage(v2_case.labels, str(real_dir / "labels.nii.gz"))
    real = real_cases(real_dir)
    assert len(real) == 1 and real[0].kind == "real"
    row = measure(real[0])
    vals = _arr(v2_case.image)[_arr(v2_case.labels) == 7]
    assert row["pancreas_median"] == pytest.approx(float(np.median(vals)))
    assert row["noise_hu"] > 0 and -1 < row["noise_correlation"] < 1
    assert row["fov_z_mm"] == pytest.approx((v2_case.image.GetSize()[2] - 1) * v2_case.image.GetSpacing()[2])
    synth = synthetic_cases(1, 40, {"spacing": [2.0, 2.0, 2.0], "size": [80, 80, 48], "center_on_pancreas": True})
    rows = realism_report(real, synth, tmp_path / "out", log=lambda *_: None)
    assert [r["kind"] for r in rows] == ["real", "synthetic"]
    for name in ("realism.csv", "realism.md", "realism.png"):
        assert (tmp_path / "out" / name).stat().st_size > 100
    assert "| pancreas median HU" in (tmp_path / "out" / "realism.md").read_text(encoding="utf-8")
    with pytest.raises(FileNotFoundError):
        real_cases(tmp_path / "out")


def test_region_figures():
    from Training.evaluate import region_figures

    truth = np.zeros((40, 40, 40), np.uint8)
    truth[10:20, 10:20, 10:20] = 1
    sp = (2.0, 2.0, 2.0)
    full = region_figures(((0, 40), (0, 40), (0, 40)), truth, sp)
    assert full["region_coverage"] == 1.0
    assert full["region_size_ratio"] == pytest.approx(80.0 / (20.0 + 40.0))
    half = region_figures(((0, 15), (0, 40), (0, 40)), truth, sp)
    assert half["region_coverage"] == pytest.approx(0.5)
    assert region_figures(None, truth, sp)["region_coverage"] == 0.0


def test_one_case_folder_is_a_dataset(tmp_path, v2_case):
    from Training.datasets import dataset_identity, open_dataset

    sitk.WriteImage(v2_case.image, str(tmp_path / "ct.nii.gz"))
    sitk.WriteImage(v2_case.label, str(tmp_path / "pancreas.nii.gz"))
    cases = open_dataset(str(tmp_path))
    assert [c.name for c in cases] == [tmp_path.name]
    image, label = cases[0].load()
    assert image.GetSize() == v2_case.image.GetSize() and _arr(label).sum() == _arr(v2_case.label).sum()
    # another generator version renders other images from the same seeds: another cache
    assert dataset_identity("synthetic:4") != dataset_identity("synthetic:4", synthetic_options={"version": 1})


def test_intensity_augmentation_changes_the_image_only():
    from Training import augment

    rng = np.random.default_rng(0)
    img = rng.normal(size=(24, 24, 24)).astype(np.float32)
    lab = (img > 1).astype(np.uint8)
    saved = dict(augment.INTENSITY)
    try:
        for name in saved:
            for k in augment.INTENSITY:
                augment.INTENSITY[k] = (1.0 if k == name else 0.0, saved[k][1])
            out = augment.intensity(img, np.random.default_rng(1))
            assert out.shape == img.shape and out.dtype == np.float32, name
            assert not np.allclose(out, img), name
    finally:
        augment.INTENSITY.update(saved)
    a, la = augment.AUGMENTATIONS["flip+intensity"](img, lab, np.random.default_rng(2))
    b, lb = augment.AUGMENTATIONS["flip+intensity"](img, lab, np.random.default_rng(2))
    assert np.array_equal(a, b) and np.array_equal(la, lb)
    g, lg = augment.AUGMENTATIONS["flip"](img, lab, np.random.default_rng(2))
    assert np.array_equal(lg, la)  # the same geometric draw; the label is never blurred


def test_fine_tuning_starts_from_the_bundle_weights(tiny_bundle):
    from PancreasC2FLib.io.bundle import load_bundle
    from PancreasC2FLib.networks import build_network
    from Training.train import initialise_from_bundle

    spec = load_bundle(tiny_bundle).stage("fine")["network"]
    net = build_network(spec["arch"], dict(spec["args"]))
    prov = initialise_from_bundle(net, {"arch": spec["arch"], "args": dict(spec["args"])}, str(tiny_bundle), "fine")
    ref = load_bundle(tiny_bundle).networks["fine"].state_dict()
    for k, v in net.state_dict().items():
        assert torch.equal(v, ref[k]), k
    assert prov["model_name"] == "tiny-resdsn"
    with pytest.raises(ValueError, match="differs"):
        initialise_from_bundle(build_network(spec["arch"], {**spec["args"], "width": 2}), {"arch": spec["arch"], "args": {**spec["args"], "width": 2}}, str(tiny_bundle), "fine")
    with pytest.raises(ValueError, match="no stage"):
        initialise_from_bundle(net, spec, str(tiny_bundle), "stage9")


def test_model_card_records_the_real_ct_check(tmp_path, forced_bundle, phantom_ct):
    """evaluate on a one-case folder (the real-CT layout), then the card in model.json."""
    import json
    import shutil

    from PancreasC2FLib.io.bundle import load_bundle
    from Training.card import write_model_card
    from Training.datasets import open_dataset
    from Training.evaluate import evaluate

    case = tmp_path / "real-like"
    case.mkdir()
    sitk.WriteImage(phantom_ct.image, str(case / "ct.nii.gz"))
    sitk.WriteImage(phantom_ct.label, str(case / "pancreas.nii.gz"))
    out = evaluate(forced_bundle, open_dataset(str(case)), tmp_path / "eval", methods=("c2f", "coarse"), log=lambda *_: None)
    row = out["rows"][0]
    assert row["c2f_dsc"] > 0.9 and row["region_coverage"] == pytest.approx(1.0) and 0.3 < row["region_size_ratio"] < 3.0
    bundle = tmp_path / "bundle"
    shutil.copytree(forced_bundle, bundle)
    card = write_model_card(bundle, [("phantom (real-CT layout)", tmp_path / "eval")], training_data="phantoms")
    md = json.loads((bundle / "model.json").read_text(encoding="utf-8"))
    assert md["model_card"] == card
    checked = md["model_card"]["checked_on"][0]
    assert checked["data"] == "phantom (real-CT layout)" and checked["cases"][0]["case"] == "real-like"
    assert float(checked["cases"][0]["c2f_dsc"]) == pytest.approx(row["c2f_dsc"], abs=1e-4)
    assert "not for clinical use" in md["model_card"]["intended_use"]
    load_bundle(bundle)  # the weights still verify
