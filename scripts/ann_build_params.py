"""ANN build parameters: build rate and how much of the exact top 10 / 50 / 200 a 260-wide search (what the
retriever asks for) finds, for usearch expansion_add 128 / 64 / 48, over the vectors of a scale home.

    python scripts/ann_build_params.py HOME   # HOME: a `memvisor bench scale --keep` store's home folder

The figures in NOTES.md ("ANN index") and `vector_index.py` come from it (a 100k home)."""
import sqlite3
import sys
import time

import numpy as np
from usearch.index import Index
from memvisor.models.embedders import default_embedder
from memvisor.bench.synthetic import SyntheticCorpus
db = sqlite3.connect(f"{sys.argv[1]}/memvisor.db")
rows = db.execute("SELECT rid, vec FROM vectors").fetchall()
keys = np.array([r[0] for r in rows], dtype=np.uint64)
vecs = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float16).reshape(len(rows), 384).astype(np.float32)
qv = default_embedder().encode([q.text for q in SyntheticCorpus(len(keys), seed=7).queries(200)])
exact = Index(ndim=384, metric="cos", dtype="f16"); exact.add(keys, vecs, threads=0)
truth = exact.search(qv, 260, exact=True, threads=0).keys
for ef_add in (128, 64, 48):
    idx = Index(ndim=384, metric="cos", dtype="f16", connectivity=16, expansion_add=ef_add, expansion_search=64)
    t0 = time.perf_counter(); idx.add(keys, vecs, threads=0); tb = time.perf_counter() - t0
    t0 = time.perf_counter(); got = [idx.search(q, 260, threads=1).keys for q in qv]; ts = (time.perf_counter() - t0) / len(qv) * 1e3
    for k in (10, 50, 200):
        r = np.mean([len(set(g[:260]) & set(t[:k])) / k for g, t in zip(got, truth)])
        print(f"ef_add={ef_add}: build {len(keys)/tb:.0f}/s search(260) {ts:.2f} ms, exact top-{k} found in 260: {r:.3f}", flush=True)
