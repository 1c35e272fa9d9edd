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


def _unit_vectors(n, dim=64, seed=0):
    import numpy as np

    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _f16(vector):
    import numpy as np

    return vector.astype(np.float16).tobytes()


def test_a_save_after_few_removals_overwrites_their_slots_instead_of_rebuilding(tmp_path):
    """usearch's remove frees a slot but keeps its vector; the save fills every free slot with filler and
    removes it again, so no removed vector reaches the file, the file keeps its size (no rebuild), and
    search still finds every live vector and never a removed or filler key."""
    import numpy as np

    from memvisor.store.vector_index import VectorIndex

    vectors = _unit_vectors(400)
    index = VectorIndex(tmp_path, "ns", 64)
    index.add(np.arange(1, 401), vectors)
    index.save()
    size = index.file_path(tmp_path, "ns").stat().st_size
    gone = [5, 77, 123, 300]
    index.remove(gone)
    index.add(np.array([1000]), _unit_vectors(1, seed=9))  # takes one freed slot itself
    before_save = index._index  # the same usearch object after the save: no rebuild
    index.save()
    assert index._index is before_save
    blob = index.file_path(tmp_path, "ns").read_bytes()
    assert len(blob) == size
    assert not any(_f16(vectors[k - 1]) in blob for k in gone)
    assert _f16(vectors[0]) in blob  # a live vector is still there (the check can see vectors)
    reloaded = VectorIndex(tmp_path, "ns", 64)
    assert len(reloaded) == 397
    for k in range(1, 401):
        keys, _ = reloaded.search(vectors[k - 1], 10)
        assert set(keys.tolist()).isdisjoint(gone) and keys.max() <= 1000
        if k not in gone:
            assert keys[0] == k


def test_a_save_after_many_removals_rebuilds_the_index(tmp_path):
    """More free slots than COMPACT_SHARE of the live vectors: the index is rebuilt from the live keys,
    which also gives the slots' space back."""
    import numpy as np

    from memvisor.store.vector_index import VectorIndex

    vectors = _unit_vectors(400)
    index = VectorIndex(tmp_path, "ns", 64)
    index.add(np.arange(1, 401), vectors)
    index.save()
    size = index.file_path(tmp_path, "ns").stat().st_size
    index.remove(list(range(1, 201)))
    index.save()
    blob = index.file_path(tmp_path, "ns").read_bytes()
    assert len(blob) < 0.7 * size
    assert not any(_f16(vectors[k - 1]) in blob for k in range(1, 201))
    keys, _ = VectorIndex(tmp_path, "ns", 64).search(vectors[250], 5)
    assert keys[0] == 251 and keys.min() > 200
