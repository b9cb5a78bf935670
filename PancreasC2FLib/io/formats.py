"""File name suffixes of the formats read and written, and the suffix of a path."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import InputError

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
LABEL_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
SEG_SUFFIX = ".seg.nrrd"


def suffix_of(path: str | Path) -> str:
    name = Path(path).name.lower()
    for s in (SEG_SUFFIX,) + IMAGE_SUFFIXES:
        if name.endswith(s):
            return s
    return Path(path).suffix.lower()



def check_itk_path(path: str | Path) -> None:
    """ITK aborts the whole process (a C++ exception) on a file name that is not valid UTF-8:
    refuse such a name as bad input instead."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"file name is not valid UTF-8, which the image readers cannot open: {os.fsencode(str(path))!r}; rename it") from None
