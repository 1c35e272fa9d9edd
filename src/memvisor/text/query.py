"""Turning untrusted query text into a safe FTS5 expression.

The query is data, never FTS syntax: each word is re-quoted, so operators, column filters or quotes
typed by a user (or injected into a memory) cannot change the query's structure.
"""
from __future__ import annotations

import functools
import re
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


def fts_match(text: str) -> str | None:
    """An FTS5 MATCH expression: any of the query's content words (BM25 ranks by how many and how rare)."""
    words = terms(text)
    if not words:
        return None
    return " OR ".join('"' + w.replace('"', '""') + '"' for w in words)
