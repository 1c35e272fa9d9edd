"""Sweep retrieval knobs on the LoCoMo development set (the figures in NOTES.md and retrieve.py come from it).

    python scripts/tune_retrieval.py --data ../shared/data/locomo/locomo-dev.json \
        --retriever '{"rrf_k": 20, "speaker_weight": 0.03}' --packer '{}' --budgets 1024

Evidence recall is computed like `memvisor bench locomo` (an evidence turn counts when its text is in the
packed context); the official, side-by-side figures come from that command. Homes are kept under
--homes so a sweep ingests each conversation once (delete them after changing what ingest writes).
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from memvisor import Memory
from memvisor.models.tokenizer import default_tokenizer
from memvisor.text.formats import locomo_conversation
from memvisor.text.pack import ContextPacker
from memvisor.text.retrieve import HybridRetriever

_WS = re.compile(r"\s+")


def squash(text: str) -> str:
    return _WS.sub(" ", text).strip()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--retriever", default="{}", help="JSON knobs of HybridRetriever")
    ap.add_argument("--packer", default="{}", help="JSON knobs of ContextPacker")
    ap.add_argument("--budgets", default="1024")
    ap.add_argument("--homes", default="/tmp/memvisor-tune")
    args = ap.parse_args()
    budgets = [int(b) for b in args.budgets.split(",")]
    recall: dict[int, dict[str, list[float]]] = {b: {} for b in budgets}
    for sample in json.loads(Path(args.data).read_text()):
        # Only the turns reach the system; the harness keeps the questions and evidence.
        conv = locomo_conversation({"sample_id": sample["sample_id"], "conversation": sample["conversation"]})
        turns = {t.source_id: t for t in conv.turns}
        home = Path(args.homes) / conv.id
        fresh = not home.exists()
        with Memory(home, retriever=HybridRetriever(**json.loads(args.retriever)),
                    packer=ContextPacker(default_tokenizer(), **json.loads(args.packer))) as m:
            if fresh:
                m.ingest(conv, namespace="tune")
            for q in sample["qa"]:
                evidence = [e for e in q["evidence"] if e in turns]
                if not evidence:
                    continue
                for b in budgets:
                    ctx = squash(m.context(q["question"], namespace="tune", budget_tokens=b).text)
                    hit = sum(squash(turns[e].text) in ctx for e in evidence) / len(evidence)
                    recall[b].setdefault(str(q["category"]), []).append(hit)
    for b in budgets:
        scored = [x for c in "1234" for x in recall[b].get(c, [])]
        per_cat = " ".join(f"c{c}={sum(v) / len(v):.3f}" for c, v in sorted(recall[b].items()))
        print(f"{b} overall {sum(scored) / len(scored):.3f} {per_cat}")


if __name__ == "__main__":
    main()
