"""Ingest indexes the turns on each side for full text, and embeds the turn with the previous one only."""
from __future__ import annotations

import numpy as np
import pytest

from memvisor.store.filters import Filters
from memvisor.text.formats import locomo_conversation
from memvisor.text.query import fts_match
from tests.conftest import locomo_sample


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    from memvisor import Memory

    with Memory(tmp_path_factory.mktemp("home")) as m:
        m.ingest(locomo_conversation(locomo_sample()), namespace="c26")
        yield m


def _row(m, turn_id):
    return m.store.db.execute("SELECT rid, context, text, speaker FROM items WHERE sources=?",
                              (f'["{turn_id}"]',)).fetchone()


def test_full_text_context_holds_the_previous_and_the_next_turn_of_the_session(ingested):
    assert _row(ingested, "D1:3")["context"] == (
        "Melanie: Hey Caroline! I'm swamped with the kids and work. What's up with you?\n"
        "Melanie: Wow, that's cool, Caroline! What happened that was so awesome?")
    # A session's first turn has no previous one, its last no next one (sessions never leak).
    assert _row(ingested, "D2:1")["context"] == "Caroline: Sounds amazing! Did you see anything special out there?"
    assert _row(ingested, "D1:8")["context"] == (
        "Caroline: I'm thinking of studying psychology and getting a counseling certification.")


def test_a_question_is_found_by_the_words_of_its_answer(ingested):
    """'Which agency did you pick?' (D3:4) shares no word with 'chose LGBTQ+ folks adoption'; the reply does."""
    m = ingested
    hits = m.store.full_text(fts_match("chose folks"), Filters(namespace="c26"), 10)
    assert _row(m, "D3:4")["rid"] in [rid for rid, _ in hits]


def test_the_vector_embeds_the_previous_turn_and_the_turn_not_the_next(ingested):
    m = ingested
    row = _row(m, "D1:3")
    stored = m.store.vectors_of([row["rid"]])[0]
    prev = "Melanie: Hey Caroline! I'm swamped with the kids and work. What's up with you?"
    line = "Caroline: I went to a LGBTQ support group yesterday and it was so powerful."
    expected, with_next = m.embedder.encode([f"{prev}\n{line}", f"{row['context']}\n{line}"])
    assert np.abs(stored - expected).max() < 2e-3  # float16 storage
    assert np.abs(stored - with_next).max() > 1e-2
