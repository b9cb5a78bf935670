"""File name suffixes of the formats read and written, and the suffix of a path."""

from __future__ import annotations

from pathlib import Path

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
LABEL_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
SEG_SUFFIX = ".seg.nrrd"


def suffix_of(path: str | Path) -> str:
    name = Path(path).name.lower()
    for s in (SEG_SUFFIX,) + IMAGE_SUFFIXES:
        if name.endswith(s):
            return s
    return Path(path).suffix.lower()

