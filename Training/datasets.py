"""Training data: where cases come from, and their preparation for one stage.

A dataset is a list of ``CaseRef`` (a name and a loader returning the CT and a binary pancreas
label as SimpleITK images on the same grid). Supported sources:

* ``synthetic:N[:SEED]`` - N cases of ``PancreasC2FLib.synthetic`` (seeds SEED .. SEED+N-1,
  default SEED 0), with random contrast phase, spacing and orientation;
* a Medical Segmentation Decathlon Task07_Pancreas folder (``imagesTr/``, ``labelsTr/``;
  pancreas (1) and tumour (2) merged into 1);
* the NIH Pancreas-CT collection: a folder of ``PANCREAS_00XX`` DICOM trees plus a folder of
  ``label00XX.nii.gz`` (``--labels``);
* any folder of images with a folder of labels (``--images DIR --labels DIR``), matched by name;
* a case folder with ``ct.nii.gz`` and ``pancreas.nii.gz`` (beside it or in ``segmentations/``, the
  TotalSegmentator layout), or a folder of such case folders.

``prepare_stage_volume`` turns one case into what a stage's network sees: the canonical array,
normalised and resampled exactly as ``PancreasC2FLib.pipelines`` does at inference (the same
functions, in the same order), with the label on the same grid. ``StageCache`` keeps the result on
disk as ``.npy`` files that are memory-mapped, so full-resolution datasets need not fit in RAM.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from PancreasC2FLib.errors import InputError
from PancreasC2FLib.processing.geometry import Orientation, crop, expand_box, mask_box
from PancreasC2FLib.io.formats import IMAGE_SUFFIXES
from PancreasC2FLib.io.images import read_image
from PancreasC2FLib.processing.preprocessing import normalization_stats, normalize, resample_array, resampled_shape

DATA_ENV = "PANCREAS_C2F_DATA"  # default folder for relative dataset paths


class DatasetError(InputError, ValueError):
    """A dataset specification or folder that cannot be used (the message says why; exit 2)."""


@dataclass(frozen=True)
class CaseRef:
    name: str
    load: Callable[[], tuple[sitk.Image, sitk.Image]]  # (CT in HU, binary uint8 label)
    label_path: Path | None = None  # the label file as stored (check.py reads its header and values)


class Cases(list):
    """A dataset's cases; ``skipped``: images left out because they have no label."""

    skipped: tuple = ()


# --- sources ---------------------------------------------------------------------------------

def _strip_suffix(name: str) -> str:
    low = name.lower()
    for s in IMAGE_SUFFIXES:
        if low.endswith(s):
            return name[: -len(s)]
    return name


def _image_files(folder: Path) -> list[Path]:
    # Archives made on macOS carry "._name" resource forks next to every file: never images.
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and _strip_suffix(p.name) != p.name)


def _binary_label_on(image: sitk.Image, label: sitk.Image) -> sitk.Image:
    """Label > 0 as uint8 on the image's grid (resampled by nearest neighbour if the grids differ)."""
    label = sitk.Cast(label > 0, sitk.sitkUInt8)
    same = (
        label.GetSize() == image.GetSize()
        and np.allclose(label.GetSpacing(), image.GetSpacing(), atol=1e-3)
        and np.allclose(label.GetOrigin(), image.GetOrigin(), atol=1e-2)
        and np.allclose(label.GetDirection(), image.GetDirection(), atol=1e-4)
    )
    if not same:
        label = sitk.Resample(label, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return label


def _load_pair(image_path: Path, label_path: Path) -> tuple[sitk.Image, sitk.Image]:
    image = read_image(image_path)
    return image, _binary_label_on(image, sitk.ReadImage(str(label_path)))


def paired_folders(images: Path, labels: Path) -> list[CaseRef]:
    """Images and labels matched by name (an nnU-Net channel suffix ``_0000`` is ignored)."""
    images, labels = Path(images), Path(labels)
    for d in (images, labels):
        if not d.is_dir():
            raise DatasetError(f"not a folder: {d}")
    by_name = {_strip_suffix(p.name): p for p in _image_files(labels)}
    cases, skipped = Cases(), []
    for img in _image_files(images):
        stem = re.sub(r"_0000$", "", _strip_suffix(img.name))
        if stem in by_name:
            cases.append(CaseRef(stem, partial(_load_pair, img, by_name[stem]), by_name[stem]))
        else:
            skipped.append(stem)
    if not cases:
        raise DatasetError(f"no image in {images} has a label of the same name in {labels}")
    cases.skipped = skipped
    return cases


def msd_task07(root: Path) -> list[CaseRef]:
    """Medical Segmentation Decathlon Task07_Pancreas (imagesTr/, labelsTr/; labels 1+2 -> 1)."""
    root = Path(root)
    if not (root / "imagesTr").is_dir() or not (root / "labelsTr").is_dir():
        raise DatasetError(f"{root} is not an MSD task folder (imagesTr/ and labelsTr/ expected)")
    return paired_folders(root / "imagesTr", root / "labelsTr")


def _dicom_series_folder(tree: Path) -> Path:
    """The folder holding the most .dcm files below ``tree`` (NIH: PANCREAS_0001/<study>/<series>/)."""
    best, count = None, 0
    for dirpath, _, files in os.walk(tree):
        n = sum(f.lower().endswith(".dcm") for f in files)
        if n > count:
            best, count = Path(dirpath), n
    if best is None:
        raise DatasetError(f"no DICOM files below {tree}")
    return best


def _load_nih(tree: Path, label_path: Path) -> tuple[sitk.Image, sitk.Image]:
    image = read_image(_dicom_series_folder(tree))
    return image, _binary_label_on(image, sitk.ReadImage(str(label_path)))


def nih_pancreas_ct(root: Path, labels: Path) -> list[CaseRef]:
    """NIH Pancreas-CT (TCIA): ``root/PANCREAS_00XX/...`` DICOM and ``labels/label00XX.nii.gz``."""
    root, labels = Path(root), Path(labels)
    label_of = {}
    for p in _image_files(labels):
        m = re.match(r"label(\d+)$", _strip_suffix(p.name))
        if m:
            label_of[int(m.group(1))] = p
    cases, skipped = Cases(), []
    for d in sorted(root.iterdir()):
        m = re.match(r"PANCREAS_(\d+)$", d.name)
        if d.is_dir() and m and int(m.group(1)) in label_of:
            cases.append(CaseRef(d.name, partial(_load_nih, d, label_of[int(m.group(1))]), label_of[int(m.group(1))]))
        elif d.is_dir() and m:
            skipped.append(d.name)
    if not cases:
        raise DatasetError(f"no PANCREAS_XXXX folder in {root} has a labelXXXX file in {labels}")
    cases.skipped = skipped
    return cases


def _case_folder_pair(folder: Path) -> tuple[Path, Path] | None:
    """TotalSegmentator's layout: ``ct.nii.gz`` with ``pancreas.nii.gz`` beside it or in
    ``segmentations/``."""
    ct = folder / "ct.nii.gz"
    for label in (folder / "pancreas.nii.gz", folder / "segmentations" / "pancreas.nii.gz"):
        if ct.is_file() and label.is_file():
            return ct, label
    return None


def case_folders(root: Path) -> list[CaseRef]:
    """One case folder (``ct.nii.gz`` + ``pancreas.nii.gz``), or a folder of them."""
    root = Path(root)
    pair = _case_folder_pair(root)
    if pair:
        return [CaseRef(root.name, partial(_load_pair, *pair))]
    cases = [CaseRef(d.name, partial(_load_pair, *p)) for d in sorted(root.iterdir()) if d.is_dir() and (p := _case_folder_pair(d))]
    if not cases:
        raise DatasetError(f"{root}: no ct.nii.gz with a pancreas.nii.gz (beside it or in segmentations/)")
    return cases


def _load_synthetic(seed: int, options: dict) -> tuple[sitk.Image, sitk.Image]:
    from PancreasC2FLib.synthetic import generate_case

    case = generate_case(seed, **options)
    return case.image, _binary_label_on(case.image, case.label)


def synthetic(count: int, seed: int = 0, options: dict | None = None) -> list[CaseRef]:
    """Synthetic CTs with seeds ``seed .. seed+count-1`` (``options`` go to ``generate_case``)."""
    options = dict(options or {})
    return [CaseRef(f"synthetic_{s:06d}", partial(_load_synthetic, s, options)) for s in range(seed, seed + count)]


def synthetic_spec(spec: str) -> tuple[int, int] | None:
    """``synthetic:N[:SEED]`` -> (N, SEED); None for anything else."""
    m = re.fullmatch(r"synthetic:(\d+)(?::(\d+))?", spec.strip())
    return (int(m.group(1)), int(m.group(2) or 0)) if m else None


def open_dataset(spec: str, labels: str | None = None, synthetic_options: dict | None = None) -> list[CaseRef]:
    """Cases from a specification: ``synthetic:N[:SEED]``, an MSD task folder, or a NIH/paired
    image folder with ``labels``. Relative paths are looked up in $PANCREAS_C2F_DATA too."""
    counted = synthetic_spec(spec)
    if counted:
        return synthetic(*counted, synthetic_options)
    path = Path(spec).expanduser()
    if not path.exists() and not path.is_absolute() and os.environ.get(DATA_ENV):
        path = Path(os.environ[DATA_ENV]) / spec
    if not path.is_dir():
        raise DatasetError(f"dataset {spec!r}: not 'synthetic:N[:SEED]' and not a folder (set ${DATA_ENV} for relative names)")
    if (path / "imagesTr").is_dir():
        cases = msd_task07(path)
    elif labels is None and (_case_folder_pair(path) or any(d.is_dir() and _case_folder_pair(d) for d in path.iterdir())):
        return case_folders(path)
    elif labels is None:
        raise DatasetError(f"{path}: give the label folder with --labels (NIH Pancreas-CT or paired folders)")
    elif any(re.match(r"PANCREAS_\d+$", d.name) for d in path.iterdir() if d.is_dir()):
        cases = nih_pancreas_ct(path, Path(labels))
    else:
        cases = paired_folders(path, Path(labels))
    if cases.skipped:  # said, never silent: a missing label file is a common packaging slip
        shown = ", ".join(cases.skipped[:5]) + (" ..." if len(cases.skipped) > 5 else "")
        print(f"note: {len(cases.skipped)} image(s) of {spec} have no label and are left out: {shown}", file=sys.stderr)
    return cases


def dataset_identity(spec: str, labels: str | None = None, synthetic_options: dict | None = None) -> str:
    """A string that names the data (for cache keys and provenance)."""
    if spec.startswith("synthetic:"):
        # Case names carry the seed, so every synthetic set with these options (and generator
        # version: another version renders other images from the same seed) shares a cache.
        from PancreasC2FLib.synthetic import GENERATOR_VERSION

        options = dict(synthetic_options or {})
        version = options.pop("version", GENERATOR_VERSION)
        return f"synthetic|generator-v{version}|{json.dumps(options, sort_keys=True)}"
    return f"{Path(spec).expanduser().resolve()}|{labels and Path(labels).expanduser().resolve()}"


# --- preparation for one stage -----------------------------------------------------------------

@dataclass
class StageVolume:
    """One case as a stage sees it: canonical z/y/x, normalised, on the stage's grid."""

    name: str
    image: np.ndarray  # float32
    label: np.ndarray  # uint8 0/1
    spacing: tuple[float, float, float]  # z, y, x mm

    _foreground: np.ndarray | None = None

    def foreground(self, max_points: int = 200_000) -> np.ndarray:
        """(k, 3) foreground voxel coordinates (a fixed subsample for huge masks), cached."""
        if self._foreground is None:
            pts = np.argwhere(np.asarray(self.label) > 0)
            if len(pts) > max_points:
                pts = pts[np.random.default_rng(0).choice(len(pts), max_points, replace=False)]
            self._foreground = pts.astype(np.int32)
        return self._foreground


def prepare_stage_volume(
    name: str,
    image: sitk.Image,
    label: sitk.Image,
    preprocessing: dict,
    spacing_xyz: list | None,
    crop_margin_mm: float | None = None,
) -> StageVolume:
    """The pipeline's preprocessing for one stage: canonical array -> (crop) -> normalise with
    whole-case statistics -> resample to the stage spacing. The label follows the same grid
    (linear interpolation thresholded at 0.5, which keeps thin structures' volume).

    ``crop_margin_mm`` keeps only the ground-truth box plus this margin (fine-stage data)."""
    orientation = Orientation.of(image)
    hu = orientation.to_canonical(sitk.GetArrayViewFromImage(image))
    lab = orientation.to_canonical(sitk.GetArrayViewFromImage(label))
    spacing = orientation.spacing_zyx(image)
    stats = normalization_stats(hu, preprocessing)
    if crop_margin_mm is not None:
        box = mask_box(lab)
        if box is None:
            raise DatasetError(f"{name}: empty label, cannot crop around the pancreas")
        box = expand_box(box, crop_margin_mm, spacing, hu.shape)
        hu, lab = crop(hu, box), crop(lab, box)
    x = normalize(hu, preprocessing, stats)
    y = (np.asarray(lab) > 0).astype(np.uint8)
    out_spacing = spacing
    if spacing_xyz:
        target = tuple(float(v) for v in spacing_xyz[::-1])
        shape = resampled_shape(x.shape, spacing, target)
        x = resample_array(x, shape, "trilinear")
        y = (resample_array(y.astype(np.float32), shape, "trilinear") >= 0.5).astype(np.uint8)
        out_spacing = target
    return StageVolume(name, np.ascontiguousarray(x, np.float32), np.ascontiguousarray(y), tuple(out_spacing))


class StageCache:
    """Prepared stage volumes on disk: ``ROOT/<key>/<case>/{image,label}.npy`` + ``meta.json``.

    ``key`` hashes everything that changes the arrays (data, preprocessing, spacing, crop), so a
    cache is never reused for different settings. Arrays are memory-mapped when read.
    ``prepare``: the stage's own data preparation, ``prepare(name, image, label, settings)``, for
    stages that have one (variants.py); None for the standard crop and resampling."""

    def __init__(self, root: str | Path, settings: dict, prepare: Callable | None = None):
        self.settings = settings
        self.prepare = prepare
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
        self.folder = Path(root) / digest
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "settings.json").write_text(json.dumps(settings, indent=2, sort_keys=True), encoding="utf-8")

    def path(self, name: str) -> Path:
        return self.folder / name

    def has(self, name: str) -> bool:
        return (self.path(name) / "meta.json").is_file()

    def write(self, vol: StageVolume) -> None:
        d = self.path(vol.name)
        d.mkdir(parents=True, exist_ok=True)
        np.save(d / "image.npy", vol.image)
        np.save(d / "label.npy", vol.label)
        # meta.json last: its presence marks a complete entry.
        (d / "meta.json").write_text(json.dumps({"name": vol.name, "spacing": list(vol.spacing), "shape": list(vol.image.shape), "foreground_voxels": int(vol.label.sum())}), encoding="utf-8")

    def read(self, name: str, mmap: bool = True) -> StageVolume:
        d = self.path(name)
        meta = json.loads((d / "meta.json").read_text(encoding="utf-8"))
        mode = "r" if mmap else None
        return StageVolume(name, np.load(d / "image.npy", mmap_mode=mode), np.load(d / "label.npy", mmap_mode=mode), tuple(meta["spacing"]))


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def _prepare_one(case: CaseRef, caches: list[StageCache]) -> str:
    """Load (or generate) a case once and write it into every cache that lacks it."""
    image, label = case.load()
    for cache in caches:
        if not cache.has(case.name):
            s = cache.settings
            if s.get("variant"):
                cache.write(cache.prepare(case.name, image, label, s))
            else:
                cache.write(prepare_stage_volume(case.name, image, label, s["preprocessing"], s["spacing"], s["crop_margin_mm"]))
    return case.name


def fill_caches(cases: list[CaseRef], caches: list[StageCache], workers: int = 1, progress: Callable[[str], None] | None = None) -> None:
    """Prepare every case for every cache (stage); a case is loaded once for all of them, which
    matters when loading means generating a synthetic CT or reading a DICOM series."""
    todo = [c for c in cases if not all(cache.has(c.name) for cache in caches)]
    if workers > 1 and len(todo) > 1:
        with ProcessPoolExecutor(max_workers=workers, initializer=_one_thread) as pool:
            for name in pool.map(_prepare_one, todo, [caches] * len(todo)):
                if progress:
                    progress(name)
    else:
        for c in todo:
            _prepare_one(c, caches)
            if progress:
                progress(c.name)


def load_stage_volumes(cases: list[CaseRef], cache: StageCache, workers: int = 1, progress: Callable[[str], None] | None = None, mmap: bool = True) -> list[StageVolume]:
    """Every case prepared for the stage (computed once, then read from the cache)."""
    fill_caches(cases, [cache], workers, progress)
    return [cache.read(c.name, mmap=mmap) for c in cases]
