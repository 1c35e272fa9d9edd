"""What a delete costs at the close that scrubs it (`SQLiteStore._scrub_deleted`), on a copy of a kept store
(`memvisor bench scale --n N --systems memvisor --keep DIR` leaves DIR/memvisor-N/home):

    python scripts/delete_close_cost.py DIR/memvisor-100000/home [--deletes 5]

Prints the deletes' time, the close's time, and the close's parts: FTS5 'optimize', the ANN index save
(with its scrub), the truncating WAL checkpoint. Run the tree before a change with PYTHONPATH=OLD/src.
"""
import argparse
import cProfile
import pstats
import shutil
import tempfile
import time
from pathlib import Path

from memvisor import Memory


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("home", type=Path)
    ap.add_argument("--deletes", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        home = Path(tmp) / "home"
        shutil.copytree(args.home, home)
        m = Memory(home)
        ns = m.store.namespaces()[0]
        m.search("warm the index up", namespace=ns)  # the index loaded, as in a serving process
        ids = [r[0] for r in m.store.db.execute("SELECT id FROM items WHERE namespace=? LIMIT ?", (ns, args.deletes))]
        t = time.perf_counter()
        for item_id in ids:
            m.delete(item_id, namespace=ns)
        print(f"{len(ids)} deletes: {time.perf_counter() - t:.3f} s ({len(m.store.vector_index(ns))} memories left)")
        prof = cProfile.Profile()
        t = time.perf_counter()
        prof.runcall(m.close)
        print(f"close with the scrub: {time.perf_counter() - t:.2f} s")
        stats = pstats.Stats(prof)
        for name in ("execute", "save", "_scrub_free_slots", "_compacted"):
            for (file, _line, func), row in stats.stats.items():
                if func == name and ("sqlite" in file or "memvisor" in file or "method" in file):
                    print(f"  {func} ({Path(file).name}): {row[3]:.2f} s cumulative over {row[1]} calls")


if __name__ == "__main__":
    main()
