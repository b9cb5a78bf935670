"""Slicer markups ROI files (``.mrk.json``) <-> canonical voxel boxes.

The file stores ``center``, ``size`` and a row-major 3x3 ``orientation`` (columns = ROI axes) in
the coordinate system it names (LPS or RAS). A box written here is the exact voxel block, so
``--coarse-only`` followed by ``--roi`` with the same file reproduces the box.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from ..processing.geometry import Box, Orientation, box_corners_physical, box_is_empty, box_to_ijk, physical_points_to_box

MARKUPS_SCHEMA = "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/Schema/markups-schema-v1.0.3.json#"
ROI_NAME = "Pancreas region"
_LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])


def box_to_roi_dict(image: sitk.Image, orientation: Orientation, box: Box, name: str = ROI_NAME, description: str = "") -> dict:
    """A markups ROI (LPS) aligned with the image grid that covers exactly the voxels of ``box``."""
    corners = box_corners_physical(image, orientation, box)
    center = corners.mean(axis=0)
    d = np.array(image.GetDirection(), float).reshape(3, 3)
    sizes = np.array(image.GetSpacing()) * np.array([hi - lo for lo, hi in box_to_ijk(image, orientation, box)], float)
    markup = {
        "type": "ROI",
        "name": name,
        "coordinateSystem": "LPS",
        "coordinateUnits": "mm",
        "locked": False,
        "roiType": "Box",
        "center": [float(v) for v in center],
        "orientation": [float(v) for v in d.reshape(-1)],
        "size": [float(v) for v in sizes],
        "insideOut": False,
        "controlPoints": [],
        "measurements": [],
        "display": {"visibility": True, "color": [1.0, 0.85, 0.0], "selectedColor": [1.0, 0.6, 0.0], "handlesInteractive": True},
    }
    if description:
        markup["description"] = description
    return {"@schema": MARKUPS_SCHEMA, "markups": [markup]}


def write_roi(path: str | Path, roi: dict) -> None:
    from .outputs import atomic_write_text

    atomic_write_text(path, json.dumps(roi, indent=2))


MAX_ROI_BYTES = 10_000_000  # a markups file is a few kB; anything this big is not one
MAX_COORDINATE_MM = 1e6  # a kilometre: beyond any scanner, and far from float overflow


def roi_corners_lps(roi: dict) -> tuple[np.ndarray, np.ndarray]:
    """The 8 corners (LPS) of the first ROI in a markups document and its axes (columns, LPS)."""
    try:
        markups = [m for m in roi["markups"] if isinstance(m, dict) and m.get("type") == "ROI"] if isinstance(roi["markups"], list) else []
        m = markups[0]
        center = np.array(m["center"] if "center" in m else m["controlPoints"][0]["position"], float)
        size = np.array(m["size"], float)
        orient = np.array(m.get("orientation", [1, 0, 0, 0, 1, 0, 0, 0, 1]), float).reshape(3, 3)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, OverflowError) as exc:
        raise InputError(f"not a Slicer markups ROI file ({exc.__class__.__name__}: {exc})") from None
    if center.shape != (3,) or size.shape != (3,) or not np.all(np.isfinite(np.r_[center, size, orient.ravel()])):
        raise InputError("markups ROI has an invalid center, size or orientation")
    if np.any(np.abs(np.r_[center, size]) > MAX_COORDINATE_MM):
        raise InputError(f"markups ROI has a center or size beyond {MAX_COORDINATE_MM:g} mm")
    if np.any(size <= 0):
        raise InputError("markups ROI has zero or negative size")
    if m.get("insideOut", False):
        raise InputError("markups ROI is inside-out (the region outside the box): a box around the pancreas is needed")
    system = m.get("coordinateSystem", "LPS")
    if not isinstance(system, str) or system.upper() not in ("LPS", "RAS"):
        raise InputError(f"markups ROI has coordinate system {system!r}: only LPS and RAS are known")
    if system.upper() == "RAS":
        center = _LPS_FROM_RAS @ center
        orient = _LPS_FROM_RAS @ orient
    corners = np.array([center + orient @ (np.array(signs) * size / 2) for signs in itertools.product((-1, 1), repeat=3)])
    return corners, orient


def read_roi(path: str | Path) -> dict:
    path = Path(path)
    try:
        if not path.exists():
            raise FileNotFoundError
        if not path.is_file():  # a FIFO would block forever, /dev/zero never ends
            raise InputError(f"ROI file is not a regular file: {path}")
        if path.stat().st_size > MAX_ROI_BYTES:
            raise InputError(f"ROI file is too large to be a markups file: {path}")
        roi = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"ROI file not found: {path}") from None
    except RecursionError:
        raise InputError(f"cannot read ROI file {path}: nested too deeply") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # ValueError: JSON errors, 5000-digit numbers
        raise InputError(f"cannot read ROI file {path}: {exc}") from None
    if not isinstance(roi, dict):
        raise InputError(f"not a Slicer markups ROI file: {path}")
    return roi


def roi_to_box(image: sitk.Image, orientation: Orientation, roi: dict) -> tuple[Box, list[str]]:
    """Canonical voxel box inside a markups ROI, plus warnings (rotated ROI, clamped to image)."""
    corners, axes = roi_corners_lps(roi)
    warnings = []
    direction = np.array(image.GetDirection(), float).reshape(3, 3)
    # Aligned when each ROI axis is parallel to an image axis.
    if not np.allclose(np.abs(direction.T @ axes).max(axis=0), 1.0, atol=1e-3):
        warnings.append("the ROI is rotated relative to the image grid; its axis-aligned bounding box was used")
    box = physical_points_to_box(image, orientation, corners)
    if box_is_empty(box):
        raise InputError("the ROI does not overlap the image")
    return box, warnings
