"""Shared fixtures. Real parts only: a real SQLite file per test, the packaged MiniLM and SmolLM2 tokenizer."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

LOCOMO = Path(__file__).resolve().parents[2] / "shared" / "data" / "locomo" / "locomo-dev.json"


@pytest.fixture
def memory(tmp_path):
    from memvisor import Memory

    with Memory(tmp_path / "home") as m:
        yield m


@pytest.fixture(scope="session")
def small_conversation(tmp_path_factory) -> Path:
    """A JSON-lines conversation of 3 sessions whose answers we know."""
    turns = [
        ("s1", "2024-01-05T10:00:00Z", "Ana", "I adopted a grey cat called Pixel from the shelter."),
        ("s1", "2024-01-05T10:00:00Z", "Ben", "Lovely! I started learning the cello last month."),
        ("s1", "2024-01-05T10:00:00Z", "Ana", "My sister Clara lives in Porto and teaches chemistry."),
        ("s2", "2024-02-11T18:30:00Z", "Ben", "Where are you going on holiday this summer?"),
        ("s2", "2024-02-11T18:30:00Z", "Ana", "To Norway, hiking the Lofoten islands in July."),
        ("s2", "2024-02-11T18:30:00Z", "Ben", "My cello teacher says I should join an orchestra."),
        ("s3", "2024-03-20T08:00:00Z", "Ana", "I got a promotion: I now lead the data team at the museum."),
        ("s3", "2024-03-20T08:00:00Z", "Ben", "Congratulations! The orchestra accepted me as second cello."),
    ]
    path = tmp_path_factory.mktemp("conv") / "chat.jsonl"
    path.write_text("\n".join(json.dumps({"conversation": "chat", "session": s, "time": t, "speaker": sp,
                                          "text": x, "id": f"t{i}"}) for i, (s, t, sp, x) in enumerate(turns)))
    return path


def count_rows(memory, table: str) -> int:
    return memory.store.db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
