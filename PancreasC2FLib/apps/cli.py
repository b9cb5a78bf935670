"""``pancreas-c2f``: the command line (also ``python -m PancreasC2FLib``).

Exit codes (see PancreasC2FLib/errors.py): 0 success, 1 internal error, 2 bad input or usage, 3 empty coarse
result, 4 output cannot be written, 5 bad model bundle, 6 out of memory, 130 cancelled.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import signal
import sys
import threading
import warnings
import time
from pathlib import Path

from .. import __version__
from ..errors import EXIT_CODES, InputError, OutOfMemory, PancreasC2FError
from ..io.outputs import Outputs, refuse_inputs
from ..progress import MODES as PROGRESS_MODES, Progress
from ..pipelines.options import add_model_options, pipeline_from_args

PROG = "pancreas-c2f"
# Subcommands living in their own modules: each has add_arguments(parser) and run(args) -> int.
EXTRA_COMMANDS = {
    "batch": ("PancreasC2FLib.apps.batch", "segment every scan in a folder; CSV summary; resumable"),
    "benchmark": ("PancreasC2FLib.apps.benchmark", "time C2F against the paper's baselines on a clinical-size synthetic CT"),
}


# --- segment ---------------------------------------------------------------------------------

def add_segment_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="CT volume (.nii.gz, .nii, .nrrd, .mha) or a DICOM series folder")
    p.add_argument("-o", "--output", help="segmentation: label map (.nii.gz/.nrrd/.mha) or Slicer .seg.nrrd, by extension")
    p.add_argument("--seg-out", help="also write a Slicer .seg.nrrd here")
    p.add_argument("--report", help="write a JSON report here")
    p.add_argument("--dicom-seg", metavar="OUT.dcm", help="DICOM series input: also write a DICOM Segmentation referencing it (needs highdicom: pip install 'pancreas-c2f[dicom-seg]')")
    p.add_argument("--overlay", metavar="OUT.png", help="also write the QA picture: axial, coronal and sagittal views through the pancreas with the result, the region box, volume and quality flag (annotated with matplotlib if installed)")
    p.add_argument("--roi", help="Slicer markups ROI (.mrk.json): skip the coarse stage, segment only inside it")
    p.add_argument("--coarse-only", action="store_true", help="run only the coarse stage and write the candidate region (--roi-out)")
    p.add_argument("--roi-out", help="write the region used (candidate box) as a Slicer markups ROI (.mrk.json)")
    p.add_argument("--series-uid", help="DICOM folder: the series to read (default: the one with the most slices)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_progress_argument(p)
    add_model_options(p)


def add_progress_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--progress", choices=PROGRESS_MODES, default="bar", help="bar: a bar per stage on a terminal, plain lines otherwise; json: one JSON object per line on stderr (stage, fraction, elapsed_s, eta_s) for scripts; none: silent (default: bar)")


def run_segment(args) -> int:
    from ..io.bundle import load_bundle, resolve_model
    from ..io.formats import SEG_SUFFIX, suffix_of
    from ..io.images import read_image, write_segmentation
    from .report import build_report
    from ..io.roi import read_roi, write_roi

    if args.coarse_only and args.roi:
        raise InputError("--coarse-only and --roi exclude each other")
    if args.coarse_only and not (args.roi_out or args.report):
        raise InputError("--coarse-only needs --roi-out (the candidate region to adjust) or --report")
    if not args.coarse_only and not (args.output or args.seg_out or args.dicom_seg):
        raise InputError("give an output with -o/--output (or --seg-out, --dicom-seg)")
    if args.dicom_seg:
        from ..io.dicomseg import check_dicom_seg_possible

        if args.coarse_only:
            raise InputError("--dicom-seg writes the segmentation: it cannot be used with --coarse-only")
        check_dicom_seg_possible(args.input, args.series_uid)
    if args.overlay and not str(args.overlay).lower().endswith(".png"):
        raise InputError("--overlay must end with .png")
    if args.seg_out and suffix_of(args.seg_out) != SEG_SUFFIX:
        raise InputError(f"--seg-out must end with {SEG_SUFFIX}")
    outputs = Outputs(args.overwrite)
    out_path = outputs.plan(args.output)
    seg_path = outputs.plan(args.seg_out)
    roi_out = outputs.plan(args.roi_out)
    report_path = outputs.plan(args.report)
    dicom_seg_path = outputs.plan(args.dicom_seg)
    overlay_path = outputs.plan(args.overlay)
    refuse_inputs(outputs.planned, [f for f in (args.input, args.roi) if f])
    if out_path is not None:
        from ..io.formats import LABEL_SUFFIXES

        if suffix_of(out_path) not in LABEL_SUFFIXES + (SEG_SUFFIX,):
            raise InputError(f"unsupported output extension for {out_path.name}: use .nii.gz, .nii, .nrrd, .mha or {SEG_SUFFIX}")
    # Inputs are checked before the model is loaded so bad input fails fast.
    t0 = time.perf_counter()
    image = read_image(args.input, args.series_uid)
    if Path(args.input).is_dir():
        from ..io.images import dicom_series_note

        note = dicom_series_note(args.input, args.series_uid)
        if note:
            print(f"{PROG}: note: {note}", file=sys.stderr)
    if dicom_seg_path is not None:
        from ..io.dicomseg import source_series, write_dicom_seg

        dicom_sources = source_series(args.input, args.series_uid)  # the files just read
    roi = read_roi(args.roi) if args.roi else None
    bundle = load_bundle(resolve_model(args.model, args.pipeline))
    pipeline = pipeline_from_args(args, bundle)
    load_s = time.perf_counter() - t0
    progress = Progress(args.quiet, args.progress)
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
        from ..io.outputs import atomic_write_text

        outputs.write(report_path, lambda p: atomic_write_text(p, json.dumps(report, indent=2)))
        if overlay_path is not None:
            from .overlay import MATPLOTLIB_HINT, write_report_overlay

            def write_overlay(p: Path) -> None:
                if not write_report_overlay(p, image, None if result is None else result.label, report, title=Path(args.input).name):
                    print(f"{PROG}: note: overlay without labels; {MATPLOTLIB_HINT}", file=sys.stderr)

            outputs.write(overlay_path, write_overlay)
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
        from ..processing.quality import summary_line

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
    from ..io.bundle import available_models, load_bundle

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

    from ..io.bundle import model_search_path

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


@contextlib.contextmanager
def _terminate_like_ctrl_c():
    """SIGTERM and SIGHUP (a closed terminal, a job scheduler) cancel cleanly like Ctrl-C: exit
    130, temporaries removed. A second Ctrl-C while the first is being handled is ignored, so
    the clean-up is not cut short by a traceback."""
    def interrupt(signum, frame):
        for s in handled:
            signal.signal(s, signal.SIG_IGN)
        raise KeyboardInterrupt

    handled = [s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None), signal.SIGINT) if s is not None]
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, interrupt) for s in handled}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    with _terminate_like_ctrl_c():
        return _run(args)


def _run(args) -> int:
    try:
        with warnings.catch_warnings():
            if not args.debug:  # library warnings (torch, numpy) would break the one-line promise
                warnings.simplefilter("ignore")
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
