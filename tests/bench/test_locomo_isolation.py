"""Systems see only turns and question texts; baselines and the whole command work end to end."""
from __future__ import annotations

import json

import pytest
import typer
from test_locomo_fixture import CANARY, conversation
from typer.testing import CliRunner

from memvisor.bench.common import ContextResult
from memvisor.bench.locomo_data import FORBIDDEN_KEYS, find_forbidden, parse_conversation, system_view
from memvisor.bench.locomo_run import make_system, run_system
from memvisor.models.tokenizer import default_tokenizer


class Spy:
    """Records everything the harness hands a system."""

    name = "spy"

    def __init__(self):
        self.seen: list = []

    def ingest(self, view: dict) -> None:
        self.seen.append(view)

    def search(self, question: str) -> list[str]:
        self.seen.append(question)
        return []

    def context(self, question: str, budget_tokens: int) -> ContextResult:
        self.seen.append(question)
        return ContextResult("", 0)

    def close(self) -> None:
        pass


def test_system_view_has_turns_only():
    raw = conversation()
    assert find_forbidden(raw)  # the fixture does plant them
    view = system_view(parse_conversation(raw))
    assert find_forbidden(view) == []
    assert set(view) == {"sample_id", "conversation"}
    assert CANARY not in json.dumps(view)
    assert view["conversation"]["session_2"][2]["blip_caption"] == "a photo of a red kite"


def test_harness_never_hands_forbidden_keys_or_answers():
    spy = Spy()
    run_system(spy, [parse_conversation(conversation())], [32], count=lambda t: len(t.split()))
    dumped = json.dumps(spy.seen)
    assert CANARY not in dumped
    assert "Lisbon" not in [s for s in spy.seen if isinstance(s, str)]  # answers never asked
    for obj in spy.seen:
        assert find_forbidden(obj) == [], f"forbidden keys {FORBIDDEN_KEYS} reached the system"
    assert "Where does Ana take pottery classes?" in spy.seen


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer()


@pytest.mark.parametrize("name", ["bm25", "recency", "full"])
def test_baselines_on_known_conversation(name, tok):
    conv = parse_conversation(conversation())
    system = make_system(name)
    system.ingest(system_view(conv))
    res = system.context("Where does Ana take pottery classes?", 40)
    if name == "full":
        assert "pottery classes in Lisbon" in res.text and res.tokens > 40
    else:
        assert 0 < tok.count(res.text) <= 40
    if name == "bm25":
        # "pottery" and "classes" occur in D1:1 only: ranked first and packed.
        assert system.search("Where does Ana take pottery classes?")[0] == "D1:1"
        assert "pottery classes in Lisbon" in res.text
        assert system.search("the of and")  # stopwords only: still a ranking, no crash
    if name == "recency":
        assert "red kite" in res.text and "pottery" not in res.text
    system.close()


def test_command_writes_results_in_the_issue_shape(tmp_path):
    from memvisor.bench.locomo import register

    data = tmp_path / "tiny.json"
    data.write_text(json.dumps([conversation()]))
    app, bench = typer.Typer(), typer.Typer()
    app.add_typer(bench, name="bench")
    register(bench)
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["bench", "locomo", "--data", str(data), "--budgets", "16,64",
                                 "--systems", "bm25,recency,full", "--out", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    assert set(res["dataset"]) >= {"sha256", "conversations", "questions"}
    assert res["dataset"]["questions"] == 6 and res["machine"] and res["date"]
    for name in ("bm25", "recency", "full"):
        s = res["systems"][name]
        assert set(s["recall"]) == {"16", "64"}
        assert set(s["recall"]["64"]) == {"overall", "1", "2", "3", "4", "5"}
        assert set(s["search_ms"]) == {"p50", "p95", "p99"}
        for key in ("mrr", "context_tokens", "ingest_seconds", "peak_rss_mb"):
            assert key in s
        assert s["malformed_evidence_entries"] == 4
    assert res["systems"]["full"]["recall"]["16"]["overall"] == 1.0
    assert "| bm25 |" in (out / "results.md").read_text()
    assert (out / "recall.png").read_bytes()[:4] == b"\x89PNG"

    # A later run of one system, merged with the earlier folder, keeps the others.
    out2 = tmp_path / "out2"
    r = CliRunner().invoke(app, ["bench", "locomo", "--data", str(data), "--budgets", "16,64",
                                 "--systems", "recency", "--out", str(out2), "--merge", str(out)])
    assert r.exit_code == 0, r.output
    merged = json.loads((out2 / "results.json").read_text())
    assert set(merged["systems"]) == {"bm25", "recency", "full"}
    assert merged["earlier_commands"]
