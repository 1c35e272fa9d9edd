"""Approximate nearest-neighbour index over memory vectors: one usearch HNSW index per namespace.

Why usearch: a maintained single-file HNSW with SIMD kernels, f16 storage, save/load and removal by key;
at 1M x 384 dims it searches in well under a millisecond (see BENCHMARKS.md). It is a cache: SQLite holds
the vectors and the log; the index file records the last log sequence it reflects, and on open (or when
another process wrote) it replays the log from there, so a crash can never leave it disagreeing with SQLite.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from usearch.index import Index

# Below this many vectors an exhaustive scan is as fast as the graph and exact.
EXACT_BELOW = 20_000
# A save after removals overwrites the freed slots (see `_scrub_free_slots`) unless they exceed this share
# of the live vectors: then a rebuild costs about as much, and it gives their space and graph back.
COMPACT_SHARE = 0.25
# Filler keys sit above every SQLite rowid (int64), so they can never name a memory.
FILLER_KEYS = np.uint64(2**63)


class VectorIndex:
    """usearch index of one namespace. Keys are item row ids (`items.rid`); vectors are unit norm."""

    def __init__(self, folder: Path, name: str, dim: int):
        self.dim = dim
        self._path = self.file_path(folder, name)
        self._state_path = folder / f"{name}.json"
        self.applied_seq = 0
        self._index = self._new()
        if self._path.exists() and self._state_path.exists():
            try:
                state = json.loads(self._state_path.read_text())
                self._index.load(str(self._path))
                self.applied_seq = int(state["applied_seq"])
            except (OSError, ValueError, KeyError, RuntimeError):
                self._index = self._new()  # unreadable cache: rebuilt from the log by the caller
                self.applied_seq = 0
        self.dirty = 0
        self.removed = 0  # removals since the last save: the saved file still holds their vectors

    @staticmethod
    def file_path(folder: Path, name: str) -> Path:
        return folder / f"{name}.usearch"

    def _new(self) -> Index:
        # expansion_add 64, not 128: twice the build rate (5.3k vs 2.6k vectors/s on 2 cores at 100k) for
        # the exact top 10 / top 50 found in the 260 the retriever asks for 0.990 / 0.981 instead of
        # 0.997 / 0.993 (NOTES.md, "ANN index"). The build is part of every bulk write.
        return Index(ndim=self.dim, metric="cos", dtype="f16", connectivity=16,
                     expansion_add=64, expansion_search=64)

    def __len__(self) -> int:
        return len(self._index)

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        """keys int64 [n]; vectors float [n, dim]. Idempotent: a key already present is replaced
        (replaying the log after a crash may meet keys the saved index already holds)."""
        if len(keys):
            keys = keys.astype(np.uint64)
            present = np.asarray(self._index.contains(keys), dtype=bool).reshape(-1)
            if present.any():
                self._index.remove(keys[present])
            self._index.add(keys, vectors.astype(np.float32), threads=0)
            self.dirty += len(keys)

    def remove(self, keys: list[int]) -> None:
        present = [k for k in keys if self._index.contains(k)]
        if present:
            self._index.remove(np.asarray(present, dtype=np.uint64))
            self.dirty += len(present)
            self.removed += len(present)

    def _scrub_free_slots(self) -> None:
        """Leave no removed vector in memory (and so in the next saved file). usearch's remove only frees a
        node's slot, its vector stays, and a deleted memory must not; an add takes a free slot before it
        grows the index, overwriting the vector there. So filler vectors (random, under keys no memory can
        have) are added into every free slot and removed again: the cost follows the removals (a rebuild's
        follows the whole index, ~5k vectors/s on 2 cores), the file keeps its size. Many free slots: rebuild."""
        slots = self._index.stats.nodes  # live and free
        free = slots - len(self._index)
        if free <= 0:
            return
        if free > COMPACT_SHARE * len(self._index):
            self._index = self._compacted()
            return
        keys = FILLER_KEYS + np.arange(free, dtype=np.uint64)
        filler = np.random.default_rng(free).standard_normal((free, self.dim)).astype(np.float32)
        self._index.add(keys, filler, threads=0)
        self._index.remove(keys)
        if self._index.stats.nodes != slots:  # an add appended instead of reusing: usearch changed; be safe
            self._index = self._compacted()

    def _compacted(self) -> Index:
        """A fresh index of the live keys only."""
        fresh = self._new()
        keys = np.asarray(self._index.keys, dtype=np.uint64)
        if len(keys):
            fresh.add(keys, np.stack(self._index.get(keys, dtype=np.float32)), threads=0)
        return fresh

    def search(self, query: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
        """query float [dim] -> (keys int64 [m], cosine similarity float32 [m]), best first, m <= count."""
        n = len(self._index)
        if n == 0 or count <= 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        matches = self._index.search(query.astype(np.float32), min(count, n), exact=n <= EXACT_BELOW, threads=1)
        real = matches.keys < FILLER_KEYS  # a search from another thread during a scrub may meet filler
        return matches.keys[real].astype(np.int64), (1.0 - matches.distances[real]).astype(np.float32)

    def save(self) -> None:
        """Write the index then its state, each atomically (write aside, rename)."""
        if self.removed:
            self._scrub_free_slots()
            self.removed = 0
        tmp = self._path.with_suffix(".usearch.tmp")
        self._index.save(str(tmp))
        os.replace(tmp, self._path)
        state_tmp = self._state_path.with_suffix(".json.tmp")
        state_tmp.write_text(json.dumps({"applied_seq": self.applied_seq, "dim": self.dim}))
        os.replace(state_tmp, self._state_path)
        self.dirty = 0

    def reset(self) -> None:
        self._index = self._new()
        self.applied_seq = 0
        self.dirty = 0
        self.removed = 0
