"""DICOM SEG output (``--dicom-seg``, dicomseg.py): each frame is the mask on the source instance it
references, at that instance's position, whatever order the series' files are in; SNOMED CT
codes and provenance; refusal (exit 2, nothing written) for non-DICOM input or without highdicom;
all-or-nothing with the other outputs; the batch's ``--dicom-seg``."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

import c2f_testutils as tu
from PancreasC2FLib.apps import batch as libbatch
from PancreasC2FLib.io import dicomseg
from PancreasC2FLib.apps.cli import main as cli_main
from PancreasC2FLib.errors import OutputError
from PancreasC2FLib.io.images import read_image

SERIES_UID = "1.2.826.0.1.3680043.8.498.4242"
SHAPE = (24, 40, 48)


def write_series(folder: Path, reverse: bool = False) -> Path:
    """The phantom as a DICOM series; ``reverse``: file 0000 (instance 1) is the top slice, so
    file and instance order run against the slice positions."""
    image, _ = tu.phantom_case(shape_zyx=SHAPE)
    n, oz, sz = image.GetDepth(), image.GetOrigin()[2], image.GetSpacing()[2]
    z = [oz + (n - 1 - k) * sz for k in range(n)] if reverse else None
    tu.write_dicom_series(folder, image, SERIES_UID, z_override=z)
    return folder


@pytest.fixture(scope="module", params=[False, True], ids=["in-order", "reversed"])
def series(request, tmp_path_factory) -> Path:
    return write_series(tmp_path_factory.mktemp("dicom") / "ct", reverse=request.param)


def seg_frames(path: Path) -> tuple[pydicom.Dataset, list[tuple[str, list[float], np.ndarray]]]:
    """The SEG and, per frame, (referenced source SOP instance UID, plane position, pixels)."""
    ds = pydicom.dcmread(str(path))
    pixels = ds.pixel_array.reshape(int(ds.NumberOfFrames), int(ds.Rows), int(ds.Columns))
    frames = []
    for item, px in zip(ds.PerFrameFunctionalGroupsSequence, pixels):
        uid = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        frames.append((str(uid), [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient], px))
    return ds, frames


def source_instances(folder: Path) -> dict[str, pydicom.Dataset]:
    return {str(d.SOPInstanceUID): d for d in (pydicom.dcmread(str(f)) for f in sorted(folder.glob("*.dcm")))}


def test_frames_land_on_the_instances_they_reference(series, tmp_path):
    """Mask = in-band voxels of the image read from the series: each SEG frame must equal the
    thresholded pixels of the very instance it references, in any order of the source list."""
    image = read_image(series)
    label = sitk.Cast(sitk.BinaryThreshold(image, *tu.BAND_HU), sitk.sitkUInt8)
    files = dicomseg.source_series(series)
    provenance = {"tool_version": "9.9", "model_name": "m", "model_version": "1", "model_sha256": "ab" * 32, "pipeline": "resdsn-c2f", "parameters": {"n": 6}}
    sources = source_instances(series)
    for order in (files, files[::-1]):
        out = tmp_path / "seg.dcm"
        dicomseg.write_dicom_seg(out, label, order, provenance)
        _, frames = seg_frames(out)
        expected = {uid: ((d.pixel_array >= tu.BAND_HU[0]) & (d.pixel_array <= tu.BAND_HU[1])) for uid, d in sources.items()}
        nonempty = {uid for uid, m in expected.items() if m.any()}
        assert {uid for uid, _, _ in frames} == nonempty  # empty frames omitted, none missing
        for uid, position, px in frames:
            assert np.allclose(position, [float(v) for v in sources[uid].ImagePositionPatient])
            assert np.array_equal(px.astype(bool), expected[uid])


def test_cli_round_trip_codes_and_provenance(series, tmp_path, forced_bundle):
    out, label_path, report = tmp_path / "pancreas.dcm", tmp_path / "label.nrrd", tmp_path / "r.json"
    code = cli_main(["segment", str(series), "--dicom-seg", str(out), "-o", str(label_path), "--report", str(report), "--model", str(forced_bundle), "--device", "cpu", "--quiet"])
    assert code == 0
    ds, frames = seg_frames(out)
    # The frames, placed by their positions, rebuild the label map written in the same run.
    label = sitk.ReadImage(str(label_path))
    truth = sitk.GetArrayFromImage(label)
    rebuilt = np.zeros_like(truth)
    for _, position, px in frames:
        i, j, k = label.TransformPhysicalPointToIndex(position)
        assert (i, j) == (0, 0)
        rebuilt[k] = px
    assert truth.sum() > 0 and np.array_equal(rebuilt, truth)
    # References, codes, provenance.
    assert ds.Modality == "SEG" and ds.SegmentationType == "BINARY"
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == SERIES_UID
    assert ds.FrameOfReferenceUID == pydicom.dcmread(str(next(series.glob("*.dcm")))).FrameOfReferenceUID
    segment = ds.SegmentSequence[0]
    assert segment.SegmentLabel == "Pancreas" and segment.SegmentAlgorithmType == "AUTOMATIC"
    category, kind = segment.SegmentedPropertyCategoryCodeSequence[0], segment.SegmentedPropertyTypeCodeSequence[0]
    assert (category.CodingSchemeDesignator, category.CodeValue) == ("SCT", "123037004")
    assert (kind.CodingSchemeDesignator, kind.CodeValue, kind.CodeMeaning) == ("SCT", "15776009", "Pancreas")
    r = json.loads(report.read_text())
    algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == f"PancreasC2F {r['model_name']}"
    assert algorithm.AlgorithmVersion.startswith(r["tool_version"])
    params = json.loads(algorithm.AlgorithmParameters)
    assert params["model_sha256"] == r["model_sha256"] and params["parameters"] == r["parameters"]
    assert r["model_sha256"][:12] in ds.ContentDescription
    assert str(out) in r["outputs"]


def test_refused_for_nifti_input(tmp_path, phantom_file, forced_bundle, capsys):
    out = tmp_path / "seg.dcm"
    code = cli_main(["segment", str(phantom_file), "--dicom-seg", str(out), "-o", str(tmp_path / "l.nii.gz"), "--model", str(forced_bundle)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "DICOM series folder" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz"]


def test_refused_without_highdicom(tmp_path, monkeypatch, forced_bundle, capsys):
    folder = write_series(tmp_path / "ct")
    monkeypatch.setitem(sys.modules, "highdicom", None)  # import highdicom -> ImportError
    out = tmp_path / "seg.dcm"
    code = cli_main(["segment", str(folder), "--dicom-seg", str(out), "-o", str(tmp_path / "l.nii.gz"), "--model", str(forced_bundle)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "highdicom" in err and "pancreas-c2f[dicom-seg]" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct"]


def test_impossible_export_writes_nothing(tmp_path, forced_bundle, capsys):
    """A series the SEG cannot reference (no Frame of Reference UID) is a one-line error naming
    what is missing, exit 2, found before any work: nothing is written."""
    folder = write_series(tmp_path / "ct")
    for f in folder.glob("*.dcm"):
        ds = pydicom.dcmread(str(f))
        del ds.FrameOfReferenceUID
        ds.save_as(str(f))
    code = cli_main(["segment", str(folder), "--dicom-seg", str(tmp_path / "seg.dcm"), "-o", str(tmp_path / "l.nii.gz"), "--report", str(tmp_path / "r.json"), "--model", str(forced_bundle), "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.splitlines() == [err] and "FrameOfReferenceUID" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct"]


def test_empty_mask_keeps_its_frames(tmp_path):
    folder = write_series(tmp_path / "ct")
    image = read_image(folder)
    empty = sitk.Image(image.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(image)
    dicomseg.write_dicom_seg(tmp_path / "seg.dcm", empty, dicomseg.source_series(folder), {})
    _, frames = seg_frames(tmp_path / "seg.dcm")
    assert len(frames) == SHAPE[0] and not any(px.any() for _, _, px in frames)


def test_instance_off_the_grid_is_refused(tmp_path):
    folder = write_series(tmp_path / "ct")
    image = read_image(folder)
    shifted = sitk.Image(image)
    shifted.SetOrigin([v + 0.5 for v in image.GetOrigin()])  # half a voxel off the source slices
    label = sitk.Cast(shifted > 100, sitk.sitkUInt8)
    with pytest.raises(OutputError, match="between or outside"):
        dicomseg.build_dicom_seg(label, dicomseg.source_series(folder), {})


def test_batch_dicom_seg(tmp_path, forced_bundle, phantom_file):
    inputs = tmp_path / "in"
    write_series(inputs / "dicom_case", reverse=True)
    sitk.WriteImage(sitk.ReadImage(str(phantom_file)), str(inputs / "nifti_case.nii.gz"))
    out = tmp_path / "out"
    assert cli_main(["batch", "--input", str(inputs), "--output", str(out), "--dicom-seg", "--model", str(forced_bundle), "--device", "cpu"]) == 0
    with open(out / libbatch.CSV_NAME, newline="") as f:
        rows = {r["case"]: r for r in csv.DictReader(f)}
    assert rows["dicom_case"]["status"] == rows["nifti_case"]["status"] == "ok"
    assert (out / "dicom_case.seg.dcm").is_file() and not (out / "nifti_case.seg.dcm").exists()
    assert "no DICOM SEG written" in rows["nifti_case"]["warnings"]
    ds, frames = seg_frames(out / "dicom_case.seg.dcm")
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == SERIES_UID and frames
