"""Sweep retrieval knobs on the LoCoMo development set (the figures in NOTES.md and retrieve.py come from it).

    python scripts/tune_retrieval.py --data ../shared/data/locomo/locomo-dev.json \
        --retriever '[{"rrf_k": 20}, {"rrf_k": 10}]' --packer '{}' --budgets 1024

`--retriever` and `--packer` take one JSON object of knobs or a list of them; every pair is measured in
one process (a query's embedding is computed once and reused across pairs: the sweep's main cost).
Evidence recall is computed like `memvisor bench locomo` (an evidence turn counts when its text is in the
packed context); the official, side-by-side figures come from that command. Homes are kept under
--homes so a sweep ingests each conversation once (delete them after changing what ingest writes).
"""
from __future__ import annotations

import argparse
import itertools
import json
import re
from pathlib import Path

import numpy as np

from memvisor import Memory
from memvisor.models.embedders import default_embedder
from memvisor.models.tokenizer import default_tokenizer
from memvisor.text.formats import locomo_conversation
from memvisor.text.pack import ContextPacker
from memvisor.text.retrieve import HybridRetriever

_WS = re.compile(r"\s+")


def squash(text: str) -> str:
    return _WS.sub(" ", text).strip()


class CachedEmbedder:
    """The default embedder with a memo per text: sweeps ask the same queries once per configuration."""

    def __init__(self):
        self.inner = default_embedder()
        self.name, self.dim = self.inner.name, self.inner.dim
        self.memo: dict[str, np.ndarray] = {}

    def encode(self, texts: list[str]) -> np.ndarray:
        missing = [t for t in dict.fromkeys(texts) if t not in self.memo]
        if missing:
            self.memo.update(zip(missing, self.inner.encode(missing)))
        return np.stack([self.memo[t] for t in texts])


def knob_list(text: str) -> list[dict]:
    value = json.loads(text)
    return value if isinstance(value, list) else [value]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--retriever", default="{}", help="JSON knobs of HybridRetriever (an object or a list)")
    ap.add_argument("--packer", default="{}", help="JSON knobs of ContextPacker (an object or a list)")
    ap.add_argument("--budgets", default="1024")
    ap.add_argument("--homes", default="/tmp/memvisor-tune")
    args = ap.parse_args()
    budgets = [int(b) for b in args.budgets.split(",")]
    configs = list(itertools.product(knob_list(args.retriever), knob_list(args.packer)))
    embedder = CachedEmbedder()
    recall = {(i, b): {} for i in range(len(configs)) for b in budgets}
    for sample in json.loads(Path(args.data).read_text()):
        # Only the turns reach the system; the harness keeps the questions and evidence.
        conv = locomo_conversation({"sample_id": sample["sample_id"], "conversation": sample["conversation"]})
        turns = {t.source_id: t for t in conv.turns}
        home = Path(args.homes) / conv.id
        if not home.exists():
            with Memory(home, embedder=embedder.inner) as m:
                m.ingest(conv, namespace="tune")
        for i, (r_knobs, p_knobs) in enumerate(configs):
            with Memory(home, embedder=embedder, retriever=HybridRetriever(**r_knobs),
                        packer=ContextPacker(default_tokenizer(), **p_knobs)) as m:
                for q in sample["qa"]:
                    evidence = [e for e in q["evidence"] if e in turns]
                    if not evidence:
                        continue
                    for b in budgets:
                        ctx = squash(m.context(q["question"], namespace="tune", budget_tokens=b).text)
                        hit = sum(squash(turns[e].text) in ctx for e in evidence) / len(evidence)
                        recall[i, b].setdefault(str(q["category"]), []).append(hit)
    for i, (r_knobs, p_knobs) in enumerate(configs):
        for b in budgets:
            scored = [x for c in "1234" for x in recall[i, b].get(c, [])]
            per_cat = " ".join(f"c{c}={sum(v) / len(v):.3f}" for c, v in sorted(recall[i, b].items()))
            print(f"{json.dumps(r_knobs)} {json.dumps(p_knobs)} {b} overall {sum(scored) / len(scored):.3f} {per_cat}")


if __name__ == "__main__":
    main()
