"""Frequency-based admission: an id earns a parameter only after it was seen ``min_count`` times.

Most ids in a behavior log appear once or twice; giving each a weight or an embedding row
at first sight fills memory with parameters that never learn anything (Monolith and
DeepRec's EmbeddingVariable admit by frequency for this reason). Counting every id exactly
would cost what we try to save, so counts live in a count-min sketch: fixed memory, and
it can only over-count, so an id is never admitted later than it should be.

>>> f = CountingFilter(width=1024, depth=3)
>>> [f.add("item=7") for _ in range(3)]
[1, 2, 3]
>>> f.count("item=8")
0
"""

from __future__ import annotations

import zlib

import numpy as np


class CountingFilter:
    """A count-min sketch of string keys (counts saturate at 65,535)."""

    def __init__(self, width: int = 1 << 20, depth: int = 3) -> None:
        self.width, self.depth = width, depth
        self.table = np.zeros((depth, width), dtype=np.uint16)
        self._seeds = [zlib.crc32(f"seed{d}".encode()) for d in range(depth)]

    def _cells(self, key: str) -> list[int]:
        data = key.encode()
        return [zlib.crc32(data, seed) % self.width for seed in self._seeds]

    def add(self, key: str) -> int:
        """Count one sighting; returns the (over-)estimated count so far."""
        cells = self._cells(key)
        counts = []
        for d, c in enumerate(cells):
            v = int(self.table[d, c])
            if v < 65_535:
                self.table[d, c] = v + 1
                v += 1
            counts.append(v)
        return min(counts)

    def count(self, key: str) -> int:
        return min(int(self.table[d, c]) for d, c in enumerate(self._cells(key)))

    @property
    def nbytes(self) -> int:
        return int(self.table.nbytes)
