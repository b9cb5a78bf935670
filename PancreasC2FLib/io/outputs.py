"""Writing outputs all or nothing: ``Outputs`` checks every output of a run before the work starts
and stages them as hidden temporaries renamed into place together; ``atomic_path`` and
``atomic_write_text`` do the same for one file.

Temporaries are named ``.NAME.pc2f-HOST-PID-RANDOM.part.EXT``: the machine and process id let a
later run on the same machine remove the ones a killed run left behind
(``clean_stale_temporaries``) without touching those of a run still going, here or on another
machine sharing the folder. Without ``overwrite`` the final rename never replaces a file that appeared after the
pre-flight check (a hard link, which fails if the name exists), so of two runs writing the same
output one fails with exit 4 instead of both reporting success.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
import uuid
from collections.abc import Callable
from pathlib import Path

from ..errors import InputError, OutputError
from .formats import check_itk_path, suffix_of

_TEMP_RE = re.compile(r"^\..+\.pc2f-([0-9a-f]{6})-(\d+)-[0-9a-f]{8}\.part(\.[A-Za-z0-9.]*)?$")


def _host_tag() -> str:
    import hashlib
    import socket

    return hashlib.sha1(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:6]


def temp_path_for(path: str | Path, pid: int | None = None) -> Path:
    """A hidden temporary beside ``path`` (same folder and extension: same file system, and the
    writer picks the same format)."""
    path = Path(path)
    pid = os.getpid() if pid is None else pid
    return path.parent / f".{path.name}.pc2f-{_host_tag()}-{pid}-{uuid.uuid4().hex[:8]}.part{suffix_of(path)}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's process, or no way to tell: leave its files alone
    return True


def clean_stale_temporaries(folder: str | Path) -> list[Path]:
    """Remove this tool's temporaries in ``folder`` whose process is gone (kill -9, power loss)."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    host = _host_tag()
    for p in entries:
        m = _TEMP_RE.match(p.name)
        if m and m.group(1) == host and int(m.group(2)) != os.getpid() and not _pid_alive(int(m.group(2))):
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p)
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_output_path(path: str | Path, overwrite: bool) -> Path:
    """Refuse, before any work, an output that cannot or may not be written: exists without
    ``overwrite``, is not a regular file (a folder, a device, a FIFO, a symlink), or lies in a
    folder that is missing, not a folder, or not writable."""
    path = Path(path)
    check_itk_path(path)  # ITK would abort the process on it
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:  # e.g. a parent that is a file (ENOTDIR)
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise OutputError(f"output is a folder: {path}")
        if not stat.S_ISREG(st.st_mode):
            kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a regular file"
            raise OutputError(f"output {path} is {kind}: outputs are written as regular files only")
        if not overwrite:
            raise OutputError(f"output exists: {path} (use --overwrite to replace it)")
    parent = path.parent
    if not parent.exists():
        raise OutputError(f"output folder does not exist: {parent}")
    if not parent.is_dir():
        raise OutputError(f"output folder is not a folder: {parent}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"output folder is not writable: {parent}")
    try:  # a read-only file system passes os.access for root: try for real
        probe = temp_path_for(path)
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"cannot write in {parent}: {exc.strerror or exc}") from None
    return path


def refuse_inputs(outputs: list[Path], inputs: list[str | Path]) -> None:
    """An output may not be an input, nor any file under an input folder (a DICOM series' slices),
    nor another name of an input file (a hard link), even with --overwrite."""
    for out in outputs:
        target = Path(out).resolve()
        for inp in inputs:
            src = Path(inp).resolve()
            inside = src.is_dir() and (target == src or src in target.parents)
            same = os.path.exists(target) and os.path.exists(src) and os.path.samefile(target, src)
            if target == src or inside or same:
                where = f"inside the input folder {inp}" if inside else "an input"
                raise OutputError(f"refusing to write {out}: it is {where} (inputs are never modified)")


def place(tmp: str | Path, final: str | Path, overwrite: bool = True) -> None:
    """Move a finished temporary to its final name with the umask's permissions. Without
    ``overwrite``, a file that appeared at ``final`` meanwhile is never replaced (exit 4)."""
    os.chmod(tmp, 0o666 & ~_umask())
    if overwrite:
        os.replace(tmp, final)
        return
    try:
        os.link(tmp, final)  # fails if final exists: create-exclusive
    except FileExistsError:
        raise OutputError(f"output appeared while this run was working (another run?): {final}; nothing replaced") from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        # No hard links on this file system: the best left is a late check.
        if os.path.lexists(final):
            raise OutputError(f"output appeared while this run was working (another run?): {final}; nothing replaced") from None
        os.replace(tmp, final)
        return
    os.unlink(tmp)


def _keep_copy(path: Path) -> Path:
    copy = temp_path_for(path)
    try:
        os.link(path, copy)
    except OSError:
        import shutil

        shutil.copy2(path, copy)
    return copy


@contextlib.contextmanager
def atomic_path(path: str | Path, overwrite: bool = True):
    """Yield a temporary path next to ``path``; move it into place only on success."""
    path = Path(path)
    tmp = temp_path_for(path)
    try:
        yield tmp
        place(tmp, path, overwrite)
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
    next to their targets, and moved into place together only when all of them are written.
    A failure or Ctrl-C removes the temporaries; a failure while moving them into place puts back
    what was already moved (and what --overwrite replaced), so a run leaves everything or nothing."""

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
        clean_stale_temporaries(p.parent)
        self.planned.append(p)
        return p

    def write(self, path: Path | None, writer: Callable[[Path], None]) -> None:
        """Write one output to its temporary."""
        if path is None:
            return
        tmp = temp_path_for(path)
        self.staged.append((tmp, path))
        writer(tmp)

    def commit(self) -> None:
        placed: list[tuple[Path, Path | None]] = []  # (final, backup of what it replaced)
        try:
            for tmp, final in self.staged:
                backup = None
                if self.overwrite and os.path.lexists(final):
                    backup = _keep_copy(final)  # the old file stays until the whole set is in place
                placed.append((final, backup))
                try:
                    place(tmp, final, self.overwrite)
                except BaseException:
                    placed.pop()
                    if backup is not None:
                        backup.unlink(missing_ok=True)
                    raise
        except BaseException as exc:
            for final, backup in reversed(placed):
                with contextlib.suppress(OSError):
                    if backup is not None:
                        os.replace(backup, final)
                    else:
                        final.unlink()
            self.rollback()
            if isinstance(exc, OSError):
                raise OutputError(f"cannot write {exc.filename or 'an output'}: {exc.strerror or exc}; nothing written") from None
            raise
        for final, backup in placed:
            if backup is not None:
                backup.unlink(missing_ok=True)
            self.written.append(final)
        self.staged.clear()

    def rollback(self) -> None:
        for tmp, _ in self.staged:
            with contextlib.suppress(OSError):
                if os.path.isdir(tmp):
                    continue
                tmp.unlink(missing_ok=True)
        self.staged.clear()
