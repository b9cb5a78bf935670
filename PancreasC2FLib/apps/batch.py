"""``pancreas-c2f batch``: segment every CT in a folder, one CSV row per case, resumable.

    pancreas-c2f batch --input DIR_OR_FILE --output DIR [--resume | --overwrite] [--roi ROI] [--coarse-only]

Cases are image files (.nii.gz, .nii, .nrrd, .nhdr, .mha, .mhd) directly in the input folder and
sub-folders that hold a DICOM series, directly or in folders below (a TCIA case folder; one case
each). Clashing names get distinct suffixes. For each case the batch writes ``CASE.seg.nrrd``
(provenance in its header; with ``--coarse-only`` the candidate region ``CASE.mrk.json``
instead), with ``--dicom-seg`` also ``CASE.seg.dcm`` for DICOM series cases (a DICOM
Segmentation referencing the series; other cases get a warning), and ``CASE.report.json``, all
or nothing, and sets the case's row (with the quality flag, see processing/quality.py) in
``pancreas_c2f_batch.csv`` as soon as the case ends (the table rewritten all or nothing), so an
interrupted batch loses at most the case it was working on. A failing case is recorded (status
``failed`` and the error) and the batch goes on; a case where a stage finds nothing is ``empty``.
An output folder holding results is refused unless ``--resume`` (skips cases with an ``ok`` row
whose output still exists; failed and empty cases run again) or ``--overwrite`` (every case runs
again). The exit status is 0, 7 (``CasesFailed``) when some cases failed, or a usage error's code.

The pieces shared with the Slicer batch script (``PancreasC2F/batch.py``) live here: discovery,
output names, the CSV and the resume set, and the loop itself (``run_cases``), which takes the
per-case work as a function.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from ..errors import Cancelled, CasesFailed, EmptyCoarseResult, InputError, OutputError, PancreasC2FError

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
    "quality",  # ok or review (processing/quality.py): empty, touching a border, odd volume, stages or ensemble members disagree, fragmented
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
    """A folder holding a DICOM series, directly or below (a case folder as TCIA delivers it). A
    folder whose name ITK cannot take is kept as a case, so its row says why it failed."""
    from ..io.formats import check_itk_path
    from ..io.images import find_dicom_series

    try:
        check_itk_path(folder)
        return bool(find_dicom_series(folder))
    except InputError:
        return True
    except (RuntimeError, OSError):
        return False


def unique_names(cases: list[CaseInput]) -> list[CaseInput]:
    """Give clashing names (ct.nii.gz and ct.nrrd both make ct.seg.nrrd) a suffix _2, _3, ...
    that no other case has or gets, so no two cases ever share an output."""
    taken = {c.name for c in cases}  # every first occurrence keeps its name
    first: set[str] = set()
    unique = []
    for c in cases:
        if c.name not in first:
            first.add(c.name)
            unique.append(c)
            continue
        n = 2
        while f"{c.name}_{n}" in taken:
            n += 1
        taken.add(f"{c.name}_{n}")
        unique.append(CaseInput(f"{c.name}_{n}", c.path))
    return unique


def discover_cases(input_path: str | Path, exclude: Iterable[str | Path] = ()) -> list[CaseInput]:
    """The cases under ``input_path``: the file itself, or the image files and DICOM-series
    sub-folders (a series directly in them or in folders below) directly inside the folder (sorted
    by name). Hidden entries, segmentations (``.seg.nrrd``) and the ``exclude`` folders (e.g. the
    output folder) are left out."""
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
    return unique_names(cases)


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
    """The batch table: one current row per case, the whole table rewritten (all or nothing) as
    each case ends, so a crash or a full disk never leaves half a row. A table cut by an older
    version or by hand is repaired: incomplete rows are dropped (those cases run again)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.dropped = 0  # incomplete rows found by the last rows()

    def rows(self) -> list[dict]:
        """The table's complete rows, the last one of each case."""
        self.dropped = 0
        if not self.path.is_file() or self.path.stat().st_size == 0:
            return []
        try:
            text = self.path.read_text(encoding="utf-8")
            records = list(csv.reader(io.StringIO(text, newline="")))
        except (OSError, csv.Error, UnicodeDecodeError) as exc:
            raise OutputError(f"cannot read the batch table {self.path}: {exc}; use a new --output folder") from None
        header = records[0] if records else []
        if header != CSV_FIELDS:
            missing = [c for c in CSV_FIELDS if c not in header]
            detail = f": this version adds {', '.join(missing)}" if missing else ""
            raise OutputError(f"{self.path} was written by another version of this tool (different columns{detail}); use a new --output folder")
        body = records[1:]
        if body and not text.endswith(("\n", "\r")):
            body = body[:-1]  # the last line was cut off mid-row
            self.dropped += 1
        by_case: dict[str, dict] = {}
        for r in body:
            if len(r) != len(CSV_FIELDS) or r[1] not in STATUSES:
                self.dropped += 1
                continue
            by_case[r[0]] = dict(zip(CSV_FIELDS, r))
        return list(by_case.values())

    def record(self, row: dict) -> None:
        """Set the case's row (replacing an earlier one) and rewrite the table."""
        from ..io.outputs import atomic_write_text

        clean = {k: _csv_value(row.get(k)) for k in CSV_FIELDS}
        rows = [r for r in self.rows() if r["case"] != clean["case"]] + [clean]
        out = io.StringIO(newline="")
        w = csv.DictWriter(out, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        atomic_write_text(self.path, out.getvalue())

    append = record  # the name earlier versions used

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
    return printable(str(v).replace("\r", " ").replace("\n", " "))


def printable(text: str) -> str:
    """A name that is not UTF-8 (undecodable bytes) escaped, never broken text or a crash."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


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


SUMMARY_KINDS = ("ok", "review", "failed", "empty", "skipped")


def summary_kind(row: dict) -> str:
    """How a row counts in the summary: ``ok`` rows split by their quality flag into ok and review."""
    if row.get("status") == "ok" and row.get("quality") == "review":
        return "review"
    return row.get("status", "failed")


@dataclass
class BatchSummary:
    counts: dict  # SUMMARY_KINDS -> number of cases
    total: int

    @property
    def all_failed(self) -> bool:
        """Every case failed (cases skipped as already done count as done, not failed)."""
        return self.total > 0 and self.counts["failed"] == self.total

    def exit_code(self) -> int:
        """0, or CasesFailed's code when any case failed (empty results are findings, not failures)."""
        return CasesFailed.exit_code if self.counts["failed"] else 0

    def line(self) -> str:
        skipped = f", {self.counts['skipped']} skipped (done earlier)" if self.counts["skipped"] else ""
        return f"{self.total} case(s): " + ", ".join(f"{self.counts[k]} {k}" for k in SUMMARY_KINDS[:4]) + skipped


def summary_lines(summary: BatchSummary, out_dir: Path, pictures: Iterable[Path] = ()) -> list[str]:
    """The end of a batch: the counts and where the table, the results and the pictures are."""
    out_dir = Path(out_dir)
    lines = [summary.line(), f"table: {out_dir / CSV_NAME}", f"segmentations and reports: {out_dir}"]
    pictures = list(pictures) or sorted(out_dir.glob("*.png"))
    if pictures:
        lines.append("pictures: " + (str(pictures[0]) if len(pictures) == 1 else f"{len(pictures)} PNG files in {out_dir}"))
    if summary.counts["failed"]:
        lines.append(f"{summary.counts['failed']} case(s) failed: their rows in the table say why; fix them and run again with --resume")
    return lines


def case_line(i: int, n: int, name: str, row: dict) -> str:
    """One progress line per case: status, volume and quality flag, or the error."""
    if row["status"] == "ok":
        detail = f"{row['volume_ml']:.1f} mL" if isinstance(row.get("volume_ml"), (int, float)) else ""
        if row.get("quality"):
            reasons = f" ({row['quality_reasons']})" if row.get("quality_reasons") else ""
            detail += f", quality {row['quality']}{reasons}"
    else:
        detail = row.get("error", "")
    return printable(f"[{i}/{n}] {name}: {row['status']} {detail} ({row['total_s']:.1f} s)".replace("  ", " "))


def check_existing_results(cases: list[CaseInput], out_dir: Path, resume: bool, overwrite: bool, coarse_only: bool = False, dicom_seg: bool = False) -> None:
    """A batch never replaces finished results unless asked: with results (or a table) already in
    the output folder, ``--resume`` continues and ``--overwrite`` redoes every case; neither is
    exit 4 before any work."""
    if resume or overwrite:
        return
    found = [out_dir / CSV_NAME] if (out_dir / CSV_NAME).exists() else []
    for c in cases:
        found += [p for p in output_paths(out_dir, c.name, coarse_only, dicom_seg).values() if os.path.lexists(p)]
    if found:
        raise OutputError(f"{out_dir} already holds results ({found[0].name}{f' and {len(found) - 1} more' if len(found) > 1 else ''}): use --resume to continue, --overwrite to redo every case, or a new --output folder")


def run_cases(
    cases: list[CaseInput],
    out_dir: Path,
    work: CaseWork,
    resume: bool = False,
    coarse_only: bool = False,
    log: Callable[[str], None] | None = None,
    dicom_seg: bool = False,
) -> BatchSummary:
    """Run ``work`` on every case, the case's CSV row set as it ends; a failing case is recorded
    and the loop goes on. Ctrl-C (or ``Cancelled``) stops the batch after recording the case it
    interrupted as failed, so ``--resume`` continues from there."""
    from ..io.outputs import clean_stale_temporaries

    log = log or (lambda m: print(m, file=sys.stderr))
    out_dir = Path(out_dir)
    for p in clean_stale_temporaries(out_dir):
        log(f"removed {p.name}, left by a run that was killed")
    table = BatchCSV(out_dir / CSV_NAME)
    done = table.done_cases(out_dir, coarse_only) if resume else set()
    if table.dropped:
        log(f"{table.path.name}: dropped {table.dropped} incomplete row(s) (a run was cut off); those cases run again")
    counts = {s: 0 for s in SUMMARY_KINDS}
    for i, case in enumerate(cases, 1):
        paths = output_paths(out_dir, case.name, coarse_only, dicom_seg)
        row = {"case": case.name, "input": str(case.path), "output": str(paths["output"])}
        if case.name in done:  # its ok row stays the case's row
            counts["skipped"] += 1
            log(printable(f"[{i}/{len(cases)}] {case.name}: skipped (done in an earlier run)"))
            continue
        t0 = time.perf_counter()
        interrupted = False
        try:
            row.update(work(case, paths))
            row["status"] = "ok"
            if not coarse_only and row.get("voxels") in (0, "0"):  # a later stage found nothing
                row.update(status="empty", error="no pancreas in the final mask (the segmentation is empty)")
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
        if not row["output"]:
            for p in paths.values():  # never leave a partial or stale output beside a failed row
                p.unlink(missing_ok=True)
        table.record(row)
        counts[summary_kind(row)] += 1
        log(case_line(i, len(cases), case.name, row))
        if interrupted:
            raise interrupted
    return BatchSummary(counts, len(cases))


# --- the library's own per-case work ---------------------------------------------------------

def library_work(pipeline, roi_arg=None, coarse_only: bool = False, series_uid=None, replace: bool = True, log: Callable[[str], None] | None = None) -> CaseWork:
    """Per-case work with the pure library: read, coarse stage (or the ROI), fine stage, write the
    .seg.nrrd (or the candidate .mrk.json), the DICOM SEG when ``paths`` has one and the case is
    a DICOM series (otherwise a warning says why there is none) and the report, with provenance,
    all or nothing. ``replace``: outputs may replace files (--resume, --overwrite); otherwise a
    file that appeared meanwhile is never replaced."""
    from ..io.outputs import Outputs, atomic_write_text
    from ..io.images import dicom_series_note, read_image, write_segmentation
    from .report import build_report
    from ..io.roi import read_roi, write_roi

    log = log or (lambda m: print(m, file=sys.stderr))

    def work(case: CaseInput, paths: dict) -> dict:
        t0 = time.perf_counter()
        is_dicom = Path(case.path).is_dir()
        image = read_image(case.path, series_uid)
        note = dicom_series_note(case.path, series_uid) if is_dicom else None
        if note:
            log(printable(f"{case.name}: {note}"))
        roi_path = roi_for_case(roi_arg, case.name)
        roi = read_roi(roi_path) if roi_path else None
        cancel = threading.Event()
        c = pipeline.prepare(image)
        region = pipeline.region_from_roi(c, roi) if roi is not None else pipeline.find_region(c, None, cancel)
        result = None if coarse_only else pipeline.segment_region(c, region, None, cancel)
        provenance = pipeline.provenance()
        outputs = Outputs(replace)
        dicom_seg = paths.get("dicom_seg") if result is not None and is_dicom else None
        out, seg_dcm, report_path = (outputs.plan(paths["output"]), outputs.plan(dicom_seg), outputs.plan(paths["report"]))
        try:
            if result is None:
                outputs.write(out, lambda p: write_roi(p, pipeline.roi_for(c, region)))
            else:
                outputs.write(out, lambda p: write_segmentation(p, result.label, provenance))
            if seg_dcm is not None:
                from ..io.dicomseg import source_series, write_dicom_seg

                outputs.write(seg_dcm, lambda p: write_dicom_seg(p, result.label, source_series(case.path, series_uid), provenance))
            report = build_report(pipeline, c, region, result, str(case.path), {"outputs": [str(p) for p in outputs.planned if p != report_path], "roi_file": str(roi_path) if roi_path else None})
            if note:
                report["dicom_series"] = note
            if result is not None and paths.get("dicom_seg") is not None and not is_dicom:
                report["warnings"].append("no DICOM SEG written: the input is not a DICOM series folder")
            report["timings_s"]["total_s"] = round(time.perf_counter() - t0, 3)
            outputs.write(report_path, lambda p: atomic_write_text(p, json.dumps(report, indent=2)))
            outputs.commit()
        except BaseException:
            outputs.rollback()
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
    p.add_argument("--overwrite", action="store_true", help="redo every case, replacing the results of an earlier run in --output")
    p.add_argument("--roi", help="Slicer markups ROI (.mrk.json) used for every case, or a folder of CASE.mrk.json: skip the coarse stage")
    p.add_argument("--coarse-only", action="store_true", help="only the coarse stage: write each case's candidate region CASE.mrk.json")


def plan_batch(args) -> tuple[list[CaseInput], Path]:
    """Check the arguments, discover the cases and refuse to replace earlier results; changes
    nothing on disk (usage errors raise)."""
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
    check_existing_results(cases, out_dir, args.resume, getattr(args, "overwrite", False), args.coarse_only, getattr(args, "dicom_seg", False))
    return cases, out_dir


def make_output_folder(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {out_dir}: {exc.strerror or exc}") from None


def prepare_output(args) -> tuple[list[CaseInput], Path]:
    """``plan_batch`` and the output folder created."""
    cases, out_dir = plan_batch(args)
    make_output_folder(out_dir)
    return cases, out_dir


def run(args) -> int:
    from ..pipelines.options import pipeline_from_args

    if getattr(args, "dicom_seg", False):
        if args.coarse_only:
            raise InputError("--dicom-seg writes the segmentation: it cannot be used with --coarse-only")
        from ..io.dicomseg import require_highdicom

        require_highdicom()
    cases, out_dir = plan_batch(args)
    pipeline = pipeline_from_args(args)  # a bad model or device is a usage error: nothing runs, no folder made
    make_output_folder(out_dir)
    print(f"{len(cases)} case(s); model {pipeline.bundle.name} (sha256 {pipeline.bundle.sha256[:16]}) on {pipeline.device}", file=sys.stderr)
    work = library_work(pipeline, args.roi, args.coarse_only, getattr(args, "series_uid", None), replace=args.resume or args.overwrite)
    summary = run_cases(cases, out_dir, work, resume=args.resume, coarse_only=args.coarse_only, dicom_seg=getattr(args, "dicom_seg", False))
    pictures: list = []
    if not getattr(args, "no_overview", False):  # one row per case (apps/overlay.py)
        from .overlay import batch_overview

        pictures = batch_overview(out_dir / OVERVIEW_NAME, cases, BatchCSV(out_dir / CSV_NAME).rows(), lambda n: output_paths(out_dir, n)["report"], getattr(args, "series_uid", None))
    print_summary(summary, out_dir, pictures)
    return summary.exit_code()


def print_summary(summary: BatchSummary, out_dir: Path, pictures: Iterable[Path] = ()) -> None:
    print(printable("\n".join(summary_lines(summary, out_dir, pictures))))
