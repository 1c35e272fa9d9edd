"""Run one LoCoMo system in its own process (so its peak RSS is its own) and write its results as JSON.

Usage (the `memvisor bench locomo` command starts it; Mem0 may run under another Python):
    python -m memvisor.bench.locomo_worker --system bm25 --data FILE --budgets 256,1024 --out part.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--system", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--conversations", default="")
    p.add_argument("--budgets", default="256,512,1024,2048")
    p.add_argument("--out", required=True)
    p.add_argument("--details", default="", help="also write per-question rows (JSON lines) here")
    p.add_argument("--llm-base-url", default=os.environ.get("MEMVISOR_LLM_BASE_URL", ""))
    p.add_argument("--llm-model", default=os.environ.get("MEMVISOR_LLM_MODEL", ""))
    p.add_argument("--llm-judge-model", default="")
    p.add_argument("--answer-budget", type=int, default=0)
    a = p.parse_args(argv)

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from memvisor.bench.locomo_data import load_conversations
    from memvisor.bench.locomo_run import make_system, run_system
    from memvisor.models.tokenizer import default_tokenizer

    ids = [c for c in a.conversations.split(",") if c]
    convs = load_conversations(a.data, ids or None)
    budgets = sorted({int(b) for b in a.budgets.split(",") if b})
    answerer = None
    if a.llm_base_url:
        from memvisor.bench.answer import Answerer
        answerer = Answerer(a.llm_base_url, a.llm_model or "default",
                            api_key=os.environ.get("MEMVISOR_LLM_API_KEY"),
                            judge_model=a.llm_judge_model or None)
    count = default_tokenizer().count
    system = make_system(a.system)
    total = sum(len(c.questions) for c in convs)
    with Progress(TextColumn(f"[bold]{a.system}[/]"), BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), transient=False) as prog:
        task = prog.add_task(a.system, total=total)
        result = run_system(system, convs, budgets, count=count, answerer=answerer,
                            answer_budget=a.answer_budget or None,
                            on_question=lambda: prog.advance(task))
    Path(a.out).write_text(json.dumps(result["entry"], indent=1))
    if a.details:
        with open(a.details, "w") as f:
            for row in result["details"]:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
