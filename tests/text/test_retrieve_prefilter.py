"""A scoped search reads the scope's rows first and ranks them exactly: it must give what the ANN path
gives (here exact, the store being small), without touching the ANN index, and the scope's rows only."""
from __future__ import annotations

import json

import numpy as np
import pytest

import memvisor.text.retrieve as retrieve
from memvisor.store.filters import Filters

TOPICS = ["hiking in the mountains", "baking sourdough bread", "learning the cello", "fixing an old bicycle",
          "planting tomatoes in the garden", "a trip to Lisbon", "reading a mystery novel", "a chess tournament"]


@pytest.fixture
def scoped(memory):
    records = [dict(text=f"{user} talked about {topic} on day {day}", user=user, session=f"{user}-d{day % 3}",
                    metadata={"weekday": day % 4})
               for user in ("ana", "ben", "cleo", "dev") for day, topic in enumerate(TOPICS * 2)]
    memory.add_many(records, namespace="n")
    return memory


def _query(memory, text):
    return memory.embedder.encode([text])[0]


@pytest.mark.parametrize("filters", [Filters("n", user="ben"), Filters("n", session="cleo-d1"),
                                     Filters("n", metadata={"weekday": 2}),  # no scope: rows read directly
                                     Filters("n", user="ana", metadata={"weekday": 1})])
def test_scoped_search_is_exact_over_the_scope_and_skips_the_index(scoped, monkeypatch, filters):
    store = scoped.store
    q = _query(scoped, "who plays a string instrument?")
    monkeypatch.setattr(retrieve, "prefilter_cap", lambda n: 0)  # every scope too large: the ANN path
    via_index = retrieve.vector_search(store, q, filters, 5)
    monkeypatch.undo()

    def no_index(*_a, **_k):
        raise AssertionError("a scope of 16 rows must not search the ANN index")
    monkeypatch.setattr(type(store.vector_index("n")), "search", no_index)
    scoped_hits = retrieve.vector_search(store, q, filters, 5)

    where, args = filters.where()
    rids = [r[0] for r in store.db.execute(f"SELECT rid FROM items WHERE {where}", args)]
    sims = store.vectors_of(rids) @ q
    expected = [rids[i] for i in np.argsort(-sims, kind="stable")[:5]]
    assert [h[0] for h in scoped_hits] == expected == [h[0] for h in via_index]
    assert all(abs(h[1] - g[1]) < 2e-3 for h, g in zip(scoped_hits, via_index))  # f16 index vs f16 rows
    assert all(h[2]["rid"] == h[0] for h in scoped_hits)
    if filters.user:
        assert {h[2]["user_id"] for h in scoped_hits} == {filters.user}
    if filters.session:
        assert {h[2]["session_id"] for h in scoped_hits} == {filters.session}
    for key, value in filters.metadata.items():
        assert {json.loads(h[2]["metadata"])[key] for h in scoped_hits} == {value}


def test_a_scope_larger_than_the_cap_takes_the_index(scoped, monkeypatch):
    monkeypatch.setattr(retrieve, "prefilter_cap", lambda n: 10)  # ben holds 16 rows
    called = []
    index_type = type(scoped.store.vector_index("n"))
    real = index_type.search
    monkeypatch.setattr(index_type, "search", lambda self, *a: called.append(1) or real(self, *a))
    hits = retrieve.vector_search(scoped.store, _query(scoped, "bread"), Filters("n", user="ben"), 3)
    assert called and len(hits) == 3 and {h[2]["user_id"] for h in hits} == {"ben"}
    assert "sourdough" in hits[0][2]["text"]


def test_whole_memory_search_with_a_user_finds_only_that_users_memories(scoped):
    hits = scoped.search("a string instrument lesson", namespace="n", user="dev", k=3)
    assert [h.item.user for h in hits] == ["dev"] * 3
    assert "cello" in hits[0].item.text
