"""Shared fixtures. Real parts only: a real SQLite file per test, the packaged MiniLM and SmolLM2 tokenizer."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

SESSIONS = [
    ("1:56 pm on 8 May, 2023", [
        ("Caroline", "Hey Mel! Good to see you! How have you been?"),
        ("Melanie", "Hey Caroline! I'm swamped with the kids and work. What's up with you?"),
        ("Caroline", "I went to a LGBTQ support group yesterday and it was so powerful."),
        ("Melanie", "Wow, that's cool, Caroline! What happened that was so awesome?"),
        ("Caroline", "The transgender stories were so inspiring, I felt accepted and brave."),
        ("Melanie", "I painted a lake sunrise last year; painting is my way to relax."),
        ("Caroline", "I'm thinking of studying psychology and getting a counseling certification."),
        ("Melanie", "You'd be a great counselor! Your empathy will help people."),
    ]),
    ("10:37 am on 27 June, 2023", [
        ("Melanie", "We went camping in the mountains with the kids last weekend."),
        ("Caroline", "Sounds amazing! Did you see anything special out there?"),
        ("Melanie", "We saw the Perseid meteor shower and roasted marshmallows."),
        ("Caroline", "I joined a mentorship program for LGBTQ youth, it's so rewarding."),
        ("Melanie", "My son loves dinosaurs; we visited the natural history museum."),
        ("Caroline", "I read 'Becoming Nicole' by Amy Ellis Nutt, a true inspiring story."),
        ("Melanie", "Pottery class is like therapy for me, I made a black and white bowl.",
         "a photo of a black and white bowl on a wooden table"),
        ("Caroline", "I love that bowl! The pattern looks so calm."),
    ]),
    ("8:18 pm on 20 July, 2023", [
        ("Caroline", "Our group, Connected LGBTQ Activists, planned a pride parade in the city."),
        ("Melanie", "I'm proud of you! My daughter started violin lessons."),
        ("Caroline", "I'm saving up to adopt a child; I contacted an adoption agency."),
        ("Melanie", "That's a big step. Which agency did you pick?"),
        ("Caroline", "I chose them because they help LGBTQ+ folks with adoption."),
        ("Melanie", "We bought new running shoes, I run farther to de-stress these days."),
        ("Caroline", "Running sounds lovely. I still go hiking every Sunday morning."),
        ("Melanie", "Let's hike together in August when the kids are at camp."),
    ]),
]


def locomo_sample() -> dict:
    """A LoCoMo-shaped sample (3 sessions, 24 turns, one image turn) with annotation fields a system
    must never read."""
    conv = {"speaker_a": "Caroline", "speaker_b": "Melanie"}
    for n, (when, turns) in enumerate(SESSIONS, start=1):
        conv[f"session_{n}_date_time"] = when
        conv[f"session_{n}"] = [
            {"speaker": t[0], "dia_id": f"D{n}:{i}", "text": t[1], **({"blip_caption": t[2]} if len(t) > 2 else {})}
            for i, t in enumerate(turns, start=1)]
    conv["session_4_date_time"] = "9:00 am on 1 August, 2023"  # a date with no session: ignored
    return {"sample_id": "conv-test", "conversation": conv,
            "qa": [{"question": "When did Caroline go to the LGBTQ support group?", "answer": "7 May 2023",
                    "evidence": ["D1:3"], "category": 2}],
            "observation": {"session_1_observation": "leaks answers"}, "session_summary": {"s1": "leaks"},
            "event_summary": {"e": "leaks"}}


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
