"""Reliability guarantees: inputs untouched, ROI round trip between the stages, reports,
determinism, cancellation, out-of-memory handling, intensity warnings."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import c2f_testutils as tu
from PancreasC2FLib import __version__
from PancreasC2FLib.apps import cli
from PancreasC2FLib.pipelines import base as pipeline_module
from PancreasC2FLib.progress import Progress
from PancreasC2FLib.io.bundle import load_bundle, save_bundle
from PancreasC2FLib.errors import Cancelled, OutOfMemory
from PancreasC2FLib.processing.geometry import Orientation
from PancreasC2FLib.pipelines import create_pipeline
from PancreasC2FLib.io.roi import box_to_roi_dict, read_roi, roi_to_box, write_roi


def run_cli(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def files_in(folder):
    return {p.name for p in folder.iterdir()}


# --- inputs, ROI between the stages, report -------------------------------------------------------

def test_input_is_never_modified(tmp_path, phantom_file, forced_bundle, capsys):
    before = tu.file_fingerprint(phantom_file)
    for extra in (["-o", tmp_path / "a.nii.gz"], ["--coarse-only", "--roi-out", tmp_path / "r.mrk.json"], ["-o", tmp_path / "b.seg.nrrd", "--report", tmp_path / "b.json"]):
        rc, _, err = run_cli(capsys, "segment", phantom_file, "--model", forced_bundle, "--quiet", *extra)
        assert rc == 0, err
    assert tu.file_fingerprint(phantom_file) == before


def test_coarse_only_then_roi_with_a_shrunken_box(tmp_path, phantom_ct, phantom_file, forced_bundle, capsys):
    roi_path, full = tmp_path / "region.mrk.json", tmp_path / "full.nii.gz"
    rc, out, err = run_cli(capsys, "segment", phantom_file, "--coarse-only", "--roi-out", roi_path, "--model", forced_bundle, "--quiet")
    assert rc == 0 and "candidate region" in out and files_in(tmp_path) == {"ct.nii.gz", "region.mrk.json"}
    rc, _, _ = run_cli(capsys, "segment", phantom_file, "-o", full, "--model", forced_bundle, "--quiet")
    assert rc == 0
    image = phantom_ct.image
    o = Orientation.of(image)
    roi = read_roi(roi_path)
    box, _ = roi_to_box(image, o, roi)
    # The unchanged ROI reproduces the full run exactly (same box, coarse result inside it).
    same = tmp_path / "same.nii.gz"
    rc, _, _ = run_cli(capsys, "segment", phantom_file, "--roi", roi_path, "-o", same, "--model", forced_bundle, "--quiet")
    assert rc == 0
    full_arr = sitk.GetArrayFromImage(sitk.ReadImage(str(full)))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(same))), full_arr)
    # A person shrinks the box: the result stays inside it.
    m = roi["markups"][0]
    m["size"] = [0.5 * s for s in m["size"]]
    write_roi(tmp_path / "small.mrk.json", roi)
    small_box, warnings = roi_to_box(image, o, roi)
    assert warnings == [] and all(b1 - b0 < a1 - a0 for (b0, b1), (a0, a1) in zip(small_box, box))
    shrunk = tmp_path / "shrunk.nii.gz"
    rc, _, err = run_cli(capsys, "segment", phantom_file, "--roi", tmp_path / "small.mrk.json", "-o", shrunk, "--model", forced_bundle, "--quiet")
    assert rc == 0, err
    canon = o.to_canonical(sitk.GetArrayFromImage(sitk.ReadImage(str(shrunk))))
    inside = np.zeros(canon.shape, bool)
    inside[tuple(slice(a, b) for a, b in small_box)] = True
    assert canon.sum() > 0 and not canon[~inside].any()
    assert canon.sum() < full_arr.sum()
    assert "touches the region's border" in err  # the shrunken box cuts the organ: say so


def test_report_contents(tmp_path, phantom_ct, phantom_file, forced_bundle, capsys):
    report = tmp_path / "report.json"
    rc, _, err = run_cli(capsys, "segment", phantom_file, "-o", tmp_path / "seg.nrrd", "--report", report, "--model", forced_bundle, "--coarse-n", "2", "--margin-mm", "12", "--quiet")
    assert rc == 0, err
    r = json.loads(report.read_text(encoding="utf-8"))
    bundle = load_bundle(forced_bundle)
    assert r["tool"] == "PancreasC2F" and r["tool_version"] == __version__
    assert r["model_sha256"] == bundle.sha256 and r["model_name"] == "forced-band" and r["trained"] is False
    p = r["parameters"]
    assert p["pipeline"] == "resdsn-c2f" and p["stages"]["coarse"]["n"] == 2 and p["stages"]["fine"]["margin_mm"] == 12.0
    assert p["stages"]["coarse"]["window"] == [32, 32, 32] and p["preprocessing"]["normalize"] == "fixed"
    assert p["deterministic"] is False
    for key in ("load_s", "coarse_s", "fine_s", "total_s"):
        assert r["timings_s"][key] >= 0
    # region: box in IJK and physical, the coarse box of the library, containing the organ
    image = phantom_ct.image
    pipe = create_pipeline(bundle, device="cpu", overrides={"stages": {"coarse": {"n": 2}, "fine": {"margin_mm": 12.0}}})
    case = pipe.prepare(image)
    region = pipe.find_region(case)
    from PancreasC2FLib.processing.geometry import box_to_ijk

    assert r["region"]["box_ijk"] == box_to_ijk(image, case.orientation, region.box)
    (i0, i1), (j0, j1), (k0, k1) = r["region"]["box_ijk"]
    label = sitk.GetArrayFromImage(phantom_ct.label)  # LPS phantom: numpy (k, j, i)
    nz = np.argwhere(label)
    assert (k0, j0, i0) <= tuple(nz.min(axis=0)) and all(hi > v for hi, v in zip((k1, j1, i1), nz.max(axis=0)))
    assert i1 - i0 > np.ptp(nz[:, 2]) + 2 * 5  # the margin (12 mm = 6 voxels, less what the coarse grid missed)
    lo_phys = np.array(image.TransformContinuousIndexToPhysicalPoint([i0 - 0.5, j0 - 0.5, k0 - 0.5]))
    hi_phys = np.array(image.TransformContinuousIndexToPhysicalPoint([i1 - 0.5, j1 - 0.5, k1 - 0.5]))
    np.testing.assert_allclose(r["region"]["box_lps_min_mm"], lo_phys, atol=1e-3)
    np.testing.assert_allclose(r["region"]["box_lps_max_mm"], hi_phys, atol=1e-3)
    np.testing.assert_allclose(r["region"]["roi_center_lps_mm"], (lo_phys + hi_phys) / 2, atol=1e-3)
    assert r["region"]["source"] == "coarse"
    # measurements: on the input grid (2 mm voxels = 0.008 mL), mean HU of the phantom's organ
    assert r["pancreas_voxels"] == int(label.sum())
    assert r["pancreas_volume_ml"] == pytest.approx(label.sum() * 0.008, abs=1e-3)
    assert r["pancreas_mean_hu"] == pytest.approx(tu.PANCREAS_HU, abs=1.0)
    assert r["touches_region_border"] is False and r["touches_image_border"] is False and r["empty"] is False
    assert r["warnings"] == []
    assert r["input_geometry"]["size"] == [64, 64, 48] and r["input_geometry"]["origin"] == [-64.0, -80.0, -300.0]
    assert str(tmp_path / "seg.nrrd") in r["outputs"]
    # provenance in the label map header too
    hdr = json.loads(sitk.ReadImage(str(tmp_path / "seg.nrrd")).GetMetaData("PancreasC2F_provenance"))
    assert hdr["model_sha256"] == bundle.sha256 and hdr["parameters"]["stages"]["coarse"]["n"] == 2


def test_mr_like_intensities_warn(tmp_path, phantom_ct, forced_bundle, capsys):
    """All values >= 0 (MR, or CT stored without the rescale): a warning in the report and on stderr."""
    mr = sitk.Cast(phantom_ct.image, sitk.sitkInt16) + 1024
    ct = tmp_path / "mr.nrrd"
    sitk.WriteImage(mr, str(ct))
    o = Orientation.of(mr)
    write_roi(tmp_path / "roi.mrk.json", box_to_roi_dict(mr, o, ((10, 40), (20, 50), (10, 50))))
    report = tmp_path / "r.json"
    rc, _, err = run_cli(capsys, "segment", ct, "--roi", tmp_path / "roi.mrk.json", "-o", tmp_path / "s.nii.gz", "--report", report, "--model", forced_bundle, "--quiet")
    assert rc == 0
    r = json.loads(report.read_text(encoding="utf-8"))
    assert any("Hounsfield" in w for w in r["warnings"]) and "Hounsfield" in err
    assert r["region"]["source"] == "roi"


# --- determinism ---------------------------------------------------------------------------------

DET_BOX = ((8, 40), (16, 48), (16, 48))  # one 32^3 window


@pytest.fixture(scope="module")
def half_foreground_bundle(tiny_bundle, tmp_path_factory):
    """The tiny random ResDSN with the fine classifier biased so that about half of the voxels are
    foreground: the mask then depends on every floating-point detail of the fine stage."""
    b = load_bundle(tiny_bundle)
    image, _ = tu.phantom_case()
    pipe = create_pipeline(b, device="cpu")
    case = pipe.prepare(image)
    x, _ = pipe.stage_input(case, DET_BOX, None)
    prob = pipe.predict("fine", x, None, None).astype(np.float64)
    logit = np.log(prob / (1 - prob))
    with torch.no_grad():
        b.networks["fine"].classifier.bias[1] -= float(np.median(logit))
    md = json.loads((tiny_bundle / "model.json").read_text(encoding="utf-8"))
    return save_bundle(tmp_path_factory.mktemp("bundles") / "half", b.networks, md).path


@pytest.fixture
def restore_torch_determinism():
    """--deterministic switches torch to deterministic algorithms for the process: undo it."""
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def test_deterministic_twice_gives_identical_masks(restore_torch_determinism, tmp_path, phantom_ct, phantom_file, half_foreground_bundle, capsys):
    o = Orientation.of(phantom_ct.image)
    write_roi(tmp_path / "roi.mrk.json", box_to_roi_dict(phantom_ct.image, o, DET_BOX))
    masks = []
    for name in ("a.nii.gz", "b.nii.gz"):
        rc, _, err = run_cli(capsys, "segment", phantom_file, "--roi", tmp_path / "roi.mrk.json", "-o", tmp_path / name, "--report", tmp_path / (name + ".json"), "--model", half_foreground_bundle, "--deterministic", "--device", "cpu", "--quiet")
        assert rc == 0, err
        masks.append(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / name))))
    frac = masks[0][8:40, 16:48, 16:48].mean()
    assert 0.05 < frac < 0.95  # a non-trivial mask
    np.testing.assert_array_equal(masks[0], masks[1])
    assert json.loads((tmp_path / "a.nii.gz.json").read_text(encoding="utf-8"))["parameters"]["deterministic"] is True


# --- cancellation ----------------------------------------------------------------------------------

def test_cancel_from_the_progress_callback(phantom_ct, forced_bundle):
    pipe = create_pipeline(load_bundle(forced_bundle), device="cpu")
    cancel = threading.Event()
    seen = []

    def progress(stage, fraction, message):
        seen.append(stage)
        if stage == "fine":
            cancel.set()

    with pytest.raises(Cancelled) as exc:
        pipe.run(phantom_ct.image, progress=progress, cancel=cancel)
    assert exc.value.exit_code == 130 and "coarse" in seen


def test_ctrl_c_in_the_cli_leaves_nothing_and_returns_130(tmp_path, phantom_file, forced_bundle, monkeypatch, capsys):
    calls = {"n": 0}

    def interrupt(self, stage, fraction, message):
        calls["n"] += 1
        if stage == "fine":
            raise KeyboardInterrupt

    monkeypatch.setattr(Progress, "__call__", interrupt)
    out = tmp_path / "out"
    out.mkdir()
    rc, _, err = run_cli(capsys, "segment", phantom_file, "-o", out / "s.nii.gz", "--seg-out", out / "s.seg.nrrd", "--report", out / "r.json", "--model", forced_bundle)
    assert rc == 130 and "cancelled" in err and calls["n"] > 0
    assert files_in(out) == set()


def test_ctrl_c_while_writing_rolls_back_written_outputs(tmp_path, phantom_file, forced_bundle, monkeypatch, capsys):
    from PancreasC2FLib.io import images as imageio

    def interrupted_write(path, label, provenance=None, segment_name="Pancreas"):
        raise KeyboardInterrupt

    monkeypatch.setattr(imageio, "write_seg_nrrd", interrupted_write)
    out = tmp_path / "out"
    out.mkdir()
    rc, _, _ = run_cli(capsys, "segment", phantom_file, "-o", out / "s.nii.gz", "--seg-out", out / "s.seg.nrrd", "--report", out / "r.json", "--model", forced_bundle, "--quiet")
    assert rc == 130
    assert files_in(out) == set()  # the label map written first was removed again


def test_disk_error_while_writing_exit_4_and_rollback(tmp_path, phantom_file, forced_bundle, monkeypatch, capsys):
    from PancreasC2FLib.io import outputs
    from PancreasC2FLib.errors import OutputError

    def full_disk(path, text):
        raise OutputError(f"cannot write {path}: No space left on device")

    monkeypatch.setattr(outputs, "atomic_write_text", full_disk)
    out = tmp_path / "out"
    out.mkdir()
    rc, _, err = run_cli(capsys, "segment", phantom_file, "-o", out / "s.nii.gz", "--report", out / "r.json", "--model", forced_bundle, "--quiet")
    assert rc == 4 and "No space" in err
    assert files_in(out) == set()


# --- out of memory ----------------------------------------------------------------------------------

class _FakeCuda:
    """Stand-in for predict_foreground on a GPU that runs out of memory."""

    def __init__(self, real, fail_while):
        self.real, self.fail_while, self.calls = real, fail_while, []

    def __call__(self, net, volume, window, n, settings, progress=None):
        self.calls.append((settings.device.type, settings.batch_size))
        if self.fail_while(settings):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        cpu = type(settings)(device=torch.device("cpu"), batch_size=settings.batch_size)
        return self.real(net, volume, window, n, cpu, progress)


def _gpu_pipeline(forced_bundle, monkeypatch):
    pipe = create_pipeline(load_bundle(forced_bundle), device="cpu")
    pipe.device = pipe.inference.device = torch.device("cuda")  # pretend
    pipe.inference.batch_size = 8
    monkeypatch.setattr(pipe, "net", lambda stage: pipe.bundle.networks[stage])
    return pipe


def test_gpu_oom_halves_the_batch(phantom_ct, forced_bundle, monkeypatch):
    fake = _FakeCuda(pipeline_module.predict_foreground, lambda s: s.batch_size > 2)
    monkeypatch.setattr(pipeline_module, "predict_foreground", fake)
    pipe = _gpu_pipeline(forced_bundle, monkeypatch)
    result = pipe.run(phantom_ct.image)
    assert fake.calls[:3] == [("cuda", 8), ("cuda", 4), ("cuda", 2)]
    assert pipe.device.type == "cuda" and pipe.inference.batch_size == 2
    assert any("batch size 2" in w for w in result.warnings)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(result.label), sitk.GetArrayViewFromImage(phantom_ct.label))


def test_gpu_oom_at_batch_1_falls_back_to_cpu(phantom_ct, forced_bundle, monkeypatch):
    fake = _FakeCuda(pipeline_module.predict_foreground, lambda s: s.device.type == "cuda")
    monkeypatch.setattr(pipeline_module, "predict_foreground", fake)
    pipe = _gpu_pipeline(forced_bundle, monkeypatch)
    result = pipe.run(phantom_ct.image)
    assert [c for c in fake.calls if c[0] == "cuda"] == [("cuda", 8), ("cuda", 4), ("cuda", 2), ("cuda", 1)]
    assert fake.calls[4][0] == "cpu" and pipe.device.type == "cpu"
    assert any("CPU" in w for w in result.warnings)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(result.label), sitk.GetArrayViewFromImage(phantom_ct.label))


def test_oom_raised_by_the_network_itself_halves_the_batch(phantom_ct, forced_bundle, monkeypatch):
    """The real sliding window with a network that runs out of memory above one window a batch."""
    # coarse stage at the native 2 mm: 2 x 3 x 3 windows, enough for several batches
    pipe = create_pipeline(load_bundle(forced_bundle), device="cpu")
    pipe.stage_config("coarse")["spacing"] = None  # (an override of None is ignored by deep_merge)
    pipe.inference.batch_size = 4
    sizes = []

    class Flaky(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            sizes.append(x.shape[0])
            if x.shape[0] > 1:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
            return self.net(x)

    flaky = {stage: Flaky(net) for stage, net in pipe.bundle.networks.items()}
    monkeypatch.setattr(pipe, "net", lambda stage: flaky[stage])
    result = pipe.run(phantom_ct.image)
    assert sizes[:3] == [4, 2, 1] and set(sizes[3:]) == {1}
    assert pipe.inference.batch_size == 1
    assert [w for w in result.warnings if "out of memory" in w] == ["GPU out of memory: retrying with batch size 2", "GPU out of memory: retrying with batch size 1"]
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(result.label), sitk.GetArrayViewFromImage(phantom_ct.label))


@pytest.mark.parametrize("exc", [MemoryError(), RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to allocate 9999999 bytes")])
def test_cpu_out_of_memory_is_exit_6(exc, tmp_path, phantom_file, forced_bundle, monkeypatch, capsys):
    def boom(*a, **k):
        raise exc

    monkeypatch.setattr(pipeline_module, "predict_foreground", boom)
    pipe = create_pipeline(load_bundle(forced_bundle), device="cpu")
    with pytest.raises(OutOfMemory):
        pipe.run(sitk.ReadImage(str(phantom_file)))
    rc, _, err = run_cli(capsys, "segment", phantom_file, "-o", tmp_path / "s.nii.gz", "--model", forced_bundle, "--quiet")
    assert rc == 6 and "out of memory" in err and err.count("\n") == 1
    assert not (tmp_path / "s.nii.gz").exists()


def test_memory_error_outside_the_networks_is_exit_6(tmp_path, phantom_file, forced_bundle, monkeypatch, capsys):
    def no_memory(*a, **k):
        raise MemoryError

    monkeypatch.setattr(pipeline_module, "normalization_stats", no_memory)
    rc, _, err = run_cli(capsys, "segment", phantom_file, "-o", tmp_path / "s.nii.gz", "--model", forced_bundle, "--quiet")
    assert rc == 6 and "out of memory" in err and err.count("\n") == 1
    assert files_in(tmp_path) == {phantom_file.name}


def test_other_runtime_errors_are_internal_errors(tmp_path, phantom_file, forced_bundle, monkeypatch, capsys):
    def bug(*a, **k):
        raise RuntimeError("shape mismatch in conv")

    monkeypatch.setattr(pipeline_module, "predict_foreground", bug)
    rc, _, err = run_cli(capsys, "segment", phantom_file, "-o", tmp_path / "s.nii.gz", "--model", forced_bundle, "--quiet")
    assert rc == 1 and "internal error" in err and "--debug" in err and "Traceback" not in err
    assert not (tmp_path / "s.nii.gz").exists()
