"""Mem0 peer: the offline Qdrant/bm25 folder, and (where mem0ai is installed) a real hybrid run."""
from __future__ import annotations

import importlib.util

import pytest
from test_locomo_fixture import conversation

from memvisor.bench.locomo_data import parse_conversation, system_view
from memvisor.bench.peers.bm25_files import build_qdrant_bm25_folder


def test_local_bm25_folder_has_nltk_english_stopwords(tmp_path):
    folder = build_qdrant_bm25_folder(tmp_path / "bm25")
    words = (folder / "english.txt").read_text().split("\n")[:-1]
    assert len(words) == 179 and len(set(words)) == 179
    assert {"the", "ourselves", "wouldn't", "ain"} <= set(words)
    assert (folder / "config.json").read_text() == "{}"


def test_missing_mem0_is_a_typed_error():
    if importlib.util.find_spec("mem0") is not None:
        pytest.skip("mem0ai is installed here")
    from memvisor.bench.peers.mem0_peer import Mem0System, Mem0Unavailable

    system = Mem0System(lambda xs: [len(x.split()) for x in xs], lambda x: len(x.split()))
    with pytest.raises(Mem0Unavailable, match="bench-mem0"):
        system.ingest(system_view(parse_conversation(conversation())))


@pytest.mark.slow
def test_mem0_hybrid_search_offline():
    # find_spec, not importorskip: importing mem0 before the peer sets MEM0_TELEMETRY=False
    # would let it phone home.
    if importlib.util.find_spec("mem0") is None or importlib.util.find_spec("fastembed") is None:
        pytest.skip("mem0ai[extras] is not installed (optional extra bench-mem0)")
    from memvisor.bench.peers.mem0_peer import Mem0System
    from memvisor.models.tokenizer import default_tokenizer

    tok = default_tokenizer()
    system = Mem0System(tok.count_many, tok.count, bm25=True)
    system.ingest(system_view(parse_conversation(conversation())))
    store = system._store.memory.vector_store
    hits = store.keyword_search("pottery classes", top_k=3, filters={"user_id": system._user})
    assert hits, "Mem0's BM25 half is not active (it would silently run dense-only)"
    assert hits[0].payload["dia_id"] == "D1:1"
    assert system.search("Where does Ana take pottery classes?")[0] == "D1:1"
    res = system.context("Where does Ana take pottery classes?", 40)
    assert "pottery classes in Lisbon" in res.text and tok.count(res.text) <= 40
    system.close()
