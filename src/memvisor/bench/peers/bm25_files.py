"""A local copy of fastembed's `Qdrant/bm25` model files, built offline from installed packages.

fastembed's BM25 "model" is not weights: a `config.json` (empty object) and one stopword list per
language (`english.txt`, one word a line). fastembed downloads them from the model hub at run time,
which is unreachable here, and Mem0 then silently drops to dense-only search. The English list in
that repository is NLTK's 179-word English stopword list; bm25s ships the same 179 words as
`STOPWORDS_EN_PLUS`, so the folder is written from it. Only English is needed (fastembed reads the
file of the configured language; a missing file for other languages means "no stopwords").
"""
from __future__ import annotations

import json
from pathlib import Path

from memvisor.errors import ModelUnavailable

NLTK_ENGLISH_STOPWORDS_COUNT = 179


def english_stopwords() -> list[str]:
    try:
        from bm25s.stopwords import STOPWORDS_EN_PLUS
    except ImportError as e:
        raise ModelUnavailable("building the local Qdrant/bm25 folder needs bm25s "
                               "(pip install 'bm25s>=0.2.10,<0.4')") from e
    words = list(dict.fromkeys(STOPWORDS_EN_PLUS))
    if len(words) != NLTK_ENGLISH_STOPWORDS_COUNT:
        raise ModelUnavailable(f"bm25s's STOPWORDS_EN_PLUS has {len(words)} words, expected NLTK's "
                               f"{NLTK_ENGLISH_STOPWORDS_COUNT}: check the bm25s version")
    return words


def build_qdrant_bm25_folder(folder: str | Path) -> Path:
    """Write `config.json` and `english.txt` into `folder` (idempotent) and return it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({}), encoding="utf-8")
    (folder / "english.txt").write_text("\n".join(english_stopwords()) + "\n", encoding="utf-8")
    return folder
