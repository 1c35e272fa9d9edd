"""Search and context latency on a store that `memvisor bench scale --keep` left partly ingested (a stopped
1M run), with the bench's loop: the 1M corpus's 200 timed queries after 5 warm-ups, top 10, 1,024 tokens.

    python scripts/time_partial_store.py KEEP/memvisor-1000000/home

Queries whose source memory was not ingested still time a full search; `source_in_top10_of_present`
counts only those whose source is in the store. The figures in BENCHMARKS.md (scale, session 4) come
from this script; `bench scale --reuse` is the command for a complete store."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from memvisor import Memory
from memvisor.bench.synthetic import SyntheticCorpus
from memvisor.bench.common import percentiles_ms, peak_rss_mb, load_average
from memvisor.store.filters import Filters


def main(home: Path) -> dict:
    queries = SyntheticCorpus(1_000_000, seed=7).queries(205)
    timed, warm_up = queries[5:], queries[:5]  # as scale_worker orders them
    m = Memory(home)
    n = m.store.count(Filters(namespace="scale"))
    t0 = time.perf_counter()
    index = m.store.vector_index("scale")  # replays what the saved index lacks
    catch_up = time.perf_counter() - t0
    for q in warm_up:
        m.search(q.text, namespace="scale", k=10)
    search, context, hit, present = [], [], 0, 0
    for q in timed:
        t0 = time.perf_counter()
        hits = m.search(q.text, namespace="scale", k=10)
        search.append(time.perf_counter() - t0)
        if q.target < n:
            present += 1
            hit += any(h.item.metadata.get("n") == q.target for h in hits)
        t0 = time.perf_counter()
        m.context(q.text, namespace="scale", budget_tokens=1024)
        context.append(time.perf_counter() - t0)
    vectors = len(index)
    m.close()
    return dict(memories=n, index_vectors=vectors, index_catch_up_s=round(catch_up, 1),
                search_ms=percentiles_ms(search), context_ms=percentiles_ms(context),
                source_in_top10_of_present=round(hit / max(1, present), 3), queries_with_present_source=present,
                peak_rss_mb=peak_rss_mb(), load_average_end=load_average())


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1])), indent=1))
