"""``pancreas-c2f``: the command line (also ``python -m PancreasC2FLib``).

Exit codes (see errors.py): 0 success, 1 internal error, 2 bad input or usage, 3 empty coarse
result, 4 output cannot be written, 5 bad model bundle, 6 out of memory, 130 cancelled.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from . import __version__
from .errors import EXIT_CODES, InputError, OutOfMemory, OutputError, PancreasC2FError

PROG = "pancreas-c2f"
# Subcommands living in their own modules: each has add_arguments(parser) and run(args) -> int.
EXTRA_COMMANDS = {
    "batch": ("PancreasC2FLib.batch", "segment every scan in a folder; CSV summary; resumable"),
    "benchmark": ("PancreasC2FLib.benchmark", "time C2F against the paper's baselines on a clinical-size synthetic CT"),
}


# --- shared option groups --------------------------------------------------------------------

def _number_in(convert, lo, hi):
    """argparse type: an int or float (``convert``) in [lo, hi]; anything else (nan and inf too)
    is a usage error, exit 2."""
    what = "an integer" if convert is int else "a number"

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{text} is outside {lo:g}..{hi:g}")
        return value

    return parse


def _int_in(lo: int, hi: int):
    return _number_in(int, lo, hi)


def _float_in(lo: float, hi: float):
    return _number_in(float, lo, hi)


def add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and device")
    g.add_argument("--model", default=None, help="registry name or bundle folder (default: demo-synthetic)")
    g.add_argument("--pipeline", default=None, choices=["resdsn-c2f", "roth-cascade", "zhao-two-stage", "yu-rstn", "fang-ggpfn"], help="the pipeline: without --model its shipped model (demo-synthetic, demo-roth-cascade, ...), with --model a check that the model is for it")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    g.add_argument("--threads", type=_int_in(1, 1024), default=None, help="CPU threads for PyTorch")
    g.add_argument("--batch-size", type=_int_in(1, 4096), default=None, help="windows per forward pass")
    g.add_argument("--preset", default=None, help="paper (n = 6 and 12 at the paper's resolution), fast (default on CPU) or default (the model's own)")
    g.add_argument("--coarse-n", type=_int_in(0, 100), default=None, help="override n of the coarse sliding window")
    g.add_argument("--fine-n", type=_int_in(0, 100), default=None, help="override n of the fine sliding window")
    g.add_argument("--margin-mm", type=_float_in(0.0, 1000.0), default=None, help="margin around the coarse box (mm)")
    g.add_argument("--min-island-fraction", type=_float_in(0.0, 1.0), default=None, help="drop components smaller than this fraction of the total (0 keeps all, 1 keeps the largest)")
    g.add_argument("--deterministic", action="store_true", help="deterministic algorithms and seeds: identical masks on reruns")


def pipeline_from_args(args, bundle=None):
    """Load the bundle named by --model and build its pipeline with the command-line overrides."""
    from .bundle import load_bundle, resolve_model
    from .pipeline import create_pipeline

    bundle = bundle or load_bundle(resolve_model(args.model, args.pipeline))
    overrides = {"stages": {}, "postprocess": {}}
    stage_names = list(bundle.metadata["stages"])
    if args.coarse_n is not None:
        overrides["stages"][stage_names[0]] = {"n": args.coarse_n}
    if args.fine_n is not None:
        overrides["stages"].setdefault(stage_names[-1], {})["n"] = args.fine_n
    if args.margin_mm is not None:
        overrides["stages"].setdefault(stage_names[-1], {})["margin_mm"] = args.margin_mm
    if args.min_island_fraction is not None:
        overrides["postprocess"]["min_island_fraction"] = args.min_island_fraction
    p = create_pipeline(bundle, args.pipeline, device=args.device, threads=args.threads, preset=args.preset, overrides=overrides, deterministic=args.deterministic)
    if args.batch_size:
        p.inference.batch_size = args.batch_size
    return p


class Progress:
    """One tqdm bar per stage on stderr (silent with --quiet)."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.bars: dict = {}

    def __call__(self, stage: str, fraction: float, message: str) -> None:
        if self.quiet:
            return
        from tqdm import tqdm

        bar = self.bars.get(stage)
        if bar is None:
            bar = self.bars[stage] = tqdm(total=100, desc=f"{stage:>7}", unit="%", file=sys.stderr, leave=True, bar_format="{desc}: {percentage:3.0f}%|{bar:30}| {elapsed}<{remaining}")
        bar.n = int(round(100 * fraction))
        bar.refresh()

    def close(self):
        for bar in self.bars.values():
            bar.close()


class Outputs:
    """All outputs of one run: checked before the work starts, staged as hidden temporary files
    next to their targets, and renamed into place together only when all of them are written.
    A failure or Ctrl-C removes the temporaries, so a run leaves everything or nothing, and an
    existing file replaced with --overwrite survives a failed run."""

    def __init__(self, overwrite: bool):
        self.overwrite = overwrite
        self.planned: list[Path] = []
        self.staged: list[tuple[Path, Path]] = []  # (temporary, final)
        self.written: list[Path] = []

    def plan(self, path: str | Path | None) -> Path | None:
        if path is None:
            return None
        from .imageio import check_output_path

        p = check_output_path(path, self.overwrite)
        if p.resolve() in [q.resolve() for q in self.planned]:
            raise InputError(f"the same output path is given twice: {p}")
        self.planned.append(p)
        return p

    def write(self, path: Path | None, writer: Callable[[Path], None]) -> None:
        """Write one output to its temporary (same folder and extension, so the format and the
        final rename stay on one file system)."""
        if path is None:
            return
        import uuid

        from .imageio import suffix_of

        tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.partial{suffix_of(path)}"
        self.staged.append((tmp, path))
        writer(tmp)

    def commit(self) -> None:
        import os

        for tmp, final in self.staged:
            os.replace(tmp, final)
            self.written.append(final)
        self.staged.clear()

    def rollback(self) -> None:
        for tmp, _ in self.staged:
            tmp.unlink(missing_ok=True)
        self.staged.clear()


# --- segment ---------------------------------------------------------------------------------

def add_segment_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="CT volume (.nii.gz, .nii, .nrrd, .mha) or a DICOM series folder")
    p.add_argument("-o", "--output", help="segmentation: label map (.nii.gz/.nrrd/.mha) or Slicer .seg.nrrd, by extension")
    p.add_argument("--seg-out", help="also write a Slicer .seg.nrrd here")
    p.add_argument("--report", help="write a JSON report here")
    p.add_argument("--dicom-seg", metavar="OUT.dcm", help="DICOM series input: also write a DICOM Segmentation referencing it (needs highdicom: pip install 'pancreas-c2f[dicom-seg]')")
    p.add_argument("--roi", help="Slicer markups ROI (.mrk.json): skip the coarse stage, segment only inside it")
    p.add_argument("--coarse-only", action="store_true", help="run only the coarse stage and write the candidate region (--roi-out)")
    p.add_argument("--roi-out", help="write the region used (candidate box) as a Slicer markups ROI (.mrk.json)")
    p.add_argument("--series-uid", help="DICOM folder: the series to read (default: the one with the most slices)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_model_options(p)


def run_segment(args) -> int:
    from .bundle import load_bundle, resolve_model
    from .imageio import SEG_SUFFIX, read_image, suffix_of, write_segmentation
    from .report import build_report
    from .roi import read_roi, write_roi

    if args.coarse_only and args.roi:
        raise InputError("--coarse-only and --roi exclude each other")
    if args.coarse_only and not (args.roi_out or args.report):
        raise InputError("--coarse-only needs --roi-out (the candidate region to adjust) or --report")
    if not args.coarse_only and not (args.output or args.seg_out or args.dicom_seg):
        raise InputError("give an output with -o/--output (or --seg-out, --dicom-seg)")
    if args.dicom_seg:
        from .dicomseg import check_dicom_seg_possible

        if args.coarse_only:
            raise InputError("--dicom-seg writes the segmentation: it cannot be used with --coarse-only")
        check_dicom_seg_possible(args.input)
    if args.seg_out and suffix_of(args.seg_out) != SEG_SUFFIX:
        raise InputError(f"--seg-out must end with {SEG_SUFFIX}")
    outputs = Outputs(args.overwrite)
    out_path = outputs.plan(args.output)
    seg_path = outputs.plan(args.seg_out)
    roi_out = outputs.plan(args.roi_out)
    report_path = outputs.plan(args.report)
    dicom_seg_path = outputs.plan(args.dicom_seg)
    inputs = {Path(f).resolve() for f in (args.input, args.roi) if f}
    for p in outputs.planned:
        if p.resolve() in inputs:
            raise OutputError(f"refusing to write {p}: it is an input (inputs are never modified)")
    if out_path is not None:
        from .imageio import LABEL_SUFFIXES

        if suffix_of(out_path) not in LABEL_SUFFIXES + (SEG_SUFFIX,):
            raise InputError(f"unsupported output extension for {out_path.name}: use .nii.gz, .nii, .nrrd, .mha or {SEG_SUFFIX}")
    # Inputs are checked before the model is loaded so bad input fails fast.
    t0 = time.perf_counter()
    image = read_image(args.input, args.series_uid)
    if dicom_seg_path is not None:
        from .dicomseg import source_series, write_dicom_seg

        dicom_sources = source_series(args.input, args.series_uid)  # the files just read
    roi = read_roi(args.roi) if args.roi else None
    bundle = load_bundle(resolve_model(args.model, args.pipeline))
    pipeline = pipeline_from_args(args, bundle)
    load_s = time.perf_counter() - t0
    progress = Progress(args.quiet)
    cancel = threading.Event()
    try:
        case = pipeline.prepare(image)
        for w in case.warnings:
            print(f"{PROG}: warning: {w}", file=sys.stderr)
        region = pipeline.region_from_roi(case, roi) if roi is not None else pipeline.find_region(case, progress, cancel)
        result = None if args.coarse_only else pipeline.segment_region(case, region, progress, cancel)
    except KeyboardInterrupt:
        cancel.set()
        raise
    finally:
        progress.close()
    provenance = pipeline.provenance()
    timings = {"load_s": round(load_s, 3)}
    try:
        if result is not None:
            outputs.write(out_path, lambda p: write_segmentation(p, result.label, provenance))
            outputs.write(seg_path, lambda p: write_segmentation(p, result.label, provenance))
            if dicom_seg_path is not None:
                outputs.write(dicom_seg_path, lambda p: write_dicom_seg(p, result.label, dicom_sources, provenance))
        elif out_path is not None:
            coarse = region.coarse_mask if region.coarse_mask is not None else None
            if coarse is not None:
                outputs.write(out_path, lambda p: write_segmentation(p, case.to_image(coarse), provenance))
        outputs.write(roi_out, lambda p: write_roi(p, pipeline.roi_for(case, region)))
        timings["total_s"] = round(time.perf_counter() - t0, 3)
        report = build_report(pipeline, case, region, result, str(args.input), {"outputs": [str(p) for p in outputs.planned if p != report_path]})
        report["timings_s"].update(timings)
        from .imageio import atomic_write_text

        outputs.write(report_path, lambda p: atomic_write_text(p, json.dumps(report, indent=2)))
        outputs.commit()
    except BaseException:
        outputs.rollback()
        raise
    for w in (result.warnings if result is not None else region.warnings):
        if w not in case.warnings:
            print(f"{PROG}: warning: {w}", file=sys.stderr)
    if result is not None:
        s = result.statistics
        mean = "n/a" if s["mean_hu"] is None else f"{s['mean_hu']:.0f} HU"
        from .quality import summary_line

        print(f"pancreas: {s['volume_ml']:.1f} mL, mean {mean}; {summary_line(report)}; {timings['total_s']:.1f} s on {pipeline.device}; wrote {', '.join(str(p) for p in outputs.written)}")
    else:
        print(f"candidate region written: {', '.join(str(p) for p in outputs.written)}")
    return 0


# --- demo, models, info ----------------------------------------------------------------------

def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output-dir", default="pancreas-c2f-demo", help="folder for the results (default: ./pancreas-c2f-demo)")
    p.add_argument("--seed", type=int, default=None, help="synthetic case to use (default: the bundled demo case)")
    p.add_argument("--overwrite", action="store_true", help="replace results of an earlier demo run")
    p.add_argument("--quiet", action="store_true")
    add_model_options(p)


def run_demo(args) -> int:
    from .demo import run_demo as _run

    return _run(args)


def run_models(args) -> int:
    from .bundle import available_models, load_bundle

    models = available_models()
    if not models:
        print("no models installed")
    for name, path in models.items():
        try:
            b = load_bundle(path)
            tag = "trained" if b.metadata.get("trained") else "UNTRAINED"
            print(f"{name:24s} {b.pipeline:16s} {tag:9s} sha256 {b.sha256[:16]}  {path}")
        except PancreasC2FError as exc:
            print(f"{name:24s} INVALID: {exc}  {path}")
    return 0


def run_info(args) -> int:
    import torch

    from .bundle import model_search_path

    print(f"PancreasC2F {__version__}")
    print(f"python {sys.version.split()[0]}, torch {torch.__version__} ({'CUDA ' + torch.version.cuda if torch.version.cuda else 'CPU build'})")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            print(f"cuda:{i}: {torch.cuda.get_device_name(i)}")
    else:
        print(f"no CUDA GPU; CPU threads: {torch.get_num_threads()}")
    print("model folders:", ", ".join(str(p) for p in model_search_path()))
    print("exit codes:", "; ".join(f"{k} {v}" for k, v in EXIT_CODES.items()))
    return 0


# --- entry point -----------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Coarse-to-fine 3D pancreas segmentation in CT.", epilog="exit codes: " + "; ".join(f"{k} {v}" for k, v in EXIT_CODES.items()))
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("segment", help="segment the pancreas in one CT")
    add_segment_arguments(p)
    p.set_defaults(func=run_segment)
    p = sub.add_parser("demo", help="segment a bundled synthetic CT and write an overlay PNG")
    add_demo_arguments(p)
    p.set_defaults(func=run_demo)
    sub.add_parser("models", help="list installed model bundles").set_defaults(func=run_models)
    sub.add_parser("info", help="versions, torch build, devices, model folders").set_defaults(func=run_info)
    for name, (module, help_text) in EXTRA_COMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name == module:
                continue
            raise
        p = sub.add_parser(name, help=help_text)
        mod.add_arguments(p)
        p.set_defaults(func=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except PancreasC2FError as exc:
        if args.debug:
            raise
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: cancelled; no output written", file=sys.stderr)
        return 130
    except MemoryError:  # outside the network stages (reading, resampling, statistics)
        if args.debug:
            raise
        print(f"{PROG}: error: out of memory (no output written): use a machine with more memory, or crop the volume", file=sys.stderr)
        return OutOfMemory.exit_code
    except Exception as exc:  # a bug: one line unless --debug
        if args.debug:
            raise
        print(f"{PROG}: internal error: {exc.__class__.__name__}: {exc} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
