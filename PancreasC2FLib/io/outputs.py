"""Writing outputs all or nothing: ``Outputs`` checks every output of a run before the work starts
and stages them as hidden temporaries renamed into place together; ``atomic_path`` and
``atomic_write_text`` do the same for one file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from ..errors import InputError, OutputError
from .formats import suffix_of


def check_output_path(path: str | Path, overwrite: bool) -> Path:
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputError(f"output exists: {path} (use --overwrite to replace it)")
    if path.exists() and path.is_dir():
        raise OutputError(f"output is a folder: {path}")
    if not path.parent.exists():
        raise OutputError(f"output folder does not exist: {path.parent}")
    return path


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path next to ``path``; rename it into place only on success."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=".part" + suffix_of(path), dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    try:
        with atomic_path(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None


class Outputs:
    """All outputs of one run: checked before the work starts, staged as hidden temporary files
    next to their targets, and renamed into place together only when all of them are written.
    A failure or Ctrl-C removes the temporaries, so a run leaves everything or nothing, and an
    existing file replaced with --overwrite survives a failed run."""

    def __init__(self, overwrite: bool):
        self.overwrite = overwrite
        self.planned: list[Path] = []
        self.staged: list[tuple[Path, Path]] = []  # (temporary, final)
        self.written: list[Path] = []

    def plan(self, path: str | Path | None) -> Path | None:
        if path is None:
            return None
        p = check_output_path(path, self.overwrite)
        if p.resolve() in [q.resolve() for q in self.planned]:
            raise InputError(f"the same output path is given twice: {p}")
        self.planned.append(p)
        return p

    def write(self, path: Path | None, writer: Callable[[Path], None]) -> None:
        """Write one output to its temporary (same folder and extension, so the format and the
        final rename stay on one file system)."""
        if path is None:
            return
        import uuid

        tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.partial{suffix_of(path)}"
        self.staged.append((tmp, path))
        writer(tmp)

    def commit(self) -> None:
        import os

        for tmp, final in self.staged:
            os.replace(tmp, final)
            self.written.append(final)
        self.staged.clear()

    def rollback(self) -> None:
        for tmp, _ in self.staged:
            tmp.unlink(missing_ok=True)
        self.staged.clear()
