"""Session 12's retrieval probe on the LoCoMo dev set: document-side expansion (doc2query in spirit).
Each turn gets the words a local LM puts next after it under a short prompt ("...\nKeywords:"), weighted
by their next-token probability; a question's words are then matched against those words (weighted BM25)
as a third ranked list in the RRF fusion (weight w, k 10), offline over `scripts/dump_candidates.py`'s
output and scored with `simulate_packing` and the default's knobs (session 11 tried the same on the
query side).

    python scripts/retrieval_probes_s12.py expand [MODEL]   # compute the expansions (cached in /tmp)
    python scripts/retrieval_probes_s12.py score            # the sweep

Reads questions' evidence only to score; the expansions see only the turns.
"""
import json
import math
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import simulate_packing as sp  # noqa: E402
from retrieval_probes_s10 import each_question, report, with_extra  # noqa: E402
from retrieval_probes_s11 import STOP, speakers, words  # noqa: E402

CACHE = Path("/tmp/memvisor-s12-expansions.json")
PROMPTS = {"kw": "{line}\nKeywords:", "topic": "{line}\nTopics:", "cat": "{line}\nCategory:"}
TOP = 60  # next tokens read per prompt


def stem_fn():
    import Stemmer
    s = Stemmer.Stemmer("english")
    return s.stemWord


def expand(name: str = "gemma3"):
    """{model: {prompt: {cid: {rid: {word: probability}}}}} for every turn, written to CACHE."""
    import torch
    from memvisor.kv.models import load_local_model
    torch.set_num_threads(2)
    model, tok = load_local_model(name, dtype=torch.float32, kv_attention=False)
    out = json.loads(CACHE.read_text()) if CACHE.exists() else {}
    out[name] = {p: {} for p in PROMPTS}
    word_start = {}
    t0, n = time.time(), 0
    for cid, cv in sp.D["convs"].items():
        for p in PROMPTS:
            out[name][p][cid] = {}
        for rid, t in cv["turns"].items():
            line = f"{t['speaker']}: {t['text']}"
            for p, prompt in PROMPTS.items():
                with torch.inference_mode():
                    logits = model(**tok(prompt.format(line=line), return_tensors="pt")).logits[0, -1]
                probs = torch.softmax(logits.float(), -1)
                top = torch.topk(probs, TOP)
                kept = {}
                for pr, i in zip(top.values.tolist(), top.indices.tolist()):
                    if i not in word_start:
                        s = tok.decode([i])
                        word_start[i] = s[1:].lower() if s[:1] == " " and s[1:].isalpha() else None
                    w = word_start[i]
                    if w and len(w) > 2 and w not in STOP:
                        kept[w] = kept.get(w, 0.0) + pr
                out[name][p][cid][rid] = kept
            n += 1
            if n % 200 == 0:
                print(f"{n} turns, {(time.time() - t0) / n * 1000:.0f} ms a turn", flush=True)
    CACHE.write_text(json.dumps(out))


def expansion_postings(exp: dict, rids: list, stem, mode: str):
    """{stem: [(turn index, BM25-like term score)]} over the expansion words; mode "prob" weights each word
    by its probability (normalised per turn), "flat" counts each word once."""
    docs = []
    for r in rids:
        e = exp.get(str(r), {})
        total = sum(e.values()) or 1.0
        d = defaultdict(float)
        for w, p in e.items():
            d[stem(w)] += p / total if mode == "prob" else 1.0
        docs.append(d)
    df = defaultdict(int)
    for d in docs:
        for w in d:
            df[w] += 1
    n = len(docs)
    post = defaultdict(list)
    for i, d in enumerate(docs):
        for w, tf in d.items():
            post[w].append((i, math.log(1 + (n - df[w] + 0.5) / (df[w] + 0.5)) * tf))
    return post


def score():
    stem = stem_fn()
    cache = json.loads(CACHE.read_text())
    report("default")
    for model, by_prompt in cache.items():
        for prompts in [(p,) for p in PROMPTS] + [tuple(PROMPTS)]:
            for mode in ("prob", "flat"):
                extra = {}
                posts = {}
                for cid, qi, q, turns in each_question():
                    if cid not in posts:
                        rids = list(turns)
                        merged = {str(r): defaultdict(float) for r in rids}
                        for p in prompts:
                            for r, e in by_prompt[p][cid].items():
                                for w, pr in e.items():
                                    merged[r][w] += pr
                        posts[cid] = (rids, expansion_postings(merged, rids, stem, mode))
                    rids, post = posts[cid]
                    spk = speakers(turns)
                    sc = np.zeros(len(rids))
                    for w in {stem(w) for w in words(q["q"]) if w not in spk}:
                        for i, s in post.get(w, ()):
                            sc[i] += s
                    extra[(cid, qi)] = {rids[i]: r + 1 for r, i in enumerate(np.argsort(-sc)) if sc[i] > 0}
                for w in (0.3, 0.5, 1.0):
                    report(f"{model} {'+'.join(prompts)} {mode} w={w}", with_extra(extra, w))


if __name__ == "__main__":
    if sys.argv[1] == "expand":
        expand(sys.argv[2] if len(sys.argv) > 2 else "gemma3")
    else:
        score()
