"""Session 11's retrieval probes on the LoCoMo dev set, offline over `scripts/dump_candidates.py`'s output
(/tmp/memvisor-cands.json and its homes in /tmp/memvisor-tune4), scored with `simulate_packing` and the
default's knobs. Each adds a third ranked list to the RRF fusion (weight w, k 10). None gained at 1,024
tokens (NOTES.md, session 11).

    python scripts/retrieval_probes_s11.py words     # query words expanded to the namespace's vocabulary
                                                     # by MiniLM word similarity, weighted BM25
    python scripts/retrieval_probes_s11.py adapter   # a linear query adapter trained on the other two
                                                     # conversations' evidence (leave-one-conversation-out)
    python scripts/retrieval_probes_s11.py lm        # expansion terms from a local LM's next-token
                                                     # distribution (Gemma 3 270M, SmolLM2), weighted BM25
    python scripts/retrieval_probes_s11.py bound     # the most the rendering can cost: no session
                                                     # headers and no speaker names (no third list)

Reads questions' evidence only to score and (adapter) to train on the other conversations.
"""
import math
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import simulate_packing as sp  # noqa: E402
from retrieval_probes_s10 import BASE, BUDGETS, each_question, report, with_extra  # noqa: E402
from memvisor.text.query import stopwords  # noqa: E402

WORD = re.compile(r"[a-z]+")
STOP = set(stopwords())


def words(text: str) -> list[str]:
    return [w for w in WORD.findall(text.lower()) if w not in STOP and len(w) > 2]


def bm25_postings(turns: dict) -> tuple[list[int], dict]:
    """Per namespace: turn ids and {word: [(turn index, BM25 term score)]} over the turns' own words."""
    rids = list(turns)
    docs = [Counter(words(turns[r]["text"])) for r in rids]
    df = Counter(w for d in docs for w in d)
    n, avg = len(docs), sum(sum(d.values()) for d in docs) / len(docs)
    post = defaultdict(list)
    for i, d in enumerate(docs):
        length = sum(d.values())
        for w, tf in d.items():
            idf = math.log(1 + (n - df[w] + 0.5) / (df[w] + 0.5))
            post[w].append((i, idf * tf * 2.2 / (tf + 1.2 * (0.25 + 0.75 * length / avg))))
    return rids, post


def weighted_ranks(weights: dict, rids: list[int], post: dict) -> dict:
    score = np.zeros(len(rids))
    for w, wt in weights.items():
        for i, s in post.get(w, ()):
            score[i] += wt * s
    return {rids[i]: r + 1 for r, i in enumerate(np.argsort(-score)) if score[i] > 0}


def speakers(turns: dict) -> set[str]:
    return {t["speaker"].lower() for t in turns.values()}


def sweep(name: str, extra: dict):
    for w in (0.3, 0.5, 1.0):
        report(f"{name} w={w}", with_extra(extra, w))


# ---------------------------------------------------------------- MiniLM word expansion
def words_probe():
    from memvisor.models.embedders import default_embedder
    emb = default_embedder()
    report("default")
    per_conv = {}
    for cid, cv in sp.D["convs"].items():
        turns = {int(k): v for k, v in cv["turns"].items()}
        rids, post = bm25_postings(turns)
        vocab = sorted(post)
        per_conv[cid] = (rids, post, vocab, emb.encode(vocab), speakers(turns))
    for topk, floor, self_w in [(10, 0.5, 1.0), (20, 0.45, 1.0), (20, 0.45, 0.0), (10, 0.55, 0.0)]:
        extra = {}
        for cid, qi, q, _ in each_question():
            rids, post, vocab, V, spk = per_conv[cid]
            qw = [w for w in words(q["q"]) if w not in spk]
            weights = defaultdict(float)
            for w, v in zip(qw, emb.encode(qw) if qw else []):
                sim = V @ v
                for i in np.argsort(-sim)[:topk]:
                    if sim[i] < floor:
                        break
                    weights[vocab[i]] = max(weights[vocab[i]], self_w if vocab[i] == w else float(sim[i]))
            extra[(cid, qi)] = weighted_ranks(weights, rids, post)
        sweep(f"words top {topk} floor {floor} self {self_w}", extra)


# ---------------------------------------------------------------- linear query adapter, LOCO
def adapter_probe():
    import torch
    from memvisor import Memory
    from memvisor.text.retrieve import dense_text, speakers_named, terms
    data = {}
    for cid, cv in sp.D["convs"].items():
        m = Memory(Path("/tmp/memvisor-tune4") / cid)
        turns = {int(t): v for t, v in cv["turns"].items()}
        rids = np.array(list(turns))
        names = m.store.speakers("tune")
        queries = [dense_text(q["q"], speakers_named(terms(q["q"]), names)) for q in cv["qs"]]
        src = {turns[int(r)]["src"]: i for i, r in enumerate(rids)}
        evidence = [[src[e] for e in q["ev"] if e in src] for q in cv["qs"]]
        data[cid] = (rids, m.store.vectors_of(rids.tolist()).astype(np.float32),
                     m.embedder.encode(queries).astype(np.float32), evidence)
        m.close()

    def train(cids, epochs, lr, decay, tau):
        """q' = norm(q + q A), A [384, 384] from zero; listwise softmax over the conversation's turns."""
        a = torch.zeros(384, 384, requires_grad=True)
        opt = torch.optim.Adam([a], lr=lr)
        sets = [(torch.tensor(data[c][1]), torch.tensor(data[c][2]), data[c][3]) for c in cids]
        count = sum(1 for _, _, ev in sets for p in ev if p)
        for _ in range(epochs):
            opt.zero_grad()
            loss = decay * (a ** 2).sum()
            for V, Q, ev in sets:
                q = Q + Q @ a
                logits = (q / q.norm(dim=1, keepdim=True)) @ V.T / tau
                lse = torch.logsumexp(logits, 1)
                loss = loss + sum((lse[i] - logits[i, p]).mean() for i, p in enumerate(ev) if p) / count
            loss.backward()
            opt.step()
        return a.detach().numpy()

    def dense_ranks(adapters):
        extra = {}
        for cid, qi, q, _ in each_question():
            rids, V, Q, _ = data[cid]
            v = Q[qi] + Q[qi] @ adapters[cid] if cid in adapters else Q[qi]
            extra[(cid, qi)] = {int(rids[i]): r + 1 for r, i in enumerate(np.argsort(-(V @ v)))}
        return extra

    def replace_dense(extra):
        """The default score with the dense rank taken from `extra` instead of the dump."""
        key = {id(q): (cid, qi) for cid, qi, q, _ in each_question()}

        def score(q, turns, c, cfg):
            return sp.default_score(q, turns, [c[0], c[1], extra[key[id(q)]][c[0]], c[3]], cfg)
        return score

    report("default (dense recomputed)", replace_dense(dense_ranks({})))
    cids = list(data)
    for epochs, lr, decay, tau in [(100, 1e-3, 1e-2, 0.05), (200, 1e-3, 1e-3, 0.05), (300, 1e-3, 1e-1, 0.05),
                                   (200, 3e-3, 1e-2, 0.1)]:
        adapters = {c: train([o for o in cids if o != c], epochs, lr, decay, tau) for c in cids}
        report(f"adapter LOCO epochs {epochs} lr {lr} decay {decay} tau {tau}", replace_dense(dense_ranks(adapters)))


# ---------------------------------------------------------------- LM next-token expansion
PROMPTS = {"qa": "Question: {q}\nAnswer:", "kw": "{q}\nKeywords:"}


def lm_probe():
    import torch
    from memvisor.kv.models import load_local_model
    torch.set_num_threads(2)
    probs = {}  # (model, prompt, cid, qi) -> probability of each vocabulary word's first token
    vocab = {}
    for name in ("gemma3", "smollm2"):
        model, tok = load_local_model(name, dtype=torch.float32, kv_attention=False)
        for cid, cv in sp.D["convs"].items():
            turns = {int(k): v for k, v in cv["turns"].items()}
            vocab[cid] = sorted(bm25_postings(turns)[1])
            first = torch.tensor([tok(" " + w, add_special_tokens=False)["input_ids"][0] for w in vocab[cid]])
            for qi, q in enumerate(cv["qs"]):
                for pn, prompt in PROMPTS.items():
                    with torch.inference_mode():
                        logits = model(**tok(prompt.format(q=q["q"]), return_tensors="pt")).logits[0, -1]
                    probs[(name, pn, cid, qi)] = torch.softmax(logits.float(), -1)[first].numpy()
    report("default")
    postings = {cid: bm25_postings({int(k): v for k, v in cv["turns"].items()}) for cid, cv in sp.D["convs"].items()}
    for models in (("gemma3",), ("smollm2",), ("gemma3", "smollm2")):
        for prompts in (("qa",), ("kw",), ("qa", "kw")):
            for topk in (10, 30):
                extra = {}
                for cid, qi, q, turns in each_question():
                    p = sum(probs[(m, pn, cid, qi)] for m in models for pn in prompts)
                    spk = speakers(turns)
                    top = [i for i in np.argsort(-p) if vocab[cid][i] not in spk][:topk]
                    total = sum(p[i] for i in top)
                    rids, post = postings[cid]
                    extra[(cid, qi)] = weighted_ranks({vocab[cid][i]: p[i] / total for i in top}, rids, post)
                sweep(f"lm {'+'.join(models)} {'+'.join(prompts)} top {topk}", extra)


# ---------------------------------------------------------------- rendering bound
def bound_probe():
    report("default")
    sp.HEADER = 0
    report("no session headers")
    for cv in sp.D["convs"].values():
        for t in cv["turns"].values():
            t["cost"] = t["cost_ns"]
    report("no session headers, no speaker names")


if __name__ == "__main__":
    probes = {"words": words_probe, "adapter": adapter_probe, "lm": lm_probe, "bound": bound_probe}
    probes[sys.argv[1] if len(sys.argv) > 1 else "words"]()
