"""Baselines over raw turns, each packed greedily with the same turn formatting (`format_turn`).

- bm25: bm25s (Lucene BM25, k1 1.5, b 0.75) with PyStemmer's English Snowball stemmer and
  bm25s's English stopword list;
- dense: cosine similarity of the shared MiniLM embeddings (the embedder memvisor and Mem0 use);
- recency: the most recent turns that fit (the last B tokens);
- full: the whole conversation whatever the budget (recall 1 at its full size: shows the cost).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from memvisor.bench.common import ContextResult, format_turn, pack_greedy
from memvisor.bench.locomo_data import Turn, parse_turns
from memvisor.errors import ModelUnavailable


class TurnSystem:
    """Shared part: parse the turns handed over, format and count them once."""

    name = "turns"

    def __init__(self, count_many: Callable[[list[str]], list[int]], count: Callable[[str], int]):
        self._count_many = count_many
        self._count = count
        self.turns: list[Turn] = []

    def reset(self) -> None:
        self.turns = []

    def ingest(self, conversation: dict) -> None:
        self.turns = parse_turns(conversation)
        self.lines = [format_turn(t) for t in self.turns]
        self.line_tokens = self._count_many(self.lines)
        self._build()

    def _build(self) -> None:
        pass

    def rank(self, question: str) -> list[int]:
        raise NotImplementedError

    def search(self, question: str) -> list[str]:
        return [self.turns[i].dia_id for i in self.rank(question)]

    def context(self, question: str, budget_tokens: int) -> ContextResult:
        order = self.rank(question)
        text, tokens = pack_greedy(order, self.lines, self.line_tokens, budget_tokens, self._count)
        return ContextResult(text, tokens)

    def close(self) -> None:
        self.turns = []


class BM25System(TurnSystem):
    name = "bm25"

    def _build(self) -> None:
        try:
            import bm25s
            import Stemmer
        except ImportError as e:
            raise ModelUnavailable("the bm25 baseline needs bm25s and PyStemmer: "
                                   "pip install 'bm25s>=0.2.10,<0.4' 'PyStemmer>=2.2,<4'") from e
        self._tokenizer = bm25s.tokenization.Tokenizer(
            stopwords="en", stemmer=Stemmer.Stemmer("english").stemWord)
        corpus = self._tokenizer.tokenize([t.index_text for t in self.turns], update_vocab=True,
                                          return_as="string", show_progress=False)
        self._index = bm25s.BM25()  # method "lucene", k1 1.5, b 0.75
        self._index.index(corpus, show_progress=False)
        self._vocab = set(self._index.vocab_dict)

    def rank(self, question: str) -> list[int]:
        n = len(self.turns)
        words = self._tokenizer.tokenize([question], update_vocab=False, return_as="string",
                                         show_progress=False)[0]
        words = [w for w in words if w and w in self._vocab]
        ranked: list[int] = []
        if words:  # else every query word is a stopword or unseen: no keyword signal at all
            docs, scores = self._index.retrieve([words], k=n, show_progress=False, n_threads=1)
            ranked = [int(d) for d, s in zip(docs[0], scores[0]) if s > 0]
        seen = set(ranked)
        # Turns with no shared word follow, most recent first (a tie-break, not a signal).
        ranked.extend(i for i in range(n - 1, -1, -1) if i not in seen)
        return ranked


class DenseSystem(TurnSystem):
    name = "dense"

    def __init__(self, count_many, count, embedder):
        super().__init__(count_many, count)
        self._embedder = embedder

    def reset(self) -> None:
        super().reset()
        self._embedder.encode(["load the model before the clock starts"])

    def _build(self) -> None:
        self._vectors = self._embedder.encode([t.index_text for t in self.turns])  # [n, 384]

    def rank(self, question: str) -> list[int]:
        q = self._embedder.encode([question])[0]  # [384], unit norm
        scores = self._vectors @ q
        return [int(i) for i in np.argsort(-scores, kind="stable")]


class RecencySystem(TurnSystem):
    name = "recency"

    def rank(self, question: str) -> list[int]:
        return list(range(len(self.turns) - 1, -1, -1))

    def context(self, question: str, budget_tokens: int) -> ContextResult:
        # The last B tokens: newest turns back to the first one that does not fit (no skipping).
        order = []
        used = 0
        for i in self.rank(question):
            cost = self.line_tokens[i] + (1 if order else 0)
            if used + cost > budget_tokens:
                break
            order.append(i)
            used += cost
        text, tokens = pack_greedy(order, self.lines, self.line_tokens, budget_tokens, self._count)
        return ContextResult(text, tokens)


class FullSystem(TurnSystem):
    name = "full"

    def _build(self) -> None:
        self._text = "\n".join(self.lines)
        self._tokens = self._count(self._text)

    def rank(self, question: str) -> list[int]:
        return list(range(len(self.turns)))  # conversation order: it ranks nothing

    def context(self, question: str, budget_tokens: int) -> ContextResult:
        return ContextResult(self._text, self._tokens)
