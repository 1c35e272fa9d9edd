"""Bad input raises a typed error with a clear message, and nothing is partly written."""
from __future__ import annotations

import json

import pytest

from memvisor import InvalidInput, MalformedFile
from tests.conftest import count_rows

TABLES = ("items", "events", "vectors", "item_keys", "namespaces")


def snapshot(memory) -> dict[str, int]:
    return {t: count_rows(memory, t) for t in TABLES}


@pytest.mark.parametrize("record, message", [
    ({"text": ""}, "text is empty"),
    ({"text": "   "}, "text is empty"),
    ({"text": "x" * 20_001}, "split it"),
    ({"text": "ok", "valid_from": "last tuesday"}, "not an ISO-8601 time"),
    ({"text": "ok", "valid_from": "2024-02-30"}, "not an ISO-8601 time"),
    ({"text": "ok", "valid_from": "2024-05-01", "valid_to": "2024-01-01"}, "must be after"),
    ({"text": "ok", "kind": "dream"}, "unknown kind"),
    ({"text": "ok", "metadata": ["not", "a", "dict"]}, "metadata must be a JSON object"),
    ({"text": "ok", "sources": "m1"}, "sources must be a list"),
    ({"text": "ok", "metadata": {"when": {1, 2}}}, "metadata must hold only JSON values"),
    ({"text": "ok", "metadata": {"a": float("nan")}}, "metadata must hold only JSON values"),
    ({"text": "ok", "key": 5}, "key must be a string"),
    ({"text": "ok", "position": "abc"}, "position must be an integer"),
    ({"text": "ok", "valid_from": "0999-05-01"}, "outside the years 1000-9999"),
    ({"text": "ok", "valid_to": "9999-12-31T23:00:00-05:00"}, "outside the years 1000-9999"),
    (42, "expected a dict with 'text'"),
    (["a", "list"], "expected a dict with 'text'"),
])
def test_bad_records_write_nothing(memory, record, message):
    memory.add("an existing memory", namespace="app")
    before = snapshot(memory)
    good = {"text": "a perfectly fine memory"}
    with pytest.raises(InvalidInput, match=message):
        memory.add_many([good, record, good | {"text": "another fine one"}], namespace="app")
    assert snapshot(memory) == before


def test_malformed_json_lines_write_nothing(memory, tmp_path):
    memory.add("an existing memory", namespace="app")
    before = snapshot(memory)
    path = tmp_path / "turns.jsonl"
    lines = [json.dumps({"speaker": "Ana", "text": "hello"}), json.dumps({"speaker": "Ben", "text": "hi"}),
             '{"speaker": "Ana", "text": "broken', json.dumps({"speaker": "Ben", "text": "bye"})]
    path.write_text("\n".join(lines))
    with pytest.raises(MalformedFile, match="line 3"):
        memory.ingest(path, namespace="app")
    path.write_text("\n".join(lines[:2] + [json.dumps({"speaker": "Ana"})]))
    with pytest.raises(MalformedFile, match="line 3: 'text' must be a non-empty string"):
        memory.ingest(path, namespace="app")
    path.write_text(json.dumps({"speaker": "Ana", "text": "x", "time": "yesterday"}))
    with pytest.raises(MalformedFile, match="line 1: time 'yesterday' is not an ISO-8601"):
        memory.ingest(path, namespace="app")
    assert snapshot(memory) == before


def test_bad_queries_and_budgets(memory):
    memory.add("something to find", namespace="app")
    with pytest.raises(InvalidInput, match="budget_tokens must be an integer from 1"):
        memory.context("find", namespace="app", budget_tokens=0)
    with pytest.raises(InvalidInput, match="budget_tokens"):
        memory.context("find", namespace="app", budget_tokens=-5)
    with pytest.raises(InvalidInput, match="query is empty"):
        memory.search("  ", namespace="app")
    with pytest.raises(InvalidInput, match="k must be"):
        memory.search("find", namespace="app", k=0)
    with pytest.raises(InvalidInput, match="as_of 'soon' is not an ISO-8601"):
        memory.search("find", namespace="app", as_of="soon")
    with pytest.raises(InvalidInput, match="update needs"):
        memory.update(memory.search("find", namespace="app")[0].item.id, namespace="app")


def test_query_text_is_data_not_fts_syntax(memory):
    """Operators, quotes and column filters typed into a query never reach FTS5 as syntax."""
    memory.add('the "NEAR" operator and items_fts: text', namespace="app")
    for query in ['"unbalanced', 'text: NEAR(a b)', "a OR b AND NOT c *", "items_fts MATCH 'x'", "^start"]:
        memory.search(query, namespace="app")  # must not raise sqlite3.OperationalError
    assert memory.search('"NEAR"', namespace="app")[0].item.text.startswith('the "NEAR"')


def test_a_bad_record_late_in_a_bulk_write_writes_no_batch(memory):
    """Validation covers every record before the first batch commits (batches are 256)."""
    before = snapshot(memory)
    records = [{"text": f"memory number {i}"} for i in range(300)]
    records[290]["metadata"] = {"when": {1, 2}}
    with pytest.raises(InvalidInput, match="#290"):
        memory.add_many(records, namespace="app")
    assert snapshot(memory) == before


class WrongWidth:
    """An embedder that announces one width and returns another."""

    def __init__(self, inner, extra=8):
        self.inner, self.dim, self.name, self.extra = inner, inner.dim, inner.name, extra

    def encode(self, texts):
        import numpy as np

        v = self.inner.encode(texts)
        return np.concatenate([v, np.zeros((len(texts), self.extra), dtype=v.dtype)], axis=1)


def test_an_embedder_returning_the_wrong_shape_writes_nothing(memory):
    memory.add("an existing memory", namespace="app")
    before = snapshot(memory)
    real = memory.embedder
    memory.embedder = WrongWidth(real)
    with pytest.raises(InvalidInput, match="check the embedder"):
        memory.add("a memory the broken embedder sees", namespace="app")
    memory.embedder = real
    assert snapshot(memory) == before
    assert memory.search("existing memory", namespace="app")  # the namespace still works


def test_validity_intervals_cannot_be_reversed(memory):
    item = memory.add("Ana lives in Lyon", namespace="app", valid_from="2024-03-01", valid_to="2024-06-01")
    before = snapshot(memory)
    with pytest.raises(InvalidInput, match="before the current version's valid_to"):
        memory.update(item.id, namespace="app", text="Ana lives in Paris", valid_from="2025-01-01")
    with pytest.raises(InvalidInput, match="after the memory's valid_from"):
        memory.invalidate(item.id, namespace="app", at="2020-01-01")
    assert snapshot(memory) == before


def test_a_blank_speaker_does_not_break_search(memory):
    memory.add("the hats don't bother them", namespace="app", metadata={"speaker": " "})
    memory.add("Audrey dresses her dogs up", namespace="app", metadata={"speaker": "Audrey"})
    assert memory.search("What does Audrey dress her dogs with?", namespace="app")


def _corrupt_export(memory, tmp_path, how):
    import shutil

    import numpy as np
    from safetensors.numpy import load_file, save_file

    memory.add("Ana lives in Lyon", namespace="chat", metadata={"speaker": "Ana"})
    memory.add("Ben plays the cello", namespace="chat")
    src = tmp_path / "cube"
    memory.export("chat", src)
    bad = tmp_path / f"bad-{how}"
    shutil.copytree(src, bad)
    items = [json.loads(x) for x in (bad / "items.jsonl").read_text().splitlines()]
    if how == "missing keys file":
        (bad / "keys.jsonl").unlink()
    elif how == "row without a field":
        del items[1]["recorded_at"]
    elif how == "metadata not json":
        items[0]["metadata"] = "{not json"
    elif how == "vectors too wide":
        t = load_file(str(bad / "vectors.safetensors"))
        save_file({"rids": t["rids"], "vectors": np.zeros((len(items), t["vectors"].shape[1] + 4), np.float16)},
                  str(bad / "vectors.safetensors"))
    elif how == "empty namespace":
        manifest = json.loads((bad / "manifest.json").read_text())
        (bad / "manifest.json").write_text(json.dumps(manifest | {"namespace": ""}))
    elif how == "time not a stored time":  # searches parse it: it used to import, then break every search
        items[0]["valid_from"] = "yesterday"
    elif how == "row twice":
        items.append(dict(items[0]))
        manifest = json.loads((bad / "manifest.json").read_text())
        (bad / "manifest.json").write_text(json.dumps(manifest | {"items": len(items)}))
    elif how == "manifest not an object":
        (bad / "manifest.json").write_text("[1]")
    elif how == "key twice":
        keys = (bad / "keys.jsonl").read_text().splitlines()
        (bad / "keys.jsonl").write_text("\n".join(keys + keys[:1]) + "\n")
    elif how == "rids not a list":
        events = [json.loads(x) for x in (bad / "events.jsonl").read_text().splitlines()]
        events[0]["payload"]["rids"] = 5
        (bad / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    (bad / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    if how == "items not utf-8":
        with open(bad / "items.jsonl", "ab") as f:
            f.write(b"\xff\xfe\n")
    return bad


@pytest.mark.parametrize("how", ["missing keys file", "row without a field", "metadata not json", "vectors too wide",
                                 "empty namespace", "time not a stored time", "row twice", "manifest not an object",
                                 "key twice", "rids not a list", "items not utf-8"])
def test_a_damaged_export_is_refused_before_anything_is_imported(memory, tmp_path, how):
    from memvisor import Memory

    bad = _corrupt_export(memory, tmp_path, how)
    with Memory(tmp_path / "other") as other:
        before = snapshot(other)
        with pytest.raises(MalformedFile):
            other.import_(bad)
        assert snapshot(other) == before


def test_unreadable_files_and_homes_are_typed_errors(memory, tmp_path):
    """Each of these raised a bare Python exception (UnicodeDecodeError, TypeError, ValueError, FileExistsError,
    sqlite3.DatabaseError) before; now a typed error that says what to fix, and nothing is written."""
    from memvisor import Memory

    memory.add("Ana lives in Lyon", namespace="chat")
    before = snapshot(memory)
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(b"\xff\xfe x")
    with pytest.raises(MalformedFile, match="not UTF-8 text"):
        memory.ingest(binary, namespace="chat")
    for when in (1234, "1:99 pm on 8 May, 2023"):
        sample = {"sample_id": "s", "conversation": {"speaker_a": "A", "speaker_b": "B", "session_1_date_time": when,
                                                     "session_1": [{"speaker": "A", "dia_id": "D1:1", "text": "hi"}]}}
        path = tmp_path / "locomo.json"
        path.write_text(json.dumps([sample]))
        with pytest.raises(MalformedFile, match="session_1_date_time: unreadable LoCoMo session time"):
            memory.ingest(path, namespace="chat")
    assert snapshot(memory) == before
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    with pytest.raises(InvalidInput, match="is a file: export into a new or empty folder"):
        memory.export("chat", a_file)
    with pytest.raises(InvalidInput, match="home .* is a file"):
        Memory(a_file)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "memvisor.db").write_bytes(b"not a database " * 100)
    with pytest.raises(InvalidInput, match="is not a memvisor database"):
        Memory(tmp_path / "junk")


def test_wrong_types_say_so(memory):
    memory.add("Ana lives in Lyon", namespace="chat", kind="semantic")
    with pytest.raises(InvalidInput, match="text must be a string, got int"):
        memory.add(123, namespace="chat")
    with pytest.raises(InvalidInput, match="query must be a string, got bytes"):
        memory.search(b"Ana", namespace="chat")
    assert [h.item.text for h in memory.search("Ana", namespace="chat", kinds="semantic")] == ["Ana lives in Lyon"]
    assert memory.search("Ana", namespace="chat", kinds="episodic") == []


def test_a_second_invalidate_cannot_move_the_end_later(memory):
    item = memory.add("Ana lives in Lyon", namespace="chat", valid_from="2020-01-01")
    memory.invalidate(item.id, namespace="chat", at="2024-01-01")
    before = snapshot(memory)
    with pytest.raises(InvalidInput, match="already stopped being true at 2024-01-01"):
        memory.invalidate(item.id, namespace="chat", at="2025-01-01")
    with pytest.raises(InvalidInput, match="already stopped being true"):
        memory.invalidate(item.id, namespace="chat")  # now
    assert snapshot(memory) == before
    assert memory.invalidate(item.id, namespace="chat", at="2023-06-01").valid_to.startswith("2023-06-01")


def test_a_bad_ingested_turn_is_named_by_its_turn_and_conversation(memory, tmp_path):
    path = tmp_path / "talk.jsonl"
    path.write_text(json.dumps({"speaker": "Ana", "text": "hi"}) + "\n"
                    + json.dumps({"speaker": "Ana", "text": "x" * 20_001}) + "\n")
    with pytest.raises(InvalidInput, match=r"^turn 'talk:2' of conversation 'talk': text has 20001 characters"):
        memory.ingest(path, namespace="chat")
