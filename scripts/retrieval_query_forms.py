"""Dense-query forms and extra dense lists, offline on `scripts/dump_candidates.py`'s output (session 6,
NOTES.md "Retrieval tuning"): the dense rank recomputed from the stored vectors of /tmp/memvisor-tune4 with
each query form embedded; recall is `simulate_packing.run` at 512 / 1,024 / 2,048 tokens.

- "replace": the form takes the dense query's place (the kept rule is `every-name`);
- "third list": the form's rank as a third RRF list beside the current one, weights 0.3 / 0.6 / 1.0;
- on top of the kept rule: each turn's best sentence, and the turn embedded alone, as third lists.

    python scripts/retrieval_query_forms.py
"""
import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import simulate_packing as sp  # noqa: E402
from retrieval_offline_signals import ranks, turn_sentences  # noqa: E402
from memvisor import Memory  # noqa: E402
from memvisor.text.query import terms  # noqa: E402
from memvisor.text.retrieve import dense_text  # noqa: E402

BASE = dict(k=10, wb=1.0, wv=1.0, spk=0.05, nb=2)
BUDGETS = (512, 1024, 2048)
ORIG = sp.D
QUESTION_WORD = re.compile(r"^(what|when|where|who|whom|which|why|how( many| much| long| often| old)?)\b\s*(\w+\b)?\s*",
                           re.I)


def forms(q: dict, speakers: list[str]) -> dict[str, str]:
    every = dense_text(q["q"], speakers)
    return {"one-name": dense_text(q["q"], [q["named"]]) if q["named"] else q["q"], "every-name": every,
            "keywords": " ".join(terms(every)) or q["q"],
            "speaker-label": f"{q['named']}: {every}" if q["named"] else every,
            "no-question-word": QUESTION_WORD.sub("", every).strip() or every}


def load() -> dict:
    out = {}
    for cid, cv in ORIG["convs"].items():
        m = Memory(Path("/tmp/memvisor-tune4") / cid)
        turns = {int(t): v for t, v in cv["turns"].items()}
        rids = np.array(list(turns))
        speakers = sorted({t["speaker"] for t in turns.values()})
        per_q = [forms(q, speakers) for q in cv["qs"]]
        words = [terms(f["every-name"]) or [f["every-name"]] for f in per_q]
        vocab = sorted({w for ws in words for w in ws})
        word_vec = dict(zip(vocab, m.embedder.encode(vocab)))
        sents, owner = turn_sentences(turns, rids)
        out[cid] = dict(
            rids=rids, V=m.store.vectors_of(rids.tolist()).astype(np.float32),
            Q={k: m.embedder.encode([f[k] for f in per_q]) for k in per_q[0]},
            W=[np.stack([word_vec[w] for w in ws]) for ws in words],
            alone=m.embedder.encode([f"{turns[int(r)]['speaker']}: {turns[int(r)]['text']}" for r in rids]),
            S=m.embedder.encode(sents), owner=np.array(owner))
        m.close()
    return out


def with_ranks(data: dict, dense, extra=None) -> dict:
    """The dump with the dense rank from `dense(d, qi)` scores and a third rank from `extra` (or None)."""
    out = {"convs": {}}
    for cid, cv in ORIG["convs"].items():
        d, qs = data[cid], []
        for qi, q in enumerate(cv["qs"]):
            br = {c[0]: c[1] for c in q["cands"]}
            vr = ranks(dense(d, qi), d["rids"])
            xr = ranks(extra(d, qi), d["rids"]) if extra else {}
            qs.append(dict(q, cands=[[int(r), br.get(int(r)), vr[int(r)], xr.get(int(r))] for r in d["rids"]]))
        out["convs"][cid] = dict(cv, qs=qs)
    return out


def third(w: float):
    def score(q, turns, c, cfg):
        return sp.default_score(q, turns, c, cfg) + w / (cfg["k"] + c[3])
    return score


def recall(dump: dict, score=sp.default_score) -> list[float]:
    sp.D = dump
    return [round(sp.run(BASE, b, score=score)[0], 4) for b in BUDGETS]


def best_sentence(d: dict, qi: int) -> np.ndarray:
    best = np.full(len(d["rids"]), -1.0)
    np.maximum.at(best, d["owner"], d["S"] @ d["Q"]["every-name"][qi])
    return best


if __name__ == "__main__":
    data = load()
    for form in data[next(iter(data))]["Q"]:
        print(f"replace: {form}", recall(with_ranks(data, lambda d, qi, f=form: d["V"] @ d["Q"][f][qi])))
    current = lambda d, qi: d["V"] @ d["Q"]["one-name"][qi]  # noqa: E731
    lists = {"keywords": lambda d, qi: d["V"] @ d["Q"]["keywords"][qi],
             "every-name": lambda d, qi: d["V"] @ d["Q"]["every-name"][qi],
             "each word, max": lambda d, qi: (d["V"] @ d["W"][qi].T).max(1),
             "each word, mean": lambda d, qi: (d["V"] @ d["W"][qi].T).mean(1)}
    for name, extra in lists.items():
        dump = with_ranks(data, current, extra)
        print(f"third list: {name}", [recall(dump, third(w))[1] for w in (0.3, 0.6, 1.0)], "(1,024 tokens)")
    kept = lambda d, qi: d["V"] @ d["Q"]["every-name"][qi]  # noqa: E731
    dump = with_ranks(data, kept, best_sentence)
    print("kept + best sentence, w 0.5", recall(dump, third(0.5)))
    dump = with_ranks(data, kept, lambda d, qi: d["alone"] @ d["Q"]["every-name"][qi])
    print("kept + turn alone", [recall(dump, third(w))[1] for w in (0.3, 0.5, 1.0)], "(1,024 tokens)")
