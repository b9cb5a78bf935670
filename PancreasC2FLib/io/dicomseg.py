"""DICOM Segmentation output (``--dicom-seg``), with highdicom (``pip install pancreas-c2f[dicom-seg]``).

One binary segment "Pancreas" coded in SNOMED CT (category Anatomical Structure 123037004, type
Pancreas 15776009), referencing the source CT series frame by frame. Provenance:

- Algorithm Identification: name ``PancreasC2F <model name>``, version ``<tool version> (model
  <model version>)``, family Artificial Intelligence, and Algorithm Parameters (0066,0032, free
  text up to 10,240 characters) = JSON of the model sha256, the pipeline and every parameter;
- Content Description and Series Description: the tool, the model and the sha256's first digits;
- Manufacturer ``PancreasC2F``, Manufacturer's Model Name the model name, Software Versions the
  tool version.

The mask (on the input grid, which the series reader built from these files) is placed on each
source instance by its Image Position (Patient): frame ``f`` of the SEG is the mask's slice at
instance ``f``'s position, whatever order the files are in.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import InputError, OutputError
from .images import PANCREAS_COLOR, PANCREAS_TERMINOLOGY, select_dicom_series

INSTALL_HINT = "pip install 'pancreas-c2f[dicom-seg]'"
SERIES_NUMBER = 900  # any number: viewers list series by it; high so the SEG sorts after the CT
LT_MAX = 10240  # characters of an LT element (Algorithm Parameters)


def require_highdicom() -> None:
    """Raise InputError (exit 2) when highdicom is not installed."""
    try:
        import highdicom  # noqa: F401
    except ImportError:
        raise InputError(f"--dicom-seg needs the highdicom package: {INSTALL_HINT}") from None


# What highdicom needs of every source instance to reference it (and the study it joins).
REQUIRED_SOURCE_ATTRIBUTES = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "Rows", "Columns")


def check_dicom_seg_possible(input_path: str | Path, series_uid: str | None = None) -> None:
    """Raise InputError (exit 2) with the reason when a DICOM SEG cannot be written for this
    input: it is not a DICOM series folder, highdicom is not installed, or the series' files lack
    what a SEG must reference (named). Checked before any work."""
    path = Path(input_path)
    if not path.is_dir():
        raise InputError(f"--dicom-seg needs a DICOM series folder as input, not a file ({path.name}): write a label map or .seg.nrrd with -o instead")
    require_highdicom()
    import pydicom

    files = source_series(path, series_uid)
    missing: set[str] = set()
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception as exc:  # pydicom raises many kinds for damaged files
            raise InputError(f"--dicom-seg: cannot read {Path(f).name}: {exc}") from None
        missing.update(a for a in REQUIRED_SOURCE_ATTRIBUTES if getattr(ds, a, None) in (None, ""))
    if missing:
        raise InputError(f"--dicom-seg: the series' files lack {', '.join(sorted(missing))}, which a DICOM SEG must reference; write a label map or .seg.nrrd with -o instead")


def source_series(folder: str | Path, series_uid: str | None = None) -> list[str]:
    """The files of the series ``read_image`` reads from ``folder``."""
    return list(select_dicom_series(folder, series_uid)[1])


def frames_for_sources(label: sitk.Image, datasets) -> np.ndarray:
    """(n_instances, rows, columns) uint8: the mask's slice at each source instance's position, in
    the instances' order. Refuses (OutputError) instances that do not lie on the label's slices."""
    arr = sitk.GetArrayViewFromImage(label)  # (k, j, i): k slices of rows j and columns i
    direction = np.array(label.GetDirection()).reshape(3, 3)
    spacing = label.GetSpacing()
    frames = np.empty((len(datasets),) + arr.shape[1:], np.uint8)
    for f, ds in enumerate(datasets):
        where = f"instance {getattr(ds, 'SOPInstanceUID', f)}"
        try:
            ipp = [float(v) for v in ds.ImagePositionPatient]
            iop = np.array([float(v) for v in ds.ImageOrientationPatient])
            rows, cols = int(ds.Rows), int(ds.Columns)
            row_mm, col_mm = (float(v) for v in ds.PixelSpacing)  # between rows, between columns
        except (AttributeError, TypeError, ValueError):
            raise OutputError(f"cannot write the DICOM SEG: {where} has no usable geometry (position, orientation, spacing)") from None
        same_plane = np.allclose(iop[:3], direction[:, 0], atol=1e-4) and np.allclose(iop[3:], direction[:, 1], atol=1e-4)
        same_pixels = (cols, rows) == tuple(label.GetSize()[:2]) and np.allclose((col_mm, row_mm), spacing[:2], rtol=1e-4)
        if not (same_plane and same_pixels):
            raise OutputError(f"cannot write the DICOM SEG: {where} is not on the segmentation's grid (was the series resampled?)")
        i, j, k = label.TransformPhysicalPointToContinuousIndex(ipp)
        kk = round(k)
        if abs(i) > 1e-2 or abs(j) > 1e-2 or abs(k - kk) > 1e-2 or not 0 <= kk < arr.shape[0]:
            raise OutputError(f"cannot write the DICOM SEG: {where} lies between or outside the segmentation's slices")
        frames[f] = arr[kk] > 0
    return frames


def algorithm_parameters(provenance: dict) -> str:
    """Algorithm Parameters text: JSON of the sha256, pipeline and parameters (compacted, then
    without the parameters if it would not fit an LT element)."""
    full = {"model_sha256": provenance.get("model_sha256"), "pipeline": provenance.get("pipeline"), "parameters": provenance.get("parameters")}
    text = json.dumps(full, sort_keys=True, separators=(",", ":"))
    if len(text) > LT_MAX:
        text = json.dumps({k: v for k, v in full.items() if k != "parameters"}, separators=(",", ":"))
    return text


def build_dicom_seg(label: sitk.Image, source_files: list[str], provenance: dict):
    """The highdicom Segmentation of ``label`` (uint8 on the grid read from ``source_files``)."""
    import highdicom as hd
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.sr.codedict import codes

    try:
        datasets = [pydicom.dcmread(f, stop_before_pixels=True) for f in source_files]
    except (OSError, InvalidDicomError) as exc:
        raise OutputError(f"cannot write the DICOM SEG: cannot read the source series again: {exc}") from None
    frames = frames_for_sources(label, datasets)
    tool = f"PancreasC2F {provenance.get('tool_version', '')}".strip()
    model = str(provenance.get("model_name") or "model")
    sha = str(provenance.get("model_sha256") or "")
    algorithm = hd.AlgorithmIdentificationSequence(
        name=f"PancreasC2F {model}"[:64],
        version=f"{provenance.get('tool_version', '')} (model {provenance.get('model_version') or '?'})"[:64],
        family=codes.cid7162.ArtificialIntelligence,
        source="PancreasC2F",
    )
    algorithm[0].AlgorithmParameters = algorithm_parameters(provenance)
    category, kind = PANCREAS_TERMINOLOGY["category"], PANCREAS_TERMINOLOGY["type"]
    color = {}
    if hasattr(getattr(hd, "color", None), "CIELabColor"):  # Slicer's pancreas colour, where highdicom has it
        color["display_color"] = hd.color.CIELabColor.from_rgb(*(round(255 * c) for c in PANCREAS_COLOR))
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="Pancreas",
        segmented_property_category=hd.sr.CodedConcept(category[1], category[0], category[2]),
        segmented_property_type=hd.sr.CodedConcept(kind[1], kind[0], kind[2]),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        **color,
    )
    try:
        return hd.seg.Segmentation(
            source_images=datasets,
            pixel_array=frames,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[segment],
            series_instance_uid=hd.UID(),
            series_number=SERIES_NUMBER,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="PancreasC2F",
            manufacturer_model_name=model[:64],
            software_versions=str(provenance.get("tool_version", "")),
            device_serial_number="1",
            content_label="PANCREAS",
            content_description=f"{tool} {model} sha256 {sha[:12]}"[:64],
            series_description=f"Pancreas ({tool}, {model})"[:64],
            omit_empty_frames=bool(frames.any()),  # an empty mask keeps its (empty) frames
        )
    except (ValueError, AttributeError, KeyError) as exc:  # highdicom's checks of the source series
        raise OutputError(f"cannot write the DICOM SEG for this series: {exc}") from None


def write_dicom_seg(path: str | Path, label: sitk.Image, source_files: list[str], provenance: dict) -> None:
    """Write the DICOM SEG to ``path`` (the caller stages and commits it, see cli.Outputs)."""
    seg = build_dicom_seg(label, source_files, provenance)
    try:
        seg.save_as(str(path))
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
