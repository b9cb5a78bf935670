"""Training curves (Training/trainer.py draw_curves): points are visible even with one logged row."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

pytest.importorskip("matplotlib")

from Training.trainer import draw_curves  # noqa: E402

BLUE = (121, 173, 210)  # matplotlib tab:blue at alpha 0.6 on white: the loss markers
GREEN = (44, 160, 44)  # tab:green, the validation DSC markers


def _count(rgb: np.ndarray, colour, tol: int = 40) -> int:
    return int((np.abs(rgb[..., :3].astype(int) - np.array(colour)).sum(-1) < tol).sum())


def test_one_logged_point_is_drawn(tmp_path: Path) -> None:
    path = tmp_path / "curves.png"
    assert draw_curves([{"iteration": 10, "loss": 0.7, "val_dsc": 0.42}], path, "resdsn-c2f", "coarse")
    rgb = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    half = rgb.shape[1] // 2
    # a line through one point draws nothing: these pixels are the markers (and legend swatches)
    assert _count(rgb[:, :half], BLUE) > 20
    assert _count(rgb[:, half:], GREEN) > 20


def test_no_validation_yet(tmp_path: Path) -> None:
    path = tmp_path / "curves.png"
    assert draw_curves([{"iteration": i, "loss": 1.0 / i} for i in range(1, 30)], path, stage="fine")
    rgb = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    assert _count(rgb[:, : rgb.shape[1] // 2], BLUE) > 50
    assert _count(rgb[:, rgb.shape[1] // 2 :], GREEN) == 0
