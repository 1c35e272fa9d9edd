"""One system at one size in its own process: ingest n synthetic memories, time search and context.

    python -m memvisor.bench.scale_worker --system memvisor --n 10000 --out part.json

Both systems hold all n memories in one scope (memvisor: one namespace; Mem0: one user_id) and
search over all of them, so the index really has n entries. Latencies include query embedding;
a few untimed warm-up queries come first. Disk is everything the system wrote in its folder.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from memvisor.bench.common import current_rss_mb, load_average, peak_rss_mb, percentiles_ms

WARMUP = 5
BUDGET = 1024
K = 10


def folder_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total


def run_memvisor(records, queries, home: Path, progress, reuse: bool = False) -> dict:
    """`reuse`: `home` already holds exactly these records (kept by an earlier run): time the queries only."""
    from memvisor import Memory
    from memvisor.store.filters import Filters

    m = Memory(home)
    m.embedder.encode(["warm up the model before the clock starts"])
    ingest = None
    if reuse:
        held = m.store.count(Filters(namespace="scale"))
        if held != len(records):
            raise SystemExit(f"{home} holds {held} memories, not {len(records)}: rebuild it (--keep)")
    else:
        t0 = time.perf_counter()
        m.add_many(records, namespace="scale", batch_size=512, progress=progress)
        ingest = time.perf_counter() - t0
    rss_after_ingest = current_rss_mb()
    for q in queries[:WARMUP]:
        m.search(q.text, namespace="scale", k=K)
    search, context, hit, scoped, scoped_hit = [], [], 0, [], 0
    for q in queries:
        t0 = time.perf_counter()
        hits = m.search(q.text, namespace="scale", k=K)
        search.append(time.perf_counter() - t0)
        hit += any(h.item.metadata.get("n") == q.target for h in hits)
        t0 = time.perf_counter()
        m.context(q.text, namespace="scale", budget_tokens=BUDGET)
        context.append(time.perf_counter() - t0)
        # The usual call of an assistant serving many users: search one user's memories.
        t0 = time.perf_counter()
        hits = m.search(q.text, namespace="scale", k=K, user=records[q.target]["user"])
        scoped.append(time.perf_counter() - t0)
        scoped_hit += any(h.item.metadata.get("n") == q.target for h in hits)
    m.close()
    return {"ingest_seconds": ingest, "search": search, "context": context, "hit": hit,
            "user_search": scoped, "user_hit": scoped_hit, "rss_after_ingest_mb": rss_after_ingest}


def run_mem0(records, queries, home: Path, progress, bm25: bool = True) -> dict:
    from memvisor.bench.common import pack_greedy
    from memvisor.bench.peers.mem0_peer import Mem0Store
    from memvisor.models.tokenizer import default_tokenizer

    tok = default_tokenizer()
    store = Mem0Store(bm25=bm25, home=str(home))
    store.memory.embedding_model.embed("warm up the model before the clock starts", "add")
    t0 = time.perf_counter()
    for i, r in enumerate(records):  # Mem0 has no bulk add: one public add() per memory
        store.add(r["text"], "scale", {"n": r["metadata"]["n"], "speaker": r["user"],
                                       "valid_from": r["valid_from"]})
        if progress and (i + 1) % 100 == 0:
            progress(100)
    ingest = time.perf_counter() - t0
    rss_after_ingest = current_rss_mb()
    for q in queries[:WARMUP]:
        store.search(q.text, "scale", top_k=K)
    search, context, hit = [], [], 0
    for q in queries:
        t0 = time.perf_counter()
        hits = store.search(q.text, "scale", top_k=K)
        search.append(time.perf_counter() - t0)
        hit += any((h.get("metadata") or {}).get("n") == q.target for h in hits)
        # Context the way the LoCoMo peer packs it: search deep, pack greedily within the budget.
        t0 = time.perf_counter()
        ranked = store.search(q.text, "scale")
        lines = [h["memory"] for h in ranked]
        pack_greedy(list(range(len(lines))), lines, tok.count_many(lines), BUDGET, tok.count,
                    chronological=False)
        context.append(time.perf_counter() - t0)
    store.close()
    return {"ingest_seconds": ingest, "search": search, "context": context, "hit": hit,
            "rss_after_ingest_mb": rss_after_ingest}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--system", required=True, choices=["memvisor", "mem0", "mem0-dense"])
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--out", required=True)
    p.add_argument("--workdir", default="", help="where the system's files go (default: a temp folder)")
    p.add_argument("--keep-at", default="", help="put the system's files in this new folder and keep them "
                   "(to inspect or re-time a large store later)")
    p.add_argument("--reuse-at", default="", help="memvisor only: time the queries on the store an earlier "
                   "--keep-at run left in this folder (same n and seed); no ingest")
    a = p.parse_args(argv)
    if a.reuse_at and a.system != "memvisor":
        p.error("--reuse-at is for --system memvisor")

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from memvisor.bench.synthetic import SyntheticCorpus

    corpus = SyntheticCorpus(a.n, seed=a.seed)
    records = corpus.records()
    queries = corpus.queries(a.queries + WARMUP)
    queries = queries[WARMUP:] + queries[:WARMUP]  # warm-ups are the last ones, untimed twice over
    if a.reuse_at:
        home = Path(a.reuse_at)
        if not (home / "home" / "memvisor.db").exists():
            p.error(f"--reuse-at {home}: no store there (make one with --keep-at)")
    elif a.keep_at:
        home = Path(a.keep_at)
        home.mkdir(parents=True)  # a new folder: never mix a run into an older store
    else:
        home = Path(tempfile.mkdtemp(prefix=f"memvisor-scale-{a.system}-", dir=a.workdir or None))
    rss_before = current_rss_mb()
    load_start = load_average()
    try:
        with Progress(TextColumn(f"[bold]{a.system} n={a.n:,}[/]"), BarColumn(), MofNCompleteColumn(),
                      TimeRemainingColumn()) as prog:
            task = prog.add_task("ingest", total=a.n)
            advance = lambda k: prog.advance(task, k)  # noqa: E731
            if a.system == "memvisor":
                r = run_memvisor(records, queries[:a.queries], home / "home", advance, reuse=bool(a.reuse_at))
            else:
                r = run_mem0(records, queries[:a.queries], home / "mem0", advance,
                             bm25=(a.system == "mem0"))
        disk = folder_bytes(home)
    finally:
        if not (a.keep_at or a.reuse_at):
            shutil.rmtree(home, ignore_errors=True)
    out = {
        "system": a.system, "n": a.n, "seed": a.seed, "queries": a.queries,
        "ingest_seconds": round(r["ingest_seconds"], 2) if r["ingest_seconds"] else None,
        "ingest_per_s": round(a.n / r["ingest_seconds"], 1) if r["ingest_seconds"] else None,
        "reused_store": bool(a.reuse_at),
        "search_ms": percentiles_ms(r["search"]),
        "context_ms": percentiles_ms(r["context"]),
        "search_k": K, "context_budget_tokens": BUDGET,
        "source_in_top10": round(r["hit"] / max(1, a.queries), 3),
        "user_search_ms": percentiles_ms(r["user_search"]) if "user_search" in r else None,
        "user_source_in_top10": round(r["user_hit"] / max(1, a.queries), 3) if "user_hit" in r else None,
        "peak_rss_mb": peak_rss_mb(),
        "rss_before_mb": rss_before,
        "rss_after_ingest_mb": r["rss_after_ingest_mb"],
        "disk_bytes": disk,
        "disk_bytes_per_memory": round(disk / a.n, 1),
        "load_average_start": load_start,
        "load_average_end": load_average(),
    }
    Path(a.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
