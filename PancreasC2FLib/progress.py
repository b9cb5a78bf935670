"""Progress on the command line: one tqdm bar per pipeline stage (the pipelines call a
``progress(stage, fraction, message)`` callable; this is the terminal's)."""

from __future__ import annotations

import sys


class Progress:
    """One tqdm bar per stage on stderr (silent with --quiet)."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.bars: dict = {}

    def __call__(self, stage: str, fraction: float, message: str) -> None:
        if self.quiet:
            return
        from tqdm import tqdm

        bar = self.bars.get(stage)
        if bar is None:
            bar = self.bars[stage] = tqdm(total=100, desc=f"{stage:>7}", unit="%", file=sys.stderr, leave=True, bar_format="{desc}: {percentage:3.0f}%|{bar:30}| {elapsed}<{remaining}")
        bar.n = int(round(100 * fraction))
        bar.refresh()

    def close(self):
        for bar in self.bars.values():
            bar.close()
