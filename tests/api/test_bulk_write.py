"""add_many writes in batches of one transaction each: each memory must get its own text's vector, and a
failure must stop the write after the last committed batch."""
from __future__ import annotations

import numpy as np
import pytest

from memvisor import Memory
from memvisor.api import memory as memory_module
from memvisor.models.embedders import default_embedder

TEXTS = [f"Note {i}: {topic}" for i, topic in enumerate(
    ["I adopted a grey cat", "the cello lesson moved to Friday", "my sister lives in Porto",
     "we hiked the Lofoten islands", "the boiler broke again", "I planted tomatoes and basil",
     "our team won the chess match", "the flight to Osaka is booked", "I finished the history book",
     "the dentist appointment is on Monday", "Clara teaches chemistry"])]


class FailsOnCall:
    """The real MiniLM, failing on its `n`-th encode call (a crashed embedder mid-ingest)."""

    def __init__(self, n: int):
        self.inner, self.n, self.calls = default_embedder(), n, 0
        self.name, self.dim = self.inner.name, self.inner.dim

    def encode(self, texts):
        self.calls += 1
        if self.calls == self.n:
            raise RuntimeError("embedder crashed")
        return self.inner.encode(texts)


def stored_vectors(m: Memory, items) -> np.ndarray:
    rids = [m.store.db.execute("SELECT rid FROM items WHERE namespace='default' AND id=?", (it.id,))
            .fetchone()["rid"] for it in items]
    return m.store.vectors_of(rids).astype(np.float32)


def test_each_memory_gets_its_own_texts_vector_across_batches(tmp_path):
    with Memory(tmp_path / "home") as m:
        result = m.add_many(TEXTS, batch_size=3)  # 4 batches
        assert [it.text for it in result.items] == TEXTS
        alone = m.embedder.encode(TEXTS)
        cos = (stored_vectors(m, result.items) * alone).sum(1)
        assert cos.min() > 0.99  # a vector written beside the wrong text scores ~0.1-0.5 here


def test_embedder_failure_keeps_the_committed_batches_and_a_rerun_completes(tmp_path, monkeypatch):
    # Each embedder call covers a window of whole batches: 2 batches of 3 here (the default is 2,048 memories).
    monkeypatch.setattr(memory_module, "EMBED_WINDOW", 6)
    home = tmp_path / "home"
    with Memory(home, embedder=FailsOnCall(2)) as m, pytest.raises(RuntimeError, match="crashed"):
        m.add_many(TEXTS, batch_size=3)
    with Memory(home) as m:
        count = m.store.db.execute("SELECT count(*) FROM items WHERE namespace='default'").fetchone()[0]
        assert count == 6  # the first window's batches 1 and 2 committed; the second window's embedding failed
        again = m.add_many(TEXTS, batch_size=3)
        assert (again.added, again.duplicates) == (5, 6)


def test_batches_commit_one_by_one_inside_an_embedding_window(tmp_path, monkeypatch):
    """One embedder call for the whole write (a window of 4 batches), four transactions, every vector its own
    text's, progress once per batch."""
    calls, steps = [], []
    with Memory(tmp_path / "home") as m:
        inner = m.embedder.encode
        monkeypatch.setattr(m.embedder, "encode", lambda texts: calls.append(len(texts)) or inner(texts))
        result = m.add_many(TEXTS, batch_size=3, progress=steps.append)
        assert calls == [len(TEXTS)] and steps == [3, 3, 3, 2]
        cos = (stored_vectors(m, result.items) * inner(TEXTS)).sum(1)
        assert cos.min() > 0.99
