"""Two dense signals tried offline on `scripts/dump_candidates.py`'s output (session 5, NOTES.md):
Rocchio feedback on the query vector, and sentence-level similarity as a third RRF list.
Vectors come from the dump's homes (/tmp/memvisor-tune4); recall is `simulate_packing.run`.

    python scripts/retrieval_offline_signals.py
"""
import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import simulate_packing as sp  # noqa: E402
from memvisor import Memory  # noqa: E402
from memvisor.text.retrieve import dense_text  # noqa: E402

BASE = dict(k=10, wb=1.0, wv=1.0, spk=0.05, nb=2)
ORIG = sp.D


def turn_sentences(turns: dict, rids) -> tuple[list[str], list[int]]:
    """Each turn's sentences of 3 words or more, as "speaker: sentence", and the index in ``rids`` of the
    turn each one comes from."""
    sents, owner = [], []
    for i, r in enumerate(rids):
        for s in re.split(r"(?<=[.!?])\s+", turns[int(r)]["text"]):
            if len(s.split()) >= 3:
                sents.append(f"{turns[int(r)]['speaker']}: {s}")
                owner.append(i)
    return sents, owner


def load():
    out = {}
    for cid, cv in ORIG["convs"].items():
        m = Memory(Path("/tmp/memvisor-tune4") / cid)
        turns = {int(t): v for t, v in cv["turns"].items()}
        rids = np.array(list(turns))
        sents, owner = turn_sentences(turns, rids)
        queries = [dense_text(q["q"], [q["named"]]) if q["named"] else q["q"] for q in cv["qs"]]
        out[cid] = (rids, m.store.vectors_of(rids.tolist()).astype(np.float32), m.embedder.encode(sents),
                    np.array(owner), m.embedder.encode(queries), turns)
        m.close()
    return out


def ranks(scores, rids):
    return {int(rids[i]): r + 1 for r, i in enumerate(np.argsort(-scores))}


def variant(vecs, beta=0.0, top=0):
    """Candidates with the dense rank recomputed (Rocchio with `beta`, `top` feedback turns) and the
    sentence-level rank in the last field."""
    out = {"convs": {}}
    for cid, cv in ORIG["convs"].items():
        rids, V, S, owner, Q, turns = vecs[cid]
        qs = []
        for qi, q in enumerate(cv["qs"]):
            br = {c[0]: c[1] for c in q["cands"]}
            q_vec = Q[qi]
            vr = ranks(V @ q_vec, rids)
            if beta:
                fused = sorted(rids.tolist(), key=lambda r: -(
                    (1 / (10 + br[r]) if br.get(r) else 0) + 1 / (10 + vr[r])
                    + (0.05 if q["named"] and turns[r]["speaker"] == q["named"] else 0)))
                idx = [int(np.where(rids == r)[0][0]) for r in fused[:top]]
                q_vec = q_vec + beta * V[idx].mean(0)
                vr = ranks(V @ (q_vec / np.linalg.norm(q_vec)), rids)
            best = np.full(len(rids), -1.0)
            np.maximum.at(best, owner, S @ Q[qi])
            sr = ranks(best, rids)
            qs.append(dict(q, cands=[[int(r), br.get(int(r)), vr[int(r)], sr[int(r)]] for r in rids]))
        out["convs"][cid] = dict(cv, qs=qs)
    return out


def with_sentences(w):
    def score(q, turns, c, cfg):
        return sp.default_score(q, turns, c, cfg) + w / (cfg["k"] + c[3])
    return score


if __name__ == "__main__":
    vecs = load()
    budgets = (512, 1024, 2048)
    for beta, top in [(0, 0), (0.5, 3), (1.0, 3), (0.5, 5), (1.0, 5), (1.0, 10)]:
        sp.D = variant(vecs, beta, top)
        print(f"rocchio beta={beta} top={top}", [round(sp.run(BASE, b)[0], 4) for b in budgets])
    sp.D = variant(vecs)
    for w in (0.3, 0.5, 1.0):
        print(f"sentence list w={w}", [round(sp.run(BASE, b, score=with_sentences(w))[0], 4) for b in budgets])
