"""memvisor itself as a LoCoMo benchmark system: the public `Memory` facade, nothing private.

Each conversation goes into a fresh home folder (SQLite + vector index) through `Memory.ingest`;
questions go through `Memory.search` (ranking, for MRR) and `Memory.context` (the packed context
whose text is scored). The conversation handed in is the harness's `system_view` (turns only).
"""
from __future__ import annotations

import shutil
import tempfile
from typing import Callable

from memvisor.bench.common import ContextResult

SEARCH_K = 100


class MemvisorSystem:
    name = "memvisor"

    def __init__(self, count: Callable[[str], int]):
        self._count = count
        self._memory = None
        self._home: str | None = None

    def reset(self) -> None:
        from memvisor import Memory

        self.close()
        self._home = tempfile.mkdtemp(prefix="memvisor-bench-")
        self._memory = Memory(self._home)
        self._memory.embedder.encode(["load the model before the clock starts"])
        self._memory.packer  # noqa: B018 - loads the tokenizer outside the timed ingest
        self._ns = "bench"

    def ingest(self, conversation: dict) -> None:
        from memvisor.text.formats import locomo_conversation

        if self._memory is None:
            self.reset()
        self._memory.ingest(locomo_conversation(conversation, "bench"), namespace=self._ns)

    def search(self, question: str) -> list[str]:
        ids: list[str] = []
        for hit in self._memory.search(question, namespace=self._ns, k=SEARCH_K):
            for s in hit.item.sources:
                if s not in ids:
                    ids.append(s)
        return ids

    def context(self, question: str, budget_tokens: int) -> ContextResult:
        ctx = self._memory.context(question, namespace=self._ns, budget_tokens=budget_tokens)
        return ContextResult(ctx.text, ctx.tokens)

    def close(self) -> None:
        if self._memory is not None:
            self._memory.close()
            self._memory = None
        if self._home:
            shutil.rmtree(self._home, ignore_errors=True)
            self._home = None
