"""Evidence recall, MRR and evidence parsing on a hand-made conversation whose answers are known."""
from __future__ import annotations

import json

import pytest
from test_locomo_fixture import conversation

from memvisor.bench.common import ContextResult, format_turn, pack_greedy
from memvisor.bench.locomo_data import load_conversations, parse_conversation, parse_evidence
from memvisor.bench.locomo_metrics import RecallTable, evidence_recall, reciprocal_rank
from memvisor.bench.locomo_run import run_system
from memvisor.errors import InvalidInput, MalformedFile


def words(text: str) -> int:
    """A stand-in token counter for harness-only tests: whitespace words (exact, deterministic)."""
    return len(text.split())


def test_turns_in_session_order_with_captions():
    conv = parse_conversation(conversation())
    assert [t.dia_id for t in conv.turns] == ["D1:1", "D1:2", "D1:3", "D2:1", "D2:2", "D2:3"]
    assert conv.turn("D2:3").caption == "a photo of a red kite"
    assert conv.turn("D1:1").date == "1:56 pm on 8 May, 2023"
    assert format_turn(conv.turn("D2:3")) == \
        "(3:00 pm on 9 May, 2023) Ben: Look at this. [shares a photo of a red kite]"


def test_malformed_evidence_is_counted_and_valid_ids_recovered():
    conv = parse_conversation(conversation())
    q = {x.index: x for x in conv.questions}
    assert q[0].evidence == ("D1:1",) and q[0].malformed == ()
    assert q[2].evidence == ("D2:2", "D1:3") and q[2].malformed == ("D2:2; D1:3",) and q[2].recovered == 2
    assert q[3].evidence == ("D1:3",) and q[3].malformed == ("", "D9:99", "") and q[3].recovered == 0
    assert q[4].evidence == () and q[4].malformed == ()
    assert q[3].answer == "2023"  # integers are cast
    assert parse_evidence("D1:1", {"D1:1"}) == (("D1:1",), (), 0)  # a bare string, not a list


def test_recall_is_the_fraction_of_evidence_text_in_the_context():
    conv = parse_conversation(conversation())
    q1 = conv.questions[1]  # evidence D1:2 and D2:1
    both = format_turn(conv.turn("D1:2")) + "\n" + format_turn(conv.turn("D2:1"))
    assert evidence_recall(q1, conv, both) == 1.0
    assert evidence_recall(q1, conv, format_turn(conv.turn("D2:1"))) == 0.5
    # Re-wrapped whitespace still counts; a truncated or paraphrased turn does not.
    assert evidence_recall(q1, conv, "Nice.  I am\nlearning the violin.") == 0.5
    assert evidence_recall(q1, conv, "Nice. I am learning the") == 0.0
    assert evidence_recall(q1, conv, "Ben plays the violin") == 0.0
    # An image-only turn is found by its caption; no valid evidence gives None (left out).
    assert evidence_recall(conv.questions[4], conv, "anything") is None


def test_mrr_ranks_first_evidence_turn():
    conv = parse_conversation(conversation())
    q1 = conv.questions[1]
    assert reciprocal_rank(q1, ["D1:1", "D2:1", "D1:2"]) == 0.5
    assert reciprocal_rank(q1, ["D1:1"]) == 0.0
    assert reciprocal_rank(conv.questions[4], ["D1:1"]) is None


def test_table_overall_excludes_category_5():
    t = RecallTable([10])
    t.add(1, 10, 1.0, 5)
    t.add(4, 10, 0.0, 7)
    t.add(5, 10, 1.0, 9)
    t.add(3, 10, None, 9)  # no valid evidence: tokens count, recall does not
    r = t.recall()["10"]
    assert r["overall"] == 0.5 and r["1"] == 1.0 and r["4"] == 0.0 and r["5"] == 1.0 and r["3"] is None
    assert t.context_tokens()["10"] == 7.5


def test_pack_greedy_skips_what_does_not_fit_and_keeps_order():
    lines = ["a b c", "d e", "f g h i j", "k"]
    toks = [3, 2, 5, 1]
    text, used = pack_greedy([2, 0, 3, 1], lines, toks, 8, words)
    # 2 (5) + 0 (3+1 newline) = 9 > 8: "a b c" is skipped; "k" fits; "d e" no longer fits.
    assert text == "f g h i j\nk" and used == 6


class Oracle:
    """Returns exactly the evidence turns of the question it is told about (to check the scorer)."""

    name = "oracle"

    def __init__(self, answers: dict[str, list[str]]):
        self.answers = answers

    def ingest(self, view: dict) -> None:
        self.view = view
        self.by_id = {t["dia_id"]: t["text"] for k, s in view["conversation"].items()
                      if k.startswith("session_") and isinstance(s, list) for t in s}

    def search(self, question: str) -> list[str]:
        return self.answers.get(question, [])

    def context(self, question: str, budget_tokens: int) -> ContextResult:
        text = "\n".join(self.by_id[d] for d in self.answers.get(question, []))
        return ContextResult(text, words(text))

    def close(self) -> None:
        pass


def test_run_system_known_recall_and_counts_malformed():
    conv = parse_conversation(conversation())
    system = Oracle({"Where does Ana take pottery classes?": ["D1:1"],       # cat 4: 1.0
                     "What instrument does Ben play?": ["D2:1"],            # cat 1: 0.5, rank 1
                     "What is the name of Ana's dog?": ["D1:1", "D1:3"],    # cat 2: 0.5, rank 2
                     "Where does Clara live?": []})                          # cat 3: 0.0
    out = run_system(system, [conv], [10, 100], count=words)
    e = out["entry"]
    assert e["recall"]["100"]["4"] == 1.0
    assert e["recall"]["100"]["1"] == 0.5
    assert e["recall"]["100"]["2"] == 0.5
    assert e["recall"]["100"]["3"] == 0.0
    assert e["recall"]["100"]["overall"] == pytest.approx((1.0 + 0.5 + 0.5 + 0.0) / 4, abs=1e-4)
    assert e["recall"]["100"]["5"] == 0.0
    assert e["mrr"] == pytest.approx((1 + 1 + 0.5 + 0) / 4, abs=1e-4)
    assert e["malformed_evidence_entries"] == 4
    assert e["evidence_ids_recovered_from_malformed"] == 2
    assert e["questions_without_valid_evidence"] == 1
    assert e["questions"] == 6 and e["turns"] == 6
    assert set(e["search_ms"]) == {"p50", "p95", "p99"}
    assert e["peak_rss_mb"] > 0


def test_loader_errors_are_typed(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(MalformedFile):
        load_conversations(bad)
    good = tmp_path / "good.json"
    good.write_text(json.dumps([conversation()]))
    assert [c.sample_id for c in load_conversations(good)] == ["tiny-1"]
    with pytest.raises(InvalidInput, match="conv-404"):
        load_conversations(good, ["conv-404"])
    with pytest.raises(InvalidInput):
        load_conversations(tmp_path / "missing.json")
