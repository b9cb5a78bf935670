"""Helpers shared by the tests (importable from subprocesses too: ``sys.path`` += Testing/).

- ``IntensityBandNet``: a deterministic stub network, registered as architecture
  ``test-intensity-band``: foreground logits where the normalised intensity lies inside a band.
  With "fixed" normalisation and a phantom whose only in-band structure is the "pancreas", both
  C2F stages find exactly that structure, so results are checkable voxel for voxel.
- ``make_phantom``: a small CT-like volume (int16 HU) with a bright ellipsoid "pancreas", a tiny
  in-band stray island, on any grid (spacing, origin, direction, axis order).
- ``band_bundle`` / ``resdsn_bundle``: write bundles for the stub or a tiny random ResDSN pair.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from torch import nn

from PancreasC2FLib.io.bundle import save_bundle
from PancreasC2FLib.networks import ARCHITECTURES, register_architecture
from PancreasC2FLib.networks.resdsn import ResDSN

CLIP = (-100.0, 240.0)
FIXED_PREPROCESSING = {"clip": list(CLIP), "normalize": "fixed"}
PANCREAS_HU = 150
BAND_HU = (100.0, 200.0)  # the stub's "pancreas" intensities; nothing else in the phantom is there
BODY_HU = 40
AIR_HU = -1000


def hu_to_fixed(hu: float) -> float:
    """HU -> the value "fixed" normalisation gives (clip range mapped to [-1, 1])."""
    lo, hi = CLIP
    return (float(np.clip(hu, lo, hi)) - (lo + hi) / 2) / ((hi - lo) / 2)


class IntensityBandNet(nn.Module):
    """Logits (0, gain * distance inside the band): foreground exactly where lo < x < hi."""

    arch = "test-intensity-band"

    def __init__(self, lo: float, hi: float, gain: float = 20.0):
        super().__init__()
        self.register_buffer("band", torch.tensor([lo, hi, gain], dtype=torch.float32))

    def forward(self, x, with_aux: bool = False):
        lo, hi, gain = self.band
        fg = gain * torch.minimum(x - lo, hi - x)
        out = torch.cat([torch.zeros_like(fg), fg], dim=1)
        return (out, out, out) if with_aux else out


if IntensityBandNet.arch not in ARCHITECTURES:
    register_architecture(IntensityBandNet)


def _stage(network: dict, window=(32, 32, 32), n=1, spacing=None, **extra) -> dict:
    return {"network": network, "window": list(window), "n": n, "spacing": spacing, "threshold": 0.5, **extra}


def fixture_metadata(pipeline: str, name: str, preprocessing: dict, stages: dict, postprocess: dict | None = None) -> dict:
    """``model.json`` of an untrained test bundle."""
    return {
        "name": name,
        "version": "0.0-test",
        "pipeline": pipeline,
        "trained": False,
        "license": "Apache-2.0 (test fixture)",
        "preprocessing": dict(preprocessing),
        "stages": stages,
        "postprocess": postprocess if postprocess is not None else {"min_island_fraction": 0.0},
    }


def base_metadata(name: str, coarse_net: dict, fine_net: dict, preprocessing: dict, coarse_spacing=(4.0, 4.0, 4.0)) -> dict:
    stages = {
        "coarse": _stage(coarse_net, n=1, spacing=list(coarse_spacing) if coarse_spacing else None),
        "fine": _stage(fine_net, n=2, spacing=None, margin_mm=10.0),
    }
    return fixture_metadata("resdsn-c2f", name, preprocessing, stages, {"coarse_min_island_fraction": 0.2, "min_island_fraction": 0.2})


def resdsn_bundle(path: Path, seed: int = 0, width: int = 4) -> Path:
    """Width-4 random ResDSN pair: windows 32^3, coarse n=1 at 4 mm, fine n=2 native, margin 10 mm."""
    torch.manual_seed(seed)
    nets = {"coarse": ResDSN(width=width).eval(), "fine": ResDSN(width=width).eval()}
    spec = {"arch": "resdsn", "args": {"in_channels": 1, "num_classes": 2, "width": width}}
    md = base_metadata("tiny-resdsn", spec, spec, {"clip": list(CLIP), "normalize": "case_zscore"})
    save_bundle(path, nets, md)
    return Path(path)


def band_bundle(path: Path, coarse_band_hu=BAND_HU, fine_band_hu=BAND_HU, name: str = "forced-band") -> Path:
    """Bundle of IntensityBandNet stubs ("fixed" normalisation, so the bands are known in HU)."""
    nets, specs = {}, {}
    for stage, (lo, hi) in (("coarse", coarse_band_hu), ("fine", fine_band_hu)):
        args = {"lo": hu_to_fixed(lo), "hi": hu_to_fixed(hi), "gain": 20.0}
        nets[stage] = IntensityBandNet(**args)
        specs[stage] = {"arch": IntensityBandNet.arch, "args": args}
    md = base_metadata(name, specs["coarse"], specs["fine"], FIXED_PREPROCESSING)
    save_bundle(path, nets, md)
    return Path(path)


# --- phantoms ----------------------------------------------------------------------------------

def phantom_arrays(shape_zyx=(48, 64, 64), center_frac=(0.5, 0.55, 0.45), radii_vox=(6, 8, 12), seed: int = 0, island: bool = True):
    """(hu int16, label uint8) in numpy z/y/x: body ellipse cylinder, "pancreas" ellipsoid, and a
    2x2x2 in-band stray island far from it (not in the label)."""
    nz, ny, nx = shape_zyx
    z, y, x = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    body = ((y - ny / 2) / (0.45 * ny)) ** 2 + ((x - nx / 2) / (0.47 * nx)) ** 2 <= 1
    cz, cy, cx = (c * n for c, n in zip(center_frac, shape_zyx))
    rz, ry, rx = radii_vox
    label = (((z - cz) / rz) ** 2 + ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1).astype(np.uint8)
    rng = np.random.default_rng(seed)
    hu = np.where(body, BODY_HU, AIR_HU).astype(np.float32) + rng.normal(0, 3, shape_zyx).astype(np.float32)
    hu[label > 0] = PANCREAS_HU + rng.normal(0, 3, int(label.sum()))
    if island:
        iz, iy, ix = int(0.2 * nz), int(0.3 * ny), int(0.75 * nx)
        hu[iz : iz + 2, iy : iy + 2, ix : ix + 2] = PANCREAS_HU
    return np.round(hu).astype(np.int16), label


def image_from_canonical(array_zyx: np.ndarray, spacing_xyz=(2.0, 2.0, 2.0), origin=(-64.0, -80.0, -300.0), axes=(0, 1, 2), flips=(False, False, False), rotation_deg: float = 0.0, pixel_type=None) -> sitk.Image:
    """Store a canonical (LPS z/y/x) array on another grid describing the same physical object.

    ``axes[i]`` is the physical axis (0 L, 1 P, 2 S) that ITK index axis i runs along, ``flips[i]``
    whether it runs against it; ``rotation_deg`` tilts the grid about S (oblique). Spacing is per
    physical axis (L, P, S). The physical position of every canonical voxel is the same whatever
    the grid, up to the rotation.
    """
    canon = np.asarray(array_zyx)
    # canonical numpy axis of physical axis p is 2 - p
    arr = np.transpose(canon, [2 - a for a in axes[::-1]])  # numpy (k, j, i) order
    for np_axis in range(3):
        if flips[2 - np_axis]:
            arr = np.flip(arr, np_axis)
    arr = np.ascontiguousarray(arr)
    img = sitk.GetImageFromArray(arr)
    if pixel_type is not None:
        img = sitk.Cast(img, pixel_type)
    d = np.zeros((3, 3))
    for i, (a, f) in enumerate(zip(axes, flips)):
        d[a, i] = -1.0 if f else 1.0
    t = np.deg2rad(rotation_deg)
    rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    d = rot @ d
    img.SetDirection([float(v) for v in d.ravel()])
    img.SetSpacing([float(spacing_xyz[a]) for a in axes])
    # Keep the physical centre of canonical voxel (0,0,0) fixed: index of it in the stored grid.
    n_phys = [canon.shape[2 - p] for p in range(3)]  # extent per physical axis
    idx0 = np.array([(n_phys[a] - 1) if f else 0 for a, f in zip(axes, flips)], float)
    img.SetOrigin([0.0, 0.0, 0.0])
    offset = np.array(img.TransformContinuousIndexToPhysicalPoint(idx0.tolist()))
    img.SetOrigin([float(v) for v in np.asarray(origin) - offset])
    return img


def phantom_case(shape_zyx=(48, 64, 64), spacing_xyz=(2.0, 2.0, 2.0), **grid):
    """(CT image int16, label image uint8) of the phantom on the given grid."""
    hu, label = phantom_arrays(shape_zyx)
    return image_from_canonical(hu, spacing_xyz, **grid), image_from_canonical(label, spacing_xyz, **grid)


def write_dataset(root: Path, cases: dict) -> tuple[Path, Path]:
    """A paired image/label folder dataset: ``cases`` maps a name to (image, label) SimpleITK images."""
    images, labels = Path(root) / "images", Path(root) / "labels"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    for name, (image, label) in cases.items():
        sitk.WriteImage(image, str(images / f"{name}.nii.gz"))
        sitk.WriteImage(label, str(labels / f"{name}.nii.gz"))
    return images, labels


def phantom_dataset(root: Path, n: int = 2, shape_zyx=(32, 48, 48), radii_vox=(5, 7, 9)) -> tuple[Path, Path]:
    """``n`` phantom cases (seeds 0..n-1, no island) as a paired folder dataset."""
    cases = {}
    for i in range(n):
        hu, lab = phantom_arrays(shape_zyx, radii_vox=radii_vox, seed=i, island=False)
        cases[f"case{i}"] = (image_from_canonical(hu), image_from_canonical(lab))
    return write_dataset(root, cases)


def file_fingerprint(path: Path) -> tuple[str, int, int]:
    p = Path(path)
    st = os.stat(p)
    return hashlib.sha256(p.read_bytes()).hexdigest(), st.st_mtime_ns, st.st_size


# --- DICOM -------------------------------------------------------------------------------------

def write_dicom_series(folder: Path, volume: sitk.Image, series_uid: str, skip=(), tilt_mm_per_slice: float = 0.0, z_override=None, prefix: str = "") -> list[Path]:
    """Write ``volume`` (int16, axial, identity direction) as a CT series with proper geometry
    tags: Image Position Patient per slice, orientation, pixel spacing, slice thickness, UIDs.

    ``skip``: slice indices left out (a missing slice); ``tilt_mm_per_slice``: shift each slice's
    position along x (a tilted gantry); ``z_override``: explicit slice positions (uneven spacing).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    sx, sy, sz = volume.GetSpacing()
    ox, oy, oz = volume.GetOrigin()
    study_uid = "1.2.826.0.1.3680043.8.498.1"
    frame_uid = "1.2.826.0.1.3680043.8.498.2"
    written = []
    for k in range(volume.GetDepth()):
        if k in skip:
            continue
        sl = sitk.Cast(volume[:, :, k], sitk.sitkInt16)
        z = oz + k * sz if z_override is None else float(z_override[k])
        x = ox + k * tilt_mm_per_slice
        tags = {
            "0008|0060": "CT",
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
            "0008|0018": f"{series_uid}.{k + 1}",
            "0010|0010": "Phantom^Test",
            "0010|0020": "TEST001",
            "0020|000d": study_uid,
            "0020|000e": series_uid,
            "0020|0052": frame_uid,
            "0020|0011": "1",
            "0020|0013": str(k + 1),
            "0020|0032": f"{x:.4f}\\{oy:.4f}\\{z:.4f}",
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0028|0030": f"{sy:.4f}\\{sx:.4f}",
            "0018|0050": f"{sz:.4f}",
            "0028|1052": "0",
            "0028|1053": "1",
            "0028|1054": "HU",
        }
        for key, value in tags.items():
            sl.SetMetaData(key, value)
        path = folder / f"{prefix}{k:04d}.dcm"
        writer.SetFileName(str(path))
        writer.Execute(sl)
        written.append(path)
    return written
