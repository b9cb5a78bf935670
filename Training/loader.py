"""Training batches drawn ahead in background threads (``--loader-threads``), so the network does
not wait for window sampling and augmentation (numpy releases the GIL for most of that work).

Each batch gets its own seed, drawn in order from the trainer's generator, so a run is the same
whatever the threads' timing; ``--seed`` still reproduces it. A resumed run continues from the
generator's state at the checkpoint, which is ``depth`` batches ahead of the last one trained, so
it is not bit-identical to an uninterrupted run.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np


class Prefetcher:
    """``next()`` returns ``draw(np.random.Generator)`` results in submission order."""

    def __init__(self, draw: Callable, rng: np.random.Generator, threads: int, depth: int | None = None):
        self.draw, self.rng = draw, rng
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="batches")
        self.queue: deque = deque()
        for _ in range(depth or 2 * threads):
            self._submit()

    def _submit(self) -> None:
        seed = int(self.rng.integers(2**63))
        self.queue.append(self.pool.submit(self.draw, np.random.default_rng(seed)))

    def next(self):
        batch = self.queue.popleft().result()
        self._submit()
        return batch

    def close(self) -> None:
        for f in self.queue:
            f.cancel()
        self.pool.shutdown(wait=True)
