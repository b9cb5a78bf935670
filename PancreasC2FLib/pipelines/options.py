"""A pipeline from command-line style options: the argparse group of model and device options
(``add_model_options``) and the pipeline they describe (``pipeline_from_args``, given the parsed
``Namespace``). Shared by the command line, batch, the demo and the Slicer module."""

from __future__ import annotations

import argparse


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
    g.add_argument("--preset", default=None, help=(
        "default (the model's own settings), fast (the model's faster settings; the default without a GPU when the model has them) or paper: "
        "the paper's test-time settings for the model's pipeline: resdsn-c2f coarse n = 6, fine n = 12; "
        "roth-cascade stage 1 side-by-side tiles (n = 0), stage 2 overlapping tiles covering each voxel 4 times on average, no island removal; "
        "zhao-two-stage box margins 2 (low grid) and 10 voxels, no island removal; "
        "yu-rstn all the model's views, T = 10 rounds, stop at DSC > 0.95, K = 20; "
        "fang-ggpfn one patch per slice (N = 1), all the model's views equally weighted, no island removal. "
        "What the model was trained on (grid spacing, window, normalisation) and its thresholds stay the model's; "
        "a model's own 'paper' preset adds to these, and every output records the settings used"))
    g.add_argument("--coarse-n", type=_int_in(0, 100), default=None, help="override n of the coarse sliding window")
    g.add_argument("--fine-n", type=_int_in(0, 100), default=None, help="override n of the fine sliding window")
    g.add_argument("--margin-mm", type=_float_in(0.0, 1000.0), default=None, help="margin around the coarse box (mm)")
    g.add_argument("--min-island-fraction", type=_float_in(0.0, 1.0), default=None, help="drop components smaller than this fraction of the total (0 keeps all, 1 keeps the largest)")
    g.add_argument("--tta", action="store_true", help="test-time augmentation: each 3D stage's prediction averaged over the 8 mirrored inputs (8 times the network work; resdsn-c2f, roth-cascade, zhao-two-stage)")
    g.add_argument("--deterministic", action="store_true", help="deterministic algorithms and seeds: identical masks on reruns")


def pipeline_from_args(args, bundle=None):
    """Load the bundle named by --model and build its pipeline with the command-line overrides."""
    from ..io.bundle import load_bundle, resolve_model
    from .base import create_pipeline

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
    if getattr(args, "tta", False):
        for stage in stage_names:
            overrides["stages"].setdefault(stage, {})["tta"] = "flips"
    p = create_pipeline(bundle, args.pipeline, device=args.device, threads=args.threads, preset=args.preset, overrides=overrides, deterministic=args.deterministic)
    if args.batch_size:
        p.inference.batch_size = args.batch_size
    return p


pipeline_from_options = pipeline_from_args
