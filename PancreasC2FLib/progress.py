"""Progress of a run, in one place for every front end.

The pipelines call a ``progress(stage, fraction, message)`` callable. ``Progress`` turns those calls
into events (stage name, fraction of the stage done, elapsed time, an estimate of the time left)
and shows them in one of three ways (``--progress``):

- ``bar``: one tqdm bar per stage on a terminal; when stderr is not a terminal (a log file, a
  pipe), plain lines at most every few seconds instead of escape codes;
- ``json``: one JSON object per line on stderr (``{"event": "progress", "stage": ..., "fraction":
  ..., "elapsed_s": ..., "stage_elapsed_s": ..., "eta_s": ...}``), for scripts and the Slicer
  panel, which reads them with ``parse_progress_line``;
- ``none``: nothing (``--quiet``).
"""

from __future__ import annotations

import json
import sys
import time

MODES = ("bar", "json", "none")
JSON_EVENT = "progress"
PLAIN_INTERVAL_S = 5.0  # plain-line mode: at most one line per stage this often (and at 100%)


class ProgressTracker:
    """Stage timing: elapsed time and a linear estimate of the time left in the current stage."""

    def __init__(self, clock=time.perf_counter):
        self._clock = clock
        self.start = clock()
        self._stage_start: dict = {}

    def event(self, stage: str, fraction: float, message: str = "") -> dict:
        now = self._clock()
        t0 = self._stage_start.setdefault(stage, now)
        fraction = min(max(float(fraction), 0.0), 1.0)
        stage_elapsed = now - t0
        # Left in this stage at the rate so far; unknown until some of it is done.
        eta = stage_elapsed * (1.0 - fraction) / fraction if fraction > 0 else None
        return {
            "event": JSON_EVENT,
            "stage": stage,
            "fraction": round(fraction, 4),
            "elapsed_s": round(now - self.start, 3),
            "stage_elapsed_s": round(stage_elapsed, 3),
            "eta_s": None if eta is None else round(eta, 3),
            "message": message,
        }


def format_eta(seconds) -> str:
    if seconds is None:
        return "estimating"
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d} left"


def describe(event: dict) -> str:
    """One human line for an event (the plain-line mode and the Slicer panel share it)."""
    return f"{event['stage']}: {100 * event['fraction']:3.0f}%, {event['elapsed_s']:.1f} s elapsed, {format_eta(event['eta_s'])}"


def parse_progress_line(line: str) -> dict | None:
    """The event in one line of ``--progress json`` output, or None for any other line."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) and obj.get("event") == JSON_EVENT else None


class Progress:
    """The command line's progress display (see the module docstring for the modes)."""

    def __init__(self, quiet: bool = False, mode: str | None = None, stream=None, clock=time.perf_counter):
        self.mode = "none" if quiet else (mode or "bar")
        if self.mode not in MODES:
            raise ValueError(f"progress mode must be one of {MODES}")
        self.stream = stream if stream is not None else sys.stderr
        self.tracker = ProgressTracker(clock)
        self._clock = clock
        self.bars: dict = {}
        self._last_plain: dict = {}
        isatty = getattr(self.stream, "isatty", None)
        self.terminal = bool(isatty and isatty())

    def __call__(self, stage: str, fraction: float, message: str = "") -> None:
        if self.mode == "none":
            return
        event = self.tracker.event(stage, fraction, message)
        if self.mode == "json":
            self.stream.write(json.dumps(event) + "\n")
            self.stream.flush()
        elif self.terminal:
            self._bar(event)
        else:
            self._plain(event)

    def _bar(self, event: dict) -> None:
        from tqdm import tqdm

        stage = event["stage"]
        bar = self.bars.get(stage)
        if bar is None:
            bar = self.bars[stage] = tqdm(total=100, desc=f"{stage:>7}", unit="%", file=self.stream, leave=True, bar_format="{desc}: {percentage:3.0f}%|{bar:30}| {elapsed}<{remaining}")
        bar.n = int(round(100 * event["fraction"]))
        bar.refresh()

    def _plain(self, event: dict) -> None:
        now = self._clock()
        last = self._last_plain.get(event["stage"])
        done = event["fraction"] >= 1.0
        if last is not None and (last[1] or (not done and now - last[0] < PLAIN_INTERVAL_S)):
            return
        self._last_plain[event["stage"]] = (now, done)
        self.stream.write(describe(event) + "\n")
        self.stream.flush()

    def close(self):
        for bar in self.bars.values():
            bar.close()
