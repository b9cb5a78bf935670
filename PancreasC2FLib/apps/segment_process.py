"""``pancreas-c2f segment`` in a separate process, followed by polling: the 3D Slicer panel's runner.

Why a process: inside Slicer the main thread holds the Python GIL while Qt's event loop runs, so a
Python worker thread only gets time while a timer slot runs Python (a run was ~28x slower). A child
process has its own interpreter. Nothing here needs threads: the child's output goes to a log file
that ``poll()`` reads from where it stopped (call it from a timer); ``cancel()`` kills the child and
everything it started. Pure Python (no slicer, no Qt), so it is tested directly.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from ..progress import parse_progress_line

LOG_NAME = "log.txt"
# Command-line flag of each option the panel passes (None and False are left out).
_FLAGS = {
    "model": "--model", "pipeline": "--pipeline", "device": "--device", "threads": "--threads", "batch_size": "--batch-size", "preset": "--preset",
    "coarse_n": "--coarse-n", "fine_n": "--fine-n", "margin_mm": "--margin-mm",
    "min_island_fraction": "--min-island-fraction", "deterministic": "--deterministic",
}


def python_executable() -> str:
    """The Python that runs the library: Slicer's ``PythonSlicer`` (its environment, its torch)
    when on PATH (inside Slicer ``sys.executable`` is the application), else this interpreter."""
    return shutil.which("PythonSlicer") or sys.executable


def library_root() -> str:
    """The folder that holds the ``PancreasC2FLib`` package (put on the child's sys.path)."""
    return str(Path(__file__).resolve().parents[2])


def segment_command(python: str, input_path, folder, kind: str, roi_path=None, options: dict | None = None) -> list:
    """The command line of one panel job (``kind``: "region", "segment" or "both"); outputs go to
    ``folder``: label.nrrd (the mask), roi.mrk.json (the region) and report.json."""
    folder = Path(folder)
    cmd = [python, "-m", "PancreasC2FLib", "segment", str(input_path), "--progress", "json",
           "--roi-out", str(folder / "roi.mrk.json"), "--report", str(folder / "report.json")]
    if kind == "region":
        cmd.append("--coarse-only")
    else:
        cmd += ["-o", str(folder / "label.nrrd")]
    if kind == "segment":
        if roi_path is None:
            raise ValueError("segmenting in a region needs the region's file")
        cmd += ["--roi", str(roi_path)]
    for key, value in (options or {}).items():
        if key not in _FLAGS:
            raise ValueError(f"unknown option {key!r}")
        if value is None or value is False:
            continue
        cmd += [_FLAGS[key]] if value is True else [_FLAGS[key], str(value)]
    return cmd


def child_environment(base: dict | None = None) -> dict:
    env = dict(os.environ if base is None else base)
    root = library_root()
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def kill_tree(proc: subprocess.Popen) -> None:
    """Kill a child started by ``SegmentProcess`` and every process it started."""
    if proc.poll() is not None:
        return
    if os.name == "nt":
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(proc.pid)], capture_output=True, check=False)
    else:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the child leads its own process group
        except ProcessLookupError:
            pass
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


class SegmentProcess:
    """A child process whose combined output goes to ``folder/log.txt``; ``poll()`` returns the
    progress events written since the last call."""

    def __init__(self, command: list, folder, env: dict | None = None):
        self.command = list(command)
        self.folder = Path(folder)
        self.log_path = self.folder / LOG_NAME
        self.env = child_environment() if env is None else env
        self.proc: subprocess.Popen | None = None
        self.cancelled = False
        self.start_time = None
        self.last_event: dict | None = None
        self.messages: list = []  # output lines that are not progress events (warnings, errors)
        self._offset = 0
        self._partial = b""

    def start(self) -> SegmentProcess:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.start_time = time.perf_counter()
        with open(self.log_path, "wb") as log:  # the child keeps its own handle
            # Its own process group (so Cancel reaches its children too), and no console window.
            kwargs = {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW} if os.name == "nt" else {"start_new_session": True}
            self.proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=library_root(), **kwargs)
        return self

    @property
    def done(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    @property
    def returncode(self):
        return None if self.proc is None else self.proc.poll()

    @property
    def elapsed(self) -> float:
        return 0.0 if self.start_time is None else time.perf_counter() - self.start_time

    def poll(self) -> list:
        """New progress events (dicts, see ``PancreasC2FLib.progress``) since the last call."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self._offset)
                data = log.read()
        except FileNotFoundError:
            return []
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()  # an unfinished line waits for the next poll
        if self.done and self._partial:
            lines.append(self._partial)
            self._partial = b""
        events = []
        for raw in lines:
            line = raw.decode("utf-8", errors="replace").rstrip("\r")
            event = parse_progress_line(line)
            if event is not None:
                events.append(event)
            elif line.strip():
                self.messages.append(line)
        if events:
            self.last_event = events[-1]
        return events

    def error_message(self) -> str:
        """The child's last output line (the command line's one-line error), for the panel."""
        self.poll()
        return self.messages[-1] if self.messages else f"the segmentation process exited with code {self.returncode}"

    def wait(self, timeout=None) -> int:
        return self.proc.wait(timeout)

    def cancel(self) -> None:
        self.cancelled = True
        if self.proc is not None:
            kill_tree(self.proc)
