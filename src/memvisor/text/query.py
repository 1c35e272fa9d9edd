"""Turning untrusted query text into a safe FTS5 expression.

The query is data, never FTS syntax: each word is re-quoted, so operators, column filters or quotes
typed by a user (or injected into a memory) cannot change the query's structure.
"""
from __future__ import annotations

import functools
import re
from collections.abc import Collection
from importlib import resources

_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)?", re.UNICODE)


@functools.lru_cache(maxsize=1)
def stopwords() -> frozenset[str]:
    text = resources.files("memvisor").joinpath("data/stopwords_en.txt").read_text()
    return frozenset(w for line in text.splitlines() if not line.startswith("#") for w in line.split())


def terms(text: str) -> list[str]:
    """Lower-cased content words of `text`, stopwords removed, first occurrence order, no repeats."""
    seen: dict[str, None] = {}
    stop = stopwords()
    for word in _WORD.findall(text.lower()):
        if word in stop or len(word) < 2:
            continue
        word = word.split("'")[0]  # "caroline's" -> "caroline" (the tokenizer would split it anyway)
        if word and word not in stop:
            seen.setdefault(word, None)
    return list(seen)


def fts_match(words: str | list[str], common: Collection[str] = (), conjoin_common: bool = True) -> str | None:
    """An FTS5 MATCH expression over the query's content words (BM25 ranks by how many and how rare).

    `words`: the query text, or its words already from `terms()`. Without `common` the expression is
    `a OR b OR c`: every row holding any word is scored, which at 1M rows means hundreds of thousands
    of BM25 evaluations for words like "visited" or "garden". `common` are the words whose posting
    lists are too long for that (`TermStats.common`); they then only match together:
    `r1 OR r2 OR (c1 AND c2)`; one common word beside rarer ones is left out (`r1 OR r2`). The price,
    measured in BENCHMARKS (scale): a row with a rarer word gets no BM25 credit for a common word unless
    it holds all of them (FTS5 scores the phrases of the branches that matched), and rows holding only
    some common words are not scored; the dense half still finds them. A query of common words only
    keeps their conjunction; a query of one common word alone gets no full-text part (None): scoring
    its whole posting list was the p99 outlier at 100k (43k rows) and grows with the store, and the
    dense half ranks a one-word query by itself. `conjoin_common=False` leaves the common words out
    altogether: for when their conjunction is itself too common ("ines" AND "seville", where Ines lives,
    cost 290 ms at 470k rows; `HybridRetriever` checks with `TermStats.matches_over`). Words in more
    than half of the rows are removed before this (`retrieve.full_text_match`).
    """
    words = terms(words) if isinstance(words, str) else list(words)
    if not words:
        return None
    common_set = set(common)
    parts = [_quote(w) for w in words if w not in common_set]  # the rarer words, each enough to match
    frequent = [_quote(w) for w in words if w in common_set]
    if len(frequent) > 1 and conjoin_common:
        parts.append("(" + " AND ".join(frequent) + ")")
    return " OR ".join(parts) or None


def _quote(word: str) -> str:
    return '"' + word.replace('"', '""') + '"'
