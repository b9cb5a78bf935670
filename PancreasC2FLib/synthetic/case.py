"""SynthSeg-style synthetic abdominal CT with a pancreas label.

Why: no CT images can be shipped, but two real multi-organ label maps can (TotalSegmentator
subjects s0327 and s0328, CC BY 4.0, see ``data/labelmaps/ATTRIBUTION.md``). Every case draws
a new patient and scanner from them, as SynthSeg does for MRI (Billot et al., MedIA 2023):

1. anatomy: random affine (scale +-15 %, rotation a few degrees) + smooth elastic field (a few
   mm up to ~10 mm), applied to the label map with nearest-neighbour resampling;
2. body: the maps leave fat, abdominal wall, skin and air unlabelled, so a hull of all labelled
   structures (closing + per-slice hole filling, cached per anatomy) is grown by a sampled
   muscle wall (6-18 mm) and subcutaneous fat (5-35 mm, thinner at the back); the back is
   flattened on a patient table in most cases;
3. intensities: Hounsfield units per tissue sampled by contrast phase (non-contrast, arterial,
   portal-venous or in between), with cortical/trabecular bone, renal cortex/medulla, bowel wall,
   bowel content (fluid, positive oral contrast, faeces, gas pockets, air-fluid levels), fatty
   pancreas, hepatic and pulmonary vessels, mesenteric vessels and unlabelled bowel loops in the
   fat, and smooth texture fields so that intensity alone does not identify the pancreas;
4. scanner: everything is built in physical (LPS) space and resampled onto the output grid
   (LPS, RAS or slightly oblique direction, realistic non-zero origin, 512 x 512 in-plane at
   0.6-1.0 mm, slices 0.6-5 mm), with a Gaussian PSF (slice thickness along z), correlated and
   white noise (5-30 HU), an optional circular reconstruction field of view, int16 output.

Intensities are rendered on a 1.5 mm "work" grid that shares the output direction and field of
view, then linearly resampled; the label is a 0.5 iso-contour of the linearly resampled work
pancreas so that it matches the image's edges at any output spacing.

Timings (2-core VM shared with other jobs, load ~6; ``time.time()`` around one call, anatomy cache
warm; building the cache costs ~2.3 s per anatomy, once per process):

* ``generate_small_case`` (96 x 96 x 64 at 2 mm): 0.6-0.9 s
* 1.5 mm isotropic, 128^3 centred on the pancreas: ~1 s; whole FOV 272 x 272 x 240: ~7 s
* 512 x 512 x 157 (0.8 mm, 1.25 mm slices): ~6 s; x 283: ~10-14 s
* 512 x 512 x 314 (0.7 mm, 0.625 mm slices): ~9 s; x 565: ~15 s
  (cost is about proportional to the voxels of the 1.5 mm work grid plus those of the output)

Reproducible: the same arguments give bit-identical arrays (one ``numpy.random.default_rng``
stream drawn in a fixed order whatever the arguments; SimpleITK filters are deterministic).
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

__all__ = [
    "ANATOMIES",
    "EXAMPLE_GRID_CASES",
    "LABELMAP_DIR",
    "ORIENTATIONS",
    "PANCREAS_LABEL_ID",
    "PHASES",
    "SyntheticCase",
    "generate_case",
    "generate_small_case",
    "load_label_names",
    "source_labelmap",
    "write_example_grid",
]

PANCREAS_LABEL_ID = 1
ANATOMIES = ("s0327", "s0328")
PHASES = ("non-contrast", "arterial", "portal-venous")
ORIENTATIONS = ("LPS", "RAS", "oblique")
LABELMAP_DIR = Path(__file__).parent / "data" / "labelmaps"
GENERATOR_VERSION = 1

_WORK_SPACING = 1.5  # mm; the label maps' own grid, fine enough for the PSF that follows
_SRC_PANCREAS = 7
_DISC_ID = 200  # derived label: intervertebral discs (unlabelled gaps in the spine)
_HU_MIN, _HU_MAX = -1024.0, 3071.0


# --------------------------------------------------------------------------------------------
# Tissues: (non-contrast, portal-venous, arterial) HU ranges, texture amplitudes (low, mid) HU
# --------------------------------------------------------------------------------------------
_R = tuple[float, float]
_TISSUES: list[tuple[str, _R, _R, _R, _R]] = [
    # name              non-contrast     portal-venous    arterial         texture (low, mid)
    ("air",             (-1000, -1000), (-1000, -1000), (-1000, -1000), (0, 0)),
    ("gas",             (-1000, -960),  (-1000, -960),  (-1000, -960),  (0, 6)),
    ("fat_subcut",      (-120, -85),    (-120, -85),    (-120, -85),    (3, 5)),
    ("fat_visceral",    (-115, -80),    (-115, -80),    (-115, -80),    (4, 8)),
    ("skin",            (10, 50),       (10, 50),       (10, 50),       (2, 5)),
    ("muscle",          (40, 60),       (50, 70),       (45, 65),       (3, 6)),
    ("liver",           (40, 65),       (90, 130),      (55, 85),       (3, 5)),
    ("liver_vessel",    (25, 45),       (140, 210),     (70, 130),      (2, 4)),
    ("spleen",          (35, 55),       (100, 140),     (80, 150),      (3, 5)),
    ("pancreas",        (25, 50),       (80, 130),      (100, 150),     (4, 8)),
    ("pancreas_fat",    (-100, -40),    (-90, -30),     (-90, -30),     (4, 10)),
    ("kidney_cortex",   (20, 40),       (150, 200),     (150, 250),     (3, 6)),
    ("kidney_medulla",  (20, 40),       (140, 200),     (60, 110),      (3, 6)),
    ("cyst",            (0, 20),        (0, 20),        (0, 20),        (1, 3)),
    ("adrenal",         (10, 40),       (50, 90),       (50, 90),       (3, 6)),
    ("bile",            (0, 25),        (0, 25),        (0, 25),        (1, 3)),
    ("urine",           (0, 20),        (0, 20),        (0, 20),        (1, 3)),
    ("prostate",        (30, 45),       (60, 90),       (50, 80),       (3, 6)),
    ("artery",          (30, 50),       (150, 250),     (250, 400),     (3, 4)),
    ("portal",          (30, 50),       (150, 250),     (100, 170),     (3, 5)),
    ("vein",            (30, 50),       (110, 200),     (50, 110),      (4, 8)),
    ("heart",           (30, 50),       (120, 220),     (180, 350),     (4, 8)),
    ("myocardium",      (35, 50),       (90, 130),      (90, 140),      (3, 5)),
    ("lung",            (-900, -750),   (-890, -740),   (-890, -740),   (10, 20)),
    ("lung_vessel",     (10, 40),       (80, 160),      (80, 200),      (3, 6)),
    ("bone_cortex",     (500, 1100),    (500, 1100),    (500, 1100),    (20, 60)),
    ("bone_trab",       (120, 320),     (130, 330),     (130, 330),     (15, 45)),
    ("cartilage",       (80, 200),      (80, 200),      (80, 200),      (10, 40)),
    ("disc",            (60, 110),      (60, 110),      (60, 110),      (3, 8)),
    ("cord",            (20, 40),       (20, 40),       (20, 40),       (2, 4)),
    ("csf",             (0, 15),        (0, 15),        (0, 15),        (1, 3)),
    ("brain",           (25, 40),       (25, 45),       (25, 45),       (2, 4)),
    ("esophagus",       (30, 45),       (50, 80),       (50, 80),       (3, 6)),
    ("thyroid",         (80, 110),      (120, 180),     (120, 200),     (4, 8)),
    ("bowel_wall",      (30, 45),       (70, 120),      (70, 130),      (4, 8)),
    ("stomach_content", (0, 35),        (0, 35),        (0, 35),        (2, 5)),
    ("duodenum_content", (0, 35),       (0, 35),        (0, 35),        (2, 5)),
    ("small_bowel_content", (0, 35),    (0, 35),        (0, 35),        (3, 6)),
    ("colon_content",   (-80, 30),      (-80, 30),      (-80, 30),      (10, 45)),
    ("loop_content",    (0, 35),        (0, 35),        (0, 35),        (3, 6)),
    ("strand",          (20, 50),       (60, 130),      (40, 120),      (4, 8)),
    ("table_pad",       (-950, -750),   (-950, -750),   (-950, -750),   (5, 10)),
    ("table_shell",     (200, 600),     (200, 600),     (200, 600),     (5, 20)),
    ("table_core",      (-980, -850),   (-980, -850),   (-980, -850),   (3, 8)),
]
_TNAMES = [t[0] for t in _TISSUES]
_TI = {name: i for i, name in enumerate(_TNAMES)}
_CONTENTS = ("stomach_content", "duodenum_content", "small_bowel_content", "colon_content",
             "loop_content")


def _source_to_tissue_lut() -> np.ndarray:
    """Source label id (TotalSegmentator 'total' + derived ids) -> tissue class."""
    groups: dict[str, list[int]] = {
        "spleen": [1], "kidney_cortex": [2, 3], "bile": [4], "liver": [5],
        "stomach_content": [6], "pancreas": [7], "adrenal": [8, 9],
        "lung": list(range(10, 15)), "esophagus": [15], "gas": [16], "thyroid": [17],
        "small_bowel_content": [18], "duodenum_content": [19], "colon_content": [20],
        "urine": [21], "prostate": [22], "cyst": [23, 24],
        "bone_trab": list(range(25, 51)) + list(range(69, 79)) + list(range(91, 117)),
        "heart": [51, 53, 61], "artery": [52, 54, 55, 56, 57, 58, 65, 66],
        "vein": [59, 60, 62, 63, 67, 68], "portal": [64], "cord": [79],
        "muscle": list(range(80, 90)), "brain": [90], "cartilage": [117], "disc": [_DISC_ID],
    }
    lut = np.full(256, _TI["fat_visceral"], dtype=np.uint8)
    lut[0] = _TI["fat_visceral"]
    for name, ids in groups.items():
        lut[ids] = _TI[name]
    return lut


_SRC_LUT = _source_to_tissue_lut()
_LUNG_IDS = list(range(10, 15))
_CHEST_IDS = _LUNG_IDS + list(range(92, 118))  # lungs, ribs, sternum, costal cartilage
_VERTEBRA_IDS = list(range(25, 51))


@dataclass(frozen=True)
class SyntheticCase:
    """One generated case: ``image`` (int16 HU) and ``label`` (uint8, 1 = pancreas) share geometry."""

    image: sitk.Image
    label: sitk.Image
    params: dict[str, Any]


# --------------------------------------------------------------------------------------------
# Source anatomy (cached per process)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Source:
    label: sitk.Image            # padded uint8 label map, 1.5 mm, with derived ids (discs)
    hull_sdf: sitk.Image         # 3 mm, signed distance (mm) to the hull of all labels (< 0 inside)
    dist_any: sitk.Image         # 3 mm, distance (mm) to the nearest labelled voxel
    pancreas_points: np.ndarray  # (n, 3) physical points of the pancreas (extremes + subset)
    body_center: np.ndarray      # physical centre of the body hull at the pancreas level
    body_width: float            # hull width (mm) at the pancreas level
    z_marks: dict[str, float]    # physical z of landmarks (data range, liver top, pelvis, ...)


def load_label_names() -> dict[int, str]:
    """TotalSegmentator 'total' label id -> structure name of the source maps."""
    with open(LABELMAP_DIR / "total_label_names.json", encoding="utf-8") as f:
        return {int(k): v for k, v in json.load(f).items()}


def source_labelmap(anatomy: str) -> sitk.Image:
    """The unmodified source label map of ``anatomy`` (read from the package data)."""
    if anatomy not in ANATOMIES:
        raise ValueError(f"anatomy must be one of {ANATOMIES}, got {anatomy!r}")
    return sitk.ReadImage(str(LABELMAP_DIR / f"{anatomy}_total_labels.nii.gz"), sitk.sitkUInt8)


def _index_to_physical(img: sitk.Image, ijk: np.ndarray) -> np.ndarray:
    """(n, 3) continuous x,y,z indices -> (n, 3) physical points."""
    d = np.array(img.GetDirection()).reshape(3, 3)
    return np.asarray(img.GetOrigin()) + (ijk * np.asarray(img.GetSpacing())) @ d.T


def _lut_mask(lab: np.ndarray, ids: list[int]) -> np.ndarray:
    """``np.isin(lab, ids)`` for uint8 labels, by table look-up (much faster)."""
    lut = np.zeros(256, bool)
    lut[ids] = True
    return lut[lab]


def _maxpool2(a: np.ndarray) -> np.ndarray:
    a = np.pad(a, [(0, s % 2) for s in a.shape])
    z, y, x = (s // 2 for s in a.shape)
    return a.reshape(z, 2, y, 2, x, 2).any(axis=(1, 3, 5))


def _distance_mm(mask: np.ndarray, ref: sitk.Image) -> np.ndarray:
    """Signed Euclidean distance (mm, negative inside) to a mask on the grid of ``ref``."""
    if not mask.any():
        return np.full(mask.shape, 1e4, np.float32)
    img = sitk.GetImageFromArray(mask.astype(np.uint8))
    img.CopyInformation(ref)
    d = sitk.SignedMaurerDistanceMap(img, insideIsPositive=False, squaredDistance=False,
                                     useImageSpacing=True)
    return sitk.GetArrayFromImage(d).astype(np.float32)


def _fill_discs(lab: np.ndarray, reach: int = 6) -> None:
    """Label unlabelled gaps along z between vertebrae as discs (in place): the maps leave the
    intervertebral discs unlabelled and they would otherwise render as fat."""
    vert = _lut_mask(lab, _VERTEBRA_IDS)
    if not vert.any():
        return
    zs, ys, xs = (np.flatnonzero(vert.any(axis=ax)) for ax in ((1, 2), (0, 2), (0, 1)))
    sl = (slice(zs[0], zs[-1] + 1), slice(ys[0], ys[-1] + 1), slice(xs[0], xs[-1] + 1))
    v = vert[sl]
    above = np.zeros_like(v)
    below = np.zeros_like(v)
    for d in range(1, reach + 1):
        above[:-d] |= v[d:]
        below[d:] |= v[:-d]
    sub = lab[sl]
    sub[above & below & (sub == 0)] = _DISC_ID


@functools.lru_cache(maxsize=len(ANATOMIES))
def _load_source(anatomy: str) -> _Source:
    src = source_labelmap(anatomy)
    lab = sitk.GetArrayFromImage(src)  # z, y, x
    _fill_discs(lab)

    panc = np.argwhere(lab == _SRC_PANCREAS)[:, ::-1].astype(np.float64)  # x, y, z indices
    ext = [panc[np.argmin(panc[:, a])] for a in range(3)] + [panc[np.argmax(panc[:, a])]
                                                              for a in range(3)]
    step = max(1, len(panc) // 400)
    pancreas_points = _index_to_physical(src, np.vstack([ext, panc[::step]]))

    def z_range(ids: list[int]) -> tuple[float, float] | None:
        ks = np.flatnonzero(_lut_mask(lab, ids).any(axis=(1, 2)))
        if ks.size == 0:
            return None
        z = _index_to_physical(src, np.array([[0, 0, ks[0]], [0, 0, ks[-1]]], float))[:, 2]
        return float(z.min()), float(z.max())

    data_z = z_range(list(range(1, 256)))  # any label
    liver_z = z_range([5])
    panc_z = z_range([_SRC_PANCREAS])
    hip_z = z_range([77, 78]) or (data_z[0], data_z[0] + 150.0)
    assert data_z and liver_z and panc_z
    z_marks = {"data_bottom": data_z[0], "data_top": data_z[1], "liver_top": liver_z[1],
               "pancreas_bottom": panc_z[0], "pancreas_top": panc_z[1],
               "hip_bottom": hip_z[0], "iliac_crest": hip_z[1]}

    # Pad in-plane with air (room for the fat layers) and along z by edge replication (so that
    # rotated or deformed fields of view near the data ends do not run into emptiness).
    img = sitk.GetImageFromArray(lab)
    img.CopyInformation(src)
    img = sitk.ConstantPad(img, [40, 40, 0], [40, 40, 0], 0)
    img = sitk.ZeroFluxNeumannPad(img, [0, 0, 14], [0, 0, 14])
    lab = sitk.GetArrayFromImage(img)

    # Hull and distances on a 3 mm grid: cheap, and all of them are smooth.
    d = np.array(img.GetDirection()).reshape(3, 3)
    coarse = sitk.Image([(s + 1) // 2 for s in img.GetSize()], sitk.sitkUInt8)
    coarse.SetSpacing([2 * s for s in img.GetSpacing()])
    coarse.SetDirection(img.GetDirection())
    coarse.SetOrigin(tuple(np.asarray(img.GetOrigin()) + d @ (0.5 * np.asarray(img.GetSpacing()))))
    fg = _maxpool2(lab > 0)
    dist_any = _distance_mm(fg, coarse)
    radius = 30.0  # mm: bridges the gaps between peripheral organs, bowel loops and ribs
    dil = dist_any <= radius
    closed = (_distance_mm(dil, coarse) <= -radius) | fg
    filled = np.empty_like(closed)
    for k in range(closed.shape[0]):  # per slice: the hull is open at the data ends
        s = sitk.GetImageFromArray(closed[k].astype(np.uint8))
        filled[k] = sitk.GetArrayFromImage(sitk.BinaryFillhole(s)) > 0
    hull_img = sitk.GetImageFromArray(_distance_mm(filled, coarse))
    hull_img.CopyInformation(coarse)
    any_img = sitk.GetImageFromArray(np.maximum(dist_any, 0.0))
    any_img.CopyInformation(coarse)

    # Body centre and width at the pancreas level (in physical space).
    kz = int(round(np.mean(np.argwhere(lab == _SRC_PANCREAS)[:, 0]) / 2))
    jy, ix = np.nonzero(filled[kz])
    pts = _index_to_physical(coarse, np.stack([ix, jy, np.full_like(ix, kz)], 1).astype(float))
    body_center = np.array([pts[:, 0].mean(), pts[:, 1].mean(), float(pancreas_points[:, 2].mean())])
    body_width = float(pts[:, 0].max() - pts[:, 0].min())
    img_u8 = sitk.GetImageFromArray(lab)
    img_u8.CopyInformation(img)
    return _Source(img_u8, hull_img, any_img, pancreas_points, body_center, body_width, z_marks)


# --------------------------------------------------------------------------------------------
# Sampling helpers
# --------------------------------------------------------------------------------------------
def _rot(axis: int, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    i, j = [a for a in range(3) if a != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def _phase_ranges(phase_name: str, t: float) -> list[_R]:
    """Per tissue (lo, hi) HU for the phase: arterial table, or NC -> PV interpolated by t."""
    if phase_name == "arterial":
        return [tuple(map(float, t_[3])) for t_ in _TISSUES]
    return [((1 - t) * nc[0] + t * pv[0], (1 - t) * nc[1] + t * pv[1])
            for _, nc, pv, _, _ in _TISSUES]


def _resolve_phase(phase: str | float | None, draw: tuple[float, float]) -> tuple[str, float]:
    """-> (name, t): t in 0..1 is the non-contrast -> portal-venous position (1 for arterial)."""
    if phase is None:
        r, u = draw
        if r < 0.2:
            return "non-contrast", 0.0
        if r < 0.4:
            return "arterial", 1.0
        if r < 0.85:
            return "portal-venous", 1.0
        return "intermediate", float(0.2 + 0.7 * u)
    if isinstance(phase, str):
        names = {"non-contrast": 0.0, "arterial": 1.0, "portal-venous": 1.0}
        if phase not in names:
            raise ValueError(f"phase must be one of {PHASES}, a float in [0, 1] or None")
        return phase, names[phase]
    t = float(phase)
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"phase as a number must lie in [0, 1], got {phase}")
    name = "non-contrast" if t == 0.0 else "portal-venous" if t == 1.0 else "intermediate"
    return name, t


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int, int],
                  spacing_mm: float | np.ndarray, sigma_mm: float) -> np.ndarray:
    """Unit-variance smooth Gaussian random field (z, y, x float32) on a grid of ``shape`` with
    ``spacing_mm`` (x, y, z or one value).

    Smooth fields are drawn on a grid ~sigma/2 coarse and interpolated: same look, far cheaper.
    """
    sp = np.broadcast_to(np.asarray(spacing_mm, float), (3,))[::-1]  # z, y, x
    step = tuple(max(1, int(sigma_mm / (2.0 * v))) for v in sp)
    small = tuple(-(-n // k) + 2 for n, k in zip(shape, step))
    img = sitk.GetImageFromArray(rng.standard_normal(small, dtype=np.float32))
    img.SetSpacing([float(v * k) for v, k in zip(sp, step)][::-1])
    a = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(img, sigma_mm))
    if max(step) > 1:
        a = _interp(a[None], step, shape)[0]
    else:
        a = a[: shape[0], : shape[1], : shape[2]]
    a = np.ascontiguousarray(a)
    a -= a.mean()
    a /= a.ravel()[::3].std() + 1e-6
    return a


def _interp(channels: np.ndarray, factor: int | tuple[int, int, int],
            shape: tuple[int, int, int]) -> np.ndarray:
    """Trilinear upsampling of (C, z, y, x) by integer factor(s), cropped to ``shape``.

    Voxel k of the input is centred on output index factor * k + (factor - 1) / 2 (half-voxel
    aligned grids), the convention of ``torch.nn.functional.interpolate(align_corners=False)``.
    """
    x = torch.from_numpy(np.ascontiguousarray(channels, dtype=np.float32))[None]
    with torch.inference_mode():
        f = tuple(float(v) for v in np.broadcast_to(factor, (3,)))
        y = torch.nn.functional.interpolate(x, scale_factor=f, mode="trilinear",
                                            align_corners=False)
    return y[0, :, : shape[0], : shape[1], : shape[2]].numpy()


def _upsample2_box(a: np.ndarray, box: tuple[slice, ...]) -> np.ndarray:
    """``_interp(a[None], 2, full)[0][box]`` computed only around the box."""
    lo = [max(0, sl.start // 2 - 1) for sl in box]
    hi = [min(n, (sl.stop - 1) // 2 + 2) for sl, n in zip(box, a.shape)]
    sub = a[lo[0]: hi[0], lo[1]: hi[1], lo[2]: hi[2]]
    stop = tuple(sl.stop - 2 * l for sl, l in zip(box, lo))
    up = _interp(sub[None], 2, stop)[0]
    return up[tuple(slice(sl.start - 2 * l, sl.stop - 2 * l) for sl, l in zip(box, lo))]


def _gauss_noise_gain(sigma_vox: float) -> float:
    """Std of white noise after a sampled 1D Gaussian of ``sigma_vox`` voxels."""
    if sigma_vox < 0.2:
        return 1.0
    x = np.arange(-int(4 * sigma_vox) - 1, int(4 * sigma_vox) + 2)
    k = np.exp(-0.5 * (x / sigma_vox) ** 2)
    k /= k.sum()
    return float(np.sqrt((k**2).sum()))


def _dilate_into(t: np.ndarray, where: np.ndarray, mask: np.ndarray, iterations: int,
                 value: int) -> None:
    """t[where & (mask dilated by ``iterations`` 6-connected voxels)] = value, in mask's box."""
    box = _bbox(mask, margin=iterations)
    if box is None:
        return
    m = mask[box].copy()
    for _ in range(iterations):
        d = m.copy()
        d[1:] |= m[:-1]
        d[:-1] |= m[1:]
        d[:, 1:] |= m[:, :-1]
        d[:, :-1] |= m[:, 1:]
        d[:, :, 1:] |= m[:, :, :-1]
        d[:, :, :-1] |= m[:, :, 1:]
        m = d
    tb = t[box]
    tb[m & where[box]] = value


def _bbox(mask: np.ndarray, margin: int = 1) -> tuple[slice, ...] | None:
    out = []
    for ax in range(3):
        nz = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != ax)))
        if nz.size == 0:
            return None
        out.append(slice(max(0, nz[0] - margin), min(mask.shape[ax], nz[-1] + 1 + margin)))
    return tuple(out)


def _interior(lab: np.ndarray, mask: np.ndarray, iterations: int = 1) -> np.ndarray:
    """Voxels of ``mask`` at least ``iterations`` voxels (6-connected) inside their own label."""
    inner = mask.copy()
    for it in range(iterations):
        keep = inner.copy()
        for ax in range(3):
            lo = [slice(None)] * 3
            hi = [slice(None)] * 3
            lo[ax], hi[ax] = slice(0, -1), slice(1, None)
            lo_t, hi_t = tuple(lo), tuple(hi)
            keep[lo_t] &= inner[hi_t]
            keep[hi_t] &= inner[lo_t]
            if it == 0:  # a neighbour with another label is a boundary too
                same = lab[lo_t] == lab[hi_t]
                keep[lo_t] &= same
                keep[hi_t] &= same
        inner = keep
    return inner


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------
@dataclass
class _Grid:
    size: tuple[int, int, int]        # x, y, z
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray              # 3x3, columns = axis directions

    def image(self, pixel: int = sitk.sitkUInt8, size: tuple[int, ...] | None = None) -> sitk.Image:
        """An image on this grid (``size=(1, 1, 1)`` for a cheap geometry probe)."""
        img = sitk.Image([int(s) for s in (size or self.size)], pixel)
        img.SetSpacing([float(s) for s in self.spacing])
        img.SetOrigin([float(o) for o in self.origin])
        img.SetDirection([float(v) for v in self.direction.ravel()])
        return img

    def xy(self) -> tuple[np.ndarray, np.ndarray]:
        """Physical x, y of every (row, column); valid because directions only rotate about z."""
        j, i = np.mgrid[0: self.size[1], 0: self.size[0]].astype(np.float32)
        d = self.direction
        x = self.origin[0] + d[0, 0] * i * self.spacing[0] + d[0, 1] * j * self.spacing[1]
        y = self.origin[1] + d[1, 0] * i * self.spacing[0] + d[1, 1] * j * self.spacing[1]
        return x.astype(np.float32), y.astype(np.float32)

    def stamp(self, img: sitk.Image) -> None:
        """Give ``img`` (already of this size) this grid's geometry."""
        img.SetSpacing([float(s) for s in self.spacing])
        img.SetOrigin([float(o) for o in self.origin])
        img.SetDirection([float(v) for v in self.direction.ravel()])

    def resample(self, img: sitk.Image, transform: sitk.Transform, interp: int,
                 default: float, pixel: int | None = None) -> sitk.Image:
        """Resample onto this grid without allocating a reference image."""
        f = sitk.ResampleImageFilter()
        f.SetSize([int(s) for s in self.size])
        f.SetOutputSpacing([float(s) for s in self.spacing])
        f.SetOutputOrigin([float(o) for o in self.origin])
        f.SetOutputDirection([float(v) for v in self.direction.ravel()])
        f.SetTransform(transform)
        f.SetInterpolator(interp)
        f.SetDefaultPixelValue(default)
        if pixel is not None:
            f.SetOutputPixelType(pixel)
        return f.Execute(img)


def _centred_grid(center: np.ndarray, size: np.ndarray, spacing: np.ndarray,
                  direction: np.ndarray) -> _Grid:
    origin = center - direction @ ((size - 1) / 2.0 * spacing)
    return _Grid(tuple(int(s) for s in size), tuple(float(s) for s in spacing),
                 tuple(float(o) for o in origin), direction)


def _fit_center(center: np.ndarray, extent: np.ndarray, direction: np.ndarray,
                points: np.ndarray) -> np.ndarray:
    """Shift the FOV centre (least possible) so that ``points`` lie inside the FOV."""
    u = (points - center) @ direction  # coordinates along the FOV axes
    lo, hi = u.min(axis=0), u.max(axis=0)
    half = extent / 2.0
    shift = np.zeros(3)
    for a in range(3):
        a_lo, a_hi = hi[a] - half[a], lo[a] + half[a]
        shift[a] = np.clip(0.0, a_lo, a_hi) if a_lo <= a_hi else (lo[a] + hi[a]) / 2.0
    return center + direction @ shift


# --------------------------------------------------------------------------------------------
# The generator
# --------------------------------------------------------------------------------------------
def generate_small_case(seed: int, spacing: tuple[float, float, float] = (2.0, 2.0, 2.0),
                        size: tuple[int, int, int] = (96, 96, 64), **kwargs: Any) -> SyntheticCase:
    """A small case for unit tests: FOV centred on the pancreas (whole pancreas inside at 2 mm)."""
    return generate_case(seed, spacing=spacing, size=size, center_on_pancreas=True, **kwargs)


def generate_case(seed: int, *, anatomy: str | None = None,
                  spacing: tuple[float, float, float] | None = None,
                  size: tuple[int, int, int] | None = None,
                  phase: str | float | None = None,
                  orientation: str | None = None,
                  deform: bool = True,
                  center_on_pancreas: bool = False) -> SyntheticCase:
    """Generate one synthetic abdominal CT with its pancreas label.

    anatomy: "s0327" | "s0328" | None (drawn from the seed).
    spacing: output (x, y, z) mm; None draws a realistic one (in-plane 0.6-1.0 mm, slices
        0.625-5 mm).
    size: output (x, y, z) voxels; None gives 512 x 512 and a z extent from about the liver dome
        (with some lung base) down to somewhere between the lower pancreas and the pelvis.
    phase: "non-contrast" | "arterial" | "portal-venous" | float 0..1 (non-contrast -> portal
        venous) | None (drawn).
    orientation: "LPS" | "RAS" | "oblique" (LPS or RAS rotated 2-10 degrees about z) | None.
    deform: random affine + elastic deformation of the anatomy (off: only a translation).
    center_on_pancreas: centre the FOV on the pancreas bounding box instead of the scanner
        isocentre (z: a realistic abdominal range). Either way the FOV is shifted as little as
        possible to keep the whole pancreas inside when it fits.
    """
    rng = np.random.default_rng(seed)
    p: dict[str, Any] = {"seed": int(seed), "generator_version": GENERATOR_VERSION}

    # ---- draws (fixed order, independent of the arguments, so e.g. LPS and RAS share anatomy)
    anat_draw = rng.integers(len(ANATOMIES))
    phase_draw = (float(rng.random()), float(rng.random()))
    orient_draw = float(rng.random())
    oblique_base = "LPS" if rng.random() < 0.6 else "RAS"
    oblique_deg = float(rng.uniform(2.0, 10.0) * rng.choice([-1.0, 1.0]))
    xy_spacing_draw = float(rng.uniform(0.6, 1.0))
    z_spacings = [0.625, 0.8, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 5.0]
    z_spacing_draw = float(rng.choice(z_spacings, p=[.08, .08, .14, .12, .1, .12, .1, .12, .14]))
    fit_fov = bool(rng.random() < 0.85)
    thick_factor = float(rng.uniform(1.0, 1.5)) if rng.random() < 0.3 else 1.0
    # output -> source scale: < 1 enlarges the anatomy (the two sources have small pancreases,
    # ~57 mL, so enlargement is favoured: volumes ~40-95 mL)
    scale = np.exp(rng.uniform(-0.12, 0.08)) * np.exp(rng.uniform(-0.05, 0.05, 3))
    angles = np.deg2rad([rng.uniform(-3, 3), rng.uniform(-3, 3), rng.uniform(-6, 6)])
    el_amp = float(rng.uniform(1.0, 3.0))
    el_scale = float(rng.uniform(25.0, 45.0))
    el_seed = int(rng.integers(2**31))
    c_out = np.array([rng.uniform(-20, 20), rng.uniform(-30, 30), rng.uniform(-450, 150)])
    fov_offset = np.array([rng.uniform(-15, 15), rng.uniform(-15, 15), 0.0])
    top_margin = float(rng.uniform(0.0, 40.0))
    upper_only = bool(rng.random() < 0.3)
    bottom_u = float(rng.random())
    z_pos_u = float(rng.random())
    render_seed = int(rng.integers(2**31))

    anatomy = anatomy if anatomy is not None else ANATOMIES[int(anat_draw)]
    src = _load_source(anatomy)
    phase_name, phase_t = _resolve_phase(phase, phase_draw)
    if orientation is None:
        orientation = "LPS" if orient_draw < 0.45 else "RAS" if orient_draw < 0.8 else "oblique"
    if orientation not in ORIENTATIONS:
        raise ValueError(f"orientation must be one of {ORIENTATIONS} or None")
    base = oblique_base if orientation == "oblique" else orientation
    direction = np.diag([-1.0, -1.0, 1.0]) if base == "RAS" else np.eye(3)
    if orientation == "oblique":
        direction = _rot(2, math.radians(oblique_deg)) @ direction
    p.update(anatomy=anatomy, phase=phase_name, phase_value=phase_t, orientation=orientation,
             oblique_angle_deg=oblique_deg if orientation == "oblique" else 0.0)

    # ---- anatomy transform: output point p -> source point A(p + e(p))
    if not deform:
        scale, angles, el_amp = np.ones(3), np.zeros(3), 0.0
    m = _rot(2, angles[2]) @ _rot(1, angles[1]) @ _rot(0, angles[0]) @ np.diag(scale)
    aff = sitk.AffineTransform(3)
    aff.SetMatrix([float(v) for v in m.ravel()])
    aff.SetCenter([float(v) for v in c_out])
    aff.SetTranslation([float(v) for v in src.body_center - c_out])
    m_inv = np.linalg.inv(m)

    def to_output(q: np.ndarray) -> np.ndarray:
        """Source points -> output points (affine inverse, elastic by fixed-point iteration)."""
        r = c_out + (q - src.body_center) @ m_inv.T
        if elastic is None:
            return r
        pts = r.copy()
        for _ in range(4):
            disp = np.array([np.subtract(elastic.TransformPoint(tuple(map(float, v))), v)
                             for v in pts])
            pts = r - disp
        return pts

    # elastic field on a 10 mm grid around the anatomy (output space)
    elastic: sitk.DisplacementFieldTransform | None = None
    z_lo = to_output(np.array([[*src.body_center[:2], src.z_marks["data_bottom"] - 60]]))[0, 2]
    z_hi = to_output(np.array([[*src.body_center[:2], src.z_marks["data_top"] + 60]]))[0, 2]
    if el_amp > 0:
        erng = np.random.default_rng(el_seed)
        fld = sitk.Image([80, 80, int((z_hi - z_lo) / 10) + 2], sitk.sitkFloat32)
        fld.SetSpacing([10.0] * 3)
        fld.SetOrigin([c_out[0] - 395.0, c_out[1] - 395.0, z_lo])
        comps = [_smooth_field(erng, fld.GetSize()[::-1], 10.0, el_scale) * el_amp
                 for _ in range(3)]
        vec = sitk.GetImageFromArray(np.stack(comps, -1).astype(np.float64), isVector=True)
        vec.CopyInformation(fld)
        elastic = sitk.DisplacementFieldTransform(vec)
        transform = sitk.CompositeTransform([aff, elastic])
    else:
        transform = sitk.CompositeTransform([aff])
    p.update(scale=scale.tolist(), rotation_deg=np.rad2deg(angles).tolist(),
             elastic_amplitude_mm=el_amp, elastic_scale_mm=el_scale, patient_center=c_out.tolist())

    # ---- output geometry
    panc_out = to_output(src.pancreas_points)
    body_width = src.body_width / float(np.mean(scale[:2]))
    if spacing is None:
        xy = xy_spacing_draw
        if fit_fov:  # radiographers fit the reconstruction FOV to the patient
            xy = float(np.clip(max(xy, (body_width + 90.0) / 512), 0.6, 1.0))
        spacing = (xy, xy, z_spacing_draw)
    spacing_a = np.asarray(spacing, float)
    center = np.array([fov_offset[0], fov_offset[1], 0.0])
    z_top_src = min(src.z_marks["liver_top"] + top_margin, src.z_marks["data_top"] - 5.0)
    if upper_only:
        z_bot_src = src.z_marks["pancreas_bottom"] - 30.0 - 50.0 * bottom_u
    else:
        z_bot_src = src.z_marks["iliac_crest"] - 20.0 + bottom_u * (
            src.z_marks["hip_bottom"] - src.z_marks["iliac_crest"])
    z_bot_src = max(z_bot_src, src.z_marks["data_bottom"] + 5.0)
    zz = to_output(np.array([[*src.body_center[:2], z_top_src],
                             [*src.body_center[:2], z_bot_src]]))[:, 2]
    if size is None:
        nz = int(round(abs(zz[0] - zz[1]) / spacing_a[2])) + 1
        size = (512, 512, nz)
        center[2] = zz.mean()
    else:
        extent_z = (size[2] - 1) * spacing_a[2]
        pz = panc_out[:, 2]
        slack = max(0.0, extent_z - (pz.max() - pz.min()))
        center[2] = (pz.max() + pz.min()) / 2 + (z_pos_u - 0.5) * slack
    if center_on_pancreas:
        center = (panc_out.min(axis=0) + panc_out.max(axis=0)) / 2.0
    size_a = np.asarray(size, int)
    extent = (size_a - 1) * spacing_a
    center = _fit_center(center, extent - 2 * spacing_a, direction, panc_out)
    out_grid = _centred_grid(center, size_a, spacing_a, direction)
    thickness = float(min(spacing_a[2] * thick_factor, 5.0))
    p.update(spacing=[float(s) for s in spacing_a], size=[int(s) for s in size_a],
             origin=list(out_grid.origin), direction=[float(v) for v in direction.ravel()],
             slice_thickness=thickness, center_on_pancreas=bool(center_on_pancreas))

    # ---- render on the work grid (same direction and FOV, 1.5 mm)
    ws = _WORK_SPACING
    # thick slices: a coarser work grid along z still resolves the slice profile (sigma_z / 2)
    work_sp = np.array([ws, ws, min(max(thickness / 2.0, ws), 2.5)])
    # bake affine + elastic into one displacement field over the work FOV (4.5 mm): resampling
    # through it is ~25 % cheaper than through the composite transform
    fstep = 3 * ws
    fsize = np.ceil((size_a - 1) * spacing_a / fstep).astype(int) + 5
    fgrid = _centred_grid(center, fsize, np.full(3, fstep), direction)
    field = sitk.TransformToDisplacementField(
        transform, sitk.sitkVectorFloat64, [int(v) for v in fgrid.size],
        [float(v) for v in fgrid.origin], [float(v) for v in fgrid.spacing],
        [float(v) for v in direction.ravel()])
    transform = sitk.DisplacementFieldTransform(field)
    same_grid = bool(np.allclose(spacing_a, work_sp))  # e.g. 1.5 mm training crops: no resampling
    work_size = size_a if same_grid else np.ceil((size_a - 1) * spacing_a / work_sp).astype(int) + 3
    work = out_grid if same_grid else _centred_grid(center, work_size, work_sp, direction)
    hu, panc_work = _render(np.random.default_rng(render_seed), src, work, transform,
                            phase_name, phase_t, thickness, p)

    # ---- to the output grid: PSF already applied on the work grid; noise at output resolution
    if same_grid:
        arr = hu
    else:
        hu_img = sitk.GetImageFromArray(hu)
        del hu
        work.stamp(hu_img)
        arr = sitk.GetArrayFromImage(
            out_grid.resample(hu_img, sitk.Transform(), sitk.sitkLinear, -1000.0, sitk.sitkFloat32))
        del hu_img
    nrng = np.random.default_rng(render_seed + 1)
    white = p["noise_white_sigma"]
    if white > 0:
        for k0 in range(0, arr.shape[0], 32):  # chunks keep the temporary small
            chunk = arr[k0: k0 + 32]
            chunk += white * nrng.standard_normal(chunk.shape, dtype=np.float32)
    if p["circular_fov"]:  # the scanner's reconstruction circle: 512 pixels about its centre
        x, y = out_grid.xy()
        r = 256.0 * float(min(spacing_a[0], spacing_a[1]))
        arr[:, (x - fov_offset[0]) ** 2 + (y - fov_offset[1]) ** 2 > r * r] = _HU_MIN
    np.clip(arr, _HU_MIN, _HU_MAX, out=arr)
    np.rint(arr, out=arr)
    image = sitk.GetImageFromArray(arr.astype(np.int16))
    del arr
    out_grid.stamp(image)
    label = _label_on_grid(panc_work, work, out_grid)
    label.CopyInformation(image)
    return SyntheticCase(image, label, _jsonable(p))


def _label_on_grid(panc: np.ndarray, work: _Grid, out_grid: _Grid) -> sitk.Image:
    """0.5 iso-contour of the linearly resampled work-grid pancreas, computed in its bounding box."""
    lab = np.zeros(tuple(out_grid.size[::-1]), np.uint8)
    box = _bbox(panc, margin=2)
    if box is not None:
        w_img = sitk.GetImageFromArray(panc[box].astype(np.float32))
        w_img.SetSpacing(work.spacing)
        w_img.SetDirection([float(v) for v in work.direction.ravel()])
        start = [box[2].start, box[1].start, box[0].start]
        w_full = work.image(size=(1, 1, 1))
        w_img.SetOrigin(w_full.TransformIndexToPhysicalPoint([int(s) for s in start]))
        o_full = out_grid.image(size=(1, 1, 1))
        stop = [box[2].stop - 1, box[1].stop - 1, box[0].stop - 1]
        corners = np.array([[a, b, c] for a in (start[0], stop[0]) for b in (start[1], stop[1])
                            for c in (start[2], stop[2])], float)
        phys = _index_to_physical(w_full, corners)
        idx = np.array([o_full.TransformPhysicalPointToContinuousIndex(tuple(map(float, q)))
                        for q in phys])
        lo = np.clip(np.floor(idx.min(axis=0)).astype(int) - 1, 0, None)
        hi = np.minimum(np.ceil(idx.max(axis=0)).astype(int) + 2, np.asarray(out_grid.size))
        if np.all(hi > lo):
            crop = sitk.Image([int(v) for v in hi - lo], sitk.sitkFloat32)
            crop.SetSpacing(out_grid.spacing)
            crop.SetDirection(o_full.GetDirection())
            crop.SetOrigin(o_full.TransformIndexToPhysicalPoint([int(v) for v in lo]))
            r = sitk.Resample(w_img, crop, sitk.Transform(), sitk.sitkLinear, 0.0)
            sub = (sitk.GetArrayFromImage(r) >= 0.5).astype(np.uint8) * PANCREAS_LABEL_ID
            lab[lo[2]: hi[2], lo[1]: hi[1], lo[0]: hi[0]] = sub
    return sitk.GetImageFromArray(lab)


def _render(rng: np.random.Generator, src: _Source, work: _Grid, transform: sitk.Transform,
            phase_name: str, phase_t: float, thickness: float,
            p: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """HU image (z, y, x float32, PSF applied) and pancreas mask on the work grid."""
    shape = tuple(work.size[::-1])
    wsp = np.asarray(work.spacing)  # x, y, z
    # ---- case parameters (drawn in a fixed order)
    wall0 = float(rng.uniform(5.0, 14.0))
    fat0 = float(rng.uniform(5.0, 35.0))
    skin = 1.5
    table = bool(rng.random() < 0.7)
    table_curv = float(rng.uniform(0.0, 1.0 / 1200.0)) if rng.random() < 0.7 else 0.0
    table_pad = float(rng.uniform(10.0, 50.0)) if rng.random() < 0.6 else 0.0
    table_comp = float(rng.uniform(0.0, 10.0))
    table_shell = float(rng.uniform(2.0, 5.0))
    table_core = float(rng.uniform(15.0, 45.0))
    table_width = float(rng.uniform(380.0, 520.0))
    fatty = float(rng.uniform(0.1, 0.45)) if rng.random() < 0.3 else 0.0
    panc_shift = float(rng.uniform(0.0, 20.0)) if fatty > 0 else 0.0
    liver_vessels = float(rng.uniform(0.15, 0.35)) if rng.random() < 0.85 else 0.0
    lung_vessels = float(rng.uniform(0.12, 0.25))
    strands = float(rng.uniform(0.08, 0.2))
    loops = float(rng.uniform(0.05, 0.3)) if rng.random() < 0.6 else 0.0
    oral = rng.random() < 0.12
    gas = {"stomach": float(rng.uniform(0.05, 0.6)) if rng.random() < 0.7 else 0.0,
           "duodenum": float(rng.uniform(0.0, 0.4)),
           "small_bowel": float(rng.uniform(0.0, 0.2)),
           "colon": float(rng.uniform(0.1, 0.7)),
           "loop": float(rng.uniform(0.0, 0.3))}
    u_global = float(rng.random())
    psf = float(rng.uniform(0.5, 1.2))
    noise = float(np.exp(rng.uniform(math.log(5.0), math.log(30.0))))
    corr = float(rng.uniform(0.3, 1.0))
    circular = bool(rng.random() < 0.35)

    # ---- per-tissue HU and texture
    ranges = _phase_ranges(phase_name, phase_t)
    n_t = len(_TISSUES)
    mean = np.empty(n_t, np.float32)
    a_low = np.empty(n_t, np.float32)
    a_mid = np.empty(n_t, np.float32)
    hu_params: dict[str, float] = {}
    for i, (name, *_r, tex) in enumerate(_TISSUES):
        u = abs(u_global + rng.normal(0.0, 0.3))  # near a shared contrast-dose quantile,
        u = float(2.0 - u if u > 1.0 else u)        # reflected into [0, 1]
        lo, hi = ranges[i]
        mean[i] = lo + u * (hi - lo)
        a_low[i] = rng.uniform(0.5, 1.0) * tex[0]
        a_mid[i] = rng.uniform(0.5, 1.0) * tex[1]
        hu_params[name] = round(float(mean[i]), 1)
    for name in _CONTENTS:  # bowel content: mostly fluid, sometimes positive oral contrast
        if oral and name != "stomach_content" and rng.random() < 0.8:
            mean[_TI[name]] = rng.uniform(150.0, 350.0)
        hu_params[name] = round(float(mean[_TI[name]]), 1)
    if phase_name == "arterial":  # arciform / heterogeneous spleen in the arterial phase
        a_mid[_TI["spleen"]] = rng.uniform(15.0, 35.0)
    mean[_TI["pancreas"]] -= panc_shift
    hu_params["pancreas"] = round(float(mean[_TI["pancreas"]]), 1)
    mean[_TI["air"]] = -1000.0

    # ---- anatomy on the work and coarse grids
    lab_img = work.resample(src.label, transform, sitk.sitkNearestNeighbor, 0)
    lab = sitk.GetArrayFromImage(lab_img)
    del lab_img
    cgrid = _Grid(tuple(s // 2 + 1 for s in work.size), tuple(2 * wsp),
                  tuple(np.asarray(work.origin) + work.direction @ (0.5 * wsp)),
                  work.direction)
    # hull distances are smooth: sampled at 6 mm through the deformation, then interpolated
    c2grid = _Grid(tuple(s // 2 + 1 for s in cgrid.size), tuple(4 * wsp),
                   tuple(np.asarray(cgrid.origin) + work.direction @ wsp),
                   work.direction)
    cshape = tuple(cgrid.size[::-1])
    sdf, dist_any = _interp(np.stack([
        sitk.GetArrayFromImage(c2grid.resample(img, transform, sitk.sitkLinear, 1e4))
        for img in (src.hull_sdf, src.dist_any)]), 2, cshape)
    f_a = _smooth_field(rng, cshape, 2 * wsp, 50.0)
    f_b = _smooth_field(rng, cshape, 2 * wsp, 70.0)
    fl = _smooth_field(rng, shape, wsp, 25.0)  # organ-scale texture
    f_mid = _smooth_field(rng, cshape, 2 * wsp, 2.5)  # fine texture, lobulation, small vessels
    f_mid2 = _smooth_field(rng, cshape, 2 * wsp, 2.5)
    f_blob = _smooth_field(rng, cshape, 2 * wsp, 6.0)  # gas pockets, loops, hepatic vessels
    f_blob2 = _smooth_field(rng, cshape, 2 * wsp, 6.0)

    # body layers (mm levels, negative inside): hull SDF -> wall -> subcutaneous fat -> skin
    _, cy = cgrid.xy()
    yc = p["patient_center"][1]
    back = np.clip((cy - yc) / 80.0, 0.0, 1.0)[None]  # supine: thin wall and fat at the back
    wall_t = np.maximum(wall0 * (1.0 + 0.3 * f_a) * (1.0 - 0.75 * back), 1.5)
    fat_t = np.maximum(fat0 * (1.0 + 0.25 * f_b) * (1.0 - 0.6 * back), 2.0)
    body_level = sdf - wall_t - fat_t - skin
    # one continuous layer coordinate: < 0 visceral, [0, 1) wall, >= 1 subcutaneous
    layer = np.where(sdf < 0, sdf, np.where(sdf < wall_t, sdf / wall_t,
                                            1.0 + (sdf - wall_t) / fat_t)).astype(np.float32)
    free = dist_any > 4.0  # room for unlabelled bowel loops, away from the labelled organs
    del sdf, wall_t, fat_t, dist_any
    body_w, layer_w, fm, fm2, fb = _interp(np.stack([body_level, layer, f_mid, f_mid2, f_blob]),
                                           2, shape)
    free_w = free[np.ix_(*[np.arange(n) // 2 for n in shape])]
    del body_level, layer, f_mid, f_mid2, f_blob, free

    x2, y2 = work.xy()
    t = _SRC_LUT[lab]
    un = lab == 0
    body = body_w < 0.0
    # table: flattens the back (the patient lies on it) and shows below
    tab_hu = None
    if table:
        cols = body.any(axis=0)
        y_back = float(np.percentile(y2[cols], 99.5)) if cols.any() else yc + 150.0
        x_t = p["patient_center"][0]

        def below(x: np.ndarray, y: np.ndarray) -> np.ndarray:
            """mm below the table's top surface (LPS: +y posterior); its sides curve up."""
            return y - (y_back - table_comp - table_curv * (x - x_t) ** 2)

        body &= ~((below(x2, y2) > 0)[None] & un)
        # layers: pad, shell, foam core, shell; 3x3 supersampled so that thin shells do not alias
        edges = np.cumsum([0.0, table_pad, table_shell, table_core, table_shell])
        layer_hu = [mean[_TI[n]] for n in ("table_pad", "table_shell", "table_core", "table_shell")]
        tab_hu = np.zeros(shape[1:], np.float32)
        d = work.direction
        for u in (-1 / 3, 0.0, 1 / 3):
            for v in (-1 / 3, 0.0, 1 / 3):
                xs = x2 + (d[0, 0] * u * wsp[0] + d[0, 1] * v * wsp[1])
                ys = y2 + (d[1, 0] * u * wsp[0] + d[1, 1] * v * wsp[1])
                dep = below(xs, ys)
                val = np.full(shape[1:], -1000.0, np.float32)
                inside = np.abs(xs - x_t) < table_width / 2
                for n, hu_n in enumerate(layer_hu):
                    val[inside & (dep >= edges[n]) & (dep < edges[n + 1])] = hu_n
                tab_hu += val / 9.0
    t[un & ~body] = _TI["air"]
    t[un & body & (body_w >= -skin)] = _TI["skin"]
    t[un & (body_w < -skin) & (layer_w >= 1)] = _TI["fat_subcut"]
    t[un & (layer_w < 1) & (layer_w >= 0)] = _TI["muscle"]  # abdominal / chest wall
    visc = un & (layer_w < 0)
    del layer_w, body_w
    # mesenteric / retroperitoneal vessels and nodes: thin tubes in the visceral fat
    tube = (np.abs(fm - 0.8) < strands) & (np.abs(fm2 + 0.8) < strands)
    t[visc & tube] = _TI["strand"]
    if loops > 0:  # bowel loops the maps leave unlabelled, away from the labelled organs
        q = np.quantile(fb[::2, ::2, ::2], 1.0 - loops)
        loop = visc & (fb > q) & free_w
        t[loop] = _TI["loop_content"]
    del free_w
    _dilate_into(t, visc, _lut_mask(lab, _CHEST_IDS), 3, _TI["muscle"])  # diaphragm, intercostals
    _dilate_into(t, visc, lab == 79, 2, _TI["csf"])  # spinal canal around the cord
    del visc

    t_sub = t[::2, ::2, ::2].copy()  # bounding boxes from a 2x subsampled map (+margin): cheap

    def refine(cls: int, fn) -> None:
        """Apply ``fn(t_crop, lab_crop, mask_crop, crop)`` inside the bounding box of a class."""
        box = _bbox(t_sub == cls, margin=2)
        if box is not None:
            box = tuple(slice(2 * b.start, min(2 * b.stop, n)) for b, n in zip(box, shape))
            tc = t[box]
            fn(tc, lab[box], tc == cls, box)

    anterior = (y2 - yc) / 100.0  # < 0 anterior: gas rises to the front in a supine patient

    def bones(tc, lc, mc, box):
        tc[mc & ~_interior(lc, mc)] = _TI["bone_cortex"]

    def kidneys(tc, lc, mc, box):
        tc[_interior(lc, mc, 3)] = _TI["kidney_medulla"]

    def heart(tc, lc, mc, box):
        tc[mc & ~_interior(lc, mc, 3)] = _TI["myocardium"]

    def organ_vessels(frac: float, target: str, thick: bool):
        def fn(tc, lc, mc, box):
            if thick:  # hepatic and portal branches, 3-8 mm
                f1, f2 = fb[box], _upsample2_box(f_blob2, box)
            else:
                f1, f2 = fm[box], fm2[box]
            tb = (np.abs(f1) < frac) & (np.abs(f2) < frac)
            tc[mc & tb & _interior(lc, mc, 2)] = _TI[target]
        return fn

    def pancreas(tc, lc, mc, box):
        if fatty > 0:
            vals = fm[box][mc]
            q = np.quantile(vals[::3], 1.0 - fatty)
            tc[mc & (fm[box] > q)] = _TI["pancreas_fat"]

    def bowel(content: str, key: str, wall_iters: int, level: bool):
        def fn(tc, lc, mc, box):
            inner = _interior(lc, mc, wall_iters)
            tc[mc & ~inner] = _TI["bowel_wall"]
            frac = gas[key]
            if frac <= 0 or not inner.any():
                return
            if level:  # air-fluid level: gas fills the anterior part of the lumen
                ya = np.broadcast_to(y2[box[1:]][None], inner.shape)
                thr = np.quantile(ya[inner][::3], frac)
                tc[inner & (ya < thr)] = _TI["gas"]
            else:  # gas pockets, preferably anterior
                score = fb[box] - 1.5 * anterior[box[1:]][None]
                thr = np.quantile(score[inner][::5], 1.0 - frac)
                tc[inner & (score > thr)] = _TI["gas"]
            if content == "colon_content":  # faecal mottling: small gas bubbles
                tc[inner & (fm[box] > 1.6)] = _TI["gas"]
        return fn

    refine(_TI["bone_trab"], bones)
    refine(_TI["kidney_cortex"], kidneys)
    refine(_TI["heart"], heart)
    if liver_vessels > 0:
        refine(_TI["liver"], organ_vessels(liver_vessels, "liver_vessel", True))
    refine(_TI["lung"], organ_vessels(lung_vessels, "lung_vessel", False))
    refine(_TI["pancreas"], pancreas)
    refine(_TI["stomach_content"], bowel("stomach_content", "stomach", 2, True))
    refine(_TI["duodenum_content"], bowel("duodenum_content", "duodenum", 1, False))
    refine(_TI["small_bowel_content"], bowel("small_bowel_content", "small_bowel", 1, False))
    refine(_TI["colon_content"], bowel("colon_content", "colon", 1, False))
    if loops > 0:
        refine(_TI["loop_content"], bowel("loop_content", "loop", 1, False))
    panc = lab == _SRC_PANCREAS

    # ---- intensities
    hu = np.take(mean, t)
    hu += np.take(a_low, t) * fl
    hu += np.take(a_mid, t) * fm
    if tab_hu is not None:
        m = (t == _TI["air"]) & (tab_hu > -999.0)[None]
        hu[m] = np.broadcast_to(tab_hu[None], shape)[m]
    del fl, fm, fm2, fb, t, lab
    # correlated noise: white on the 1.5 mm grid, smoothed by the PSF, then linearly resampled;
    # amplified by what those two steps take away so that ``noise_sigma`` is about (+-20 %) the
    # final std in a flat region
    sig_z = max(thickness / 2.35, 0.3)
    gain = (_gauss_noise_gain(psf / wsp[0]) * _gauss_noise_gain(psf / wsp[1])
            * _gauss_noise_gain(sig_z / wsp[2]) * 0.68)  # 0.68: linear resampling, measured
    hu += (corr * noise / gain) * rng.standard_normal(shape, dtype=np.float32)
    img = sitk.GetImageFromArray(hu)
    del hu
    img.SetSpacing(work.spacing)
    img = sitk.SmoothingRecursiveGaussian(img, [psf, psf, sig_z])
    hu = sitk.GetArrayFromImage(img)
    p.update(wall_thickness_mm=wall0, subcutaneous_fat_mm=fat0, table=table,
             table_curvature=table_curv, table_pad_mm=table_pad, fatty_pancreas_fraction=fatty,
             liver_vessels=liver_vessels, lung_vessels=lung_vessels, mesenteric_strands=strands,
             unlabelled_loops=loops, oral_contrast=bool(oral), gas_fractions=gas,
             contrast_dose_quantile=u_global, psf_sigma_mm=psf, psf_sigma_z_mm=sig_z,
             noise_sigma=noise, noise_correlated_fraction=corr,
             noise_white_sigma=float(noise * math.sqrt(max(0.0, 1.0 - corr**2))),
             table_top_compression_mm=table_comp, table_width_mm=table_width,
             circular_fov=circular, hu=hu_params)
    return hu, panc


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


# Cases of the README grid: every phase, orientation and a spread of spacings, both anatomies.
EXAMPLE_GRID_CASES: tuple[dict[str, Any], ...] = (
    dict(seed=0, anatomy="s0327", phase="non-contrast", orientation="LPS", spacing=(0.7, 0.7, 5.0)),
    dict(seed=1, anatomy="s0328", phase="arterial", orientation="RAS", spacing=(0.8, 0.8, 1.0)),
    dict(seed=2, anatomy="s0327", phase="portal-venous", orientation="oblique",
         spacing=(0.9, 0.9, 2.5)),
    dict(seed=3, anatomy="s0328", phase=0.5, orientation="LPS", spacing=(0.65, 0.65, 0.625)),
    dict(seed=4, anatomy="s0327", phase="arterial", orientation="RAS", spacing=(0.75, 0.75, 3.0)),
    dict(seed=5, anatomy="s0328", phase="portal-venous", orientation="oblique",
         spacing=(1.0, 1.0, 1.25)),
    dict(seed=6, anatomy="s0327", phase="portal-venous", orientation="RAS", spacing=(0.85, 0.85, 2.0)),
    dict(seed=7, anatomy="s0328", phase="non-contrast", orientation=None, spacing=None),
)


def write_example_grid(path: str | Path,
                       cases: tuple[dict[str, Any], ...] = EXAMPLE_GRID_CASES) -> list[dict[str, Any]]:
    """Generate the example cases and save their axial | coronal grid (pancreas outlined) as PNG.

    Returns the parameters of each case, in grid order (left to right, top to bottom)."""
    from .overlay import save_case_grid  # only this helper needs the renderer

    made = [generate_case(c["seed"], **{k: v for k, v in c.items() if k != "seed"})
            for c in cases]
    save_case_grid(path, made)
    return [m.params for m in made]


if __name__ == "__main__":  # python -m PancreasC2FLib.synthetic [grid.png]
    import sys

    out = sys.argv[1] if len(sys.argv) > 1 else "synthetic_grid.png"
    for prm in write_example_grid(out):
        print(prm["seed"], prm["anatomy"], prm["phase"], prm["orientation"],
              [round(v, 3) for v in prm["spacing"]], prm["size"])
