"""``pancreas-c2f demo``: segment a synthetic CT with the bundled model and show the result.

The case is drawn by the synthetic generator from a fixed seed (the same bytes on every machine),
so the demo needs no download. Writes the CT, its reference label, the segmentation (label map and
``.seg.nrrd``), the candidate ROI, ``report.json`` (with the DSC) and ``overlay.png``.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import SimpleITK as sitk

from ..errors import OutputError

DEMO_SEED = 20180101  # held out: training uses seeds below 1,000,000
DEMO_CASE = {"spacing": (0.8, 0.8, 2.0), "phase": "portal-venous", "orientation": "LPS"}


def demo_case(seed: int | None = None):
    from ..synthetic import generate_case

    return generate_case(DEMO_SEED if seed is None else seed, **DEMO_CASE)


def _earlier_demo(out_dir: Path) -> bool:
    """The folder holds an earlier demo's results (its report says so): running the demo again
    simply replaces them. Anything else in the way still needs --overwrite."""
    try:
        report = json.loads((out_dir / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and report.get("tool") == "PancreasC2F" and "synthetic_case" in report


def run_demo(args) -> int:
    from ..io.outputs import Outputs
    from ..progress import Progress
    from ..pipelines.options import pipeline_from_args
    from ..io.outputs import atomic_write_text
    from ..io.images import write_label, write_segmentation
    from .overlay import MATPLOTLIB_HINT, write_report_overlay
    from ..processing.postprocess import dice
    from .report import build_report
    from ..io.roi import write_roi

    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = ["demo_ct.nii.gz", "demo_reference.nii.gz", "pancreas.nii.gz", "pancreas.seg.nrrd", "pancreas_region.mrk.json", "report.json", "overlay.png"]
    outputs = Outputs(args.overwrite or _earlier_demo(out_dir))
    paths = {n: outputs.plan(out_dir / n) for n in names}
    t0 = time.perf_counter()
    pipeline = pipeline_from_args(args)
    if not pipeline.bundle.metadata.get("trained", False):
        print("note: this model is UNTRAINED (random weights); the result is meaningless", file=sys.stderr)
    print(f"generating the demo CT (synthetic, seed {DEMO_SEED if args.seed is None else args.seed}) ...", file=sys.stderr)
    case_data = demo_case(args.seed)
    progress = Progress(args.quiet)
    try:
        case = pipeline.prepare(case_data.image)
        region = pipeline.find_region(case, progress, threading.Event())
        result = pipeline.segment_region(case, region, progress, threading.Event())
    finally:
        progress.close()
    truth = case.orientation.to_canonical(sitk.GetArrayViewFromImage(case_data.label))
    dsc = dice(result.mask, truth)
    provenance = pipeline.provenance()
    try:
        outputs.write(paths["demo_ct.nii.gz"], lambda p: write_label(p, case_data.image))
        outputs.write(paths["demo_reference.nii.gz"], lambda p: write_label(p, case_data.label))
        outputs.write(paths["pancreas.nii.gz"], lambda p: write_segmentation(p, result.label, provenance))
        outputs.write(paths["pancreas.seg.nrrd"], lambda p: write_segmentation(p, result.label, provenance))
        outputs.write(paths["pancreas_region.mrk.json"], lambda p: write_roi(p, pipeline.roi_for(case, region)))
        report = build_report(
            pipeline,
            case,
            region,
            result,
            f"synthetic demo case (seed {DEMO_SEED if args.seed is None else args.seed})",
            {"dsc": round(dsc, 4), "synthetic_case": case_data.params},
        )
        report["timings_s"]["total_s"] = round(time.perf_counter() - t0, 3)
        annotated = []
        outputs.write(paths["overlay.png"], lambda p: annotated.append(write_report_overlay(
            p, case_data.image, result.label, report, reference=case_data.label,
            title=f"PancreasC2F demo: synthetic CT, seed {DEMO_SEED if args.seed is None else args.seed}",
            extra=f"DSC vs reference {dsc:.3f}")))
        outputs.write(paths["report.json"], lambda p: atomic_write_text(p, json.dumps(report, indent=2)))
        outputs.commit()
    except BaseException:
        outputs.rollback()
        raise
    if not outputs.written:
        raise OutputError("nothing written")
    s = result.statistics
    print(f"DSC against the synthetic reference: {dsc:.3f}; pancreas {s['volume_ml']:.1f} mL; C2F {sum(v for k, v in result.timings.items() if k != 'load_s'):.1f} s on {pipeline.device}")
    key = "result orange, reference dashed cyan, coarse region dashed yellow" if annotated[0] else "red = reference, green = result; " + MATPLOTLIB_HINT
    print(f"results in {out_dir.resolve()}: overlay.png ({key}), pancreas.seg.nrrd, report.json")
    return 0
