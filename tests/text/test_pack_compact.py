"""Compact rendering: a speaker is named only when the speaker changes, and the slack is filled."""
from __future__ import annotations

from memvisor.models.tokenizer import default_tokenizer
from memvisor.text.pack import ContextPacker

TURNS = [("s1", "Ana", "Ana moved to Lyon for a new job at the observatory."),
         ("s1", "Ana", "Ana started climbing at the Lyon gym on Sundays."),
         ("s1", "Ben", "Ben visited Ana in Lyon and they went climbing."),
         ("s1", "Ana", "Ana bought new climbing shoes in Lyon."),
         ("s2", "Ana", "Ana left Lyon for Paris after the observatory job ended."),
         ("s2", "Ana", "Ana still goes climbing in Paris on Sundays.")]


def _memory(tmp_path, **packer):
    from memvisor import Memory

    m = Memory(tmp_path, packer=ContextPacker(default_tokenizer(), neighbours=0, **packer))
    m.add_many([dict(text=t, session=s, valid_from="2023-05-08T10:00:00Z" if s == "s1" else "2023-06-01T10:00:00Z",
                     metadata={"speaker": who}, thread="c", position=k)
                for k, (s, who, t) in enumerate(TURNS)], namespace="n")
    return m


def test_speaker_is_named_only_when_it_changes_within_a_session(tmp_path):
    with _memory(tmp_path) as m:
        ctx = m.context("Ana Lyon Paris climbing observatory Sundays shoes Ben", namespace="n", budget_tokens=500)
    assert ctx.text.splitlines() == [
        "[8 May 2023]",
        "Ana: Ana moved to Lyon for a new job at the observatory.",
        "Ana started climbing at the Lyon gym on Sundays.",
        "Ben: Ben visited Ana in Lyon and they went climbing.",
        "Ana: Ana bought new climbing shoes in Lyon.",
        "[1 June]",  # a new session names its first speaker again
        "Ana: Ana left Lyon for Paris after the observatory job ended.",
        "Ana still goes climbing in Paris on Sundays."]
    assert ctx.tokens == default_tokenizer().count(ctx.text)


def test_every_line_named_when_speaker_once_is_off(tmp_path):
    with _memory(tmp_path, speaker_once=False) as m:
        ctx = m.context("Ana Lyon Paris climbing observatory Sundays shoes Ben", namespace="n", budget_tokens=500)
    lines = [ln for ln in ctx.text.splitlines() if not ln.startswith("[")]
    assert len(lines) == 6 and all(ln.startswith(("Ana: ", "Ben: ")) for ln in lines)


def test_the_saved_tokens_hold_more_memories_and_never_overflow(tmp_path):
    """At each budget the compact context holds at least as many memories as the named-every-line one,
    and at some budget strictly more (the fill rounds use the slack the shorter lines leave)."""
    tokenizer = default_tokenizer()
    query = "Ana Lyon Paris climbing observatory Sundays shoes Ben"
    more = 0
    with _memory(tmp_path / "a") as compact, _memory(tmp_path / "b", speaker_once=False) as plain:
        for budget in range(20, 130, 5):
            a = compact.context(query, namespace="n", budget_tokens=budget)
            b = plain.context(query, namespace="n", budget_tokens=budget)
            assert a.tokens == tokenizer.count(a.text) <= budget
            assert len(a.items) >= len(b.items)
            more += len(a.items) > len(b.items)
    assert more > 0
