"""SIGKILL during ingest: every acknowledged write survives and the indexes agree with the log."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

WRITER = r"""
import sys
from memvisor import Memory
m = Memory(sys.argv[1])
for i in range(100000):
    item = m.add(f"memory number {i}: the quick brown fox visits town {i % 97}", namespace="crash",
                 valid_from="2024-01-01")
    print(i, item.id, flush=True)       # acknowledged: add() returned after COMMIT
"""


def test_sigkill_mid_ingest_loses_nothing_acknowledged(tmp_path):
    home = tmp_path / "home"
    # Build and save an ANN index first, so the reopen must also catch a stale index up from the log.
    from memvisor import Memory

    with Memory(home) as m:
        m.add_many([{"text": f"seed memory {i}"} for i in range(20)], namespace="crash")
        m.search("seed", namespace="crash")
        m.store.vector_index("crash").save()

    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(home)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    acked: dict[int, str] = {}
    deadline = time.time() + 240
    while len(acked) < 40 and time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        i, item_id = line.split()
        acked[int(i)] = item_id
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(acked) >= 40, "the writer did not get going"

    with Memory(home) as m:
        db = m.store.db
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        for i, item_id in acked.items():
            assert m.get(item_id, namespace="crash").text.startswith(f"memory number {i}:")
        n_items = db.execute("SELECT count(*) FROM items").fetchone()[0]
        assert n_items >= 20 + len(acked)
        # every view agrees with the log: one add event per row, one FTS row and one vector per row
        assert db.execute("SELECT count(*) FROM events WHERE op='add'").fetchone()[0] == n_items
        assert db.execute("SELECT count(*) FROM vectors").fetchone()[0] == n_items
        assert db.execute("SELECT count(*) FROM items_fts WHERE items_fts MATCH 'memory'").fetchone()[0] == n_items
        assert db.execute("INSERT INTO items_fts(items_fts) VALUES('integrity-check')") is not None
        index = m.store.vector_index("crash")
        assert len(index) == n_items
        last = max(acked)
        hit = m.search(f"memory number {last}: the quick brown fox visits town {last % 97}", namespace="crash", k=1)
        assert hit[0].item.id == acked[last]
