"""A/B of the full-text common-word cut (`TermStats.common` + `fts_match(words, common)`).

    python scripts/fulltext_cut_ab.py --n 100000 --home /tmp/home100k [--queries 100] [--cap 2000]

Builds a synthetic home of n memories (`memvisor.bench.synthetic`, seed 7, as `memvisor bench scale`)
unless --home already holds one, then times the FTS5 BM25 query (top 200, no join) for each synthetic
query with every word matched (`a OR b OR c`) and with the cut, and reports p50/p95 ms, the overlap of
the two top-50 lists, and how often the query's source memory is in each top 10. The figures in
NOTES.md ("Full text at scale") and BENCHMARKS.md (scale) come from this script.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from memvisor import Memory
from memvisor.bench.synthetic import SyntheticCorpus
from memvisor.text.query import fts_match, terms

RANK = "bm25(items_fts, 1.0, 0.5)"


def top(db, match: str, k: int) -> tuple[list[int], float]:
    t0 = time.perf_counter()
    rows = [r[0] for r in db.execute(f"SELECT rowid FROM items_fts WHERE items_fts MATCH ? ORDER BY {RANK} "
                                      "LIMIT ?", [match, k])]
    return rows, (time.perf_counter() - t0) * 1e3


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--home", required=True)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--cap", type=int, default=2000)
    a = ap.parse_args()
    corpus = SyntheticCorpus(a.n, seed=7)
    home = Path(a.home)
    with Memory(home) as m:
        if m.store.db.execute("SELECT count(*) FROM items").fetchone()[0] == 0:
            m.add_many(corpus.records(), namespace="scale", batch_size=512)
        store, db = m.store, m.store.db
        n_of = lambda rids: {r[0]: r[1] for r in db.execute(  # noqa: E731
            f"SELECT rid, json_extract(metadata, '$.n') FROM items WHERE rid IN ({','.join('?' * len(rids))})",
            rids)} if rids else {}
        ms = {"all words": [], "cut": []}
        hits = {"all words": 0, "cut": 0}
        overlap = []
        qs = corpus.queries(a.queries)
        for q in qs:
            words = terms(q.text)
            full, t_full = top(db, fts_match(words), 200)
            t0 = time.perf_counter()
            common = store.terms.common(words, a.cap)
            cut, _ = top(db, fts_match(words, common), 200)
            ms["all words"].append(t_full)
            ms["cut"].append((time.perf_counter() - t0) * 1e3)  # counting the postings included
            overlap.append(len(set(full[:50]) & set(cut[:50])) / 50)
            hits["all words"] += q.target in n_of(full[:10]).values()
            hits["cut"] += q.target in n_of(cut[:10]).values()
        for name in ms:
            print(f"{name}: p50 {pct(ms[name], 0.5):.1f} ms, p95 {pct(ms[name], 0.95):.1f} ms, "
                  f"source in top 10 {hits[name] / len(qs):.3f}")
        print(f"top-50 overlap {sum(overlap) / len(overlap):.2f} ({len(qs)} queries, cap {a.cap})")


if __name__ == "__main__":
    main()
