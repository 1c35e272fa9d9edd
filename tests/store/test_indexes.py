"""The statements that would otherwise scan a namespace use an index, and stores written before an index
existed gain it on open: a delete looks up its memory's idempotency keys by id (a scan took 0.18 s per
delete at 100k memories); a scoped search counts and reads the scope's rows
(`SQLiteStore.scope_size`, `admitted_rids`)."""
from __future__ import annotations

import sqlite3

from memvisor import Memory

DELETE_KEYS = "DELETE FROM item_keys WHERE namespace=? AND id=?"


def _plan(memory) -> str:
    return " ".join(row[-1] for row in memory.store.db.execute("EXPLAIN QUERY PLAN " + DELETE_KEYS, ("n", "x")))


def test_delete_finds_keys_by_id_through_an_index_also_in_older_stores(tmp_path):
    home = tmp_path / "home"
    with Memory(home) as m:
        kept = m.add("the heron fishes at the pond", namespace="n", key="a")
        gone = m.add("the otter swims in the river", namespace="n", key="b")
        assert "item_keys_by_id" in _plan(m)
    with sqlite3.connect(home / "memvisor.db") as db:  # as a store written before the index existed
        db.execute("DROP INDEX item_keys_by_id")
        assert db.execute("SELECT count(*) FROM sqlite_master WHERE name='item_keys_by_id'").fetchone() == (0,)
    with Memory(home) as m:
        assert "item_keys_by_id" in _plan(m)
        m.delete(gone.id, namespace="n")
        assert [r["id"] for r in m.store.db.execute("SELECT id FROM item_keys")] == [kept.id]
        again = m.add("the otter swims in the river", namespace="n", key="b")  # the key is free again
        assert again.id != gone.id


def test_a_scoped_search_reads_its_scope_through_the_scope_index(tmp_path):
    from memvisor.store.filters import Filters

    with Memory(tmp_path / "home") as m:
        m.add("the heron fishes at the pond", namespace="n", user="ana", session="s1", agent="bot")
        for column, filters in (("user", Filters("n", user="ana")), ("session", Filters("n", session="s1")),
                                ("agent", Filters("n", agent="bot"))):
            where, args = filters.where()
            plan = " ".join(r[-1] for r in m.store.db.execute(
                f"EXPLAIN QUERY PLAN SELECT items.rid FROM items WHERE {where}", args))
            assert f"items_{column}" in plan, plan
