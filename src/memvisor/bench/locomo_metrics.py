"""Evidence recall and MRR, computed by the harness from the context TEXT a system returned.

A system's own citations are never trusted: an evidence turn counts as recalled only if its text
appears in the packed context. Both sides are compared after whitespace is collapsed (systems may
re-wrap lines); nothing else is normalised, so a paraphrase or a truncated turn does not count.
"""
from __future__ import annotations

import functools
import re
from collections import defaultdict

from memvisor.bench.locomo_data import Conversation, Question

_WS = re.compile(r"\s+")
CATEGORIES = ("1", "2", "3", "4", "5")
SCORED = ("1", "2", "3", "4")  # `overall` is the mean over questions of these categories


@functools.lru_cache(maxsize=16)  # `full` hands the same 100 KB text for every question and budget
def squash(text: str) -> str:
    return _WS.sub(" ", text).strip()


def evidence_recall(question: Question, conv: Conversation, context_text: str) -> float | None:
    """Fraction of the question's valid evidence turns whose text is inside `context_text`.

    None when the question has no valid evidence id (it is then left out of the averages and
    counted apart). A turn with empty text (an image-only turn) is found by its caption instead.
    """
    if not question.evidence:
        return None
    ctx = squash(context_text)
    found = 0
    for dia_id in question.evidence:
        turn = conv.turn(dia_id)
        needle = squash(turn.text) or squash(turn.caption)
        if needle and needle in ctx:
            found += 1
    return found / len(question.evidence)


def reciprocal_rank(question: Question, ranked_ids: list[str]) -> float | None:
    """1 / rank of the first evidence turn in a system's ranking (0 when absent); None: no evidence."""
    if not question.evidence:
        return None
    wanted = set(question.evidence)
    for rank, dia_id in enumerate(ranked_ids, start=1):
        if dia_id in wanted:
            return 1.0 / rank
    return 0.0


class RecallTable:
    """Accumulates per-question recall at each budget; reports the issue's per-category shape."""

    def __init__(self, budgets: list[int]):
        self.budgets = budgets
        self._recall: dict[int, dict[str, list[float]]] = {b: defaultdict(list) for b in budgets}
        self._tokens: dict[int, list[int]] = {b: [] for b in budgets}
        self._rr: list[float] = []
        self._rr_cat: dict[str, list[float]] = defaultdict(list)

    def add(self, category: int, budget: int, recall: float | None, tokens: int) -> None:
        self._tokens[budget].append(tokens)
        if recall is not None:
            self._recall[budget][str(category)].append(recall)

    def add_rr(self, category: int, rr: float | None) -> None:
        if rr is not None:
            self._rr_cat[str(category)].append(rr)
            if str(category) in SCORED:
                self._rr.append(rr)

    def recall(self) -> dict[str, dict[str, float | None]]:
        out = {}
        for b in self.budgets:
            per = self._recall[b]
            row: dict[str, float | None] = {}
            scored = [v for c in SCORED for v in per.get(c, [])]
            row["overall"] = _mean(scored)
            for c in CATEGORIES:
                row[c] = _mean(per.get(c, []))
            out[str(b)] = row
        return out

    def mrr(self) -> float | None:
        return _mean(self._rr)

    def mrr_by_category(self) -> dict[str, float | None]:
        return {c: _mean(self._rr_cat.get(c, [])) for c in CATEGORIES}

    def context_tokens(self) -> dict[str, float | None]:
        return {str(b): _mean(self._tokens[b]) for b in self.budgets}


def _mean(xs: list[float]) -> float | None:
    return round(sum(xs) / len(xs), 4) if xs else None
