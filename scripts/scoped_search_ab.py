"""One user's search on a large kept store (`memvisor bench scale --keep KEEP`), timed on whichever tree is
imported; alternate the trees to compare (the tree before with PYTHONPATH=OLD/src):

    python scripts/scoped_search_ab.py KEEP/memvisor-100000/home [--queries 100] [--tops FILE]

The queries are the scale bench's (`memvisor.bench.synthetic`, seed 7), each searched within the user of
the memory it was written from. Prints p50 / p95 overall and by the user's row count; --tops writes each
query's top 10 ids (JSON) and, if FILE exists, first says how many queries have the same top 10 as it.
"""
import argparse
import collections
import json
import time
from pathlib import Path

import numpy as np

from memvisor import Memory
from memvisor.bench.synthetic import SyntheticCorpus
from memvisor.store.filters import Filters

SIZES = [(0, 2000), (2000, 8538), (8538, 20000), (20000, 10**9)]  # 8,538: prefilter_cap at 100k


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("home", type=Path)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--tops", type=Path)
    args = ap.parse_args()
    m = Memory(args.home)
    corpus = SyntheticCorpus(m.store.count(Filters(namespace="scale")), seed=7)
    records, queries = corpus.records(), corpus.queries(args.queries)
    size = collections.Counter(r["user"] for r in records)
    m.search("warm up", namespace="scale", user=records[0]["user"])
    times, tops = [], []
    for q in queries:
        user = records[q.target]["user"]
        t0 = time.perf_counter()
        hits = m.search(q.text, namespace="scale", k=10, user=user)
        times.append((size[user], 1000 * (time.perf_counter() - t0)))
        tops.append([h.item.id for h in hits])
    m.close()
    all_ms = [t for _, t in times]
    print(f"p50 {np.percentile(all_ms, 50):.1f} ms  p95 {np.percentile(all_ms, 95):.1f} ms  "
          + "  ".join(f"users of {lo}-{hi} rows: {len(s)} queries, median {np.median(s):.1f} ms"
                      for lo, hi in SIZES if (s := [t for n, t in times if lo <= n < hi])))
    if args.tops:
        if args.tops.exists():
            other = json.loads(args.tops.read_text())
            print(f"same top 10 as {args.tops}: {np.mean([a == b for a, b in zip(tops, other)]):.2f}")
        else:
            args.tops.write_text(json.dumps(tops))


if __name__ == "__main__":
    main()
