"""Model bundles: round trip, integrity checks, and no pickle ever loaded."""

from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import pytest
import torch

import c2f_testutils as tu
from PancreasC2FLib.apps import cli
from PancreasC2FLib.io.bundle import load_bundle, resolve_model, save_bundle, sha256_file
from PancreasC2FLib.errors import ModelError
from PancreasC2FLib.processing.sliding_window import InferenceSettings, predict_foreground


@pytest.fixture(autouse=True)
def no_pickle(monkeypatch):
    """Loading a bundle must never unpickle anything."""

    def refuse(*a, **k):
        raise AssertionError("a pickle was loaded")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, dst)
    return dst


def _md(path):
    return json.loads((path / "model.json").read_text(encoding="utf-8"))


def _write_md(path, md):
    (path / "model.json").write_text(json.dumps(md), encoding="utf-8")


def test_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(3)
    nets = {"coarse": tu.ResDSN(width=4), "fine": tu.ResDSN(width=4)}
    # non-trivial batch-norm statistics so that buffers matter too
    for net in nets.values():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
        net.eval()
    spec = {"arch": "resdsn", "args": {"width": 4}}
    md = tu.base_metadata("rt", spec, spec, {"clip": [-100, 240], "normalize": "case_zscore"})
    saved = save_bundle(tmp_path / "b", nets, md)
    loaded = load_bundle(tmp_path / "b")
    assert loaded.sha256 == saved.sha256 and len(loaded.sha256) == 64
    assert loaded.pipeline == "resdsn-c2f" and set(loaded.networks) == {"coarse", "fine"}
    assert not any(n.training for n in loaded.networks.values())
    vol = np.random.default_rng(0).normal(size=(24, 20, 18)).astype(np.float32)
    for stage in ("coarse", "fine"):
        a = predict_foreground(nets[stage], vol, (16, 16, 16), 1, InferenceSettings())
        b = predict_foreground(loaded.networks[stage], vol, (16, 16, 16), 1, InferenceSettings())
        np.testing.assert_array_equal(a, b)
    # the model.json records the weights' hashes, and only safetensors files are written
    for stage, spec in _md(tmp_path / "b")["stages"].items():
        assert spec["weights"] == f"{stage}.safetensors"
        assert spec["sha256"] == sha256_file(tmp_path / "b" / spec["weights"])
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["coarse.safetensors", "fine.safetensors", "model.json"]
    # load via the model.json path and via resolve_model
    assert load_bundle(tmp_path / "b" / "model.json").sha256 == saved.sha256
    assert resolve_model(str(tmp_path / "b")) == tmp_path / "b"


def test_sha_changes_with_any_parameter(bundle_copy, tiny_bundle):
    md = _md(bundle_copy)
    md["stages"]["fine"]["margin_mm"] = 25.0
    _write_md(bundle_copy, md)
    assert load_bundle(bundle_copy).sha256 != load_bundle(tiny_bundle).sha256


def _flip_byte(path, offset_from_end=100):
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x01
    path.write_bytes(bytes(data))


def test_tampered_weights(bundle_copy):
    _flip_byte(bundle_copy / "fine.safetensors")
    with pytest.raises(ModelError, match="sha256"):
        load_bundle(bundle_copy)


def test_truncated_weights(bundle_copy):
    w = bundle_copy / "coarse.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    with pytest.raises(ModelError, match="sha256"):
        load_bundle(bundle_copy)


def test_truncated_weights_with_a_matching_hash(bundle_copy):
    """Even if someone updates the hash, a damaged file is refused by the safetensors reader."""
    w = bundle_copy / "coarse.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    md = _md(bundle_copy)
    md["stages"]["coarse"]["sha256"] = sha256_file(w)
    _write_md(bundle_copy, md)
    with pytest.raises(ModelError, match="cannot read"):
        load_bundle(bundle_copy)


def test_edited_sha_in_model_json(bundle_copy):
    md = _md(bundle_copy)
    md["stages"]["fine"]["sha256"] = "0" * 64
    _write_md(bundle_copy, md)
    with pytest.raises(ModelError, match="sha256"):
        load_bundle(bundle_copy)


def test_missing_files(bundle_copy, tmp_path):
    (bundle_copy / "fine.safetensors").unlink()
    with pytest.raises(ModelError, match="missing"):
        load_bundle(bundle_copy)
    with pytest.raises(ModelError, match="no model.json"):
        load_bundle(tmp_path / "nowhere")
    with pytest.raises(ModelError, match="unknown model"):
        resolve_model("no-such-model-name")


@pytest.mark.parametrize("weights", ["../x.safetensors", "/etc/passwd", "sub/fine.safetensors", "fine.pt", "fine.pkl", "..", "", None, 5])
def test_weights_must_be_a_safetensors_file_inside_the_bundle(bundle_copy, tmp_path, weights):
    outside = tmp_path / "x.safetensors"
    shutil.copy(bundle_copy / "fine.safetensors", outside)
    md = _md(bundle_copy)
    md["stages"]["fine"]["weights"] = weights
    _write_md(bundle_copy, md)
    with pytest.raises(ModelError, match="safetensors file inside the bundle"):
        load_bundle(bundle_copy)


def test_a_pickle_is_refused_even_with_a_safetensors_name_and_matching_hash(bundle_copy):
    w = bundle_copy / "fine.safetensors"
    w.write_bytes(pickle.dumps({"conv.weight": [1, 2, 3]}))  # pickle.dumps is not monkeypatched
    md = _md(bundle_copy)
    md["stages"]["fine"]["sha256"] = sha256_file(w)
    _write_md(bundle_copy, md)
    with pytest.raises(ModelError):
        load_bundle(bundle_copy)


def test_torch_save_file_is_refused(bundle_copy):
    """A ``.pt`` checkpoint (zip + pickle) renamed and re-hashed is still not loadable."""
    w = bundle_copy / "coarse.safetensors"
    torch.save(tu.ResDSN(width=4).state_dict(), w)
    md = _md(bundle_copy)
    md["stages"]["coarse"]["sha256"] = sha256_file(w)
    _write_md(bundle_copy, md)
    with pytest.raises(ModelError):
        load_bundle(bundle_copy)


@pytest.mark.parametrize(
    "edit",
    [
        lambda md: md.pop("format"),
        lambda md: md.update(format="something-else"),
        lambda md: md.update(format_version=99),
        lambda md: md.update(format_version="one"),
        lambda md: md.pop("pipeline"),
        lambda md: md.update(stages={}),
        lambda md: md.update(stages=["coarse", "fine"]),
        lambda md: md["stages"].update(fine="fine.safetensors"),
        lambda md: md["stages"]["fine"].pop("network"),
        lambda md: md["stages"]["fine"].update(network={"arch": "no-such-net"}),
        lambda md: md["stages"]["fine"].update(network={"arch": "resdsn", "args": {"width": 8}}),
        lambda md: md["stages"]["fine"].update(network={"arch": "resdsn", "args": {"nonsense": 1}}),
        lambda md: md["stages"]["fine"].update(network={"arch": "resdsn", "args": [4]}),
        lambda md: md["stages"]["fine"].update(network="resdsn"),
    ],
)
def test_malformed_model_json(bundle_copy, edit):
    md = _md(bundle_copy)
    edit(md)
    _write_md(bundle_copy, md)
    with pytest.raises(ModelError):
        load_bundle(bundle_copy)


@pytest.mark.parametrize("content", [b"", b"{", b"\xff\xfe", b"[]", b"null", b"x" * 100])
def test_model_json_not_json(bundle_copy, content):
    (bundle_copy / "model.json").write_bytes(content)
    with pytest.raises(ModelError):
        load_bundle(bundle_copy)


def test_model_json_too_large(bundle_copy):
    md = _md(bundle_copy)
    md["padding"] = "x" * (2 << 20)
    _write_md(bundle_copy, md)
    with pytest.raises(ModelError, match="large"):
        load_bundle(bundle_copy)


def test_cli_exit_code_5_for_a_bad_bundle(bundle_copy, phantom_file, tmp_path, capsys):
    _flip_byte(bundle_copy / "coarse.safetensors")
    out = tmp_path / "seg.nii.gz"
    rc = cli.main(["segment", str(phantom_file), "-o", str(out), "--model", str(bundle_copy), "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 5
    assert err.startswith("pancreas-c2f: error:") and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()
    rc = cli.main(["segment", str(phantom_file), "-o", str(out), "--model", "no-such-model", "--quiet"])
    assert rc == 5 and not out.exists()


def test_half_precision_weights_load_into_float32_networks(tmp_path, tiny_bundle):
    """--half-weights: half-size files, recorded in model.json; loading gives float32 networks
    whose weights are the float16-rounded originals."""
    from PancreasC2FLib.io.bundle import load_bundle, save_bundle

    original = load_bundle(tiny_bundle)
    half = save_bundle(tmp_path / "half", original.networks, original.metadata, weights_dtype="float16")
    assert half.metadata["weights_dtype"] == "float16"
    for stage in original.networks:
        full_size = (tiny_bundle / f"{stage}.safetensors").stat().st_size
        assert (tmp_path / "half" / f"{stage}.safetensors").stat().st_size < 0.6 * full_size
    again = load_bundle(tmp_path / "half")
    for stage, net in original.networks.items():
        for (k, a), b in zip(net.state_dict().items(), again.networks[stage].state_dict().values()):
            assert b.dtype == a.dtype, k
            if a.is_floating_point():
                assert torch.equal(b, a.half().float()), k
            else:
                assert torch.equal(b, a), k
    with pytest.raises(ValueError, match="float16"):
        save_bundle(tmp_path / "bad", original.networks, original.metadata, weights_dtype="int8")


@pytest.mark.parametrize("pipeline", ["roth-cascade", "zhao-two-stage", "fang-ggpfn"])
def test_shipped_variant_demo_models(pipeline):
    """Each pipeline's shipped demo model verifies, is that pipeline's, says what it is and stays small."""
    from PancreasC2FLib.io.bundle import MODELS_DIR, default_model, load_bundle, resolve_model
    from PancreasC2FLib.pipelines import create_pipeline

    path = resolve_model(None, pipeline)
    assert path == MODELS_DIR / default_model(pipeline)
    bundle = load_bundle(path)  # re-hashes every file
    assert bundle.pipeline == pipeline and bundle.metadata["trained"] and bundle.metadata["weights_dtype"] == "float16"
    assert "synthetic" in bundle.metadata["description"] and "CC BY 4.0" in bundle.metadata["license"]
    assert sum(f.stat().st_size for f in path.iterdir()) < 6_000_000
    assert create_pipeline(bundle, device="cpu").stages
