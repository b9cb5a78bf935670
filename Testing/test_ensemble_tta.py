"""Test-time flips and fold ensembles in one bundle (PancreasC2FLib/networks/ensemble.py,
``--tta``, ``python -m Training ensemble``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import c2f_testutils as tu
from PancreasC2FLib.io.bundle import load_bundle
from PancreasC2FLib.networks.ensemble import FLIP_SETS, Ensemble, FlipAverage, members_of
from PancreasC2FLib.networks.resdsn import ResDSN
from PancreasC2FLib.io.roi import box_to_roi_dict
from PancreasC2FLib.pipelines import create_pipeline
from PancreasC2FLib.processing.quality import MemberAgreement, assess

SPEC = {"arch": "resdsn", "args": {"in_channels": 1, "num_classes": 2, "width": 4}}


def _probs(net, x):
    with torch.no_grad():
        return torch.softmax(net(x), dim=1)


def test_ensemble_averages_the_members_probabilities():
    torch.manual_seed(0)
    ens = Ensemble(SPEC, 2).eval()
    x = torch.randn(1, 1, 16, 16, 16)
    expected = (_probs(ens.members[0], x) + _probs(ens.members[1], x)) / 2
    assert torch.allclose(_probs(ens, x), expected, atol=1e-5)
    assert not torch.allclose(_probs(ens.members[0], x), expected, atol=1e-3)  # the members differ


def test_ensemble_refuses_unknown_networks_and_sigmoid_ensembles_are_not_called():
    with pytest.raises(ValueError, match="ensemble holds"):
        Ensemble({"arch": "intensity-band", "args": {}}, 2)
    ens = Ensemble({"arch": "rstn-stage", "args": {"views": ["axial"], "width": 2, "levels": 2}}, 2)
    with pytest.raises(TypeError, match="run by its pipeline"):
        ens(torch.zeros(1, 3, 8, 8))
    assert members_of(ens) == list(ens.members) and members_of(ens.members[0]) == [ens.members[0]]


def test_flip_average_is_the_mean_over_the_eight_mirrorings():
    torch.manual_seed(1)
    net = ResDSN(width=4).eval()
    x = torch.randn(1, 1, 16, 16, 16)
    manual = sum(_probs(net, x.flip(a)).flip(a) if a else _probs(net, x) for a in FLIP_SETS) / len(FLIP_SETS)
    assert len(FLIP_SETS) == 8
    assert torch.allclose(_probs(FlipAverage(net), x), manual, atol=1e-5)
    assert not torch.allclose(_probs(net, x), manual, atol=1e-3)


def test_tta_setting_runs_and_is_recorded(tiny_bundle):
    from PancreasC2FLib.processing.sliding_window import predict_foreground

    bundle = load_bundle(tiny_bundle)
    plain = create_pipeline(bundle, threads=1, preset="default")
    tta = create_pipeline(bundle, threads=1, preset="default", overrides={"stages": {"coarse": {"tta": "flips"}, "fine": {"tta": "flips"}}})
    assert isinstance(tta.net("fine"), FlipAverage) and not isinstance(plain.net("fine"), FlipAverage)
    assert tta.parameters()["stages"]["fine"]["tta"] == "flips"  # recorded in every output
    vol = np.random.default_rng(0).normal(size=(32, 32, 32)).astype(np.float32)
    a = predict_foreground(tta.net("fine"), vol, (32, 32, 32), 1, tta.inference)
    b = predict_foreground(plain.net("fine"), vol, (32, 32, 32), 1, plain.inference)
    assert a.shape == b.shape and not np.allclose(a, b, atol=1e-4)


def test_bad_tta_value_is_refused(tiny_bundle):
    from PancreasC2FLib.errors import ModelError

    with pytest.raises(ModelError, match="tta"):
        create_pipeline(load_bundle(tiny_bundle), threads=1, overrides={"stages": {"fine": {"tta": "rotations"}}})


def test_tta_command_line_flag(tiny_bundle):
    import argparse

    from PancreasC2FLib.pipelines.options import add_model_options, pipeline_from_args

    p = argparse.ArgumentParser()
    add_model_options(p)
    pipe = pipeline_from_args(p.parse_args(["--model", str(tiny_bundle), "--tta", "--threads", "1"]))
    assert all(pipe.stage_config(s)["tta"] == "flips" for s in ("coarse", "fine"))
    pipe = pipeline_from_args(p.parse_args(["--model", str(tiny_bundle), "--threads", "1"]))
    assert all(pipe.stage_config(s).get("tta", "none") == "none" for s in ("coarse", "fine"))


def test_ensemble_bundle_from_folds(tmp_path):
    from Training.__main__ import main

    folds = tmp_path / "cv"
    tu.resdsn_bundle(folds / "fold0", seed=0)
    tu.resdsn_bundle(folds / "fold1", seed=1)
    md = json.loads((folds / "fold1" / "model.json").read_text())
    md["stages"]["fine"]["threshold"] = 0.3  # per-fold calibration
    (folds / "fold1" / "model.json").write_text(json.dumps(md))
    # model.json changed, sha256s of weights unchanged: still a valid bundle
    out = tmp_path / "ens"
    assert main(["ensemble", str(folds), "--out", str(out), "--name", "cv-ensemble"]) == 0
    ens = load_bundle(out)
    fine = ens.metadata["stages"]["fine"]
    assert fine["network"]["arch"] == "ensemble" and fine["network"]["args"]["count"] == 2
    assert fine["threshold"] == pytest.approx((0.5 + 0.3) / 2)
    assert [m["folder"] for m in ens.metadata["training"]["ensemble"]] == [str(folds / "fold0"), str(folds / "fold1")]
    x = torch.randn(1, 1, 16, 16, 16)
    members = [load_bundle(folds / f"fold{k}").networks["fine"] for k in (0, 1)]
    assert torch.allclose(_probs(ens.networks["fine"], x), (_probs(members[0], x) + _probs(members[1], x)) / 2, atol=1e-5)
    create_pipeline(ens, threads=1)  # a runnable bundle
    # a fold without a calibrated threshold does not count in the mean
    del md["stages"]["fine"]["threshold"]
    (folds / "fold1" / "model.json").write_text(json.dumps(md))
    assert main(["ensemble", str(folds), "--out", str(tmp_path / "ens-one-calibrated"), "--name", "cv"]) == 0
    assert load_bundle(tmp_path / "ens-one-calibrated").metadata["stages"]["fine"]["threshold"] == pytest.approx(0.5)
    # one bundle is not an ensemble; an existing output is refused
    assert main(["ensemble", str(folds / "fold0"), "--out", str(tmp_path / "one"), "--name", "x"]) == 2
    assert main(["ensemble", str(folds), "--out", str(out), "--name", "cv-ensemble"]) == 4


def _tiny_rstn(path, seed: int, fine_threshold: float, coarse_gain: float = 1.0):
    """Random tiny RSTN networks; ``coarse_gain`` scales the coarse classifiers' weights, so that
    the coarse maps vary across the image instead of sitting near one value."""
    from PancreasC2FLib.io.bundle import save_bundle
    from PancreasC2FLib.networks.rstn import RSTNStage
    from test_rstn import ARGS, rstn_metadata

    torch.manual_seed(seed)
    nets = {"coarse": RSTNStage(**ARGS).eval(), "fine": RSTNStage(**ARGS, saliency_kernel=3, saliency_layers=2).eval()}
    with torch.no_grad():
        for net in nets["coarse"].nets.values():
            net.classifier.weight.mul_(coarse_gain)
    md = rstn_metadata(path.name)
    md["stages"]["fine"]["threshold"] = fine_threshold
    save_bundle(path, nets, md)
    return path


def test_weight_mean_bundle_holds_the_mixed_weights(tmp_path):
    """``ensemble --mean-weights --mix``: one network per stage whose every weight is the mixed
    mean of the members' (here of a sigmoid pipeline)."""
    from Training.__main__ import main

    a, b = _tiny_rstn(tmp_path / "a", 0, 0.5), _tiny_rstn(tmp_path / "b", 1, 0.3)
    out = tmp_path / "soup"
    assert main(["ensemble", str(a), str(b), "--mean-weights", "--mix", "0.25", "0.75", "--out", str(out), "--name", "soup", "--version", "2"]) == 0
    soup, ma, mb = load_bundle(out), load_bundle(a), load_bundle(b)
    assert soup.metadata["version"] == "2" and soup.pipeline == "yu-rstn"
    for stage in ("coarse", "fine"):
        assert soup.metadata["stages"][stage]["network"] == ma.metadata["stages"][stage]["network"]  # one network, not an ensemble
        sa, sb = ma.networks[stage].state_dict(), mb.networks[stage].state_dict()
        floats = [k for k, v in soup.networks[stage].state_dict().items() if v.is_floating_point()]
        for k in floats:
            assert torch.allclose(soup.networks[stage].state_dict()[k], 0.25 * sa[k] + 0.75 * sb[k], atol=1e-6), k
        assert any(not torch.allclose(sa[k], sb[k]) for k in floats)  # the members differ: the mean is no copy
    assert soup.metadata["stages"]["fine"]["threshold"] == pytest.approx(0.25 * 0.5 + 0.75 * 0.3)
    record = soup.metadata["training"]["weight_mean"]
    assert [(m["folder"], m["mix"], m["model_sha256"]) for m in record] == [(str(a), 0.25, ma.sha256), (str(b), 0.75, mb.sha256)]
    create_pipeline(soup, threads=1)  # a runnable bundle
    # equal weights by default; a mix that does not sum to 1, or --mix without --mean-weights, is refused
    assert main(["ensemble", str(a), str(b), "--mean-weights", "--out", str(tmp_path / "eq"), "--name", "eq"]) == 0
    assert load_bundle(tmp_path / "eq").metadata["stages"]["fine"]["threshold"] == pytest.approx(0.4)
    assert main(["ensemble", str(a), str(b), "--mean-weights", "--mix", "0.5", "0.6", "--out", str(tmp_path / "bad"), "--name", "x"]) == 2
    assert main(["ensemble", str(a), str(b), "--mix", "0.5", "0.5", "--out", str(tmp_path / "bad"), "--name", "x"]) == 2
    assert not (tmp_path / "bad").exists()
    # runs of different recipes (here: another fine-stage margin) are refused
    md = json.loads((b / "model.json").read_text())
    md["stages"]["fine"]["margin"] = 9
    (b / "model.json").write_text(json.dumps(md))
    assert main(["ensemble", str(a), str(b), "--mean-weights", "--out", str(tmp_path / "bad"), "--name", "x"]) == 2


def test_a_stage_the_members_share_stays_one_network(tmp_path):
    """Runs that trained stage 2 only (``--stages stage2``) carry stage 1 unchanged: the ensemble
    keeps that stage as one network and averages the stage that differs."""
    from PancreasC2FLib.io.bundle import save_bundle
    from Training.__main__ import main

    a = load_bundle(tu.resdsn_bundle(tmp_path / "a", seed=0))
    b = load_bundle(tu.resdsn_bundle(tmp_path / "b", seed=1))
    save_bundle(tmp_path / "b2", {"coarse": a.networks["coarse"], "fine": b.networks["fine"]}, b.metadata)
    out = tmp_path / "ens"
    assert main(["ensemble", str(a.path), str(tmp_path / "b2"), "--out", str(out), "--name", "shared"]) == 0
    ens = load_bundle(out)
    assert ens.metadata["stages"]["coarse"]["network"] == a.metadata["stages"]["coarse"]["network"]  # one network
    assert ens.metadata["stages"]["fine"]["network"]["arch"] == "ensemble"
    x = torch.randn(1, 1, 16, 16, 16)
    assert torch.allclose(_probs(ens.networks["coarse"], x), _probs(a.networks["coarse"], x), atol=1e-6)
    assert torch.allclose(_probs(ens.networks["fine"], x), (_probs(a.networks["fine"], x) + _probs(b.networks["fine"], x)) / 2, atol=1e-5)


def test_rstn_ensemble_averages_its_members_in_the_coarse_map_and_every_round(tmp_path):
    """RSTN runs its networks slice by slice with saliency from the previous round, so its
    ensemble is averaged inside the pipeline: the coarse map and each fine round are the members'
    means, and the rounds go on from that shared mean. Its members are compared on the coarse
    maps."""
    from Training.__main__ import main
    from Training.rstn_training import YU_RSTN, init_from_bundle

    a, b = _tiny_rstn(tmp_path / "a", 0, 0.5, coarse_gain=100), _tiny_rstn(tmp_path / "b", 1, 0.3, coarse_gain=100)
    out = tmp_path / "ens"
    assert main(["ensemble", str(a), str(b), "--out", str(out), "--name", "rstn-seeds"]) == 0
    ens = load_bundle(out)
    assert {s: ens.metadata["stages"][s]["network"]["arch"] for s in ("coarse", "fine")} == {"coarse": "ensemble", "fine": "ensemble"}
    assert ens.metadata["stages"]["fine"]["threshold"] == pytest.approx(0.4)
    pipes = [create_pipeline(load_bundle(p), threads=1) for p in (a, b, out)]
    hu, _ = tu.phantom_arrays((12, 16, 16), radii_vox=(3, 4, 4), island=False)
    case = pipes[2].prepare(tu.image_from_canonical(hu))
    grid = pipes[2].grid(case)
    coarse = [p.coarse_prob(grid) for p in pipes]
    assert np.allclose(coarse[2], (coarse[0] + coarse[1]) / 2, atol=1e-5)
    assert not np.allclose(coarse[0], coarse[1], atol=1e-3)  # the members differ
    box = ((2, 10), (3, 13), (3, 13))
    prev_mask = np.zeros(grid.shape, np.uint8)
    prev_mask[4:8, 6:10, 6:10] = 1
    prev_prob = prev_mask * np.float32(0.8)
    fine = [p.fine_round(grid, box, prev_prob, prev_mask) for p in pipes]
    assert np.allclose(fine[2], (fine[0] + fine[1]) / 2, atol=1e-5)
    assert not np.allclose(fine[0], fine[1], atol=1e-3) and fine[2].any()
    # the members compared on their own coarse maps (the fine rounds share one mask)
    agreement = MemberAgreement(0.5)
    assert np.allclose(pipes[2].coarse_prob(grid, agreement=agreement), coarse[2], atol=1e-6)
    expected = _dice(coarse[0] >= 0.5, coarse[1] >= 0.5)
    assert 0 < expected < 1 and agreement.dsc() == pytest.approx(expected, abs=1e-4)
    found = pipes[2].find_region(case)  # the whole scan's coarse maps, kept by a later ROI
    assert found.extra["member_agreement_dsc"] == pytest.approx(expected, abs=1e-4)
    roi = box_to_roi_dict(case.image, case.orientation, box)
    assert pipes[2].region_from_roi(case, roi, previous=found).extra["member_agreement_dsc"] == found.extra["member_agreement_dsc"]
    region = pipes[2].region_from_roi(case, box_to_roi_dict(case.image, case.orientation, box))
    result = pipes[2].segment_region(case, region)  # the coarse maps made inside the ROI's slices
    assert result.mask.shape == case.shape
    assert 0 < assess(result)["member_agreement_dsc"] <= 1  # recorded for the quality flag
    single = pipes[0].segment_region(case, region)  # the same region run by one model keeps no stale score
    assert assess(single)["member_agreement_dsc"] is None
    # an ensemble is no starting point for training
    with pytest.raises(ValueError, match="ensemble"):
        init_from_bundle(None, ens, "axial")
    with pytest.raises(ValueError, match="ensemble"):  # nor a view to take over at export
        YU_RSTN.stage_from_bundle(ens, "axial")


def test_ggpfn_ensemble_averages_its_members_per_view(tmp_path):
    from PancreasC2FLib.io.bundle import save_bundle
    from PancreasC2FLib.networks.ggpfn import GGPFNViews
    from Training.__main__ import main
    from test_ggpfn import NET_ARGS, ggpfn_metadata

    views = ["coronal", "sagittal", "axial"]
    spec = {"arch": "ggpfn-views", "args": {"views": views, **NET_ARGS}}
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        paths.append(tmp_path / f"g{seed}")
        save_bundle(paths[-1], {"ggpfn": GGPFNViews(views=views, **NET_ARGS).eval()}, ggpfn_metadata(f"g{seed}", spec, {"clip": [-100, 240], "normalize": "case_zscore"}))
    out = tmp_path / "ens"
    assert main(["ensemble", *map(str, paths), "--out", str(out), "--name", "ggpfn-seeds"]) == 0
    pipes = [create_pipeline(load_bundle(p), threads=1) for p in (*paths, out)]
    vol = np.random.default_rng(0).normal(size=(8, 16, 16)).astype(np.float32)
    box = ((1, 7), (2, 14), (2, 14))
    probs = [p.views_probability(vol, box) for p in pipes]
    assert np.allclose(probs[2], (probs[0] + probs[1]) / 2, atol=1e-5)
    assert not np.allclose(probs[0], probs[1], atol=1e-3)
    agreement = MemberAgreement(0.5)
    assert np.allclose(pipes[2].views_probability(vol, box, agreement=agreement), probs[2], atol=1e-6)
    assert agreement.dsc() == pytest.approx(_dice(probs[0] >= 0.5, probs[1] >= 0.5), abs=1e-4)


def test_3d_ensemble_runs_its_members_in_turn_and_compares_them(tmp_path):
    """With an agreement to fill, a 3D ensemble stage runs each member's windows (with its flips)
    and returns their mean: the ensemble's own prediction; a whole run records the score."""
    from PancreasC2FLib.processing.sliding_window import predict_foreground
    from Training.__main__ import main

    folds = tmp_path / "cv"
    tu.resdsn_bundle(folds / "fold0", seed=0)
    tu.resdsn_bundle(folds / "fold1", seed=1)
    assert main(["ensemble", str(folds), "--out", str(tmp_path / "ens"), "--name", "cv"]) == 0
    for tta in ("none", "flips"):
        pipe = create_pipeline(load_bundle(tmp_path / "ens"), threads=1, overrides={"stages": {"fine": {"tta": tta}}})
        x = np.random.default_rng(0).normal(size=(40, 36, 36)).astype(np.float32)
        agreement = MemberAgreement(0.5)
        mean = pipe.predict("fine", x, None, None, agreement)
        assert np.allclose(mean, pipe.predict("fine", x, None, None), atol=1e-5)  # as the ensemble network gives it
        window, n = tuple(pipe.stage_config("fine")["window"]), int(pipe.stage_config("fine").get("n", 0))
        own = [predict_foreground(m, x, window, n, pipe.inference) for m in pipe.member_nets("fine")]
        assert len(own) == 2 and isinstance(pipe.member_nets("fine")[0], FlipAverage) is (tta == "flips")
        assert agreement.dsc() == pytest.approx(_dice(own[0] >= 0.5, own[1] >= 0.5), abs=1e-4)
    image = tu.image_from_canonical(tu.phantom_arrays((40, 48, 48), radii_vox=(6, 8, 8), island=False)[0])
    region = pipe.region_from_roi(pipe.prepare(image), box_to_roi_dict(image, pipe.prepare(image).orientation, ((8, 32), (10, 38), (10, 38))))
    assert assess(pipe.segment_region(pipe.prepare(image), region))["member_agreement_dsc"] is not None


def _dice(a, b) -> float:
    return 2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def test_an_ensembles_card_names_its_members_training_data(tmp_path):
    from Training.__main__ import main
    from Training.card import _training_data

    paths = []
    for k, dataset in enumerate(("nih/images", "msd/imagesTr")):
        path = tu.resdsn_bundle(tmp_path / f"fold{k}", seed=k)
        md = json.loads((path / "model.json").read_text())
        md["training"] = {"stages": {"fine": {"dataset": dataset, "synthetic_generator_version": None}}}
        md["attribution"] = "Data: theirs."
        (path / "model.json").write_text(json.dumps(md))
        paths.append(path)
    assert main(["ensemble", *map(str, paths), "--out", str(tmp_path / "ens"), "--name", "cv"]) == 0
    md = load_bundle(tmp_path / "ens").metadata
    assert [m["training"]["stages"]["fine"]["dataset"] for m in md["training"]["ensemble"]] == ["nih/images", "msd/imagesTr"]
    assert _training_data(md) == "msd/imagesTr (generator version n/a); nih/images (generator version n/a). Data: theirs."
    assert _training_data({"attribution": "Data: theirs."}) == "Data: theirs."  # no stages: no empty sentence
