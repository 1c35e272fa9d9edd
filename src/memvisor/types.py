"""The typed values memvisor returns. Plain dataclasses: easy to print, compare and turn into JSON."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

KINDS = ("episodic", "semantic", "core", "procedural")
STATUSES = ("active", "superseded", "invalidated")


@dataclass(frozen=True)
class MemoryItem:
    """One version of a memory.

    Times are ISO-8601 UTC strings. `valid_from`/`valid_to`: when it was true in the world
    (None = unbounded). `recorded_at`/`expired_at`: when the system learned it / retired this version
    (expired_at None = still believed).
    """

    id: str
    namespace: str
    text: str
    kind: str = "episodic"
    user: str | None = None
    agent: str | None = None
    session: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)
    version: int = 1
    status: str = "active"
    valid_from: str | None = None
    valid_to: str | None = None
    recorded_at: str | None = None
    expired_at: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ScoreExplanation:
    """Why a hit scored what it did: each signal's raw value and its contribution to `score`."""

    bm25_rank: int | None
    vector_rank: int | None
    vector_similarity: float | None
    fused: float
    time_boost: float
    speaker_boost: float
    neighbour_of: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SearchHit:
    item: MemoryItem
    score: float
    explanation: ScoreExplanation

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.item.id, "text": self.item.text, "score": self.score,
                "item": self.item.to_dict(), "explanation": self.explanation.to_dict()}


@dataclass(frozen=True)
class Citation:
    memory_id: str
    sources: list[str]


@dataclass(frozen=True)
class Context:
    """A prompt-ready block of memories that fits `budget_tokens` (counted with the real tokenizer)."""

    text: str
    tokens: int
    budget_tokens: int
    citations: list[Citation]
    items: list[MemoryItem]
    dropped: int  # candidates that did not fit the budget

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "tokens": self.tokens, "budget_tokens": self.budget_tokens,
                "citations": [asdict(c) for c in self.citations], "dropped": self.dropped}


@dataclass(frozen=True)
class IngestReport:
    namespace: str
    added: int
    skipped_duplicates: int
    ids: list[str]


@dataclass(frozen=True)
class HistoryEntry:
    """One event of a memory's log, with the version row it produced (None once deleted)."""

    seq: int
    op: str
    recorded_at: str
    version: MemoryItem | None
