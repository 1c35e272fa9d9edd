"""Every SQL statement the Memory verbs run on a large kept store, with SQLite's query plan and the verb's
time: a statement that scans a table grows with the store (session 12 found a delete scanning the
namespace's idempotency keys). On a copy of a store kept by `memvisor bench scale --keep KEEP`:

    python scripts/query_plan_audit.py KEEP/memvisor-100000/home

Prints each verb's time and every distinct statement whose plan holds a full SCAN (FTS5's virtual-table
scans and scans of a few rows, such as meta, are listed too: read them, don't count them).
"""
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from memvisor import Memory


def main(source: Path):
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        home = Path(tmp) / "home"
        shutil.copytree(source, home)
        m = Memory(home)
        ns = m.store.namespaces()[0]
        row = m.store.db.execute("SELECT id, user_id, session_id, valid_from FROM items WHERE namespace=? "
                                 "ORDER BY rid DESC LIMIT 1", (ns,)).fetchone()
        m.search("warm up", namespace=ns)
        seen = []
        m.store.db.set_trace_callback(seen.append)
        verbs = {
            "add": lambda: m.add("Mina bought a new camera lens in Lyon", namespace=ns, user=row["user_id"]),
            "add_many 100": lambda: m.add_many([f"note {i} about the lens and Lyon" for i in range(100)], namespace=ns),
            "get": lambda: m.get(row["id"], namespace=ns),
            "history": lambda: m.history(row["id"], namespace=ns),
            "update": lambda: m.update(row["id"], namespace=ns, text="Mina returned the camera lens"),
            "search": lambda: m.search("camera lens in Lyon", namespace=ns),
            "search user": lambda: m.search("camera lens in Lyon", namespace=ns, user=row["user_id"]),
            "search session": lambda: m.search("camera lens", namespace=ns, session=row["session_id"]),
            "search metadata": lambda: m.search("camera lens", namespace=ns, metadata={"source": "synthetic"}),
            "search as_of": lambda: m.search("camera lens", namespace=ns, as_of=row["valid_from"]),
            "search known_at": lambda: m.search("camera lens", namespace=ns, known_at="2026-01-01T00:00:00Z"),
            "context": lambda: m.context("camera lens in Lyon", namespace=ns),
            "context user": lambda: m.context("camera lens in Lyon", namespace=ns, user=row["user_id"]),
            "invalidate": lambda: m.invalidate(row["id"], namespace=ns, at="2099-01-01T00:00:00Z"),
            "delete": lambda: m.delete(row["id"], namespace=ns),
        }
        statements = {}
        for name, call in verbs.items():
            seen.clear()
            t = time.perf_counter()
            call()
            print(f"{name:16s} {1000 * (time.perf_counter() - t):8.1f} ms  {len(seen)} statements")
            for sql in seen:
                statements.setdefault(re.sub(r"\s+", " ", sql.strip()), name)
        m.store.db.set_trace_callback(None)
        print()
        for sql, name in statements.items():
            if not sql.split()[0].upper() in ("SELECT", "UPDATE", "DELETE", "INSERT", "WITH"):
                continue
            try:
                plan = [r[-1] for r in m.store.db.execute("EXPLAIN QUERY PLAN " + sql)]
            except Exception as e:  # noqa: BLE001 - a statement the plan cannot replay (temp tables)
                plan = [f"(no plan: {e})"]
            scans = [p for p in plan if p.startswith("SCAN")]
            if scans:
                print(f"[{name}] {sql[:160]}\n    {' | '.join(scans)}")
        m.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
