"""``pancreas-c2f benchmark``: how long ResDSN C2F takes on a clinical-size CT, measured in one
run on this machine against

* the paper's "ResDSN Fine" baseline (Zhu et al. 2018, Table 5): the fine network with n = 12
  over the whole volume, estimated from a measured sample of its windows unless
  ``--fine-everywhere-windows 0`` asks for the full run;
* MONAI's ``sliding_window_inference`` over the same fine-stage windows (MONAI is an optional
  extra, ``pip install pancreas-c2f[benchmark]``, never needed to segment);
* the machine itself: a measured fp32 matrix-multiply peak against the GFLOP/s the windows reach.

The CT is synthetic (``synthetic.generate_case``, 512 x 512 x 240 at 0.8 x 0.8 x 1.0 mm by default)
and the networks are a full-width ResDSN pair with random weights (or a bundle, ``--model``): the
time does not depend on the weights, but a random coarse network finds no pancreas, so the coarse
stage runs in full and its mask is then replaced by the synthetic reference pancreas (the region
the fine stage gets is the real pancreas box plus the margin, as with a trained model).

The C2F run (read the CT file -> load the bundle -> both stages -> write the mask) happens in a
fresh Python process, so its peak memory is its own.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ..processing.sliding_window import predict_foreground

WINDOW = (64, 64, 64)
MARGIN_MM = 20.0
# Stage settings of the benchmark bundle: the paper's (native resolution, n = 6 and n = 12).
BASE_STAGES = {
    "coarse": {"window": list(WINDOW), "n": 6, "spacing": None, "threshold": 0.5},
    "fine": {"window": list(WINDOW), "n": 12, "spacing": None, "margin_mm": MARGIN_MM, "threshold": 0.5},
}
# The two presets this benchmark reports (a bundle's model.json "presets" section).
PRESETS = {
    "paper": {"stages": {"coarse": {"n": 6}, "fine": {"n": 12}}},
    "fast": {"stages": {"coarse": {"n": 1, "spacing": [4.0, 4.0, 4.0]}, "fine": {"n": 1}}},
}
PAPER_FINE_N = 12  # Table 5's "ResDSN Fine": the fine network with n = 12 over the whole CT
TARGETS_CPU = {"c2f_seconds": 20.0, "ratio_c2f_to_fine_everywhere": 0.05, "ratio_to_monai": 0.7, "peak_rss_mb": 3072.0}
TARGETS_GPU = {"c2f_seconds": 1.5, "ratio_c2f_to_fine_everywhere": 0.05, "ratio_to_monai": 0.7}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--size", type=int, nargs=3, default=(512, 512, 240), metavar=("X", "Y", "Z"), help="CT size in voxels (default: 512 512 240)")
    p.add_argument("--spacing", type=float, nargs=3, default=(0.8, 0.8, 1.0), metavar=("X", "Y", "Z"), help="voxel size in mm (default: 0.8 0.8 1.0)")
    p.add_argument("--seed", type=int, default=7, help="synthetic case (default: 7)")
    p.add_argument("--width", type=int, default=32, help="base width of the random ResDSN pair (default: 32, the paper's)")
    p.add_argument("--model", default=None, help="time this bundle (registry name or folder) instead of a random full-width ResDSN pair")
    p.add_argument("--preset", default=None, help="preset of the C2F run: paper or fast (default: the pipeline's, i.e. fast without a GPU)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch (default: PyTorch's)")
    p.add_argument("--batch-size", type=int, default=None, help="windows per forward pass (default: the pipeline's)")
    p.add_argument("--fine-everywhere-windows", type=int, default=24, metavar="K", help="time K of the baseline's windows and extrapolate; 0 runs them all (default: 24)")
    p.add_argument("--no-monai", action="store_true", help="skip the MONAI comparison")
    p.add_argument("--ablation", action="store_true", help="also time the fine-stage windows with each fast path turned off")
    p.add_argument("--profile", action="store_true", help="print where the C2F run spends its time (cProfile, top functions)")
    p.add_argument("--in-process", action="store_true", help="run C2F in this process (faster start; peak memory then includes the set-up)")
    p.add_argument("--workdir", help="keep the CT, bundle and outputs here (default: a temporary folder)")


# --- measurements --------------------------------------------------------------------------

def matmul_peak_gflops(device, seconds: float = 1.0) -> float:
    """Best fp32 matrix-multiply rate (GFLOP/s) over repeated square products."""
    import torch

    n = 4096 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    best = 0.0
    deadline = time.perf_counter() + seconds
    a @ b
    while True:
        _sync(device)
        t = time.perf_counter()
        a @ b
        _sync(device)
        best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e9)
        if time.perf_counter() > deadline:
            return best


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_rss_mb() -> float | None:
    """Peak resident memory of this process (Linux/macOS), in MB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(rss / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA)"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads"


# --- set-up: the CT and the bundle ---------------------------------------------------------

def make_case(seed: int, size, spacing):
    """(image, label) of a synthetic abdominal CT, or of a plain phantom without the generator."""
    try:
        from ..synthetic import generate_case
    except ImportError:
        return _phantom_case(size, spacing)
    case = generate_case(seed, spacing=tuple(spacing), size=tuple(size), phase="portal-venous", orientation="LPS", center_on_pancreas=max(size) < 256)
    return case.image, case.label


def _phantom_case(size, spacing):
    """Water body with an ellipsoid "pancreas" of 150 x 50 x 70 mm (x, y, z) in the middle."""
    import SimpleITK as sitk

    nx, ny, nz = size
    z, y, x = np.ogrid[:nz, :ny, :nx]
    pos = [(a - n / 2) * s for a, n, s in ((x, nx, spacing[0]), (y, ny, spacing[1]), (z, nz, spacing[2]))]
    body = (pos[0] / (0.45 * nx * spacing[0])) ** 2 + (pos[1] / (0.4 * ny * spacing[1])) ** 2 <= 1
    label = ((pos[0] / 75) ** 2 + (pos[1] / 25) ** 2 + (pos[2] / 35) ** 2 <= 1).astype(np.uint8)
    rng = np.random.default_rng(0)
    hu = np.where(body, 40, -1000) + np.where(label > 0, 70, 0) + rng.normal(0, 10, (nz, ny, nx))
    images = []
    for arr in (hu.astype(np.int16), np.broadcast_to(label, (nz, ny, nx)).astype(np.uint8)):
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing(tuple(float(s) for s in spacing))
        images.append(img)
    return images[0], images[1]


def make_bundle(path: Path, width: int, seed: int = 0):
    """A ResDSN pair with random weights (BatchNorm statistics drawn too, as after training)."""
    import torch

    from ..io.bundle import save_bundle
    from ..networks.resdsn import ResDSN
    from ..processing.preprocessing import PAPER_PREPROCESSING

    torch.manual_seed(seed)
    nets = {}
    for stage in BASE_STAGES:
        net = ResDSN(width=width)
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
        nets[stage] = net.eval()
    spec = {"arch": "resdsn", "args": {"in_channels": 1, "num_classes": 2, "width": width}}
    metadata = {
        "name": "benchmark-random-resdsn",
        "version": "0",
        "pipeline": "resdsn-c2f",
        "trained": False,
        "description": "random weights, for timing only",
        "license": "Apache-2.0",
        "preprocessing": dict(PAPER_PREPROCESSING),
        "stages": {s: {"network": spec, **cfg} for s, cfg in BASE_STAGES.items()},
        "postprocess": {"min_island_fraction": 0.2, "coarse_min_island_fraction": 0.2},
        "presets": PRESETS,
    }
    return save_bundle(path, nets, metadata)


# --- the C2F run ---------------------------------------------------------------------------

def _timed_pipeline_class():
    """ResDSNC2F that records per-step times and uses a forced coarse mask (see module doc)."""
    from ..pipelines.resdsn_c2f import ResDSNC2F

    class BenchmarkC2F(ResDSNC2F):
        forced_mask: np.ndarray | None = None

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.times: dict[str, float] = {}
            self.windows: dict[str, int] = {}
            self._stage = "coarse"

        def _add(self, key, t0):
            self.times[key] = self.times.get(key, 0.0) + time.perf_counter() - t0

        def stage_input(self, case, box, spacing_xyz):
            t0 = time.perf_counter()
            out = super().stage_input(case, box, spacing_xyz)
            self._add(f"{self._stage}_input_s", t0)
            return out

        def predict(self, stage, x, progress, cancel, agreement=None):
            from ..processing.sliding_window import window_count

            cfg = self.stage_config(stage)
            self.windows[stage] = window_count(tuple(x.shape), tuple(cfg["window"]), int(cfg["n"]))
            t0 = time.perf_counter()
            out = super().predict(stage, x, progress, cancel, agreement)
            self._add(f"{stage}_network_s", t0)
            return out

        def coarse_mask(self, case, progress=None, cancel=None):
            self._stage = "coarse"
            mask = super().coarse_mask(case, progress, cancel)
            self._stage = "fine"
            if self.forced_mask is not None:
                # Random weights: the stage ran in full for its time, the region comes from the reference.
                return self.forced_mask
            return mask

        def finish(self, case, region, mask, timings):
            t0 = time.perf_counter()
            out = super().finish(case, region, mask, timings)
            self._add("finish_s", t0)
            return out

    return BenchmarkC2F


def run_c2f(config: dict) -> dict:
    """One timed C2F run, from reading the CT file to the written mask."""
    import SimpleITK as sitk
    import torch

    from ..io.bundle import load_bundle
    from ..processing.geometry import Orientation
    from ..io.images import read_image, write_segmentation

    if config.get("threads"):
        torch.set_num_threads(int(config["threads"]))
    label = sitk.ReadImage(config["label"])  # not timed: stands in for a trained coarse network
    forced = Orientation.of(label).to_canonical(sitk.GetArrayViewFromImage(label))
    forced = np.ascontiguousarray(forced, dtype=np.uint8)
    cls = _timed_pipeline_class()
    profiler = None
    if config.get("profile"):
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    t_start = time.perf_counter()
    t = time.perf_counter()
    image = read_image(config["ct"])
    read_s = time.perf_counter() - t
    t = time.perf_counter()
    bundle = load_bundle(config["bundle"])
    pipeline = cls(bundle, device=config["device"], threads=config.get("threads"), preset=config["preset"])
    pipeline.forced_mask = forced
    if config.get("batch_size"):
        pipeline.inference.batch_size = int(config["batch_size"])
    model_s = time.perf_counter() - t
    t = time.perf_counter()
    case = pipeline.prepare(image)
    prepare_s = time.perf_counter() - t
    t = time.perf_counter()
    region = pipeline.find_region(case)
    coarse_s = time.perf_counter() - t
    t = time.perf_counter()
    result = pipeline.segment_region(case, region)
    fine_s = time.perf_counter() - t
    t = time.perf_counter()
    write_segmentation(config["output"], result.label, pipeline.provenance())
    write_s = time.perf_counter() - t
    total_s = time.perf_counter() - t_start
    profile_text = None
    if profiler is not None:
        import io
        import pstats

        profiler.disable()
        buf = io.StringIO()
        pstats.Stats(profiler, stream=buf).sort_stats("cumulative").print_stats(25)
        profile_text = buf.getvalue()
    tm = pipeline.times
    stages = {
        "read_s": read_s,
        "model_s": model_s,
        "prepare_s": prepare_s,
        "coarse_input_s": tm.get("coarse_input_s", 0.0),
        "coarse_network_s": tm.get("coarse_network_s", 0.0),
        "coarse_mask_and_box_s": coarse_s - tm.get("coarse_input_s", 0.0) - tm.get("coarse_network_s", 0.0),
        "fine_input_s": tm.get("fine_input_s", 0.0),
        "fine_network_s": tm.get("fine_network_s", 0.0),
        "fine_decrop_islands_s": fine_s - tm.get("fine_input_s", 0.0) - tm.get("fine_network_s", 0.0) - tm.get("finish_s", 0.0),
        "statistics_s": tm.get("finish_s", 0.0),
        "write_s": write_s,
    }
    out = {
        "c2f_seconds": total_s,
        "stages_s": {k: round(v, 3) for k, v in stages.items()},
        "windows": dict(pipeline.windows),
        "preset": pipeline.preset,
        "box": [list(b) for b in region.box],
        "box_shape": [hi - lo for lo, hi in region.box],
        "shape": list(case.shape),
        "spacing_zyx": list(case.spacing),
        "batch_size": pipeline.inference.batch_size,
        "device": str(pipeline.device),
        "peak_rss_mb": peak_rss_mb(),
        "profile": profile_text,
    }
    if pipeline.device.type == "cuda":
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(pipeline.device) / 2**20, 1)
    return out


def _child_main(config_path: str) -> None:
    config = json.loads(Path(config_path).read_text(encoding="utf-8"))
    result = run_c2f(config)
    Path(config["result"]).write_text(json.dumps(result), encoding="utf-8")


def run_c2f_subprocess(config: dict, workdir: Path) -> dict:
    cfg_path = workdir / "c2f_config.json"
    config = dict(config, result=str(workdir / "c2f_result.json"))
    cfg_path.write_text(json.dumps(config), encoding="utf-8")
    code = "import sys; from PancreasC2FLib.apps.benchmark import _child_main; _child_main(sys.argv[1])"
    proc = subprocess.run([sys.executable, "-c", code, str(cfg_path)], capture_output=True, text=True, encoding="utf-8", errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"the C2F run failed:\n{proc.stderr[-3000:]}")
    return json.loads(Path(config["result"]).read_text(encoding="utf-8"))


# --- baselines -----------------------------------------------------------------------------

def fine_everywhere(bundle, image, device, threads, batch_size, sample: int, c2f: dict) -> dict:
    """The fine network with the paper's n = 12 over the whole volume.

    With ``sample`` > 0 only that many windows (spread over the grid) are run; the network time is
    scaled to the full grid and added to the measured whole-volume steps (normalisation, averaging,
    islands) and to the C2F run's read, model, statistics and write times, which are the same.
    """
    from ..processing.geometry import box_slices
    from ..pipelines.resdsn_c2f import ResDSNC2F
    from ..processing.postprocess import remove_small_components
    from ..processing.sliding_window import window_grid

    n = PAPER_FINE_N
    pipeline = ResDSNC2F(bundle, device=device, threads=threads, preset="default", overrides={"stages": {"fine": {"n": n}}})
    if batch_size:
        pipeline.inference.batch_size = batch_size
    case = pipeline.prepare(image)
    cfg = pipeline.stage_config("fine")
    window = tuple(int(v) for v in cfg["window"])
    whole = ((0, case.shape[0]), (0, case.shape[1]), (0, case.shape[2]))
    shared = sum(c2f["stages_s"][k] for k in ("read_s", "model_s", "prepare_s", "statistics_s", "write_s"))
    net = pipeline.net("fine")
    t = time.perf_counter()
    x, _ = pipeline.stage_input(case, whole, cfg.get("spacing"))
    input_s = time.perf_counter() - t
    # The windows tile the fine stage's grid (resampled when the model has a fine spacing).
    padded = tuple(max(s, w) for s, w in zip(x.shape, window))
    total = len(window_grid(padded, window, n))
    if sample <= 0 or sample >= total:
        t = time.perf_counter()
        prob = predict_foreground(net, x, window, n, pipeline.inference)
        network_s = time.perf_counter() - t
        measured = total
    else:
        corners = window_grid(padded, window, n)
        picked = [corners[i] for i in np.linspace(0, total - 1, sample).round().astype(int)]
        predict_foreground(net, x, window, n, pipeline.inference, corners=picked[: pipeline.inference.batch_size])  # warm-up
        t = time.perf_counter()
        prob = predict_foreground(net, x, window, n, pipeline.inference, corners=picked)
        network_s = (time.perf_counter() - t) * total / len(picked)
        measured = len(picked)
    del x
    t = time.perf_counter()
    mask = (prob >= float(cfg.get("threshold", 0.5))).astype(np.uint8)
    del prob
    if measured < total:
        mask = np.zeros(case.shape, np.uint8)  # a random net's sampled sums mean nothing: time the islands on the reference
        mask[box_slices(tuple(tuple(b) for b in c2f["box"]))] = 1
    remove_small_components(mask, float(pipeline.config["postprocess"].get("min_island_fraction", 0.2)))
    post_s = time.perf_counter() - t
    seconds = shared + input_s + network_s + post_s
    return {
        "fine_everywhere_seconds": seconds,
        "estimated": measured < total,
        "windows_total": total,
        "windows_measured": measured,
        "n": n,
        "seconds_per_window": network_s / total,
        "parts_s": {"shared_with_c2f_s": round(shared, 3), "input_s": round(input_s, 3), "network_s": round(network_s, 3), "threshold_islands_s": round(post_s, 3)},
    }


def monai_windows_per_axis(size: int, window: int, count: int) -> tuple[float, int]:
    """An overlap for MONAI giving ``count`` windows along an axis, and the count it gives."""
    if size <= window or count <= 1:
        return 0.0, 1
    best = None
    for interval in range(window, 0, -1):
        got = 1 + next(d for d in range(size) if d * interval + window >= size)
        if got == count:
            best = interval
            break
    interval = best or max(1, math.ceil((size - window) / (count - 1)))
    overlap = max(0.0, 1.0 - (interval + 0.5) / window)  # MONAI's interval is int(window * (1 - overlap))
    got = 1 + next(d for d in range(size) if d * interval + window >= size)
    return overlap, got


def fine_stage_input(bundle, image, device, threads, batch_size, preset: str, c2f: dict):
    """The pipeline and the fine stage's normalised input of the C2F run (its region)."""
    from ..pipelines.resdsn_c2f import ResDSNC2F
    from ..pipelines.base import grow_box_to

    pipeline = ResDSNC2F(bundle, device=device, threads=threads, preset=preset)
    if batch_size:
        pipeline.inference.batch_size = batch_size
    case = pipeline.prepare(image)
    cfg = pipeline.stage_config("fine")
    window = tuple(int(v) for v in cfg["window"])
    box = tuple(tuple(b) for b in c2f["box"])
    target = tuple(float(v) for v in cfg["spacing"][::-1]) if cfg.get("spacing") else case.spacing
    min_vox = tuple(int(np.ceil(w * t / s)) for w, t, s in zip(window, target, case.spacing))
    run_box = grow_box_to(box, min_vox, case.shape)
    x, _ = pipeline.stage_input(case, run_box, cfg.get("spacing"))
    return pipeline, x, window, int(cfg["n"])


def fast_path_ablation(bundle, image, device, threads, batch_size, preset: str, c2f: dict, windows: int = 12) -> dict:
    """Seconds per window of the fine stage with all fast paths, and with each one turned off
    (the first ``windows`` windows of the C2F run's fine grid; best of two interleaved rounds)."""
    import dataclasses

    from ..processing.sliding_window import prepare_network, window_grid

    pipeline, x, window, n = fine_stage_input(bundle, image, device, threads, batch_size, preset, c2f)
    base = pipeline.inference
    padded = tuple(max(s, w) for s, w in zip(x.shape, window))
    corners = window_grid(padded, window, n)[:windows]
    corners = corners[: max(len(corners) - len(corners) % 4, 1)]  # whole batches for every variant
    variants = {
        "all fast paths": base,
        "without channels-last": dataclasses.replace(base, channels_last=False),
        "without BatchNorm folding": dataclasses.replace(base, fold_batchnorm=False),
        "batch 1": dataclasses.replace(base, batch_size=1),
        "batch 4": dataclasses.replace(base, batch_size=4),
        "plain (all off)": type(base).plain(base.device),
    }
    if base.device.type == "cuda":
        variants["without autocast (fp32)"] = dataclasses.replace(base, amp=False)
        variants["stitching on the CPU"] = dataclasses.replace(base, stitch_device="cpu")
    nets = {k: prepare_network(bundle.networks["fine"], v) for k, v in variants.items()}
    # What the accuracy options cost (same fast paths): test-time flips and a 4-fold ensemble.
    from ..networks.ensemble import Ensemble, FlipAverage

    spec = bundle.stage("fine").get("network", {})
    if spec.get("arch") in ("resdsn", "unet3d"):
        ensemble = Ensemble(spec, 4)
        for member in ensemble.members:
            member.load_state_dict(bundle.networks["fine"].state_dict())
        nets["test-time flips (--tta, 8 passes)"] = FlipAverage(nets["all fast paths"])
        nets["ensemble of 4 fold models"] = prepare_network(ensemble.eval(), base)
        variants.update({k: base for k in list(nets)[-2:]})
    best = {k: float("inf") for k in variants}
    for _ in range(2):
        for k, settings in variants.items():
            predict_foreground(nets[k], x, window, n, settings, corners=corners[: settings.batch_size])  # warm-up
            _sync(base.device)
            t = time.perf_counter()
            predict_foreground(nets[k], x, window, n, settings, corners=corners)
            best[k] = min(best[k], (time.perf_counter() - t) / len(corners))
    return {"windows": len(corners), "seconds_per_window": best}


def monai_comparison(bundle, image, device, threads, batch_size, preset: str, c2f: dict) -> dict:
    """Our sliding window against MONAI's on the C2F run's fine-stage input (same windows)."""
    import torch
    from monai import __version__ as monai_version
    from monai.inferers import sliding_window_inference

    from ..processing.sliding_window import window_starts

    pipeline, x, window, n = fine_stage_input(bundle, image, device, threads, batch_size, preset, c2f)
    ours_counts = [len(window_starts(s, w, n)) for s, w in zip(x.shape, window)]
    overlaps, monai_counts = zip(*(monai_windows_per_axis(s, w, c) for s, w, c in zip(x.shape, window, ours_counts)))
    net_ours = pipeline.net("fine")
    plain = bundle.networks["fine"].eval().to(pipeline.device)
    inp = torch.from_numpy(x)[None, None].to(pipeline.device)
    bs = pipeline.inference.batch_size

    def monai_run(net, memory_format=torch.contiguous_format):
        def predictor(t):
            return torch.softmax(net(t.contiguous(memory_format=memory_format)), dim=1)[:, 1:2]

        with torch.inference_mode():
            out = sliding_window_inference(inp, window, bs, predictor, overlap=list(overlaps), mode="constant")
        _sync(pipeline.device)
        return out

    with torch.inference_mode():  # warm-up (first-call allocations and kernel selection)
        net_ours(torch.zeros((bs, 1, *window), device=pipeline.device).contiguous(memory_format=torch.channels_last_3d if pipeline.inference.channels_last else torch.contiguous_format))
        plain(torch.zeros((bs, 1, *window), device=pipeline.device))
    t = time.perf_counter()
    ours = predict_foreground(net_ours, x, window, n, pipeline.inference)
    ours_s = time.perf_counter() - t
    t = time.perf_counter()
    theirs = monai_run(plain)[0, 0].float().cpu().numpy()
    monai_s = time.perf_counter() - t
    t = time.perf_counter()
    monai_run(net_ours, torch.channels_last_3d if pipeline.inference.channels_last else torch.contiguous_format)
    monai_prepared_s = time.perf_counter() - t
    same = float(np.mean((ours >= 0.5) == (theirs >= 0.5))) if int(np.prod(monai_counts)) == int(np.prod(ours_counts)) else None
    return {
        "monai_seconds": monai_s,
        "ours_seconds": ours_s,
        "monai_with_our_network_seconds": monai_prepared_s,
        # Per window, which is the same as the plain ratio when the counts agree (they do for n <= 2).
        "ratio_to_monai": (ours_s / int(np.prod(ours_counts))) / (monai_s / int(np.prod(monai_counts))),
        "windows_ours": int(np.prod(ours_counts)),
        "windows_monai": int(np.prod(monai_counts)),
        "input_shape": list(x.shape),
        "monai_overlap": [round(o, 4) for o in overlaps],
        "masks_agree_fraction": same,
        "monai_version": monai_version,
    }


# --- the report ----------------------------------------------------------------------------

def preset_windows(bundle, shape, spacing, box) -> dict:
    """Windows per stage for each preset on this case and region."""
    from ..pipelines.resdsn_c2f import ResDSNC2F
    from ..pipelines.base import grow_box_to
    from ..processing.preprocessing import resampled_shape
    from ..processing.sliding_window import window_count

    out = {}
    for name in list(bundle.metadata.get("presets", {})) or ["default"]:
        p = ResDSNC2F(bundle, device="cpu", preset=name)
        row = {}
        for stage in ("coarse", "fine"):
            cfg = p.stage_config(stage)
            window = tuple(int(v) for v in cfg["window"])
            target = tuple(float(v) for v in cfg["spacing"][::-1]) if cfg.get("spacing") else tuple(spacing)
            if stage == "coarse":
                region_shape = tuple(shape)
            else:
                min_vox = tuple(int(np.ceil(w * t / s)) for w, t, s in zip(window, target, spacing))
                run_box = grow_box_to(tuple(tuple(b) for b in box), min_vox, shape)
                region_shape = tuple(hi - lo for lo, hi in run_box)
            grid = resampled_shape(region_shape, tuple(spacing), target)
            row[stage] = {"windows": window_count(grid, window, int(cfg["n"])), "n": int(cfg["n"]), "grid": list(grid), "spacing_zyx_mm": [round(v, 3) for v in target]}
        out[name] = row
    return out


def format_table(r: dict) -> str:
    c2f = r["c2f"]
    fe = r["fine_everywhere"]
    lines = [
        f"PancreasC2F benchmark on {r['device_name']} (torch {r['torch']})",
        f"CT {' x '.join(map(str, r['case']['size_xyz']))} voxels at {' x '.join(map(str, r['case']['spacing_xyz']))} mm; "
        f"model: {r['model']}; GFLOP per window: " + ", ".join(f"{s} {g:.1f}" for s, g in r["gflop_per_window_by_stage"].items()),
        f"region (reference pancreas box + margin): {' x '.join(map(str, c2f['box_shape']))} (z, y, x) voxels",
        "",
        "preset  coarse windows (n, grid z/y/x)          fine windows (n, grid z/y/x)",
    ]
    for name, row in r["presets"].items():
        co, fi = row["coarse"], row["fine"]
        lines.append(f"{name:7s} {co['windows']:6d} (n={co['n']}, {'x'.join(map(str, co['grid']))} at {co['spacing_zyx_mm'][0]:g} mm)".ljust(48) + f"{fi['windows']:6d} (n={fi['n']}, {'x'.join(map(str, fi['grid']))})")
    lines += ["", f"{'measure':52s} {'seconds':>9s}  note", "-" * 100]

    def row(name, value, note=""):
        lines.append(f"{name:52s} {value:9.2f}  {note}")

    row(f"C2F end to end, preset {c2f['preset']}", r["c2f_seconds"], f"{c2f['windows'].get('coarse', 0)} + {c2f['windows'].get('fine', 0)} windows, batch {c2f['batch_size']}")
    for k, v in c2f["stages_s"].items():
        row(f"  {k}", v)
    note = f"estimated from {fe['windows_measured']} of {fe['windows_total']} windows" if fe["estimated"] else f"all {fe['windows_total']} windows run"
    row(f"Fine everywhere (paper's ResDSN Fine, n = {fe['n']})", r["fine_everywhere_seconds"], note)
    paper = r["presets"].get("paper") or r["presets"].get("default") or next(iter(r["presets"].values()))
    row("  paper preset C2F (estimated from per-window time)", r["paper_c2f_seconds_estimated"], f"{paper['coarse']['windows']} + {paper['fine']['windows']} windows")
    if r.get("monai"):
        m = r["monai"]
        row(f"Fine-stage windows, ours ({m['windows_ours']} windows)", m["ours_seconds"])
        row(f"Fine-stage windows, MONAI sliding_window_inference ({m['windows_monai']})", m["monai_seconds"], f"MONAI {m['monai_version']}, network as loaded")
        row("  MONAI with our prepared network", m["monai_with_our_network_seconds"], "BatchNorm folded, channels-last")
    if r.get("ablation"):
        a = r["ablation"]
        ref = a["seconds_per_window"]["all fast paths"]
        lines += ["-" * 100, f"fast paths and --tta / ensemble costs, fine-stage windows ({a['windows']} each) s/window  relative"]
        for k, v in a["seconds_per_window"].items():
            lines.append(f"  {k:50s} {v:9.3f}  {v / ref:5.2f}x")
    lines += ["-" * 100]
    ratio = lambda k: "n/a" if r.get(k) is None else f"{r[k]:.4f}"  # noqa: E731
    lines.append(f"ratio C2F / fine everywhere {ratio('ratio_c2f_to_fine_everywhere')}; ours / MONAI {ratio('ratio_to_monai')}")
    lines.append(f"achieved {r['achieved_gflops']:.0f} GFLOP/s in the windows; fp32 matmul peak {r['matmul_peak_gflops']:.0f} GFLOP/s ({100 * r['achieved_gflops'] / r['matmul_peak_gflops']:.0f} %)")
    lines.append(f"peak memory of the C2F process: {r['peak_rss_mb']} MB" + (f"; GPU {c2f['peak_gpu_mb']} MB" if "peak_gpu_mb" in c2f else ""))
    lines.append("targets (" + ("GPU" if r["device"].startswith("cuda") else "CPU") + "): " + "; ".join(f"{k} <= {t['target']:g}: {'met' if t['met'] else 'MISSED'} ({t['value']:.3g})" for k, t in r["targets"].items() if t["value"] is not None))
    return "\n".join(lines)


def run(args) -> int:
    from ..pipelines.base import resolve_device

    device = resolve_device(args.device)
    preset = args.preset  # None: the pipeline's default (fast on a CPU when the bundle has it)
    if args.workdir:
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        return _run(args, device, preset, workdir)
    with tempfile.TemporaryDirectory(prefix="pancreas-c2f-benchmark-") as tmp:
        return _run(args, device, preset, Path(tmp))


def _run(args, device, preset: str | None, workdir: Path) -> int:
    import SimpleITK as sitk
    import torch

    from ..io.bundle import load_bundle, resolve_model
    from ..errors import InputError
    from ..networks import gflop_per_window

    if args.threads:
        torch.set_num_threads(args.threads)
    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    say(f"measuring the fp32 matrix-multiply peak on {device} ...")
    peak = matmul_peak_gflops(device)
    ct_path, label_path, case_path = workdir / "ct.nii.gz", workdir / "reference.nii.gz", workdir / "case.json"
    case_key = json.dumps({"size": list(args.size), "spacing": list(args.spacing), "seed": args.seed})
    if ct_path.is_file() and label_path.is_file() and case_path.is_file() and case_path.read_text(encoding="utf-8") == case_key:
        say(f"reusing the synthetic CT in {workdir}")
        image = sitk.ReadImage(str(ct_path))
    else:
        say(f"generating the synthetic CT ({' x '.join(map(str, args.size))} at {' x '.join(map(str, args.spacing))} mm, seed {args.seed}) ...")
        image, label = make_case(args.seed, args.size, args.spacing)
        sitk.WriteImage(image, str(ct_path), True)
        sitk.WriteImage(label, str(label_path), True)
        case_path.write_text(case_key, encoding="utf-8")
        del label
    if args.model:
        bundle_path = resolve_model(args.model)
    else:
        bundle_path = workdir / "model"
        make_bundle(bundle_path, args.width)
    bundle = load_bundle(bundle_path)
    if bundle.pipeline != "resdsn-c2f":
        raise InputError(f"the benchmark times the resdsn-c2f pipeline; {bundle.name!r} is a {bundle.pipeline!r} model")
    config = {
        "ct": str(ct_path),
        "label": str(label_path),
        "bundle": str(bundle_path),
        "output": str(workdir / "pancreas.nii.gz"),
        "device": str(device),
        "threads": args.threads,
        "batch_size": args.batch_size,
        "preset": preset,
        "profile": bool(args.profile),
    }
    say(f"C2F end to end (preset {preset or 'chosen by the pipeline'}) ...")
    c2f = run_c2f(config) if args.in_process else run_c2f_subprocess(config, workdir)
    preset = c2f["preset"]
    say("fine network everywhere (the paper's ResDSN Fine baseline) ...")
    fe = fine_everywhere(bundle, image, device, args.threads, args.batch_size, args.fine_everywhere_windows, c2f)
    monai = None
    if not args.no_monai:
        try:
            import monai  # noqa: F401
        except ImportError:
            say("MONAI is not installed (pip install monai): skipping the comparison")
        else:
            say("the fine-stage windows through MONAI's sliding_window_inference ...")
            monai = monai_comparison(bundle, image, device, args.threads, args.batch_size, preset, c2f)
    ablation = None
    if args.ablation:
        say("fast-path ablation on the fine-stage windows ...")
        ablation = fast_path_ablation(bundle, image, device, args.threads, args.batch_size, preset, c2f)
    peak = max(peak, matmul_peak_gflops(device))  # measured before and after: the better of the two
    gflop = {s: gflop_per_window(bundle.networks[s], tuple(bundle.stage(s)["window"])) for s in ("coarse", "fine")}
    network_s = c2f["stages_s"]["coarse_network_s"] + c2f["stages_s"]["fine_network_s"]
    work = sum(gflop[s] * c2f["windows"].get(s, 0) for s in gflop)
    presets = preset_windows(bundle, c2f["shape"], c2f["spacing_zyx"], c2f["box"])
    paper = presets.get("paper") or presets.get("default") or next(iter(presets.values()))
    s_per_gflop = network_s / work if work else 0.0
    paper_s = c2f["c2f_seconds"] - network_s + s_per_gflop * sum(gflop[s] * paper[s]["windows"] for s in gflop)
    r = {
        "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "model": bundle.name if args.model else f"random ResDSN pair, width {args.width}",
        "networks": {s: bundle.stage(s)["network"] for s in ("coarse", "fine")},
        "case": {"size_xyz": list(args.size), "spacing_xyz": list(args.spacing), "seed": args.seed, "forced_region": "synthetic reference pancreas + margin"},
        "preset": preset,
        "presets": presets,
        "preset_settings": bundle.metadata.get("presets", {}),
        "c2f_seconds": c2f["c2f_seconds"],
        "c2f": {k: v for k, v in c2f.items() if k != "profile"},
        "fine_everywhere_seconds": fe["fine_everywhere_seconds"],
        "fine_everywhere": fe,
        "paper_c2f_seconds_estimated": paper_s,
        "monai_seconds": monai["monai_seconds"] if monai else None,
        "monai": monai,
        "ablation": ablation,
        "ratio_c2f_to_fine_everywhere": c2f["c2f_seconds"] / fe["fine_everywhere_seconds"],
        "ratio_to_monai": monai["ratio_to_monai"] if monai else None,
        "gflop_per_window": gflop["fine"],
        "gflop_per_window_by_stage": gflop,
        "achieved_gflops": work / network_s if network_s > 0 else 0.0,
        "matmul_peak_gflops": peak,
        "peak_rss_mb": c2f["peak_rss_mb"],
        "peak_rss_includes_setup": bool(args.in_process),
        "command": " ".join(["pancreas-c2f", *sys.argv[1:]]) if "benchmark" in sys.argv[1:] else None,
    }
    targets = TARGETS_GPU if device.type == "cuda" else TARGETS_CPU
    r["targets"] = {k: {"target": t, "value": r.get(k), "met": r.get(k) is not None and r[k] <= t} for k, t in targets.items()}
    print(format_table(r))
    if c2f.get("profile"):
        print("\nwhere the C2F run spends its time (cProfile, cumulative):\n" + c2f["profile"])
    if args.json:
        from ..io.outputs import atomic_write_text

        atomic_write_text(args.json, json.dumps(r, indent=2, default=float))
    return 0
