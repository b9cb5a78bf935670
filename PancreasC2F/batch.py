"""Batch pancreas segmentation through the Slicer module's logic (MRML nodes), without a GUI.

In 3D Slicer::

    Slicer --no-main-window --python-script PancreasC2F/batch.py -- --input DIR_OR_FILE --output DIR \\
        [--resume] [--roi ROI] [--coarse-only] [--dicom-seg] [--model NAME_OR_FOLDER] [--pipeline NAME]
        [--preset paper|fast|default] [--device auto|cpu|cuda|mps] [--threads N] ...

or in plain Python with the ``slicer-core`` package (MRML and module logics without Qt)::

    python PancreasC2F/batch.py --input DIR_OR_FILE --output DIR ...

Each case is loaded into a volume node, segmented by ``PancreasC2FLogic`` (ROI node, segmentation
node with the coded "Pancreas" segment and provenance attributes), saved as ``CASE.seg.nrrd`` with
MRML's segmentation storage node (``--coarse-only``: the region as ``CASE.mrk.json``) plus
``CASE.report.json``, and its nodes are removed again. Case discovery, the CSV (one row per case,
written as each case ends), ``--resume`` and the keep-going loop are the library's
(``PancreasC2FLib.apps.batch``), so both batch commands write the same table. The exit status is
the library batch's: 0, 7 when some cases failed, or the usage error's code. It takes the options of
``pancreas-c2f batch`` (the same argparse definitions). Inside Slicer the script always ends Slicer
with its exit status, whatever goes wrong (an unexpected error exits 1), so a headless run never
hangs.
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
    from PancreasC2FLib.apps.batch import add_arguments

    p = argparse.ArgumentParser(prog="PancreasC2F/batch.py", description="Segment the pancreas in every CT of a folder with the Slicer module's logic; CSV summary; resumable.")
    add_arguments(p)  # the options of `pancreas-c2f batch`
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
                if paths.get("dicom_seg") is not None:
                    provenance = {k: report[k] for k in module.PROVENANCE_KEYS if k in report}
                    _writeDicomSeg(case, paths, out, args.series_uid, report, provenance)
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


def _writeDicomSeg(case, paths, out, seriesUid, report, provenance) -> None:
    """CASE.dcm beside the .seg.nrrd for a DICOM series case (as the library batch does)."""
    from pathlib import Path

    if not Path(case.path).is_dir():
        report["warnings"].append("no DICOM SEG written: the input is not a DICOM series folder")
        return
    from PancreasC2FLib.io.dicomseg import source_series, write_dicom_seg
    from PancreasC2FLib.io.outputs import atomic_path

    with atomic_path(paths["dicom_seg"]) as tmp:
        write_dicom_seg(tmp, out["result"].label, source_series(case.path, seriesUid), provenance)
    report["outputs"].append(str(paths["dicom_seg"]))


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    module = _importModule()
    from PancreasC2FLib.apps.batch import make_output_folder, plan_batch, print_summary, run_cases
    from PancreasC2FLib.errors import InputError, PancreasC2FError

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
        if args.dicom_seg:
            if args.coarse_only:
                raise InputError("--dicom-seg writes the segmentation: it cannot be used with --coarse-only")
            from PancreasC2FLib.io.dicomseg import require_highdicom

            require_highdicom()
        cases, out_dir = plan_batch(args)
        params = {
            "model": args.model, "pipeline": args.pipeline, "device": args.device, "threads": args.threads, "batchSize": args.batch_size,
            "preset": args.preset, "coarseN": args.coarse_n, "fineN": args.fine_n, "marginMm": args.margin_mm,
            "minIslandFraction": args.min_island_fraction, "deterministic": args.deterministic,
        }
        pipeline = logic.createPipeline(**params)  # a bad model or device is a usage error: nothing runs, no folder made
        make_output_folder(out_dir)
        print(f"{len(cases)} case(s); model {pipeline.bundle.name} (sha256 {pipeline.bundle.sha256[:16]}) on {pipeline.device}", file=sys.stderr)
        summary = run_cases(cases, out_dir, slicer_work(module, logic, args, params), resume=args.resume, coarse_only=args.coarse_only, dicom_seg=args.dicom_seg)
    except PancreasC2FError as exc:
        print(f"batch.py: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("batch.py: cancelled (run again with --resume to continue)", file=sys.stderr)
        return 130
    except Exception as exc:  # a torch install failure, a bug: still a one-line error and an exit status
        print(f"batch.py: internal error: {exc.__class__.__name__}: {exc}", file=sys.stderr)
        return 1
    print_summary(summary, out_dir)
    return summary.exit_code()


def _exit(code: int) -> None:
    import slicer

    if hasattr(slicer, "app"):
        slicer.util.exit(code)  # --no-main-window keeps Slicer running otherwise
    else:
        sys.exit(code)


def run_script(argv=None, exit=_exit) -> None:
    """Run ``main`` and always end with an exit status: 1 unless ``main`` returned one."""
    code = 1
    try:
        code = main(argv)
    finally:
        exit(code)


if __name__ == "__main__":
    run_script()
