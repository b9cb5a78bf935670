"""The Slicer panel's path without Qt: the command line in a separate process, polled for its JSON
progress lines, its results loaded into the nodes captured at start (slicer-core MRML); the
progress service; batch.py's exit status; Python 3.9 compatibility of what runs in Slicer.

The child processes load the stub architecture of ``forced_bundle`` through a ``sitecustomize``
on their PYTHONPATH (``child_env``), so their results are checked voxel for voxel.
"""

from __future__ import annotations

import ast
import ctypes
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import slicer  # slicer-core

import c2f_testutils as tu
from test_slicer_logic import module, mrml, node_ids  # noqa: F401  (mrml is a fixture)

from PancreasC2FLib.apps import segment_process as sp
from PancreasC2FLib.errors import Cancelled, EmptyCoarseResult, InputError, PancreasC2FError
from PancreasC2FLib.progress import Progress, parse_progress_line

ROOT = Path(__file__).resolve().parents[1]
TESTING = Path(__file__).resolve().parent
GIL_POLL_S = 0.1  # Slicer's panel timer


@pytest.fixture
def child_env(tmp_path, monkeypatch):
    """Child processes register the test architectures (sitecustomize imports c2f_testutils)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(f"import sys\nsys.path.insert(0, {str(TESTING)!r})\nimport c2f_testutils  # noqa: F401\n", encoding="utf-8")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), str(ROOT)]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return os.environ.copy()


def wait_holding_the_gil(run, timeout=300.0) -> list:
    """Slicer's main thread: between 100 ms timer polls it sits in C code (Qt's event loop) that
    holds the GIL. ``PyDLL`` calls do not release the GIL, so ``usleep`` through it holds it."""
    usleep = ctypes.PyDLL(None).usleep
    events = []
    t0 = time.perf_counter()
    while not run.done:
        events += run.process.poll()
        usleep(int(GIL_POLL_S * 1e6))
        assert time.perf_counter() - t0 < timeout, "the run did not finish"
    return events + run.process.poll()


# --- the panel's run: separate process, results into the captured nodes ---------------------


def test_panel_run_in_a_process_loads_exact_results_into_the_captured_nodes(mrml, forced_bundle, child_env):
    image, label = tu.phantom_case(shape_zyx=(40, 56, 56), axes=(1, 0, 2), flips=(True, False, True))
    truth = sitk.GetArrayFromImage(label)
    volume = mrml.addVolumeFromImage(image, "ct")
    other = mrml.addVolumeFromImage(image, "other")
    before = node_ids(mrml.scene)
    run = mrml.startRun("both", volume, model=str(forced_bundle), device="cpu")
    assert node_ids(mrml.scene) == before  # nothing in the scene changes while it runs
    events = wait_holding_the_gil(run)
    stages = [e["stage"] for e in events]
    assert {"coarse", "fine"} <= set(stages) and stages.index("coarse") < stages.index("fine")
    values = [mrml.progressValue(run, e)[0] for e in events]
    assert values == sorted(values) and values[-1] == 100  # the bar only moves forward
    assert all(e["eta_s"] is None or e["eta_s"] >= 0 for e in events)
    nodes, report = mrml.finishRun(run)
    assert not Path(run.folder).exists()  # the temporary folder is removed
    seg = nodes["segmentation"]
    assert int((mrml.segmentArray(seg, volume) != truth).sum()) == 0
    assert "SCT^15776009^Pancreas" in seg.GetSegmentation().GetNthSegment(0).GetTerminology()
    assert seg.GetAttribute("PancreasC2F.modelSha256") == report["model_sha256"] and len(report["model_sha256"]) == 64
    assert json.loads(seg.GetAttribute("PancreasC2F.statistics"))["voxels"] == int(truth.sum())
    inside = np.zeros_like(truth)
    inside[module._roiVoxelBox(mrml, nodes["roi"], volume)] = 1
    assert int((truth * (1 - inside)).sum()) == 0
    assert "mL" in mrml.reportSummary(report, run.process.elapsed)
    assert other.GetID() in node_ids(mrml.scene)


def test_panel_segment_in_region_uses_the_roi_captured_at_start(mrml, forced_bundle, child_env):
    image, label = tu.phantom_case(shape_zyx=(40, 56, 56))
    truth = sitk.GetArrayFromImage(label)
    volume = mrml.addVolumeFromImage(image, "ct")
    roi = mrml.findRegion(volume, model=str(forced_bundle), device="cpu")
    roi.SetSize(*[s * 0.4 for s in roi.GetSize()])  # cuts through the pancreas
    seg = mrml.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "target")
    run = mrml.startRun("segment", volume, roi, seg, model=str(forced_bundle), device="cpu")
    roi.SetSize(500, 500, 500)  # edits after the start do not change this run
    later = mrml.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "selected later")
    wait_holding_the_gil(run)
    nodes, report = mrml.finishRun(run)
    assert nodes["segmentation"] is seg and later.GetSegmentation().GetNumberOfSegments() == 0
    assert report["region"]["source"] == "roi" and report["touches_region_border"]
    mask = mrml.segmentArray(seg, volume)
    assert 0 < mask.sum() < truth.sum()


def test_cancel_kills_the_process_and_discards_the_run(mrml, tiny_bundle, child_env):
    image, _ = tu.phantom_case(shape_zyx=(40, 56, 56))
    volume = mrml.addVolumeFromImage(image, "ct")
    before = node_ids(mrml.scene)
    run = mrml.startRun("both", volume, model=str(tiny_bundle), device="cpu")
    run.cancel()
    assert run.done and run.process.returncode != 0
    with pytest.raises(Cancelled):
        mrml.finishRun(run)
    assert node_ids(mrml.scene) == before and not Path(run.folder).exists()


def fake_cli(tmp_path, code: int, line: str) -> str:
    """An executable standing in for Python: prints ``line``, exits with ``code`` (fast)."""
    path = tmp_path / "fake-python"
    path.write_text(f"#!/bin/sh\necho '{line}'\nexit {code}\n", encoding="utf-8")
    path.chmod(0o755)
    return str(path)


@pytest.mark.skipif(os.name == "nt", reason="the stand-in for Python is a shell script")
def test_a_run_whose_nodes_left_the_scene_is_discarded(mrml, tmp_path):
    image, _ = tu.phantom_case(shape_zyx=(32, 40, 40))
    volume = mrml.addVolumeFromImage(image, "ct")
    seg = mrml.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "target")
    run = mrml.startRun("both", volume, None, seg, python=fake_cli(tmp_path, 0, "done"))
    mrml.scene.RemoveNode(seg)  # or the scene was closed
    run.process.wait(30)
    before = node_ids(mrml.scene)
    with pytest.raises(Cancelled, match="discarded"):
        mrml.finishRun(run)
    assert node_ids(mrml.scene) == before and not Path(run.folder).exists()


@pytest.mark.skipif(os.name == "nt", reason="the stand-in for Python is a shell script")
def test_failed_run_raises_the_error_of_its_exit_code_and_keeps_the_log(mrml, tmp_path):
    image, _ = tu.phantom_case(shape_zyx=(32, 40, 40))
    volume = mrml.addVolumeFromImage(image, "ct")
    run = mrml.startRun("region", volume, python=fake_cli(tmp_path, EmptyCoarseResult.exit_code, "pancreas-c2f: error: no pancreas found"))
    wait_holding_the_gil(run)
    with pytest.raises(EmptyCoarseResult, match="no pancreas found .log: "):
        mrml.finishRun(run)
    assert [p.name for p in Path(run.folder).iterdir()] == [sp.LOG_NAME]
    run = mrml.startRun("region", volume, python=fake_cli(tmp_path, 1, "pancreas-c2f: internal error: KeyError: x"))
    wait_holding_the_gil(run)
    with pytest.raises(PancreasC2FError, match="internal error: KeyError"):
        mrml.finishRun(run)
    with pytest.raises(InputError, match="model default"):  # only -1 means "model default"
        mrml.startRun("both", volume, marginMm=-0.5)


def test_panel_run_is_as_fast_as_the_cli_while_the_main_thread_holds_the_gil(mrml, tiny_bundle, child_env, tmp_path):
    """Slicer's main thread holds the GIL between 100 ms timer polls; a run in a process is not
    slowed by that (a worker thread was ~28x slower)."""
    # The emulation really holds the GIL: a Python thread gets (almost) no time during PyDLL's
    # usleep, unlike during time.sleep (which releases it).
    import threading

    counter = [0]
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            counter[0] += 1

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)  # the thread's share at the window's edges stays small
    thread = threading.Thread(target=spin)
    thread.start()
    counts = {}
    try:
        for name, pause in (("released", lambda: time.sleep(0.5)), ("held", lambda: ctypes.PyDLL(None).usleep(500000))):
            start = counter[0]
            pause()
            counts[name] = counter[0] - start
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(interval)
    assert counts["held"] < 0.5 * counts["released"], counts  # ~0.1 on a busy 2-core machine, ~1 if it were released

    # A real (tiny, random) ResDSN in a region: convolutions, not a stub.
    image, _ = tu.phantom_case(shape_zyx=(48, 64, 64))
    volume = mrml.addVolumeFromImage(image, "ct")
    roi = mrml.defaultRegion(volume, fraction=0.8)
    options = {"model": str(tiny_bundle), "device": "cpu", "threads": 1, "fine_n": 2}
    ct, roi_file = tmp_path / "ct.nrrd", tmp_path / "roi.mrk.json"
    sitk.WriteImage(image, str(ct))
    roi_file.write_text(json.dumps(mrml.roiDictFromNode(roi, volume)), encoding="utf-8")
    cli_times, panel_times = [], []
    for i in range(2):  # a second pair only when the first is over the limit (a busy machine)
        folder = tmp_path / f"cli{i}"
        folder.mkdir()
        command = sp.segment_command(sys.executable, ct, folder, "segment", roi_file, options)
        t0 = time.perf_counter()
        done = subprocess.run(command, env=sp.child_environment(), capture_output=True, timeout=300)
        cli_times.append(time.perf_counter() - t0)
        assert done.returncode == 0, done.stderr.decode()[-2000:]
        t0 = time.perf_counter()
        run = mrml.startRun("segment", volume, roi, model=str(tiny_bundle), device="cpu", threads=1, fineN=2)
        wait_holding_the_gil(run)
        mrml.finishRun(run)
        panel_times.append(time.perf_counter() - t0)
        if min(panel_times) <= 1.5 * min(cli_times):
            break
    print(f"CLI {cli_times} s, panel {panel_times} s")
    assert min(panel_times) <= 1.5 * min(cli_times), (cli_times, panel_times)


# --- the process runner ------------------------------------------------------------------------


def test_segment_command_passes_the_panels_options():
    cmd = sp.segment_command("py", "in.nrrd", "/tmp/x", "segment", "/tmp/x/roi-in.mrk.json", {"model": "m", "pipeline": None, "fine_n": 0, "deterministic": True, "margin_mm": None})
    assert cmd[:5] == ["py", "-m", "PancreasC2FLib", "segment", "in.nrrd"]
    assert cmd[cmd.index("--progress") + 1] == "json" and cmd[cmd.index("--roi") + 1] == "/tmp/x/roi-in.mrk.json"
    assert cmd[cmd.index("--fine-n") + 1] == "0" and "--deterministic" in cmd and "--pipeline" not in cmd and "--margin-mm" not in cmd
    region = sp.segment_command("py", "in.nrrd", "/tmp/x", "region")
    assert "--coarse-only" in region and "-o" not in region and "--roi" not in region
    with pytest.raises(ValueError):
        sp.segment_command("py", "in.nrrd", "/tmp/x", "segment")
    with pytest.raises(ValueError):
        sp.segment_command("py", "in.nrrd", "/tmp/x", "both", options={"coarseN": 1})
    # The panel's parameters map onto exactly these options.
    options = module.PancreasC2FLogic.commandOptions(model="m", coarseN=module.MODEL_DEFAULT, fineN=3, marginMm=0.0)
    assert set(options) <= set(sp._FLAGS) and options["coarse_n"] is None and options["fine_n"] == 3 and options["margin_mm"] == 0.0


@pytest.mark.skipif(os.name == "nt", reason="process groups are POSIX; Windows uses taskkill /T")
def test_cancel_kills_the_whole_process_tree(tmp_path):
    code = "import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); print(p.pid, flush=True); time.sleep(120)"
    proc = sp.SegmentProcess([sys.executable, "-c", code], tmp_path).start()
    deadline = time.time() + 30
    while not proc.messages and time.time() < deadline:
        proc.poll()
        time.sleep(0.05)
    grandchild = int(proc.messages[0])
    proc.cancel()
    assert proc.done
    for _ in range(100):
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        try:  # reaped by init, or a zombie until then
            if Path(f"/proc/{grandchild}/stat").read_text().split()[2] == "Z":
                break
        except FileNotFoundError:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the grandchild survived Cancel")


def test_poll_reads_only_complete_new_lines(tmp_path):
    code = "import sys, time; sys.stdout.write('{\"event\": \"progress\", \"stage\": \"coarse\", \"fraction\": 0.5'); sys.stdout.flush(); time.sleep(0.5); print(', \"elapsed_s\": 1, \"stage_elapsed_s\": 1, \"eta_s\": 1, \"message\": \"\"}'); print('pancreas-c2f: error: bad input')"
    proc = sp.SegmentProcess([sys.executable, "-c", code], tmp_path).start()
    time.sleep(0.25)
    assert proc.poll() == []  # half a line: wait for the rest
    proc.wait(30)
    events = proc.poll()
    assert [e["fraction"] for e in events] == [0.5]
    assert proc.error_message() == "pancreas-c2f: error: bad input"


# --- progress ----------------------------------------------------------------------------------


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_progress_json_lines_name_stage_fraction_elapsed_and_eta():
    clock, out = FakeClock(), io.StringIO()
    progress = Progress(mode="json", stream=out, clock=clock)
    for t, f in ((0, 0.0), (2, 0.25), (8, 1.0)):
        clock.t = t
        progress("coarse", f, "x")
    events = [parse_progress_line(line) for line in out.getvalue().splitlines()]
    assert [e["fraction"] for e in events] == [0.0, 0.25, 1.0]
    assert [e["eta_s"] for e in events] == [None, 6.0, 0.0]  # 2 s for a quarter: 6 s left
    assert events[-1]["elapsed_s"] == 8 and events[-1]["stage"] == "coarse"
    assert parse_progress_line("pancreas-c2f: warning: {x}") is None and parse_progress_line('{"event": "other"}') is None


def test_progress_is_plain_lines_without_a_terminal():
    clock, out = FakeClock(), io.StringIO()
    progress = Progress(mode="bar", stream=out, clock=clock)
    for i in range(21):
        clock.t = i * 0.5
        progress("fine", i / 20)
    progress.close()
    text = out.getvalue()
    assert "\x1b" not in text and "\r" not in text
    lines = text.splitlines()
    assert 2 <= len(lines) <= 4 and lines[-1].startswith("fine: 100%") and "0:00 left" in lines[-1]


def test_cli_progress_json_on_stderr(phantom_file, forced_bundle, tmp_path, capsys):
    from PancreasC2FLib.apps.cli import main

    assert main(["segment", str(phantom_file), "-o", str(tmp_path / "seg.nii.gz"), "--model", str(forced_bundle), "--device", "cpu", "--progress", "json"]) == 0
    captured = capsys.readouterr()
    events = [parse_progress_line(line) for line in captured.err.splitlines() if line.startswith("{")]
    assert events and all(events)
    assert {e["stage"] for e in events} == {"coarse", "fine"} and not any(line.startswith("{") for line in captured.out.splitlines())
    for stage in ("coarse", "fine"):
        assert [e["fraction"] for e in events if e["stage"] == stage][-1] == 1.0


# --- batch.py, dependencies, Slicer 5.6 compatibility -------------------------------------------


def test_batch_script_exits_with_a_status_on_any_error(monkeypatch, tmp_path, phantom_file, capsys):
    """Inside Slicer (``slicer.app`` present) an unexpected error (here a failing torch install)
    still ends Slicer with a non-zero status instead of leaving it running."""
    sys.path.insert(0, str(ROOT / "PancreasC2F"))
    import batch

    exits = []
    monkeypatch.setattr(slicer, "app", object(), raising=False)
    monkeypatch.setattr(slicer.util, "exit", exits.append, raising=False)

    def broken(self, *a, **k):
        raise RuntimeError("pip failed")

    monkeypatch.setattr(module.PancreasC2FLogic, "ensureTorch", broken)
    batch.run_script(["--input", str(phantom_file), "--output", str(tmp_path / "out")])
    assert exits == [1] and "internal error: RuntimeError: pip failed" in capsys.readouterr().err

    def interrupted(argv=None):
        raise SystemExit("something called sys.exit")

    monkeypatch.setattr(batch, "main", interrupted)
    with pytest.raises(SystemExit):
        batch.run_script([])
    assert exits == [1, 1]
    exits.clear()
    monkeypatch.undo()
    monkeypatch.setattr(slicer, "app", object(), raising=False)
    monkeypatch.setattr(slicer.util, "exit", exits.append, raising=False)
    batch.run_script(["--input", str(phantom_file)])  # usage error (no --output): argparse's status
    assert exits == [2]


def test_batch_script_accepts_the_cli_batch_options():
    sys.path.insert(0, str(ROOT / "PancreasC2F"))
    import batch

    from PancreasC2FLib.apps import batch as library_batch

    ours = batch.build_parser()
    import argparse

    theirs = argparse.ArgumentParser()
    library_batch.add_arguments(theirs)
    assert set(theirs._option_string_actions) <= set(ours._option_string_actions)
    for flag in ("--pipeline", "--preset", "--threads", "--dicom-seg"):
        assert flag in ours._option_string_actions


def test_pipelines_without_a_model_are_not_offered(monkeypatch):
    monkeypatch.delenv("PANCREAS_C2F_MODELS", raising=False)
    monkeypatch.setenv("HOME", "/nonexistent-home")
    runnable = module.PancreasC2FLogic.pipelinesWithModels()
    assert runnable == ["resdsn-c2f", "roth-cascade", "zhao-two-stage", "yu-rstn", "fang-ggpfn"]  # every pipeline ships a demo
    from PancreasC2FLib.io import bundle

    installed = bundle.available_models()
    monkeypatch.setattr(bundle, "available_models", lambda: {k: v for k, v in installed.items() if k != "demo-yu-rstn"})
    assert "yu-rstn" not in module.PancreasC2FLogic.pipelinesWithModels()


def test_dependencies_are_asked_for_once_and_torch_is_never_upgraded(monkeypatch):
    import torch

    logic = module.PancreasC2FLogic
    monkeypatch.setattr(torch, "__version__", "1.13.1")
    with pytest.raises(RuntimeError, match="not upgraded automatically"):
        logic().missingDependencies()
    monkeypatch.setattr(torch, "__version__", "2.5.0")
    assert logic().missingDependencies() == []
    monkeypatch.setattr(module, "DEPENDENCIES", (("no_such_module_c2f", "no-such-module-c2f>=1"), ("json", "json")))
    assert logic().missingDependencies() == ["no-such-module-c2f>=1"]
    installed = []
    monkeypatch.setattr(slicer, "util", type("U", (), {"pip_install": staticmethod(installed.append)}), raising=False)
    if hasattr(slicer, "packaging"):
        monkeypatch.delattr(slicer, "packaging")
    logic.installDependencies(["no-such-module-c2f>=1"])  # no pip_ensure (Slicer 5.6-5.10): pip_install
    assert installed == ["no-such-module-c2f>=1"]


RUNS_IN_SLICER = [ROOT / "PancreasC2F" / "PancreasC2F.py", ROOT / "PancreasC2F" / "batch.py", *sorted((ROOT / "PancreasC2FLib").rglob("*.py"))]


def test_code_that_runs_in_slicer_needs_at_most_python_3_9():
    """Slicer 5.6 and 5.8 ship Python 3.9: vermin checks the language and library features."""
    files = [str(p) for p in RUNS_IN_SLICER]
    out = subprocess.run([sys.executable, "-c", "import sys; from vermin.main import main; sys.exit(main())", "-t=3.9-", "--violations", "--no-tips", "--no-parse-comments", *files], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    # vermin does not see ``X | Y`` in annotations: they need postponed evaluation on 3.9.
    for path in RUNS_IN_SLICER:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        future = any(isinstance(n, ast.ImportFrom) and n.module == "__future__" and any(a.name == "annotations" for a in n.names) for n in tree.body)
        if future:
            continue
        for node in ast.walk(tree):
            ann = getattr(node, "annotation", None) or getattr(node, "returns", None)
            if ann is not None and any(isinstance(n, ast.BinOp) and isinstance(n.op, ast.BitOr) for n in ast.walk(ann)):
                raise AssertionError(f"{path.name}:{node.lineno}: X | Y annotation without from __future__ import annotations")


def test_module_uses_no_slicer_api_newer_than_5_6():
    source = (ROOT / "PancreasC2F" / "PancreasC2F.py").read_text(encoding="utf-8")
    assert ".SetTerminology(" not in source  # Slicer 5.10+
    assert "GetTerminologyEntryTagName()" in source
    assert "slicer.packaging.pip_ensure(" not in source  # main branch only: looked up with getattr


def test_extension_description_points_at_real_files_and_needs_pytorch():
    import re

    cmake = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    prefix = "https://raw.githubusercontent.com/PancreasC2F/SlicerPancreasC2F/main/"
    for key in ("EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        (url,) = re.findall(rf'set\({key} "([^"]+)"\)', cmake)
        assert url.startswith(prefix) and (ROOT / url[len(prefix):]).is_file(), url
    entry = json.loads((ROOT / "PancreasC2F.json").read_text(encoding="utf-8"))
    assert entry["build_dependencies"] == ["PyTorch"] and f'set(EXTENSION_CATEGORY "{entry["category"]}")' in cmake
    assert entry["scm_url"] in cmake.replace('set(EXTENSION_HOMEPAGE "', "")
