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
