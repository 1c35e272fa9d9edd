"""Offline re-scoring, neighbour expansion and greedy packing over `scripts/dump_candidates.py`'s output:
an approximation of `Memory.context` (it gave 0.860 where the real system gives 0.866 at 1,024 tokens)
for sweeping knobs in seconds. `run(cfg, budget)` -> (overall recall, per category); cfg keys: k (rrf_k),
wb, wv (weights), spk (speaker weight), limit, expand, nb / nb_before / nb_after (neighbours), decay,
dist_decay, same_session. The session-4 table in NOTES.md is `run` over the knobs it lists.

    python scripts/simulate_packing.py   # the default knobs at 256-2,048 tokens
"""
import json
from collections import defaultdict

D = json.load(open("/tmp/memvisor-cands.json"))
HEADER = 8

def default_score(q, turns, c, cfg):
    rid, br, vr, sim = c
    s = (1 / (cfg["k"] + br) if br else 0) * cfg["wb"] + (1 / (cfg["k"] + vr) if vr else 0) * cfg["wv"]
    if q["named"] and turns[rid]["speaker"] == q["named"]:
        s += cfg["spk"]
    return s

def run(cfg, budget=1024, score=default_score, cats="1234", verbose=False, per_question=None):
    """``per_question``: a dict that receives {(conversation id, question index): (category, recall)}."""
    rec = defaultdict(list)
    for cid, cv in D["convs"].items():
        turns = {int(k): v for k, v in cv["turns"].items()}
        by_pos = {t["pos"]: rid for rid, t in turns.items()}
        src2rid = {t["src"]: rid for rid, t in turns.items()}
        for qi, q in enumerate(cv["qs"]):
            if str(q["cat"]) not in cats and str(q["cat"]) != "5":
                continue
            ev = [src2rid[e] for e in q["ev"] if e in src2rid]
            if not ev:
                continue
            scored = sorted(((score(q, turns, c, cfg), c[0]) for c in q["cands"]), reverse=True)[:cfg.get("limit", 128)]
            sc = {rid: s for s, rid in scored}
            for s, rid in scored[:cfg.get("expand", 30)]:
                p = turns[rid]["pos"]
                for d in range(-cfg.get("nb_before", cfg.get("nb", 1)), cfg.get("nb_after", cfg.get("nb", 1)) + 1):
                    o = by_pos.get(p + d)
                    if o is None or o == rid:
                        continue
                    if cfg.get("same_session") and turns[o]["session"] != turns[rid]["session"]:
                        continue
                    ns = s * cfg.get("decay", 0.5) * cfg.get("dist_decay", 1.0) ** (abs(d) - 1)
                    if sc.get(o, -1) < ns:
                        sc[o] = ns
            order = sorted(sc, key=lambda r: -sc[r])
            chosen = pack(order, turns, budget)
            hit = sum(r in chosen for r in ev) / len(ev)
            rec[str(q["cat"])].append(hit)
            if per_question is not None:
                per_question[(cid, qi)] = (str(q["cat"]), hit)
    ov = [x for c in cats for x in rec[c]]
    return sum(ov) / len(ov), {c: round(sum(v) / len(v), 3) for c, v in sorted(rec.items())}

def rendered_cost(chosen, turns):
    tot, last_sess, last_spk = 0, None, None
    for rid in sorted(chosen, key=lambda r: turns[r]["pos"]):
        t = turns[rid]
        if t["session"] != last_sess:
            tot += HEADER; last_sess, last_spk = t["session"], None
        tot += t["cost"] if t["speaker"] != last_spk else t["cost_ns"]
        last_spk = t["speaker"]
    return tot

def pack(order, turns, budget, rounds=4):
    chosen, sessions, used = set(), set(), 0
    for _ in range(rounds):
        added = False
        for rid in order:
            if rid in chosen:
                continue
            t = turns[rid]
            cost = t["cost"] + (0 if t["session"] in sessions else HEADER)
            if used + cost > budget:
                continue
            chosen.add(rid); sessions.add(t["session"]); used += cost; added = True
        used = rendered_cost(chosen, turns)
        if not added:
            break
    return chosen

if __name__ == "__main__":
    base = dict(k=10, wb=1.0, wv=1.0, spk=0.05)
    for b in (256, 512, 1024, 2048):
        print(b, run(base, b))
