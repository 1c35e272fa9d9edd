"""The answer path: LoCoMo token F1, and real HTTP against a small OpenAI-compatible server on loopback."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from test_locomo_fixture import conversation

from memvisor.bench.answer import (Answerer, EndpointError, f1_multi, f1_score, locomo_score,
                                   normalize_answer)
from memvisor.bench.common import ContextResult
from memvisor.bench.locomo_data import parse_conversation
from memvisor.bench.locomo_run import run_system


def test_normalisation_and_stemmed_f1_follow_locomo():
    assert normalize_answer("The cats, and a Dog!") == "cats dog"
    assert f1_score("running cats", "the cat runs") == 1.0      # Porter: run/run, cat/cat
    assert f1_score("Paris", "Lyon") == 0.0
    assert f1_score("7 May 2023", "May 7, 2023") == 1.0          # bag of tokens, order-free
    assert f1_score("red car", "red") == pytest.approx(2 / 3)
    # multi-hop: mean over gold parts of the best-matching predicted part
    assert f1_multi("pottery, violin", "violin, pottery, hiking") == pytest.approx(2 / 3)
    assert locomo_score("Psychology", "Psychology; counseling", 3) == 1.0  # cat 3: before ';'
    assert locomo_score("No information available.", "whatever", 5) == 1.0
    assert locomo_score("Pixel", "Pixel", 5) == 0.0


class FakeOpenAI(BaseHTTPRequestHandler):
    """Answers from the prompt: 'Lisbon' when the context mentions it, else a refusal; judges by match."""

    calls: list[dict] = []
    fail_next = 0

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeOpenAI.calls.append({"path": self.path, "auth": self.headers.get("Authorization"), **body})
        if FakeOpenAI.fail_next:
            FakeOpenAI.fail_next -= 1
            self.send_response(503)
            self.end_headers()
            return
        prompt = body["messages"][-1]["content"]
        if prompt.startswith("Grade"):
            gold = prompt.split("Gold answer: ")[1].split("\n")[0]
            given = prompt.split("Given answer: ")[1].split("\n")[0]
            reply = "CORRECT" if gold.split()[0].lower() in given.lower() else "WRONG"
        elif "Lisbon" in prompt.split("Question:")[0]:
            reply = "Lisbon"
        else:
            reply = "No information available."
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture()
def server():
    FakeOpenAI.calls = []
    FakeOpenAI.fail_next = 0
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


class Keyword:
    """Puts the turn with the question's last word first (enough to answer one question)."""

    name = "kw"

    def ingest(self, view):
        self.turns = [t for k, s in sorted(view["conversation"].items())
                      if k.startswith("session_") and isinstance(s, list) for t in s]

    def search(self, q):
        return [t["dia_id"] for t in self.turns if "pottery" in q and "pottery" in t["text"]]

    def context(self, q, budget):
        text = "\n".join(t["text"] for t in self.turns if "pottery" in q and "pottery" in t["text"])
        return ContextResult(text, len(text.split()))

    def close(self):
        pass


def test_answers_scored_through_real_http(server):
    answerer = Answerer(server, "fake-model", api_key="k-123", judge_model="fake-judge")
    out = run_system(Keyword(), [parse_conversation(conversation())], [64, 1024],
                     count=lambda t: len(t.split()), answerer=answerer)
    a = out["entry"]["answer"]
    assert a["budget"] == 1024 and a["model"] == "fake-model"
    # cat 4 question answered "Lisbon" from its context: F1 of "Lisbon" vs "Lisbon CANARY-7f3a" = 2/3.
    assert a["f1"]["4"] == pytest.approx(2 / 3, abs=1e-3)
    assert a["f1"]["5"] == 1.0            # the adversarial question got a refusal
    assert a["f1"]["1"] == 0.0
    assert a["judge_accuracy"]["4"] == 1.0
    answer_calls = [c for c in FakeOpenAI.calls if c["model"] == "fake-model"]
    assert len(answer_calls) == 6 and all(c["path"] == "/v1/chat/completions" for c in answer_calls)
    assert answer_calls[0]["auth"] == "Bearer k-123" and answer_calls[0]["temperature"] == 0
    assert "pottery classes in Lisbon" in answer_calls[0]["messages"][0]["content"]
    assert len([c for c in FakeOpenAI.calls if c["model"] == "fake-judge"]) == 6


def test_without_endpoint_answering_is_skipped():
    out = run_system(Keyword(), [parse_conversation(conversation())], [64], count=lambda t: len(t.split()))
    assert "answer" not in out["entry"]


def test_endpoint_failures_are_retried_then_typed(server):
    FakeOpenAI.fail_next = 1
    assert Answerer(server, "m").answer("Where does Ana take pottery classes?", "Lisbon") == "Lisbon"
    FakeOpenAI.fail_next = 10
    with pytest.raises(EndpointError):
        Answerer(server, "m").answer("q", "c")
    with pytest.raises(EndpointError):
        Answerer("ftp://x", "m")
