"""Run one system over LoCoMo conversations: ingest, ask every question at every budget, score.

The system gets `system_view(conversation)` (turns only) and question texts; the harness keeps the
evidence and answers and scores what comes back. Search and context calls are timed one by one
(query embedding included: systems embed inside those calls and must not cache across them).
"""
from __future__ import annotations

import time
from typing import Callable

from memvisor.bench.common import BenchSystem, current_rss_mb, load_average, peak_rss_mb, percentiles_ms
from memvisor.bench.locomo_data import Conversation, system_view
from memvisor.bench.locomo_metrics import RecallTable, evidence_recall, reciprocal_rank

SYSTEMS = ("memvisor", "bm25", "dense", "recency", "full", "mem0", "mem0-dense")


def make_system(name: str) -> BenchSystem:
    """Build a system by name with the shared tokenizer (and the shared MiniLM where it embeds)."""
    from memvisor.models.tokenizer import default_tokenizer

    tok = default_tokenizer()
    if name == "bm25":
        from memvisor.bench.baselines import BM25System
        return BM25System(tok.count_many, tok.count)
    if name == "dense":
        from memvisor.bench.baselines import DenseSystem
        from memvisor.models.embedders import default_embedder
        return DenseSystem(tok.count_many, tok.count, default_embedder())
    if name == "recency":
        from memvisor.bench.baselines import RecencySystem
        return RecencySystem(tok.count_many, tok.count)
    if name == "full":
        from memvisor.bench.baselines import FullSystem
        return FullSystem(tok.count_many, tok.count)
    if name in ("mem0", "mem0-dense"):
        from memvisor.bench.peers.mem0_peer import Mem0System
        return Mem0System(tok.count_many, tok.count, bm25=(name == "mem0"))
    if name == "memvisor":
        from memvisor.bench.locomo_memvisor import MemvisorSystem
        return MemvisorSystem(tok.count)
    from memvisor.errors import InvalidInput
    raise InvalidInput(f"unknown system {name!r}; choose from {', '.join(SYSTEMS)}")


def run_system(system: BenchSystem, convs: list[Conversation], budgets: list[int], *,
               count: Callable[[str], int], answerer=None, answer_budget: int | None = None,
               on_question: Callable[[], None] | None = None,
               keep_contexts: bool = False) -> dict:
    """Evaluate `system` on `convs`; returns the per-system entry of results.json plus details.

    count: the shared tokenizer's counter (the harness re-counts every context with it).
    answerer: an `answer.Answerer` (OpenAI-compatible endpoint) or None (answering skipped).
    answer_budget: the budget whose context is used to answer (default: the largest <= 1024).
    """
    table = RecallTable(budgets)
    ingest_s = 0.0
    search_s: list[float] = []
    context_s: list[float] = []
    over_budget = 0
    turns = questions = no_evidence = malformed = recovered = 0
    rss_before = current_rss_mb()
    load_start = load_average()
    details: list[dict] = []
    if answerer is not None and answer_budget is None:
        answer_budget = max([b for b in budgets if b <= 1024] or [min(budgets)])
    scores = None
    if answerer is not None:
        from memvisor.bench.answer import AnswerScores
        scores = AnswerScores()
    last_text, last_tokens = "", 0
    for conv in convs:
        view = system_view(conv)
        if hasattr(system, "reset"):
            system.reset()
        t0 = time.perf_counter()
        system.ingest(view)
        ingest_s += time.perf_counter() - t0
        turns += len(conv.turns)
        for q in conv.questions:
            questions += 1
            malformed += len(q.malformed)
            recovered += q.recovered
            if not q.evidence:
                no_evidence += 1
            t0 = time.perf_counter()
            ranked = system.search(q.question)
            search_s.append(time.perf_counter() - t0)
            table.add_rr(q.category, reciprocal_rank(q, ranked))
            row = {"conversation": conv.sample_id, "qa": q.index, "category": q.category,
                   "recall": {}, "tokens": {}}
            answer_ctx = None
            for b in budgets:
                t0 = time.perf_counter()
                res = system.context(q.question, b)
                context_s.append(time.perf_counter() - t0)
                # Never trust a system's own count; the same text twice (full) is counted once.
                if res.text != last_text:
                    last_text, last_tokens = res.text, (count(res.text) if res.text else 0)
                tokens = last_tokens
                if tokens > b and system.name != "full":
                    over_budget += 1
                rec = evidence_recall(q, conv, res.text)
                table.add(q.category, b, rec, tokens)
                row["recall"][str(b)] = rec
                row["tokens"][str(b)] = tokens
                if keep_contexts:
                    row.setdefault("contexts", {})[str(b)] = res.text
                if b == answer_budget:
                    answer_ctx = res.text
            if scores is not None and answer_ctx is not None:
                pred = answerer.answer(q.question, answer_ctx)
                judged = answerer.judge(q.question, q.answer, pred) if answerer.judging else None
                scores.add(q.category, pred, q.answer, judged)
                row["prediction"] = pred
            details.append(row)
            if on_question:
                on_question()
        system.close()
    entry = {
        "recall": table.recall(),
        "mrr": table.mrr(),
        "context_tokens": table.context_tokens(),
        "ingest_seconds": round(ingest_s, 3),
        "search_ms": percentiles_ms(search_s),
        "peak_rss_mb": peak_rss_mb(),
        # Beyond the shape: what the figures above rest on.
        "context_ms": percentiles_ms(context_s),
        "mrr_by_category": table.mrr_by_category(),
        "ingest_turns_per_s": round(turns / ingest_s, 1) if ingest_s > 0 else None,
        "rss_before_ingest_mb": rss_before,
        "turns": turns,
        "questions": questions,
        "questions_without_valid_evidence": no_evidence,
        "malformed_evidence_entries": malformed,
        "evidence_ids_recovered_from_malformed": recovered,
        "contexts_over_budget": over_budget,
        "load_average_start": load_start,
        "load_average_end": load_average(),
    }
    if getattr(system, "config", None):
        entry["config"] = system.config
    if scores is not None:
        entry["answer"] = {"budget": answer_budget, "model": answerer.model, **scores.summary()}
    return {"entry": entry, "details": details}
