"""Test-time flips and fold ensembles in one bundle (PancreasC2FLib/networks/ensemble.py,
``--tta``, ``python -m Training ensemble``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import c2f_testutils as tu
from PancreasC2FLib.io.bundle import load_bundle
from PancreasC2FLib.networks.ensemble import FLIP_SETS, Ensemble, FlipAverage
from PancreasC2FLib.networks.resdsn import ResDSN
from PancreasC2FLib.pipelines import create_pipeline

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


def test_ensemble_refuses_sigmoid_networks():
    with pytest.raises(ValueError, match="ensemble holds"):
        Ensemble({"arch": "rstn-stage", "args": {}}, 2)


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


def _tiny_rstn(path, seed: int, fine_threshold: float):
    from PancreasC2FLib.io.bundle import save_bundle
    from PancreasC2FLib.networks.rstn import RSTNStage
    from test_rstn import ARGS, rstn_metadata

    torch.manual_seed(seed)
    nets = {"coarse": RSTNStage(**ARGS).eval(), "fine": RSTNStage(**ARGS, saliency_kernel=3, saliency_layers=2).eval()}
    md = rstn_metadata(path.name)
    md["stages"]["fine"]["threshold"] = fine_threshold
    save_bundle(path, nets, md)
    return path


def test_weight_mean_bundle_holds_the_mixed_weights(tmp_path):
    """``ensemble --mean-weights --mix``: one network per stage whose every weight is the mixed
    mean of the members' (a sigmoid pipeline too, which a probability ensemble refuses)."""
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
