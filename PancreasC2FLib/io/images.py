"""Reading CT (NIfTI, NRRD, MHA, DICOM series folder) and writing results, with SimpleITK.

Inputs are only ever opened for reading. Every output is written to a temporary file in the same
folder and renamed into place, so a failed or cancelled run leaves no partial file.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import InputError, OutputError
from .formats import IMAGE_SUFFIXES, LABEL_SUFFIXES, SEG_SUFFIX, check_itk_path, suffix_of
from .outputs import atomic_path

MAX_VOXELS = 2_000_000_000  # header promising more than this is refused before allocating
# Pancreas in standard terminology (SNOMED CT), as Slicer's segment editor names it.
PANCREAS_TERMINOLOGY = {
    "contextName": "Segmentation category and type - 3D Slicer General Anatomy list",
    "category": ["SCT", "123037004", "Anatomical Structure"],
    "type": ["SCT", "15776009", "Pancreas"],
}
PANCREAS_COLOR = (0.976, 0.706, 0.431)  # Slicer's colour for the pancreas



def is_image_path(path: Path) -> bool:
    return path.is_dir() or suffix_of(path) in IMAGE_SUFFIXES or suffix_of(path) == ".dcm"


# --- reading ---------------------------------------------------------------------------------

def read_image(path: str | Path, series_uid: str | None = None) -> sitk.Image:
    """A 3D scalar CT volume from a file or a DICOM folder, or InputError with the reason."""
    path = Path(path)
    check_itk_path(path)
    if not path.exists():
        raise InputError(f"input not found: {path}")
    if path.is_dir():
        image = _read_dicom_folder(path, series_uid)
    else:
        if not path.is_file():  # a FIFO or a device would block or never end
            raise InputError(f"input is not a regular file: {path}")
        if path.stat().st_size == 0:
            raise InputError(f"input file is empty: {path}")
        _check_data_files(path)
        image = _read_file(path)
    return validate_volume(image, str(path))


def _read_file(path: Path) -> sitk.Image:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        with _quiet_itk():
            reader.ReadImageInformation()
    except RuntimeError:
        raise InputError(f"cannot read {path.name}: not an image SimpleITK understands, or the file is damaged") from None
    size = reader.GetSize()
    voxels = int(np.prod(size, dtype=np.float64)) * max(1, reader.GetNumberOfComponents())
    if voxels > MAX_VOXELS:
        raise InputError(f"{path.name}: header promises {size} voxels, more than this tool will load")
    memory = _physical_memory()
    if memory and voxels * _PIXEL_BYTES.get(reader.GetPixelID(), 8) > memory:
        raise InputError(f"{path.name}: header promises {size} voxels, more than this machine's memory")
    if suffix_of(path) in (".nii", ".nii.gz"):
        _check_nifti_complete(path)  # ITK silently reads truncated NIfTI data
    try:
        with _quiet_itk():
            return reader.Execute()
    except (RuntimeError, MemoryError) as exc:
        reason = "not enough memory" if isinstance(exc, MemoryError) else "truncated or corrupt data"
        raise InputError(f"cannot read {path.name}: {reason}") from None


def _data_files(path: Path) -> list[str] | None:
    """The data files an NRRD or MetaImage header names (None: the data is in the file itself,
    or a pattern we leave to ITK)."""
    with open(path, "rb") as f:
        head = f.read(1 << 16).decode("latin-1")
    lines = head.splitlines()
    nrrd = suffix_of(path) in (".nrrd", ".nhdr")
    for i, line in enumerate(lines):
        if nrrd and not line.strip():
            break  # end of the NRRD header: what follows is data
        key, sep, value = line.partition(":" if nrrd else "=")
        key = key.strip().lower().replace(" ", "")
        if not sep or key not in ("datafile", "elementdatafile"):
            continue
        value = value.strip()
        if value.upper() == "LOCAL" or "%" in value:
            return None
        if value.upper().startswith("LIST"):
            return [x.strip() for x in lines[i + 1 :] if x.strip()]
        return [value]
    return None


def _check_data_files(path: Path) -> None:
    """A detached header's data must be regular files (a FIFO blocks the reader forever) and a
    list of data files may not be empty (MetaImage would read zeros)."""
    if suffix_of(path) not in (".nrrd", ".nhdr", ".mha", ".mhd"):
        return
    files = _data_files(path)
    if files is None:
        return
    if not files:
        raise InputError(f"{path.name}: the header lists no data files")
    for name in files:
        check_itk_path(name)
        data = Path(name) if Path(name).is_absolute() else path.parent / name
        if not data.exists():
            raise InputError(f"{path.name}: data file {name} not found")
        if not data.is_file():
            raise InputError(f"{path.name}: data file {name} is not a regular file")


_PIXEL_BYTES = {
    sitk.sitkUInt8: 1, sitk.sitkInt8: 1, sitk.sitkUInt16: 2, sitk.sitkInt16: 2, sitk.sitkUInt32: 4,
    sitk.sitkInt32: 4, sitk.sitkFloat32: 4, sitk.sitkUInt64: 8, sitk.sitkInt64: 8, sitk.sitkFloat64: 8,
}


def _physical_memory() -> int | None:
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None  # not POSIX: rely on MAX_VOXELS


def _check_nifti_complete(path: Path) -> None:
    """Refuse a NIfTI file whose data is shorter than its header promises (or whose gzip stream
    is truncated or corrupt): ITK would read it without complaint and fill in the rest."""
    import gzip
    import struct
    import zlib

    opener = gzip.open if suffix_of(path) == ".nii.gz" else open
    try:
        with opener(path, "rb") as f:
            hdr = f.read(540)
            total = len(hdr)
            while chunk := f.read(1 << 22):
                total += len(chunk)
    except (EOFError, OSError, zlib.error):
        raise InputError(f"cannot read {path.name}: truncated or corrupt compressed data") from None
    for endian in "<>":
        if len(hdr) >= 348 and struct.unpack(endian + "i", hdr[:4])[0] == 348:
            dims = struct.unpack(endian + "8h", hdr[40:56])
            bitpix = struct.unpack(endian + "h", hdr[72:74])[0]
            pixdim = struct.unpack(endian + "8f", hdr[76:108])
            offset = struct.unpack(endian + "f", hdr[108:112])[0]
            break
        if len(hdr) >= 540 and struct.unpack(endian + "i", hdr[:4])[0] == 540:
            bitpix = struct.unpack(endian + "h", hdr[14:16])[0]
            dims = struct.unpack(endian + "8q", hdr[16:80])
            pixdim = struct.unpack(endian + "8d", hdr[104:168])
            offset = struct.unpack(endian + "q", hdr[168:176])[0]
            break
    else:
        return  # not a single-file NIfTI header we know (e.g. .hdr/.img pair): let ITK decide
    ndim = int(dims[0]) if 1 <= dims[0] <= 7 else 0
    # ITK replaces a zero or NaN voxel size by 1 mm without a word: every volume would be wrong.
    spacing = pixdim[1 : 1 + min(ndim, 3)]
    if not all(np.isfinite(spacing)) or any(v == 0 for v in spacing):
        raise InputError(f"{path.name}: invalid voxel size in the header (pixdim {', '.join(f'{v:g}' for v in spacing)}); volumes would be wrong")
    offset = offset if np.isfinite(offset) else 0
    expected = int(max(offset, 0)) + int(np.prod([max(int(d), 1) for d in dims[1 : 1 + ndim]], dtype=np.float64)) * max(int(bitpix), 0) // 8
    if total < expected:
        raise InputError(f"cannot read {path.name}: truncated data ({total} of {expected} bytes)")


def list_dicom_series(folder: Path) -> dict[str, list[str]]:
    """Series UID -> ordered file names for every DICOM series directly in ``folder``."""
    series = {}
    check_itk_path(folder)
    with _quiet_itk():
        for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)) or ():
            series[uid] = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))
    return series


def _is_scout(files: list[str]) -> bool:
    """A localizer (scout) series: one or two slices, or ImageType saying LOCALIZER."""
    if len(files) < 3:
        return True
    r = sitk.ImageFileReader()
    r.SetFileName(files[0])
    try:
        with _quiet_itk():
            r.ReadImageInformation()
        return "LOCALIZER" in r.GetMetaData("0008|0008").upper()
    except RuntimeError:
        return False  # no ImageType: not known to be a scout


def find_dicom_series(folder: str | Path) -> dict[str, list[str]]:
    """The DICOM series in ``folder`` or, when it holds none, in the folders below it (a case
    folder as TCIA delivers it: PANCREAS_0001/<study>/<series>/), scouts left out there."""
    folder = Path(folder)
    series = list_dicom_series(folder)
    if series:
        return series
    found: dict[str, list[str]] = {}
    for dirpath, dirnames, _ in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if Path(dirpath) == folder:
            continue
        try:
            below = list_dicom_series(Path(dirpath))
        except InputError:
            continue  # a sub-folder with a name ITK cannot take: not a series we can read
        for uid, files in below.items():
            if uid not in found and not _is_scout(files):
                found[uid] = files
    return found


def select_dicom_series(folder: str | Path, series_uid: str | None = None) -> tuple[str, list[str]]:
    """The series ``read_image`` reads from a DICOM folder (or a case folder with the series in
    sub-folders): ``series_uid``, or the one with the most slices. Returns its UID and its files
    (in the reader's order)."""
    series = find_dicom_series(folder)
    if not series:
        raise InputError(f"no DICOM series found in folder {folder}")
    if series_uid is None:
        series_uid = max(series, key=lambda uid: len(series[uid]))  # the series with the most slices
    elif series_uid not in series:
        raise InputError(f"series {series_uid} not in {folder}; found: {', '.join(sorted(series))}")
    return series_uid, series[series_uid]


def dicom_series_note(folder: str | Path, series_uid: str | None = None) -> str | None:
    """What a user should be told about the series chosen in ``folder``: where it was found and
    what else was there (None when the folder holds exactly that one series)."""
    series = find_dicom_series(folder)
    if not series:
        return None
    uid, files = select_dicom_series(folder, series_uid)
    where = Path(files[0]).parent
    others = len(series) - 1
    if where == Path(folder) and not others:
        return None
    place = "" if where == Path(folder) else f" in {where}"
    rest = f" ({others} other series: pick one with --series-uid)" if others else ""
    return f"using DICOM series {uid} ({len(files)} slices){place}{rest}"


def _read_dicom_folder(folder: Path, series_uid: str | None) -> sitk.Image:
    series_uid, files = select_dicom_series(folder, series_uid)
    if len(files) < 2:
        raise InputError(f"DICOM series {series_uid} has a single slice; a 3D series is needed")
    _check_slice_positions(files)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        with _quiet_itk():
            return reader.Execute()
    except RuntimeError as exc:
        raise InputError(f"cannot read DICOM series {series_uid}: {str(exc).strip().splitlines()[-1]}") from None


def _slice_geometry(f: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(position, orientation, pixel spacing) of one DICOM slice, or InputError naming what is missing."""
    check_itk_path(f)
    r = sitk.ImageFileReader()
    r.SetFileName(f)
    r.LoadPrivateTagsOff()
    values = []
    try:
        with _quiet_itk():
            r.ReadImageInformation()
    except RuntimeError:
        raise InputError(f"cannot read DICOM file {Path(f).name}") from None
    for tag, what, n in (("0020|0032", "ImagePositionPatient", 3), ("0020|0037", "ImageOrientationPatient", 6), ("0028|0030", "PixelSpacing", 2)):
        try:
            v = np.array([float(x) for x in r.GetMetaData(tag).split("\\")])
        except (RuntimeError, ValueError):
            v = np.array([])
        if v.shape != (n,) or not np.all(np.isfinite(v)):
            raise InputError(f"DICOM slice {Path(f).name} has no valid {what} ({tag}): the series' geometry is unknown")
        values.append(v)
    if min(values[2]) <= 0:
        raise InputError(f"DICOM slice {Path(f).name}: invalid PixelSpacing {values[2].tolist()}; volumes would be wrong")
    return values[0], values[1], values[2]


def _check_slice_positions(files: list[str]) -> None:
    """Refuse series that would be silently distorted: a slice without position, orientation or
    pixel spacing, slices with another orientation or spacing, missing slices, uneven spacing,
    slices shifted sideways, a tilted gantry."""
    geometry = [_slice_geometry(f) for f in files]
    positions = np.array([g[0] for g in geometry])
    iop, spacing = geometry[0][1], geometry[0][2]
    for f, (_, o, sp) in zip(files, geometry):
        if np.abs(o - iop).max() > 1e-4:
            raise InputError(f"DICOM slice {Path(f).name} has another orientation than the rest of the series")
        if np.abs(sp - spacing).max() > 1e-4 * max(spacing.max(), 1.0):
            raise InputError(f"DICOM slice {Path(f).name} has another pixel spacing than the rest of the series")
    normal = np.cross(iop[:3], iop[3:])
    dist = positions @ normal
    gaps = np.diff(np.sort(dist))
    if len(gaps) == 0 or np.any(gaps <= 1e-4):
        raise InputError("DICOM series has duplicate slice positions (mixed series?); pick one with --series-uid")
    # Scanners write positions to ~1e-3 mm; 1% (at least 0.01 mm) is what Slicer calls irregular.
    if np.abs(gaps - np.median(gaps)).max() > max(0.01 * np.median(gaps), 0.01):
        raise InputError(f"DICOM series has uneven slice spacing ({gaps.min():.2f} to {gaps.max():.2f} mm): a slice is missing or the series is irregular")
    # Every slice must sit on the line through the first along the normal (no sideways shift).
    order = np.argsort(dist)
    steps = positions[order] - positions[order[0]]
    in_plane = steps - np.outer(steps @ normal, normal)
    if np.linalg.norm(in_plane, axis=1).max() > 1e-3 * max(np.linalg.norm(steps[-1]), 1e-6) + 1e-3:
        raise InputError("DICOM series has a tilted gantry or slices shifted sideways (slices are sheared); resample it to a regular grid first")


@contextlib.contextmanager
def _quiet_itk():
    """No ITK warnings, and no raw messages that some readers (MetaImage) print straight to the
    process's stderr: errors reach the user as one line from us."""
    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    saved = None
    try:
        import sys

        sys.stderr.flush()
        saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        saved = None  # no usable stderr descriptor (e.g. a GUI process): nothing to silence
    try:
        yield
    finally:
        if saved is not None:
            os.dup2(saved, 2)
            os.close(saved)
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)


def validate_volume(image: sitk.Image, name: str = "input") -> sitk.Image:
    """A 3D, single-component, finite volume big enough for the networks."""
    if image.GetPixelID() in (sitk.sitkComplexFloat32, sitk.sitkComplexFloat64):
        raise InputError(f"{name}: has complex-valued voxels; a real-valued CT volume is needed")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{name}: has {image.GetNumberOfComponentsPerPixel()} components per voxel (RGB or vector image); a scalar CT volume is needed")
    dim = image.GetDimension()
    if dim == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
        dim = 3
    if dim != 3:
        raise InputError(f"{name}: is a {dim}D image; a 3D CT volume is needed")
    size = image.GetSize()
    if min(size) < 8:
        raise InputError(f"{name}: {size[0]}x{size[1]}x{size[2]} voxels is too small for a CT volume")
    sp = image.GetSpacing()
    if not all(np.isfinite(sp)) or min(sp) <= 0:
        raise InputError(f"{name}: invalid voxel spacing {sp}")
    d = np.array(image.GetDirection()).reshape(3, 3)
    if not np.all(np.isfinite(d)) or abs(abs(np.linalg.det(d)) - 1) > 1e-3:
        raise InputError(f"{name}: invalid direction matrix")
    if np.abs(d.T @ d - np.eye(3)).max() > 1e-3:  # a shear: the output could not keep this grid
        raise InputError(f"{name}: the direction matrix is not orthonormal (sheared axes); resample the image to a regular grid first")
    if image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
        arr = sitk.GetArrayViewFromImage(image)
        if not np.isfinite(arr).all():
            raise InputError(f"{name}: contains NaN or infinite values")
    return image


def intensity_warnings(volume_hu: np.ndarray) -> list[str]:
    """Warnings for volumes that do not look like calibrated CT (MR, rescaled, uncalibrated)."""
    sample = volume_hu[::4, ::4, ::4] if volume_hu.size > 4_000_000 else volume_hu
    lo, p50, hi = (float(v) for v in np.percentile(sample, [1, 50, 99.5]))
    warnings = []
    if lo >= -10:
        warnings.append(f"intensities do not look like calibrated CT in Hounsfield units (1st percentile {lo:.0f}, no air below -500): MR or uncalibrated CT? results are unreliable")
    elif lo > -500:
        warnings.append(f"little or no air in the volume (1st percentile {lo:.0f} HU): check the field of view and calibration")
    if hi > 5000 or hi - lo < 200:
        warnings.append(f"intensity range {lo:.0f}..{hi:.0f} is unusual for CT in HU")
    return warnings


# --- writing ---------------------------------------------------------------------------------

def write_label(path: str | Path, label: sitk.Image, provenance: dict | None = None) -> None:
    """Label map (NIfTI, NRRD or MHA by extension), provenance in the header where supported."""
    if suffix_of(path) not in LABEL_SUFFIXES:
        raise OutputError(f"unsupported label map extension for {path}: use one of {', '.join(LABEL_SUFFIXES)} or {SEG_SUFFIX}")
    img = sitk.Image(label)
    if provenance and suffix_of(path) in (".nrrd", ".mha"):
        img.SetMetaData("PancreasC2F_provenance", json.dumps(provenance, sort_keys=True))
    if provenance and suffix_of(path) in (".nii", ".nii.gz"):
        # NIfTI has an 80-character description field: keep the essentials.
        img.SetMetaData("ITK_FileNotes", f"PancreasC2F {provenance.get('tool_version', '')} {provenance.get('model_sha256', '')[:12]}"[:79])
    try:
        with atomic_path(path) as tmp:
            sitk.WriteImage(img, str(tmp), useCompression=True)
    except (OSError, RuntimeError) as exc:
        raise OutputError(f"cannot write {path}: {str(exc).strip().splitlines()[-1]}") from None


def ijk_to_lps(image: sitk.Image) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())[None, :]
    m[:3, 3] = image.GetOrigin()
    return m


def write_seg_nrrd(path: str | Path, label: sitk.Image, provenance: dict | None = None, segment_name: str = "Pancreas") -> None:
    """Slicer ``.seg.nrrd`` with one named, coloured, coded "Pancreas" segment on the label's grid."""
    import slicerio

    mask = np.transpose(sitk.GetArrayViewFromImage(label), (2, 1, 0)) > 0  # (k,j,i) -> (i,j,k)
    seg = slicerio.create_segmentation(mask.shape, ijk_to_lps(label))
    seg["containedRepresentationNames"] = ["Binary labelmap"]
    seg["masterRepresentation"] = "Binary labelmap"
    slicerio.add_segment(
        seg,
        mask,
        {"id": "Pancreas", "name": segment_name, "color": list(PANCREAS_COLOR), "terminology": PANCREAS_TERMINOLOGY, "status": "completed"},
    )
    if provenance:
        seg["PancreasC2F_provenance"] = json.dumps(provenance, sort_keys=True)
    try:
        with atomic_path(path) as tmp:
            slicerio.write_segmentation(str(tmp), seg)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None


def write_segmentation(path: str | Path, label: sitk.Image, provenance: dict | None = None) -> None:
    """Dispatch on the extension: ``.seg.nrrd`` or a plain label map."""
    if suffix_of(path) == SEG_SUFFIX:
        write_seg_nrrd(path, label, provenance)
    else:
        write_label(path, label, provenance)
