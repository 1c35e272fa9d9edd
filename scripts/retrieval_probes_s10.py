"""Session 10's retrieval probes on the LoCoMo dev set, offline over `scripts/dump_candidates.py`'s output
(/tmp/memvisor-cands.json and its homes in /tmp/memvisor-tune4); recall is `simulate_packing`'s, with the
default's knobs (two neighbours a side). None gained at 1,024 tokens (NOTES.md, session 10).

    python scripts/retrieval_probes_s10.py late        # late-chunked vectors as a third RRF list
    python scripts/retrieval_probes_s10.py fusion      # a learned fusion, leave-one-conversation-out
    python scripts/retrieval_probes_s10.py dates       # a prior for turns dated where the question says
    python scripts/retrieval_probes_s10.py neighbours  # question/answer-aware neighbour weights
    python scripts/retrieval_probes_s10.py qlm [CATS]  # SmolLM2 query likelihood over the fused top 80

Reads questions and evidence only to score; the signals never see them.
"""
import datetime as dt
import re
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import simulate_packing as sp  # noqa: E402
from retrieval_offline_signals import ranks, turn_sentences  # noqa: E402

BASE = dict(k=10, wb=1.0, wv=1.0, spk=0.05, nb=2)
BUDGETS = (512, 1024, 2048)


def each_question():
    for cid, cv in sp.D["convs"].items():
        turns = {int(k): v for k, v in cv["turns"].items()}
        for qi, q in enumerate(cv["qs"]):
            yield cid, qi, q, turns


def with_extra(extra: dict, w: float, k: int = 10):
    """A scorer adding w / (k + rank) of a per-question extra ranking {(cid, qi): {rid: rank}}."""
    key = {id(q): (cid, qi) for cid, qi, q, _ in each_question()}

    def score(q, turns, c, cfg):
        r = extra.get(key[id(q)], {}).get(c[0])
        return sp.default_score(q, turns, c, cfg) + (w / (k + r) if r else 0.0)
    return score


def report(name, score=sp.default_score):
    print(name, [round(sp.run(BASE, b, score=score)[0], 4) for b in BUDGETS], sp.run(BASE, 1024, score=score)[1],
          flush=True)


# ---------------------------------------------------------------- late chunking
SENT = re.compile(r"[^.!?]+(?:[.!?]+|$)")


def late_vectors(emb, turns, rids):
    """Pooled spans of each turn's own embedding forward (its previous turn, then "speaker: text", as
    ingest embeds it): its sentences (3+ words) and the turn without the context."""
    import torch
    tok, model = emb._tokenizer, emb._model  # an ad-hoc probe: the embedder's forward, token states kept
    by_pos = {turns[int(r)]["pos"]: int(r) for r in rids}
    sents, owner, alone = [], [], []
    for i, r in enumerate(rids):
        t = turns[int(r)]
        prev = by_pos.get(t["pos"] - 1)
        line = f"{t['speaker']}: {t['text']}"
        same = prev is not None and turns[prev]["session"] == t["session"]
        full = f"{turns[prev]['speaker']}: {turns[prev]['text']}\n{line}" if same else line
        start = len(full) - len(line)
        enc = tok(full, return_offsets_mapping=True, truncation=True, max_length=256, return_tensors="pt")
        offs = enc.pop("offset_mapping")[0].tolist()
        with torch.inference_mode():
            h = model(**enc).last_hidden_state[0].float()

        def pool(a, b):
            idx = [j for j, (s, e) in enumerate(offs) if e > s and s >= a and e <= b]
            return None if not idx else (lambda v: (v / v.norm()).numpy())(h[idx].mean(0))
        v = pool(start, len(full))
        alone.append(v if v is not None else np.zeros(h.shape[-1], np.float32))
        text_start = start + len(t["speaker"]) + 2
        for m in SENT.finditer(t["text"]):
            if len(m.group(0).split()) >= 3 and (v := pool(text_start + m.start(), text_start + m.end())) is not None:
                sents.append(v)
                owner.append(i)
    return np.array(sents), np.array(owner), np.array(alone)


def late():
    from memvisor import Memory
    from memvisor.text.retrieve import dense_text
    lists = {"sentences embedded alone": {}, "late-chunked sentences": {}, "late-chunked turn alone": {}}
    for cid, cv in sp.D["convs"].items():
        m = Memory(Path("/tmp/memvisor-tune4") / cid)
        turns = {int(t): v for t, v in cv["turns"].items()}
        rids = np.array(list(turns))
        S, own, T = late_vectors(m.embedder, turns, rids)
        sep, sep_owner = turn_sentences(turns, rids)
        SS, sep_owner = m.embedder.encode(sep), np.array(sep_owner)
        Q = m.embedder.encode([dense_text(q["q"], [q["named"]]) if q["named"] else q["q"] for q in cv["qs"]])
        m.close()
        for qi in range(len(cv["qs"])):
            for name, (vecs, owners) in {"sentences embedded alone": (SS, sep_owner),
                                         "late-chunked sentences": (S, own)}.items():
                best = np.full(len(rids), -1.0)
                np.maximum.at(best, owners, vecs @ Q[qi])
                lists[name][(cid, qi)] = ranks(best, rids)
            lists["late-chunked turn alone"][(cid, qi)] = ranks(T @ Q[qi], rids)
    report("default")
    for name, extra in lists.items():
        for w in (0.3, 0.5, 1.0):
            report(f"{name}, w {w}", with_extra(extra, w))


# ---------------------------------------------------------------- learned fusion
def fusion():
    """Logistic regression (and gradient boosting) over per-candidate features, trained on two
    conversations' evidence and scored on the third."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def features(q, turns, c, by_pos, fused):
        rid, br, vr, _ = c
        t = turns[rid]
        first = by_pos.get(t["pos"] - 1) is None or turns[by_pos[t["pos"] - 1]]["session"] != t["session"]
        return [1 / (10 + br) if br else 0, 1 / (10 + vr), float(bool(q["named"]) and t["speaker"] == q["named"]),
                np.log(t["cost_ns"]), float("[shares" in t["text"]), float("?" in t["text"][-40:]), float(first),
                max(fused.get(by_pos.get(t["pos"] + d), 0) for d in (-2, -1, 1, 2)), float(bool(q["named"])),
                np.log(1 + (br or 1000)), np.log(vr)]

    def rows(cid, q, turns):
        by_pos = {t["pos"]: r for r, t in turns.items()}
        fused = {c[0]: (1 / (10 + c[1]) if c[1] else 0) + 1 / (10 + c[2]) for c in q["cands"]}
        return [features(q, turns, c, by_pos, fused) for c in q["cands"]]

    cids = list(sp.D["convs"])
    for kind in ("logistic", "boosting"):
        preds = {}
        for held in cids:
            X, y = [], []
            for cid, _qi, q, turns in each_question():
                if cid == held or q["cat"] == 5:
                    continue
                src = {t["src"]: r for r, t in turns.items()}
                ev = {src[e] for e in q["ev"] if e in src}
                X += rows(cid, q, turns)
                y += [c[0] in ev for c in q["cands"]]
            model = (make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)) if kind == "logistic" else
                     HistGradientBoostingClassifier(max_iter=200, learning_rate=0.05, max_leaf_nodes=15,
                                                    min_samples_leaf=50))
            model.fit(np.array(X), np.array(y))
            for cid, qi, q, turns in each_question():
                if cid == held:
                    p = model.predict_proba(np.array(rows(cid, q, turns)))[:, 1]
                    preds[id(q)] = {c[0]: float(s) for c, s in zip(q["cands"], p)}
        report("default")
        report(f"learned fusion ({kind}, held-out conversation)", lambda q, t, c, cfg: preds[id(q)][c[0]])


# ---------------------------------------------------------------- a date prior
MONTHS = "january february march april may june july august september october november december".split()
MR = "|".join(MONTHS)


def date_window(question: str):
    """The days a question names: "30 August, 2023" / "August 30, 2023" -> that day +-1; "September 2023" -> the month."""
    s = question.lower()
    if m := re.search(rf"\b(\d{{1,2}})(?:st|nd|rd|th)?\s+({MR}),?\s+(\d{{4}})", s):
        d = dt.date(int(m[3]), MONTHS.index(m[2]) + 1, int(m[1]))
    elif m := re.search(rf"\b({MR})\s+(\d{{1,2}}),?\s+(\d{{4}})", s):
        d = dt.date(int(m[3]), MONTHS.index(m[1]) + 1, int(m[2]))
    elif m := re.search(rf"\b({MR}),?\s+(\d{{4}})", s):
        a = dt.date(int(m[2]), MONTHS.index(m[1]) + 1, 1)
        return a, (a + dt.timedelta(days=32)).replace(day=1) - dt.timedelta(days=1)
    else:
        return None
    return d - dt.timedelta(days=1), d + dt.timedelta(days=1)


def dates():
    def prior(w, slack):
        def score(q, turns, c, cfg):
            s = sp.default_score(q, turns, c, cfg)
            win, t = date_window(q["q"]), turns[c[0]]["time"]
            if win and t and win[0] - dt.timedelta(days=slack) <= dt.date.fromisoformat(t[:10]) <= win[1] + dt.timedelta(days=slack):
                s += w
            return s
        return score
    print("questions naming a date:", sum(1 for *_, q, _t in each_question() if date_window(q["q"])))
    report("default")
    for w in (0.02, 0.05, 0.1):
        for slack in (0, 7):
            report(f"date prior {w}, +-{slack} days", prior(w, slack))


# ---------------------------------------------------------------- neighbour weights
def neighbours():
    """The hit's next turn when the hit asks a question, its previous turn when that one asks, weighted apart."""
    def asks(t):
        return "?" in t["text"][-40:]

    def run(weight, budget, cats="1234"):
        rec = defaultdict(list)
        for _cid, _qi, q, turns in each_question():
            if str(q["cat"]) not in cats:
                continue
            by_pos = {t["pos"]: r for r, t in turns.items()}
            src = {t["src"]: r for r, t in turns.items()}
            ev = [src[e] for e in q["ev"] if e in src]
            if not ev:
                continue
            scored = sorted(((sp.default_score(q, turns, c, BASE), c[0]) for c in q["cands"]), reverse=True)[:128]
            sc = {rid: s for s, rid in scored}
            for s, rid in scored[:30]:
                for d in (-2, -1, 1, 2):
                    o = by_pos.get(turns[rid]["pos"] + d)
                    if o is not None and sc.get(o, -1) < s * weight(turns, rid, o, d):
                        sc[o] = s * weight(turns, rid, o, d)
            chosen = sp.pack(sorted(sc, key=lambda r: -sc[r]), turns, budget)
            rec[str(q["cat"])].append(sum(r in chosen for r in ev) / len(ev))
        return round(float(np.mean([x for c in cats for x in rec[c]])), 4)

    print("default", [run(lambda *a: 0.5, b) for b in BUDGETS])
    for answer, question, other in [(0.7, 0.7, 0.4), (0.6, 0.6, 0.45), (0.8, 0.6, 0.5), (0.7, 0.5, 0.5)]:
        def weight(T, h, o, d, a=answer, qn=question, x=other):
            return a if d == 1 and asks(T[h]) else qn if d == -1 and asks(T[o]) else x
        print(f"answer {answer} / question {question} / other {other}", [run(weight, b) for b in BUDGETS])


# ---------------------------------------------------------------- query likelihood with SmolLM2
def qlm(cats="13", top=80):
    """log P(question | "speaker: turn") under SmolLM2-135M-Instruct (bf16, 2 threads), as a third RRF list
    over the fused top ``top`` (about 7 s a question on 2 cores)."""
    import torch
    from memvisor.kv.models import load_local_model
    torch.set_num_threads(2)
    model, tok = load_local_model("smollm2", torch.bfloat16, kv_attention=False)

    @torch.inference_mode()
    def loglik(question, lines, bs=16):
        q_ids = tok(question, add_special_tokens=False)["input_ids"]
        out = []
        for i in range(0, len(lines), bs):
            seqs = [tok(f"<|im_start|>user\nA line from a chat between friends:\n{s}: {t}\nAsk a question that "
                        f"this line answers.<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
                    ["input_ids"][-200:] + q_ids for s, t in lines[i:i + bs]]
            L = max(map(len, seqs))
            ids = torch.full((len(seqs), L), tok.pad_token_id or 0)
            att = torch.zeros_like(ids)
            for j, s in enumerate(seqs):  # left-padded
                ids[j, L - len(s):], att[j, L - len(s):] = torch.tensor(s), 1
            lp = torch.log_softmax(model(input_ids=ids, attention_mask=att).logits[:, -len(q_ids) - 1:-1].float(), -1)
            out += lp.gather(-1, torch.tensor(q_ids).expand(len(seqs), -1).unsqueeze(-1)).squeeze(-1).sum(-1).tolist()
        return out

    extra = {}
    for cid, qi, q, turns in each_question():
        if str(q["cat"]) in cats:
            top_rids = [r for _, r in sorted(((sp.default_score(q, turns, c, BASE), c[0]) for c in q["cands"]),
                                             reverse=True)[:top]]
            ll = loglik(q["q"], [(turns[r]["speaker"], turns[r]["text"]) for r in top_rids])
            order = sorted(zip(ll, top_rids), reverse=True)
            extra[(cid, qi)] = {r: i + 1 for i, (_, r) in enumerate(order)}
    print("categories", cats, "default", sp.run(BASE, 1024, cats=cats))
    for w in (0.5, 1.0, 2.0):
        for k in (10, 30):
            print(f"w {w} k {k}", sp.run(BASE, 1024, score=with_extra(extra, w, k), cats=cats))


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "late"
    {"late": late, "fusion": fusion, "dates": dates, "neighbours": neighbours,
     "qlm": lambda: qlm(*(sys.argv[2:3] or ["13"]))}[what]()
