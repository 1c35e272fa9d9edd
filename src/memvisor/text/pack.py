"""Context packing: the most useful memories that fit a token budget, formatted for a prompt.

Greedy by score (a knapsack heuristic: an item that does not fit is skipped and smaller ones are still
tried), then rendered in time order, grouped under one date header per conversation session so the
date is paid for once, not per line. The rendered text is counted with the real tokenizer; if joining
made it longer than the sum of the parts, the lowest-scored items are dropped until it fits.
"""
from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass

from memvisor import timeutil
from memvisor.models.tokenizer import HFTokenizer
from memvisor.store.filters import Filters
from memvisor.store.items import row_to_item
from memvisor.store.sqlite_store import SQLiteStore
from memvisor.text.retrieve import Candidate
from memvisor.types import Citation, Context


def speaker_of(row: sqlite3.Row) -> str | None:
    speaker = json.loads(row["metadata"]).get("speaker")
    return speaker if isinstance(speaker, str) and speaker else None


def one_line(text: str) -> str:
    """A memory on one line: its own line breaks would let stored text pass for a date header, another
    speaker's line or the prompt's closing delimiter (memories are data, never structure)."""
    return " ".join(text.splitlines())


def render_line(row: sqlite3.Row, speaker_shown: bool = True) -> str:
    speaker = speaker_of(row)
    text = one_line(row["text"])
    return f"{one_line(speaker)}: {text}" if speaker and speaker_shown else text


def group_key(row: sqlite3.Row) -> tuple:
    if row["thread"] is not None:
        return (row["thread"], row["session_id"], row["valid_from"])
    return (None, None, (row["valid_from"] or "")[:10])


def render_header(row: sqlite3.Row, year_shown: str | None = None) -> str:
    """The group's date, the day only: "[8 May 2023, 13:56]" costs 17 SmolLM2 tokens, "[8 May 2023]" 10,
    and a context spread over 20 sessions pays it 20 times. The year is written only when it differs
    from the previous header's (`year_shown`): "[25 May]" costs 6 (headers were 11% of a 1,024-token
    LoCoMo context)."""
    if not row["valid_from"]:
        return "[undated]"
    date = timeutil.human_date(row["valid_from"])
    return f"[{date.rsplit(' ', 1)[0]}]" if date.endswith(" " + str(year_shown)) else f"[{date}]"


def _year(row: sqlite3.Row) -> str | None:
    return row["valid_from"][:4] if row["valid_from"] else None


@dataclass
class ContextPacker:
    """`neighbours`: turns on each side of a top hit in its conversation that become candidates too
    (a fact often spans a question and its answer, and the speaker's own turn before or after), scored
    `neighbour_decay` x the hit's score; only the best `expand_top` hits are expanded. Two on each side,
    not one: LoCoMo dev recall@1024 0.866 -> 0.876 (temporal 0.880 -> 0.914; 512 and 2,048 tokens not
    worse), see NOTES.md. `speaker_once`: see `render`; `fill_rounds`: greedy
    passes over the candidates, each with the slack the previous render left."""

    tokenizer: HFTokenizer
    neighbours: int = 2
    neighbour_decay: float = 0.5
    expand_top: int = 30
    speaker_once: bool = True
    fill_rounds: int = 4

    def expand(self, store: SQLiteStore, candidates: list[Candidate], filters: Filters) -> list[Candidate]:
        by_rid = {c.row["rid"]: c for c in candidates}
        if self.neighbours <= 0:
            return candidates
        for hit in candidates[:self.expand_top]:
            row = hit.row
            if row["thread"] is None or row["position"] is None:
                continue
            for other in store.thread_rows(row["namespace"], row["thread"], row["position"] - self.neighbours,
                                           row["position"] + self.neighbours, filters):
                score = hit.score * self.neighbour_decay
                known = by_rid.get(other["rid"])
                if known is None:
                    by_rid[other["rid"]] = Candidate(row=other, score=score, neighbour_of=row["id"])
                elif known.score < score:
                    known.score, known.neighbour_of = score, row["id"]
        return sorted(by_rid.values(), key=lambda c: -c.score)

    def pack(self, candidates: list[Candidate], budget_tokens: int) -> Context:
        taken: list[int] = []  # indexes into `candidates`, which are sorted by score
        in_context: set[int] = set()
        groups: set[tuple] = set()
        lines = self.tokenizer.count_many(["\n" + render_line(c.row) for c in candidates])
        keys = [group_key(c.row) for c in candidates]
        # Each group's header with its newline, counted once in one batch (not per candidate and round).
        # Estimated without the year (most headers omit it); the exact recount of the rendered text
        # below settles it. The first header of the text has no newline: one token less at most.
        row_of_group = dict(zip(keys, (c.row for c in candidates)))  # rows of one group share one header
        header_costs = dict(zip(row_of_group, self.tokenizer.count_many(
            ["\n" + render_header(row, year_shown=_year(row)) for row in row_of_group.values()])))
        used = 0
        text, tokens = "", 0
        # Costs are estimated with the speaker's name on every line; `render` writes it only when the
        # speaker changes, so the real text is shorter: the greedy pass is repeated over what is left
        # with the measured slack until nothing more fits.
        for _round in range(self.fill_rounds):
            added = False
            for i, (cost, key) in enumerate(zip(lines, keys)):
                if i in in_context:
                    continue
                if key not in groups:
                    cost += header_costs[key] - (0 if groups else 1)
                # By score, not by score per token: value-per-token packing fills the budget with short,
                # empty turns ("Thanks!"); on LoCoMo it cut recall@1024 from 0.833 to 0.733.
                if used + cost > budget_tokens:
                    continue
                taken.append(i)
                in_context.add(i)
                groups.add(key)
                used += cost
                added = True
            taken.sort()
            text, tokens = self._fit(candidates, taken, budget_tokens)
            if not added or tokens >= budget_tokens:
                break
            used = tokens
            in_context = set(taken)  # `_fit` may have dropped some
            groups = {group_key(candidates[i].row) for i in taken}
        chosen = [candidates[i] for i in taken]
        ordered = sorted(chosen, key=_time_order)
        return Context(text=text, tokens=tokens, budget_tokens=budget_tokens,
                       citations=[Citation(c.row["id"], json.loads(c.row["sources"])) for c in ordered],
                       items=[row_to_item(c.row) for c in ordered], dropped=len(candidates) - len(chosen))

    def _fit(self, candidates: list[Candidate], taken: list[int], budget_tokens: int) -> tuple[str, int]:
        """Render what was taken, dropping the lowest-scored until the real count fits (in place)."""
        while True:
            text = render([candidates[i] for i in taken], self.speaker_once)
            tokens = self.tokenizer.count(text)
            if tokens <= budget_tokens or not taken:
                return text, tokens
            taken.pop()  # lowest score last


def _time_order(c: Candidate) -> tuple:
    row = c.row
    return (row["valid_from"] or "", row["thread"] or "", row["session_id"] or "", row["position"] or 0, row["rid"])


def render(chosen: list[Candidate], speaker_once: bool = True) -> str:
    """Chronological, one header per group (the year only when it changes), lines in conversation order.
    With `speaker_once`, a line names its speaker only when the speaker differs from the line above in
    the same group: a context built around one person is mostly their lines, and "Melanie: " costs 4
    tokens a line (speaker names were 10% of a 1,024-token LoCoMo context). Attribution stays exact:
    an unnamed line is always the previous named speaker's."""
    out: list[str] = []
    last_group = year = last_speaker = None
    for cand in sorted(chosen, key=_time_order):
        key = group_key(cand.row)
        if key != last_group:
            out.append(render_header(cand.row, year_shown=year))
            last_group, year, last_speaker = key, _year(cand.row) or year, None
        speaker = speaker_of(cand.row)
        out.append(render_line(cand.row, speaker_shown=not speaker_once or speaker != last_speaker))
        last_speaker = speaker
    return "\n".join(out)
