"""Synthetic CT, the anatomy: the two source label maps (TotalSegmentator s0327, s0328), their
derived labels (discs), the body hull and distances cached per anatomy, and the label-map
helpers (look-up masks, bounding boxes, interiors, dilation) the renderer uses."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

PANCREAS_LABEL_ID = 1
ANATOMIES = ("s0327", "s0328")
LABELMAP_DIR = Path(__file__).parent.parent / "data" / "labelmaps"

_SRC_PANCREAS = 7
_DISC_ID = 200  # derived label: intervertebral discs (unlabelled gaps in the spine)
_LUNG_IDS = list(range(10, 15))
_CHEST_IDS = _LUNG_IDS + list(range(92, 118))  # lungs, ribs, sternum, costal cartilage
_VERTEBRA_IDS = list(range(25, 51))


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
