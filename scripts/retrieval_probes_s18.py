"""Session 18's offline probe of the full-text half: BM25's k1 and b, and per-field length normalisation (BM25F).

FTS5's bm25() fixes k1 = 1.2 and b = 0.75 and normalises by the whole row's length, its `context` column (the
previous and next turns) included, so a turn between long neighbours is marked down. This recomputes the full-text
ranks from FTS5's own tokens (an `fts5vocab` instance table over a copy of each conversation's rows, the same
tokenizer), checks that the FTS5 formula reproduces the dumped ranks, and re-runs the packing simulator
(`simulate_packing.run`) with each variant's ranks in place of the dumped ones.

    python scripts/dump_candidates.py            # once: /tmp/memvisor-cands.json and the homes it reads
    python scripts/retrieval_probes_s18.py       # the table (overall recall at 512 / 1,024 / 2,048 tokens)
"""
from __future__ import annotations

import math
import sqlite3
import sys
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import simulate_packing as sim  # noqa: E402

from memvisor.text.query import terms  # noqa: E402

HOMES = Path("/tmp/memvisor-tune4")
TOKENIZE = "porter unicode61 remove_diacritics 2"
BASE = dict(k=10, wb=1.0, wv=1.0, spk=0.05, nb=2)


def field_stats(home: Path) -> tuple[dict[int, list[Counter]], dict[int, list[int]]]:
    """Per row: term counts of (text, context) and their token counts, through FTS5's own tokenizer."""
    src = sqlite3.connect(home / "memvisor.db")
    rows = src.execute("SELECT rid, text, coalesce(context, '') FROM items WHERE namespace='tune'").fetchall()
    db = sqlite3.connect(":memory:")
    db.execute(f"CREATE VIRTUAL TABLE f USING fts5(text, context, tokenize='{TOKENIZE}')")
    db.executemany("INSERT INTO f(rowid, text, context) VALUES (?, ?, ?)", rows)
    db.execute("CREATE VIRTUAL TABLE v USING fts5vocab(f, 'instance')")
    tf: dict[int, list[Counter]] = defaultdict(lambda: [Counter(), Counter()])
    lengths: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    for term, doc, col, _ in db.execute("SELECT term, doc, col, offset FROM v"):
        c = 0 if col == "text" else 1
        tf[doc][c][term] += 1
        lengths[doc][c] += 1
    for rid, _, _ in rows:
        tf[rid], lengths[rid]  # rows with no token still count in N
    return dict(tf), dict(lengths)


def stems(words: list[str]) -> dict[str, str]:
    """Each query word's FTS5 token (porter stem)."""
    db = sqlite3.connect(":memory:")
    db.execute(f"CREATE VIRTUAL TABLE s USING fts5(x, tokenize='{TOKENIZE}')")
    db.executemany("INSERT INTO s(rowid, x) VALUES (?, ?)", list(enumerate(words, start=1)))
    db.execute("CREATE VIRTUAL TABLE sv USING fts5vocab(s, 'instance')")
    return {words[doc - 1]: term for term, doc, _, _ in db.execute("SELECT * FROM sv")}


def bm25(query: list[str], tf, lengths, *, k1=1.2, b=0.75, w_ctx=0.5, per_field=False, b_ctx=None) -> dict[int, float]:
    """Scores of the rows holding a query token. Default: FTS5's formula (column weights on term counts, the row's
    whole length). ``per_field``: BM25F, each column's count normalised by its own length (b, ``b_ctx``)."""
    n_docs = len(tf)
    avg = [sum(v[c] for v in lengths.values()) / n_docs for c in (0, 1)]
    avg_all = avg[0] + avg[1]
    df = Counter(t for counts in tf.values() for t in set(counts[0]) | set(counts[1]) if t in query)
    out = {}
    for rid, (c0, c1) in tf.items():
        s = 0.0
        for t in query:
            if not (c0[t] or c1[t]):
                continue
            idf = max(math.log((n_docs - df[t] + 0.5) / (df[t] + 0.5)), 1e-6)
            if per_field:
                bc = b if b_ctx is None else b_ctx
                f = (c0[t] / (1 - b + b * lengths[rid][0] / avg[0])
                     + w_ctx * c1[t] / (1 - bc + bc * lengths[rid][1] / max(avg[1], 1e-9)))
                s += idf * f * (k1 + 1) / (f + k1)
            else:
                f = c0[t] + w_ctx * c1[t]
                s += idf * f * (k1 + 1) / (f + k1 * (1 - b + b * (lengths[rid][0] + lengths[rid][1]) / avg_all))
        if s > 0:
            out[rid] = s
    return out


def main() -> None:
    stats = {cid: field_stats(HOMES / cid) for cid in sim.D["convs"]}
    words = sorted({w for cv in sim.D["convs"].values() for q in cv["qs"] for w in terms(q["q"])})
    stem = stems(words)
    queries = {}
    for cid, cv in sim.D["convs"].items():
        for qi, q in enumerate(cv["qs"]):
            named = (q["named"] or "").lower()
            queries[cid, qi] = [stem[w] for w in terms(q["q"]) if w != named and w in stem]

    def ranks_for(**kw) -> float:
        agree = total = 0
        for cid, cv in sim.D["convs"].items():
            tf, lengths = stats[cid]
            for qi, q in enumerate(cv["qs"]):
                scores = bm25(queries[cid, qi], tf, lengths, **kw)
                order = sorted(scores, key=lambda r: -scores[r])
                q["br"] = {rid: i + 1 for i, rid in enumerate(order)}
                dumped = sorted((c for c in q["cands"] if c[1]), key=lambda c: c[1])
                agree += sum(a[0] == b for a, b in zip(dumped[:10], order[:10]))
                total += min(10, len(dumped))
        return agree / max(total, 1)

    def score(q, turns, c, cfg):
        return sim.default_score(q, turns, (c[0], q["br"].get(c[0]), c[2], c[3]), cfg)

    variants = [("FTS5's formula (k1 1.2, b 0.75, context 0.5)", {})]
    variants += [(f"k1 {k1}, b {b}", dict(k1=k1, b=b)) for k1 in (0.9, 1.2, 1.6) for b in (0.3, 0.5, 0.9)
                 if (k1, b) != (1.2, 0.75)]
    variants += [(f"BM25F, b {b} / context b {bc}, context {w}", dict(per_field=True, b=b, b_ctx=bc, w_ctx=w))
                 for b in (0.5, 0.75) for bc in (0.3, 0.75) for w in (0.3, 0.5)]
    print("| full-text ranks | top-10 agreement with the dump | 512 | 1,024 | 2,048 |")
    print("|---|---:|---:|---:|---:|")
    for name, kw in variants:
        agreement = ranks_for(**kw)
        rec = [sim.run(BASE, budget, score=score)[0] for budget in (512, 1024, 2048)]
        print(f"| {name} | {agreement:.3f} | " + " | ".join(f"{r:.3f}" for r in rec) + " |", flush=True)


if __name__ == "__main__":
    main()
