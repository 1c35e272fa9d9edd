"""The dense half of hybrid retrieval embeds the question without the speakers it names."""
from __future__ import annotations

import pytest

from memvisor.store.filters import Filters
from memvisor.text.retrieve import HybridRetriever, dense_text, vector_search
from tests.conftest import locomo_sample

SPEAKERS = frozenset({"Caroline", "Melanie"})


def test_dense_text_drops_the_speakers_names():
    assert dense_text("What did Melanie paint?", SPEAKERS) == "What did paint?"
    assert dense_text("What is Caroline's identity?", SPEAKERS) == "What is identity?"
    assert dense_text("Did Caroline and Melanie go hiking?", SPEAKERS) == "Did and go hiking?"
    assert dense_text("What did Melanie Smith paint?", frozenset({"Melanie Smith"})) == "What did paint?"
    assert dense_text("Where is the melanie-free zone?", frozenset({"Mel"})) == "Where is the melanie-free zone?"
    assert dense_text("Melanie?", SPEAKERS) == "Melanie?"  # nothing would be left: keep the query


@pytest.fixture(scope="module")
def locomo_memory(tmp_path_factory):
    from memvisor import Memory
    from memvisor.text.formats import locomo_conversation

    with Memory(tmp_path_factory.mktemp("home")) as m:
        m.ingest(locomo_conversation(locomo_sample()), namespace="c26")
        yield m


@pytest.mark.parametrize("query,dense", [
    ("What did Melanie paint?", "What did paint?"),
    # Two people named: both names leave the dense half (no one speaker is favoured by the boost).
    ("Where did Caroline and Melanie plan to hike?", "Where did and plan to hike?"),
    ("Where do people plan to hike?", "Where do people plan to hike?")])
def test_vector_ranks_are_those_of_the_question_without_the_named_speakers(locomo_memory, query, dense):
    m = locomo_memory
    filters = Filters(namespace="c26")
    got = {c.row["rid"]: c.vector_rank for c in HybridRetriever().retrieve(m.store, m.embedder, query, filters, 500)
           if c.vector_rank}
    vec = m.embedder.encode([dense])[0]
    expected = {rid: rank for rank, (rid, _, _) in enumerate(vector_search(m.store, vec, filters, 200), start=1)}
    assert got == expected


def test_the_name_moves_minilm_ranking(locomo_memory):
    """Why the name is dropped at all: with it, MiniLM ranks the turns differently."""
    m = locomo_memory
    filters = Filters(namespace="c26")
    with_name, without = m.embedder.encode(["What did Melanie paint?", "What did paint?"])
    assert ([rid for rid, _, _ in vector_search(m.store, with_name, filters, 10)]
            != [rid for rid, _, _ in vector_search(m.store, without, filters, 10)])
