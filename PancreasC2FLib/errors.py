"""Errors with the exit codes the command line returns for them.

One place for the mapping, so the CLI, the batch script and Slicer all report the same thing.
"""

from __future__ import annotations


class PancreasC2FError(Exception):
    """Base class: a clear one-line message and a distinct exit code."""

    exit_code = 1


class InputError(PancreasC2FError):
    """The input image is missing, unreadable, not a 3D scalar volume, or otherwise unusable."""

    exit_code = 2


class EmptyCoarseResult(PancreasC2FError):
    """The coarse stage found no pancreas: never silently return an empty mask."""

    exit_code = 3


class OutputError(PancreasC2FError):
    """An output cannot be written (exists without --overwrite, unwritable folder, disk full)."""

    exit_code = 4


class ModelError(PancreasC2FError):
    """A model bundle is missing, malformed, tampered with or incompatible."""

    exit_code = 5


class OutOfMemory(PancreasC2FError):
    """Out of memory on every device we were allowed to try."""

    exit_code = 6


class CasesFailed(PancreasC2FError):
    """A batch finished, but some of its cases failed (their rows say why)."""

    exit_code = 7


class Cancelled(PancreasC2FError):
    """The user cancelled the run (Ctrl-C, the Cancel button, a cancel event)."""

    exit_code = 130


EXIT_CODES = {
    0: "success",
    1: "internal error (a bug: please report it with the command and the traceback from --debug)",
    InputError.exit_code: "bad input image, ROI file or command-line usage",
    EmptyCoarseResult.exit_code: "the coarse stage found no pancreas (give an ROI with --roi)",
    OutputError.exit_code: "output cannot be written (exists: use --overwrite; or unwritable)",
    ModelError.exit_code: "model bundle missing, invalid or tampered with",
    OutOfMemory.exit_code: "out of memory",
    CasesFailed.exit_code: "batch finished, but some cases failed (see the CSV)",
    Cancelled.exit_code: "cancelled",
}
