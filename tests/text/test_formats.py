"""Conversation readers: LoCoMo and JSON lines."""
from __future__ import annotations

import json

import pytest

from memvisor.errors import MalformedFile
from memvisor.text.formats import load_conversations, locomo_conversation, parse_locomo_time
from tests.conftest import locomo_sample


class Watched(dict):
    """A dict that records which keys were read."""

    def __init__(self, *a):
        super().__init__(*a)
        self.read: set[str] = set()

    def __getitem__(self, k):
        self.read.add(k)
        return super().__getitem__(k)

    def get(self, k, default=None):
        self.read.add(k)
        return super().get(k, default)

    def __contains__(self, k):
        self.read.add(k)
        return super().__contains__(k)


def test_locomo_reader_never_reads_answers_or_summaries():
    sample = Watched(locomo_sample())
    conv = locomo_conversation(sample)
    assert sample.read <= {"sample_id", "conversation"}
    assert len(conv.turns) == 24 and conv.id == "conv-test"
    first = conv.turns[0]
    assert (first.speaker, first.source_id, first.session, first.time) == (
        "Caroline", "D1:1", "session_1", "2023-05-08T13:56:00.000000Z")
    assert conv.turns[8].time == "2023-06-27T10:37:00.000000Z" and conv.turns[8].source_id == "D2:1"
    bowl = next(t for t in conv.turns if t.source_id == "D2:7")
    assert bowl.text.endswith("[shares a photo of a black and white bowl on a wooden table]")


def test_locomo_time_parsing():
    assert parse_locomo_time("1:56 pm on 8 May, 2023") == "2023-05-08T13:56:00.000000Z"
    assert parse_locomo_time("12:09 am on 13 September, 2023") == "2023-09-13T00:09:00.000000Z"
    with pytest.raises(MalformedFile):
        parse_locomo_time("noon-ish")


def test_jsonl_groups_turns_by_conversation(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in [
        {"speaker": "A", "text": "one", "conversation": "c1", "time": "2024-01-01"},
        {"speaker": "B", "text": "two", "conversation": "c2"}, {"speaker": "A", "text": "three", "conversation": "c1"}]))
    convs = load_conversations(path)
    assert [(c.id, [t.text for t in c.turns]) for c in convs] == [("c1", ["one", "three"]), ("c2", ["two"])]
    assert convs[0].turns[0].source_id == "c1:1" and convs[0].turns[0].time == "2024-01-01T00:00:00.000000Z"


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(MalformedFile, match="no turns"):
        load_conversations(tmp_path / "e.jsonl")
    with pytest.raises(Exception, match="no such file"):
        load_conversations(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("[{")
    with pytest.raises(MalformedFile, match="not valid JSON"):
        load_conversations(tmp_path / "bad.json")
