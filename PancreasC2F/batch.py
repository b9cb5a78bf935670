"""Batch pancreas segmentation through the Slicer module's logic (MRML nodes), without a GUI.

In 3D Slicer::

    Slicer --no-main-window --python-script PancreasC2F/batch.py -- --input DIR_OR_FILE --output DIR \\
        [--resume] [--roi ROI] [--coarse-only] [--model NAME_OR_FOLDER] [--device auto|cpu|cuda|mps]

or in plain Python with the ``slicer-core`` package (MRML and module logics without Qt)::

    python PancreasC2F/batch.py --input DIR_OR_FILE --output DIR ...

Each case is loaded into a volume node, segmented by ``PancreasC2FLogic`` (ROI node, segmentation
node with the coded "Pancreas" segment and provenance attributes), saved as ``CASE.seg.nrrd`` with
MRML's segmentation storage node (``--coarse-only``: the region as ``CASE.mrk.json``) plus
``CASE.report.json``, and its nodes are removed again. Case discovery, the CSV (one row per case,
written as each case ends), ``--resume`` and the keep-going loop are the library's
(``PancreasC2FLib.apps.batch``), so both batch commands write the same table. The exit status is
the library batch's: 0, 7 when some cases failed, or the usage error's code.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading


def _importModule():
    """PancreasC2F.py and PancreasC2FLib: beside this script, or one folder up (installed
    extension: the script sits in a sub-folder of qt-scripted-modules)."""
    here = os.path.dirname(os.path.abspath(__file__))
    for folder in (here, os.path.dirname(here)):
        if os.path.isfile(os.path.join(folder, "PancreasC2F.py")) and folder not in sys.path:
            sys.path.insert(0, folder)
    import PancreasC2F

    return PancreasC2F


def build_parser() -> argparse.ArgumentParser:
    from PancreasC2FLib.apps.batch import add_batch_arguments
    from PancreasC2FLib.pipelines.options import _float_in, _int_in  # checked like the CLI's

    p = argparse.ArgumentParser(prog="PancreasC2F/batch.py", description="Segment the pancreas in every CT of a folder with the Slicer module's logic; CSV summary; resumable.")
    add_batch_arguments(p)
    p.add_argument("--series-uid", help="DICOM folders: the series to read (default: the one with the most slices)")
    g = p.add_argument_group("model and device")
    g.add_argument("--model", default=None, help="registry name or bundle folder (default: the default model)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    g.add_argument("--coarse-n", type=_int_in(0, 100), default=-1, help="sliding-window n of the coarse stage (default: the model's)")
    g.add_argument("--fine-n", type=_int_in(0, 100), default=-1, help="sliding-window n of the fine stage (default: the model's)")
    g.add_argument("--margin-mm", type=_float_in(0.0, 1000.0), default=-1.0, help="margin around the coarse result in mm (default: the model's)")
    g.add_argument("--min-island-fraction", type=_float_in(0.0, 1.0), default=-1.0, help="drop parts smaller than this fraction (default: the model's)")
    g.add_argument("--deterministic", action="store_true", help="deterministic algorithms: identical masks on reruns")
    return p


def slicer_work(module, logic, args, params):
    """The per-case work for ``PancreasC2FLib.apps.batch.run_cases``, through MRML."""
    from PancreasC2FLib.apps.batch import roi_for_case, row_from_report
    from PancreasC2FLib.io.outputs import atomic_write_text
    from PancreasC2FLib.io.images import read_image
    from PancreasC2FLib.apps.report import build_report
    from PancreasC2FLib.io.roi import read_roi, write_roi

    scene = logic.scene

    def work(case, paths):
        image = read_image(case.path, args.series_uid)
        before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
        try:
            volume = logic.addVolumeFromImage(image, case.name)
            roiPath = roi_for_case(args.roi, case.name)
            roiNode = None
            if roiPath:
                roiNode = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", module.ROI_NAME)
                logic.updateRoiNodeFromDict(roiNode, read_roi(roiPath))
            cancel = threading.Event()
            if args.coarse_only:
                job, computed, _ = logic.runStage("region", volume, cancel=cancel, **params)
                write_roi(paths["output"], job.pipeline.roi_for(computed["case"], computed["region"]))
                report = build_report(job.pipeline, computed["case"], computed["region"], None, str(case.path), {"outputs": [str(paths["output"])]})
            else:
                out = logic.process(volume, roi=roiNode, cancel=cancel, **params)
                logic.saveSegmentation(out["segmentation"], paths["output"])
                report = out["report"]
                report["input"] = str(case.path)
                report["outputs"] = [str(paths["output"])]
                report["roi_file"] = str(roiPath) if roiPath else None
            atomic_write_text(paths["report"], json.dumps(report, indent=2))
            return row_from_report(report)
        finally:
            # Leave the scene as it was: remove every node this case added.
            for i in reversed(range(scene.GetNumberOfNodes())):
                node = scene.GetNthNode(i)
                if node is not None and node.GetID() not in before:
                    scene.RemoveNode(node)

    return work


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    module = _importModule()
    from PancreasC2FLib.apps.batch import make_output_folder, plan_batch, print_summary, run_cases
    from PancreasC2FLib.errors import PancreasC2FError

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help or a usage error: return instead of leaving Slicer hanging
        return int(exc.code or 0)
    import slicer

    try:
        if hasattr(slicer, "app"):  # inside the Slicer application
            logic = module.PancreasC2FLogic()
            print(logic.ensureTorch(), file=sys.stderr)
            logic.ensureDependencies()
        else:  # plain Python with slicer-core
            scene, _appLogic, _logics = module.createCoreScene()
            logic = module.PancreasC2FLogic(scene)
        cases, out_dir = plan_batch(args)
        params = {
            "model": args.model, "device": args.device, "coarseN": args.coarse_n, "fineN": args.fine_n,
            "marginMm": args.margin_mm, "minIslandFraction": args.min_island_fraction, "deterministic": args.deterministic,
        }
        pipeline = logic.createPipeline(**params)  # a bad model or device is a usage error: nothing runs, no folder made
        make_output_folder(out_dir)
        print(f"{len(cases)} case(s); model {pipeline.bundle.name} (sha256 {pipeline.bundle.sha256[:16]}) on {pipeline.device}", file=sys.stderr)
        summary = run_cases(cases, out_dir, slicer_work(module, logic, args, params), resume=args.resume, coarse_only=args.coarse_only)
    except PancreasC2FError as exc:
        print(f"batch.py: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("batch.py: cancelled (run again with --resume to continue)", file=sys.stderr)
        return 130
    print_summary(summary, out_dir)
    return summary.exit_code()


if __name__ == "__main__":
    code = main()
    import slicer

    if hasattr(slicer, "app"):
        slicer.util.exit(code)  # --no-main-window keeps Slicer running otherwise
    else:
        sys.exit(code)
