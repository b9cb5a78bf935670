"""``pancreas-c2f batch``: segment every CT in a folder, one CSV row per case, resumable.

    pancreas-c2f batch --input DIR_OR_FILE --output DIR [--resume] [--roi ROI] [--coarse-only]

Cases are image files (.nii.gz, .nii, .nrrd, .nhdr, .mha, .mhd) directly in the input folder and
sub-folders that hold a DICOM series (one case each). For each case the batch writes
``CASE.seg.nrrd`` (provenance in its header; with ``--coarse-only`` the candidate region
``CASE.mrk.json`` instead), with ``--dicom-seg`` also ``CASE.seg.dcm`` for DICOM series cases
(a DICOM Segmentation referencing the series; other cases get a warning), and
``CASE.report.json``, and appends one row (with the quality flag, see processing/quality.py) to
``pancreas_c2f_batch.csv`` as soon as the case ends, so an interrupted batch loses at most the case
it was working on. A failing case is recorded (status ``failed`` and the error) and the batch goes
on; a case whose coarse stage finds nothing is ``empty``. ``--resume`` skips cases with an ``ok``
row whose output still exists (they get a ``skipped`` row); failed and empty cases run again.
The exit status is non-zero only for usage errors and when every case that ran failed.

The pieces shared with the Slicer batch script (``PancreasC2F/batch.py``) live here: discovery,
output names, the CSV and the resume set, and the loop itself (``run_cases``), which takes the
per-case work as a function.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from ..errors import Cancelled, EmptyCoarseResult, InputError, OutputError, PancreasC2FError

CSV_NAME = "pancreas_c2f_batch.csv"
CSV_FIELDS = [
    "case",
    "status",  # ok, failed, empty (the coarse stage found nothing), skipped (--resume)
    "error",
    "input",
    "output",
    "volume_ml",
    "mean_hu",
    "voxels",
    "touches_region_border",
    "touches_image_border",
    "quality",  # ok or review (processing/quality.py): empty, touching a border, odd volume, stages disagree, fragmented
    "quality_reasons",  # short phrases separated by "; "
    "stage_agreement_dsc",  # Dice of the first-stage and final masks in the region (blank: none)
    "largest_component_fraction",
    "region_source",
    "coarse_s",
    "fine_s",
    "total_s",
    "device",
    "model_name",
    "model_sha256",
    "tool_version",
    "warnings",
    "finished",
]
STATUSES = ("ok", "failed", "empty", "skipped")
SEG_EXT = ".seg.nrrd"
ROI_EXT = ".mrk.json"
REPORT_EXT = ".report.json"
DICOM_SEG_EXT = ".seg.dcm"
OVERVIEW_NAME = "overview.png"  # the batch's overview picture (NAME-1.png, NAME-2.png, ... for many cases)


@dataclass(frozen=True)
class CaseInput:
    name: str  # unique, file-system safe; names the outputs and the CSV row
    path: Path  # image file or DICOM folder


# --- discovery -------------------------------------------------------------------------------

def case_name(path: Path) -> str:
    from ..io.formats import IMAGE_SUFFIXES, suffix_of

    name = path.name
    s = suffix_of(path)
    if path.is_file() and s in IMAGE_SUFFIXES:
        name = name[: -len(s)]
    return name


def _is_dicom_folder(folder: Path) -> bool:
    from ..io.images import list_dicom_series

    try:
        return bool(list_dicom_series(folder))
    except (RuntimeError, OSError):
        return False


def discover_cases(input_path: str | Path, exclude: Iterable[str | Path] = ()) -> list[CaseInput]:
    """The cases under ``input_path``: the file itself, or the image files and DICOM-series
    sub-folders directly inside the folder (sorted by name). Hidden entries, segmentations
    (``.seg.nrrd``) and the ``exclude`` folders (e.g. the output folder) are left out."""
    from ..io.formats import IMAGE_SUFFIXES, SEG_SUFFIX, suffix_of

    root = Path(input_path)
    if not root.exists():
        raise InputError(f"input not found: {root}")
    if root.is_file():
        if suffix_of(root) == SEG_SUFFIX or suffix_of(root) not in IMAGE_SUFFIXES:
            raise InputError(f"not a CT image file ({', '.join(IMAGE_SUFFIXES)}): {root}")
        return [CaseInput(case_name(root), root)]
    excluded = {Path(p).resolve() for p in exclude}
    cases: list[CaseInput] = []
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if entry.name.startswith(".") or entry.resolve() in excluded:
            continue
        if entry.is_file():
            s = suffix_of(entry)
            if s == SEG_SUFFIX or s not in IMAGE_SUFFIXES:
                continue
            cases.append(CaseInput(case_name(entry), entry))
        elif entry.is_dir() and _is_dicom_folder(entry):
            cases.append(CaseInput(entry.name, entry))
    if not cases and _is_dicom_folder(root):
        cases.append(CaseInput(root.name, root))  # the folder itself is one DICOM series
    # Names must be unique: ct.nii.gz and ct.nrrd would both write ct.seg.nrrd.
    seen: dict[str, int] = {}
    unique = []
    for c in cases:
        n = seen.get(c.name, 0)
        seen[c.name] = n + 1
        unique.append(c if n == 0 else CaseInput(f"{c.name}_{n + 1}", c.path))
    return unique


def output_paths(out_dir: Path, name: str, coarse_only: bool = False, dicom_seg: bool = False) -> dict[str, Path]:
    main = out_dir / (name + (ROI_EXT if coarse_only else SEG_EXT))
    paths = {"output": main, "report": out_dir / (name + REPORT_EXT)}
    if dicom_seg and not coarse_only:
        paths["dicom_seg"] = out_dir / (name + DICOM_SEG_EXT)
    return paths


def roi_for_case(roi_arg: str | Path | None, name: str) -> Path | None:
    """``--roi`` is one .mrk.json for every case, or a folder of ``CASE.mrk.json`` files (cases
    without one get the coarse stage)."""
    if not roi_arg:
        return None
    p = Path(roi_arg)
    if p.is_dir():
        q = p / (name + ROI_EXT)
        return q if q.is_file() else None
    return p


# --- CSV -------------------------------------------------------------------------------------

class BatchCSV:
    """The batch table: one row per case and run, appended and flushed as each case ends."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def rows(self) -> list[dict]:
        if not self.path.is_file():
            return []
        try:
            with open(self.path, newline="", encoding="utf-8") as f:
                return list(csv.DictReader(f))
        except (OSError, csv.Error, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read the batch table {self.path}: {exc}") from None

    def append(self, row: dict) -> None:
        new = not self.path.is_file() or self.path.stat().st_size == 0
        if not new:
            self._check_header()
        clean = {k: _csv_value(row.get(k)) for k in CSV_FIELDS}
        try:
            with open(self.path, "a", newline="", encoding="utf-8") as f:
                w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
                if new:
                    w.writeheader()
                w.writerow(clean)
                f.flush()
        except OSError as exc:
            raise OutputError(f"cannot write the batch table {self.path}: {exc.strerror or exc}") from None

    def _check_header(self) -> None:
        with open(self.path, newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), [])
        if header != CSV_FIELDS:
            missing = [c for c in CSV_FIELDS if c not in header]
            detail = f": this version adds {', '.join(missing)}" if missing else ""
            raise OutputError(f"{self.path} was written by another version of this tool (different columns{detail}); use a new --output folder")

    def done_cases(self, out_dir: Path, coarse_only: bool = False) -> set[str]:
        """Cases with an ``ok`` row whose output is still there (what ``--resume`` skips)."""
        done = set()
        for r in self.rows():
            if r.get("status") != "ok":
                continue
            out = r.get("output") or str(output_paths(out_dir, r.get("case", ""), coarse_only)["output"])
            if Path(out).is_file():
                done.add(r.get("case", ""))
        return done


def _csv_value(v):
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, tuple)):
        return " | ".join(str(x) for x in v)
    return str(v).replace("\r", " ").replace("\n", " ")


def row_from_report(report: dict) -> dict:
    """The CSV fields a per-case report (report.build_report) provides."""
    t = report.get("timings_s", {})
    region = report.get("region", {})
    return {
        "volume_ml": report.get("pancreas_volume_ml"),
        "mean_hu": report.get("pancreas_mean_hu"),
        "voxels": report.get("pancreas_voxels"),
        "touches_region_border": report.get("touches_region_border"),
        "touches_image_border": report.get("touches_image_border"),
        "quality": report.get("quality"),
        "quality_reasons": "; ".join(report.get("quality_reasons") or []),
        "stage_agreement_dsc": report.get("stage_agreement_dsc"),
        "largest_component_fraction": report.get("largest_component_fraction"),
        "region_source": region.get("source"),
        "coarse_s": t.get("coarse_s"),
        "fine_s": t.get("fine_s"),
        "device": report.get("device"),
        "model_name": report.get("model_name"),
        "model_sha256": report.get("model_sha256"),
        "tool_version": report.get("tool_version"),
        "warnings": report.get("warnings", []),
    }


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# --- the loop --------------------------------------------------------------------------------

CaseWork = Callable[[CaseInput, dict], dict]  # (case, output paths) -> CSV fields


@dataclass
class BatchSummary:
    counts: dict
    total: int

    @property
    def all_failed(self) -> bool:
        """Every case failed (cases skipped as already done count as done, not failed)."""
        return self.total > 0 and self.counts["failed"] == self.total

    def exit_code(self) -> int:
        return 1 if self.all_failed else 0

    def line(self) -> str:
        return f"{self.total} case(s): " + ", ".join(f"{self.counts[s]} {s}" for s in STATUSES)


def run_cases(
    cases: list[CaseInput],
    out_dir: Path,
    work: CaseWork,
    resume: bool = False,
    coarse_only: bool = False,
    log: Callable[[str], None] | None = None,
    dicom_seg: bool = False,
) -> BatchSummary:
    """Run ``work`` on every case, one CSV row per case written as it ends; a failing case is
    recorded and the loop goes on. Ctrl-C (or ``Cancelled``) stops the batch after recording the
    case it interrupted as failed, so ``--resume`` continues from there."""
    log = log or (lambda m: print(m, file=sys.stderr))
    out_dir = Path(out_dir)
    table = BatchCSV(out_dir / CSV_NAME)
    done = table.done_cases(out_dir, coarse_only) if resume else set()
    counts = {s: 0 for s in STATUSES}
    for i, case in enumerate(cases, 1):
        paths = output_paths(out_dir, case.name, coarse_only, dicom_seg)
        row = {"case": case.name, "input": str(case.path), "output": str(paths["output"])}
        if case.name in done:
            row.update(status="skipped", finished=_now())
            table.append(row)
            counts["skipped"] += 1
            log(f"[{i}/{len(cases)}] {case.name}: skipped (done in an earlier run)")
            continue
        t0 = time.perf_counter()
        interrupted = False
        try:
            row.update(work(case, paths))
            row["status"] = "ok"
        except EmptyCoarseResult as exc:
            row.update(status="empty", error=str(exc), output="")
        except (KeyboardInterrupt, Cancelled) as exc:
            row.update(status="failed", error="cancelled", output="")
            interrupted = exc
        except PancreasC2FError as exc:
            row.update(status="failed", error=str(exc), output="")
        except Exception as exc:  # a bug or an unexpected library error: record it, keep going
            row.update(status="failed", error=f"internal error: {exc.__class__.__name__}: {exc}", output="")
        row["total_s"] = round(time.perf_counter() - t0, 3)
        row["finished"] = _now()
        if row["status"] != "ok":
            for p in paths.values():  # never leave a partial or stale output beside a failed row
                p.unlink(missing_ok=True)
        table.append(row)
        counts[row["status"]] += 1
        detail = f"{row.get('volume_ml')} mL" if row["status"] == "ok" and row.get("volume_ml") not in (None, "") else row.get("error", "")
        log(f"[{i}/{len(cases)}] {case.name}: {row['status']} {detail} ({row['total_s']:.1f} s)")
        if interrupted:
            raise interrupted
    return BatchSummary(counts, len(cases))


# --- the library's own per-case work ---------------------------------------------------------

def library_work(pipeline, roi_arg=None, coarse_only: bool = False, series_uid=None) -> CaseWork:
    """Per-case work with the pure library: read, coarse stage (or the ROI), fine stage, write the
    .seg.nrrd (or the candidate .mrk.json), the DICOM SEG when ``paths`` has one and the case is
    a DICOM series (otherwise a warning says why there is none) and the report, with provenance."""
    from ..io.outputs import atomic_path, atomic_write_text
    from ..io.images import read_image, write_segmentation
    from .report import build_report
    from ..io.roi import read_roi, write_roi

    def work(case: CaseInput, paths: dict) -> dict:
        t0 = time.perf_counter()
        image = read_image(case.path, series_uid)
        roi_path = roi_for_case(roi_arg, case.name)
        roi = read_roi(roi_path) if roi_path else None
        cancel = threading.Event()
        c = pipeline.prepare(image)
        region = pipeline.region_from_roi(c, roi) if roi is not None else pipeline.find_region(c, None, cancel)
        result = None if coarse_only else pipeline.segment_region(c, region, None, cancel)
        provenance = pipeline.provenance()
        written = []
        try:
            if result is None:
                write_roi(paths["output"], pipeline.roi_for(c, region))
            else:
                write_segmentation(paths["output"], result.label, provenance)
            written.append(paths["output"])
            outs = [str(paths["output"])]
            no_dicom = None
            if result is not None and paths.get("dicom_seg") is not None:
                if Path(case.path).is_dir():
                    from ..io.dicomseg import source_series, write_dicom_seg

                    with atomic_path(paths["dicom_seg"]) as tmp:
                        write_dicom_seg(tmp, result.label, source_series(case.path, series_uid), provenance)
                    written.append(paths["dicom_seg"])
                    outs.append(str(paths["dicom_seg"]))
                else:
                    no_dicom = "no DICOM SEG written: the input is not a DICOM series folder"
            report = build_report(pipeline, c, region, result, str(case.path), {"outputs": outs, "roi_file": str(roi_path) if roi_path else None})
            if no_dicom:
                report["warnings"].append(no_dicom)
            report["timings_s"]["total_s"] = round(time.perf_counter() - t0, 3)
            atomic_write_text(paths["report"], json.dumps(report, indent=2))
        except BaseException:
            for p in written:
                p.unlink(missing_ok=True)
            raise
        return row_from_report(report)

    return work


# --- command line ----------------------------------------------------------------------------

def add_arguments(p) -> None:
    from ..pipelines.options import add_model_options

    add_batch_arguments(p)
    p.add_argument("--series-uid", help="DICOM folders: the series to read (default: the one with the most slices)")
    p.add_argument("--dicom-seg", action="store_true", help=f"DICOM series cases: also write CASE{DICOM_SEG_EXT}, a DICOM Segmentation referencing the series (needs highdicom); other cases get a warning")
    p.add_argument("--no-overview", action="store_true", help=f"do not draw {OVERVIEW_NAME} (one row per case: views with the mask, volume, quality flag; needs matplotlib)")
    add_model_options(p)


def add_batch_arguments(p) -> None:
    """The options the library batch and the Slicer batch script share."""
    p.add_argument("--input", required=True, help="a CT file, or a folder of CT files and/or DICOM series sub-folders")
    p.add_argument("--output", required=True, help="folder for CASE.seg.nrrd, CASE.report.json and the CSV (created if missing)")
    p.add_argument("--resume", action="store_true", help="skip cases already done (an 'ok' row in the CSV and the output present)")
    p.add_argument("--roi", help="Slicer markups ROI (.mrk.json) used for every case, or a folder of CASE.mrk.json: skip the coarse stage")
    p.add_argument("--coarse-only", action="store_true", help="only the coarse stage: write each case's candidate region CASE.mrk.json")


def prepare_output(args) -> tuple[list[CaseInput], Path]:
    """Check the arguments, create the output folder and discover the cases (usage errors raise)."""
    if args.coarse_only and args.roi:
        raise InputError("--coarse-only and --roi exclude each other")
    if args.roi and not Path(args.roi).exists():
        raise InputError(f"ROI not found: {args.roi}")
    out_dir = Path(args.output)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--output must be a folder: {out_dir}")
    cases = discover_cases(args.input, exclude=[out_dir])
    if not cases:
        raise InputError(f"no CT images or DICOM series found in {args.input}")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {out_dir}: {exc.strerror or exc}") from None
    return cases, out_dir


def run(args) -> int:
    from ..pipelines.options import pipeline_from_args

    if getattr(args, "dicom_seg", False):
        if args.coarse_only:
            raise InputError("--dicom-seg writes the segmentation: it cannot be used with --coarse-only")
        from ..io.dicomseg import require_highdicom

        require_highdicom()
    cases, out_dir = prepare_output(args)
    pipeline = pipeline_from_args(args)  # a bad model is a usage error: nothing runs
    print(f"{len(cases)} case(s); model {pipeline.bundle.name} (sha256 {pipeline.bundle.sha256[:16]}) on {pipeline.device}", file=sys.stderr)
    work = library_work(pipeline, args.roi, args.coarse_only, getattr(args, "series_uid", None))
    summary = run_cases(cases, out_dir, work, resume=args.resume, coarse_only=args.coarse_only, dicom_seg=getattr(args, "dicom_seg", False))
    print(f"{summary.line()}; table: {out_dir / CSV_NAME}")
    if not getattr(args, "no_overview", False):  # one row per case (apps/overlay.py)
        from .overlay import batch_overview

        batch_overview(out_dir / OVERVIEW_NAME, cases, BatchCSV(out_dir / CSV_NAME).rows(), lambda n: output_paths(out_dir, n)["report"], getattr(args, "series_uid", None))
    return summary.exit_code()
