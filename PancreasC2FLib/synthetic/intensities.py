"""Synthetic CT, the intensities: Hounsfield units and texture amplitudes per tissue by contrast
phase (non-contrast, arterial, portal-venous or in between), and the source label -> tissue
table."""

from __future__ import annotations

import numpy as np

from .anatomy import _DISC_ID

PHASES = ("non-contrast", "arterial", "portal-venous")
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
# Soft tissues: what version 2 compresses, jitters or randomises (not air, gas, fat, lung, bone,
# the table: their HU ranges are narrow and physical in every scan).
_SOFT = ("skin", "muscle", "liver", "liver_vessel", "spleen", "pancreas", "kidney_cortex",
         "kidney_medulla", "cyst", "adrenal", "bile", "urine", "prostate", "artery", "portal", "vein",
         "heart", "myocardium", "esophagus", "bowel_wall", "stomach_content", "duodenum_content",
         "small_bowel_content", "loop_content", "strand", "cord", "csf", "thyroid")
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
