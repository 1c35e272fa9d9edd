"""The ANN index follows bulk writes: it is built as batches commit and saved at the end of a large write,
so a first search (in this process or the next) neither rebuilds it nor replays the log."""
from __future__ import annotations

import json

import memvisor.api.memory as memory_module
from memvisor import Memory


def saved_states(home):
    return [json.loads(p.read_text()) for p in (home / "vectors").glob("*.json")]


def test_bulk_write_builds_and_saves_the_index(tmp_path, monkeypatch):
    monkeypatch.setattr(memory_module, "BULK_WRITE", 30)  # "large" for this test: 40 memories
    home = tmp_path / "home"
    texts = [f"note {i}: the heron fishes at the pond number {i}" for i in range(40)]
    with Memory(home) as m:
        m.add_many(texts, namespace="bulk", batch_size=16)
        # Saved before close: a crash now would not need a replay either.
        assert saved_states(home) == [{"applied_seq": m.store.last_seq("bulk"), "dim": m.embedder.dim}]
        m.add("a later single note about herons", namespace="bulk")  # small write: not saved yet
        last = m.store.last_seq("bulk")
        assert saved_states(home)[0]["applied_seq"] < last
    # close() saved the rest; a new process loads the index as it is.
    assert saved_states(home)[0]["applied_seq"] == last
    with Memory(home) as m:
        index = m.store.vector_index("bulk")
        assert len(index) == 41 and index.applied_seq == last and index.dirty == 0
        hits = m.search("heron at pond number 7", namespace="bulk", k=3)
        assert hits[0].item.text.startswith("note 7:")


def test_small_writes_keep_the_index_current_without_saving(tmp_path):
    home = tmp_path / "home"
    with Memory(home) as m:
        m.add_many([f"short note {i}" for i in range(5)], namespace="small")
        assert saved_states(home) == []  # 5 < BULK_WRITE: saved at close, not per write
        index = m.store.vector_index("small")
        assert len(index) == 5 and index.dirty == 5
