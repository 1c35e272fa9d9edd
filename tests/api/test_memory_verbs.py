"""Every verb of the Memory facade against a real SQLite file."""
from __future__ import annotations

import pytest

from memvisor import InvalidInput, UnknownMemory, UnknownNamespace


def test_add_get_search_and_explanations(memory):
    a = memory.add("Ana moved to Lyon for a bakery job", namespace="app", user="ana",
                   valid_from="2024-03-01", metadata={"topic": "home"}, sources=["msg-1"])
    memory.add("Ben runs the Annecy 10k race", namespace="app", user="ben")
    got = memory.get(a.id, namespace="app")
    assert (got.text, got.user, got.metadata, got.sources, got.version) == (
        "Ana moved to Lyon for a bakery job", "ana", {"topic": "home"}, ["msg-1"], 1)
    assert got.valid_from == "2024-03-01T00:00:00.000000Z" and got.recorded_at and got.expired_at is None
    hits = memory.search("Where does Ana live? Lyon?", namespace="app", k=2)
    assert hits[0].item.id == a.id
    e = hits[0].explanation
    assert e.bm25_rank == 1 and e.vector_rank == 1 and e.vector_similarity > 0.3
    assert hits[0].score == pytest.approx(e.fused + e.time_boost + e.speaker_boost)
    # filters: by user, kind, metadata
    assert [h.item.id for h in memory.search("race", namespace="app", user="ana")] == [a.id]
    assert memory.search("Lyon", namespace="app", kinds=["semantic"]) == []
    assert [h.item.id for h in memory.search("Lyon", namespace="app", metadata={"topic": "home"})] == [a.id]


def test_update_keeps_history_with_both_times(memory):
    a = memory.add("Ana lives in Grenoble", namespace="app", valid_from="2020-01-01")
    b = memory.update(a.id, namespace="app", text="Ana lives in Lyon", valid_from="2024-04-01")
    assert (b.id, b.version, b.text, b.valid_from) == (a.id, 2, "Ana lives in Lyon", "2024-04-01T00:00:00.000000Z")
    versions = memory.history(a.id, namespace="app")
    # the original (now expired in system time), its copy bounded in world time, and the new version
    assert [(v.version, v.text, v.valid_to) for v in versions] == [
        (1, "Ana lives in Grenoble", None),
        (1, "Ana lives in Grenoble", "2024-04-01T00:00:00.000000Z"),
        (2, "Ana lives in Lyon", None)]
    assert versions[0].expired_at is not None and versions[0].expired_at >= versions[0].recorded_at
    assert versions[1].expired_at is None and versions[2].expired_at is None
    # a correction (no valid_from) replaces the text over the same validity
    c = memory.update(a.id, namespace="app", text="Ana lives in Lyon 4e")
    assert c.version == 3 and c.valid_from == b.valid_from
    assert memory.get(a.id, namespace="app").text == "Ana lives in Lyon 4e"


def test_as_of_returns_what_was_valid_then(memory):
    a = memory.add("Ana lives in Grenoble", namespace="app", valid_from="2020-01-01")
    memory.update(a.id, namespace="app", text="Ana lives in Lyon", valid_from="2024-04-01")
    then = memory.search("Where does Ana live?", namespace="app", as_of="2022-06-01")
    assert [h.item.text for h in then] == ["Ana lives in Grenoble"]
    now = memory.search("Where does Ana live?", namespace="app")
    assert [h.item.text for h in now] == ["Ana lives in Lyon"]
    assert memory.search("Where does Ana live?", namespace="app", as_of="2019-01-01") == []
    # known_at: before the update was recorded, the system believed Grenoble with no end
    first = memory.history(a.id, namespace="app")[0]
    believed = memory.search("Ana", namespace="app", known_at=first.recorded_at)
    assert [(h.item.text, h.item.valid_to) for h in believed] == [("Ana lives in Grenoble", None)]


def test_invalidate_hides_now_but_not_as_of(memory):
    a = memory.add("Ben is training for a half marathon", namespace="app", valid_from="2024-03-01")
    memory.invalidate(a.id, namespace="app", at="2024-04-20")
    assert memory.search("half marathon", namespace="app") == []
    assert [h.item.id for h in memory.search("half marathon", namespace="app", as_of="2024-04-01")] == [a.id]
    assert memory.get(a.id, namespace="app").status == "invalidated"


def test_delete_removes_from_every_index(memory):
    keep = memory.add("Pixel the cat sleeps on the balcony", namespace="app")
    gone = memory.add("Ana's secret door code is 4471", namespace="app")
    memory.update(gone.id, namespace="app", text="Ana's secret door code is 9912")
    assert memory.delete(gone.id, namespace="app") == 2
    db = memory.store.db
    assert db.execute("SELECT count(*) FROM items WHERE id=?", (gone.id,)).fetchone()[0] == 0
    for word in ("secret", "4471", "9912"):
        assert db.execute("SELECT count(*) FROM items_fts WHERE items_fts MATCH ?", (word,)).fetchone()[0] == 0
    assert db.execute("SELECT count(*) FROM vectors").fetchone()[0] == 1
    log = " ".join(r[0] for r in db.execute("SELECT payload FROM events WHERE item_id=?", (gone.id,)))
    assert "4471" not in log and "9912" not in log
    index = memory.store.vector_index("app")
    assert len(index) == 1
    assert [h.item.id for h in memory.search("secret door code", namespace="app", k=5)] == [keep.id]
    with pytest.raises(UnknownMemory):
        memory.get(gone.id, namespace="app")
    with pytest.raises(UnknownMemory):
        memory.history(gone.id, namespace="app")


def test_ingest_is_idempotent(memory, small_conversation):
    first = memory.ingest(small_conversation, namespace="chat")
    assert first.added == 8 and first.skipped_duplicates == 0
    again = memory.ingest(small_conversation, namespace="chat")
    assert again.added == 0 and again.skipped_duplicates == 8
    assert memory.store.db.execute("SELECT count(*) FROM items").fetchone()[0] == 8
    # the same text added twice through add() is also one memory
    x = memory.add("same words", namespace="chat")
    assert memory.add("same words", namespace="chat").id == x.id


def _count(memory, namespace):
    return memory.store.db.execute("SELECT count(*) FROM items WHERE namespace=?", (namespace,)).fetchone()[0]


def test_ingest_refuses_a_turn_whose_ids_name_other_content(memory, tmp_path):
    """A turn is known by its conversation and turn ids (a JSON-lines file's name and line by default). Another
    file of the same name, a second turn of one id, or the same file for another user used to be skipped as
    "already present" (their text lost); now the ingest refuses with KeyConflict and writes nothing."""
    from memvisor import KeyConflict

    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    first, other = tmp_path / "a" / "chat.jsonl", tmp_path / "b" / "chat.jsonl"
    first.write_text('{"speaker": "Ana", "text": "Monday I bought a piano"}\n')
    other.write_text('{"speaker": "Ana", "text": "Tuesday I sold my car"}\n'
                     '{"speaker": "Ben", "text": "why?"}\n')
    assert memory.ingest(first, namespace="app").added == 1
    with pytest.raises(KeyConflict, match="conversation 'chat' is already stored as memory .* another text"):
        memory.ingest(other, namespace="app")
    with pytest.raises(KeyConflict, match="another user"):
        memory.ingest(first, namespace="app", user="bob")
    assert _count(memory, "app") == 1  # nothing of either refused ingest was written (not even Ben's turn)
    again = memory.ingest(first, namespace="app")  # the same content stays idempotent
    assert (again.added, again.skipped_duplicates) == (0, 1)
    twice = tmp_path / "twice.jsonl"
    twice.write_text('{"speaker": "Ana", "text": "one", "id": "x"}\n{"speaker": "Ana", "text": "two", "id": "x"}\n')
    with pytest.raises(KeyConflict, match=r"given twice in this write \(#0 and #1\)"):
        memory.ingest(twice, namespace="app2")
    assert memory.ingest(other, namespace="elsewhere").added == 2


def test_add_with_a_used_key_and_other_content_is_refused(memory):
    from memvisor import KeyConflict

    item = memory.add("Ana moved to Lyon", namespace="app", key="k1")
    assert memory.add("Ana moved to Lyon", namespace="app", key="k1").id == item.id  # a retry: the same memory
    memory.update(item.id, namespace="app", text="Ana moved to Paris")  # later versions do not count
    assert memory.add("Ana moved to Lyon", namespace="app", key="k1").id == item.id
    with pytest.raises(KeyConflict, match="key 'k1' is already stored as memory .* another text"):
        memory.add("Ben moved to Rome", namespace="app", key="k1")


def test_turn_memories_carry_time_speaker_and_source(memory, small_conversation):
    memory.ingest(small_conversation, namespace="chat")
    hit = memory.search("Which islands is Ana hiking?", namespace="chat", k=1)[0]
    assert hit.item.sources == ["t4"] and hit.item.metadata["speaker"] == "Ana"
    assert hit.item.valid_from == "2024-02-11T18:30:00.000000Z" and hit.item.session == "s2"


def test_export_import_round_trip_gives_identical_search(memory, small_conversation, tmp_path):
    from memvisor import Memory

    memory.ingest(small_conversation, namespace="chat")
    a = memory.add("Ana lives in Grenoble", namespace="chat", valid_from="2020-01-01")
    memory.update(a.id, namespace="chat", text="Ana lives in Lyon", valid_from="2024-04-01")
    memory.delete(memory.search("cello teacher orchestra", namespace="chat", k=1)[0].item.id, namespace="chat")
    memory.export("chat", tmp_path / "cube")
    with Memory(tmp_path / "other") as other:
        report = other.import_(tmp_path / "cube")
        assert report.namespace == "chat"
        for q, as_of in [("What does Ben play?", None), ("Where does Ana live?", None),
                         ("Where does Ana live?", "2021-01-01"), ("holiday hiking", None)]:
            mine = [(h.item.id, h.item.version, h.item.text, round(h.score, 6))
                    for h in memory.search(q, namespace="chat", k=5, as_of=as_of)]
            theirs = [(h.item.id, h.item.version, h.item.text, round(h.score, 6))
                      for h in other.search(q, namespace="chat", k=5, as_of=as_of)]
            assert mine == theirs and mine
        assert other.history(a.id, namespace="chat") == memory.history(a.id, namespace="chat")
        assert other.context("cello", namespace="chat", budget_tokens=64).text == \
            memory.context("cello", namespace="chat", budget_tokens=64).text


def test_unknown_namespace_and_id(memory):
    with pytest.raises(UnknownNamespace, match="has no memories"):
        memory.search("anything", namespace="nope")
    memory.add("x marks the spot", namespace="app")
    with pytest.raises(UnknownMemory, match="no memory 'deadbeef'"):
        memory.get("deadbeef", namespace="app")
    with pytest.raises(UnknownMemory):
        memory.update("deadbeef", namespace="app", text="y")
    with pytest.raises(UnknownMemory):
        memory.delete("deadbeef", namespace="app")
    with pytest.raises(InvalidInput, match="namespace must be"):
        memory.search("x", namespace="")


def test_update_of_a_turn_embeds_it_as_ingest_did(memory, small_conversation):
    """A turn's vector is computed with the previous turn of its session (its stored context also
    holds the next turn, for full text only); an update must embed it the same way."""
    import numpy as np

    memory.ingest(small_conversation, namespace="chat")
    turn = memory.search("Which islands is Ana hiking?", namespace="chat", k=1)[0].item
    assert turn.sources == ["t4"]
    memory.update(turn.id, namespace="chat", text="To Iceland, hiking the highlands in August.")
    rid = memory.store.head_row("chat", turn.id)["rid"]
    stored = memory.store.vectors_of([rid]).astype(np.float32)[0]
    line = "Ana: To Iceland, hiking the highlands in August."
    as_ingest, with_next = memory.embedder.encode([
        f"Ben: Where are you going on holiday this summer?\n{line}",
        f"Ben: Where are you going on holiday this summer?\nBen: My cello teacher says I should join "
        f"an orchestra.\n{line}"])
    assert stored @ as_ingest > 0.999
    assert stored @ with_next < 0.99


def test_deleted_text_and_vector_are_not_left_in_the_files(tmp_path):
    """A purge leaves nothing readable on disk: not in SQLite's pages or WAL, not in FTS5's segments, not
    in the saved ANN index (usearch's remove alone keeps the vector in the file)."""
    import numpy as np

    from memvisor import Memory

    home = tmp_path / "home"
    with Memory(home) as m:
        m.add("Pixel the cat sleeps on the balcony", namespace="app")
        gone = m.add("my bank PIN is 48213 zqxjvwk", namespace="app")
        m.search("cat", namespace="app")  # the index exists in memory ...
        m.store.save_index("app")
        m.store.vector_index("app").dirty = 1
        m.store.save_index("app")  # ... and on disk, holding the vector
        vec = m.store.vectors_of([m.store.head_row("app", gone.id)["rid"]]).astype(np.float16).tobytes()
        m.delete(gone.id, namespace="app")
    blobs = b"".join(p.read_bytes() for p in home.rglob("*") if p.is_file())
    assert b"48213" not in blobs and b"zqxjvwk" not in blobs
    assert vec not in blobs
    with Memory(home) as m:
        assert [h.item.text for h in m.search("bank PIN", namespace="app")] == ["Pixel the cat sleeps on the balcony"]


def test_a_delete_whose_process_dies_before_close_is_scrubbed_by_the_next_close(tmp_path):
    """The scrub mark is stored with the delete: a process killed before its close leaves it, and the
    next process's close removes the deleted text and vector from the files."""
    import subprocess
    import sys

    from memvisor import Memory

    home = tmp_path / "home"
    with Memory(home) as m:
        m.add("Pixel the cat sleeps on the balcony", namespace="app")
        gone = m.add("my bank PIN is 48213 zqxjvwk", namespace="app")
        m.search("cat", namespace="app")
        m.store.vector_index("app").dirty = 1  # save the index with the vector in it
    script = ("import os, sys\nfrom memvisor import Memory\nm = Memory(sys.argv[1])\n"
              "m.delete(sys.argv[2], namespace='app')\nos._exit(0)  # no close: the process dies\n")
    subprocess.run([sys.executable, "-c", script, str(home), gone.id], check=True)
    with Memory(home) as m:
        assert [h.item.text for h in m.search("bank PIN", namespace="app")] == ["Pixel the cat sleeps on the balcony"]
    blobs = b"".join(p.read_bytes() for p in home.rglob("*") if p.is_file())
    assert b"48213" not in blobs and b"zqxjvwk" not in blobs


def test_update_merges_metadata_and_a_turn_keeps_its_speaker(memory, small_conversation):
    """`update(metadata=...)` is a top-level JSON merge patch: an ingested turn keeps the speaker its
    ranking and its context line use; None removes a key; a new speaker re-embeds "speaker: text"."""
    import numpy as np

    memory.ingest(small_conversation, namespace="chat")
    turn = memory.search("Which islands is Ana hiking?", namespace="chat", k=1)[0].item
    rid = memory.store.head_row("chat", turn.id)["rid"]
    before = memory.store.vectors_of([rid])[0]
    got = memory.update(turn.id, namespace="chat", metadata={"mood": "excited", "conversation": None})
    assert got.metadata == {"speaker": "Ana", "turn_id": turn.metadata["turn_id"], "mood": "excited"}
    row = memory.store.head_row("chat", turn.id)
    assert row["speaker"] == "Ana"
    assert np.array_equal(memory.store.vectors_of([row["rid"]])[0], before)  # same "Ana: text": same vector
    assert "Ana: To Norway" in memory.context("Lofoten islands", namespace="chat", budget_tokens=200).text
    memory.update(turn.id, namespace="chat", metadata={"speaker": "Ben"})
    row = memory.store.head_row("chat", turn.id)
    assert row["speaker"] == "Ben"
    want = memory.embedder.encode(["Ben: Where are you going on holiday this summer?\n"
                                   "Ben: To Norway, hiking the Lofoten islands in July."])[0]
    assert memory.store.vectors_of([row["rid"]])[0] @ want > 0.999
    with pytest.raises(InvalidInput, match="metadata must be a JSON object"):
        memory.update(turn.id, namespace="chat", metadata=["speaker"])


def test_delete_namespace_purges_it_and_frees_its_name(tmp_path, small_conversation):
    """Every row, key, log entry and index file of the namespace goes, and nothing of it stays in the
    files; other namespaces are untouched; the name can be imported again. A second process that held
    the namespace's index in memory rebuilds it once the name is written again: kept, its old vectors
    would be saved back to disk at that process's close."""
    import numpy as np

    from memvisor import Memory

    home = tmp_path / "home"
    m, other = Memory(home), Memory(home)
    m.add("Pixel the cat sleeps on the balcony", namespace="pets")
    m.ingest(small_conversation, namespace="chat")  # the highest rids: given again after the drop
    pin = m.add("my bank PIN is 48213 zqxjvwk", namespace="chat")
    pin_vec = m.store.vectors_of([m.store.head_row("chat", pin.id)["rid"]]).astype(np.float16).tobytes()
    m.export("chat", tmp_path / "cube")
    assert other.search("bank PIN", namespace="chat", k=1)[0].item.id == pin.id
    m.store.vector_index("chat").dirty = 1
    m.store.save_index("chat")
    assert m.delete_namespace("chat") == 9
    assert m.store.namespaces() == ["pets"]
    for table in ("items", "events", "item_keys"):
        assert m.store.db.execute(f"SELECT count(*) FROM {table} WHERE namespace='chat'").fetchone()[0] == 0
    with pytest.raises(UnknownNamespace):
        m.search("bank PIN", namespace="chat")
    with pytest.raises(UnknownNamespace):
        m.delete_namespace("chat")
    fresh = m.add("Rex the dog guards the garden", namespace="chat")
    assert m.store.head_row("chat", fresh.id)["rid"] <= 9  # a rid of the dropped rows, given again
    assert [h.item.id for h in other.search("bank PIN", namespace="chat")] == [fresh.id]
    assert len(other.store.vector_index("chat")) == 1
    m.close()
    other.close()  # its index is dirty (it caught up with the add): saved last, over m's
    blobs = b"".join(p.read_bytes() for p in home.rglob("*") if p.is_file())
    assert b"48213" not in blobs and b"zqxjvwk" not in blobs and b"Lofoten" not in blobs
    assert pin_vec not in blobs
    with Memory(home) as m:
        assert [h.item.text for h in m.search("cat", namespace="pets")] == ["Pixel the cat sleeps on the balcony"]
        m.delete_namespace("chat")
        assert m.import_(tmp_path / "cube").added == 9
        assert m.search("bank PIN", namespace="chat", k=1)[0].item.text == "my bank PIN is 48213 zqxjvwk"
