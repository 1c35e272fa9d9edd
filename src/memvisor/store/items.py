"""A memory row's two shapes: what a write stores (:class:`NewItem`, validated by `Memory`) and what a read
returns (:class:`~memvisor.types.MemoryItem`), and their conversions from an ``items`` row of the SQLite store."""
from __future__ import annotations

import hashlib
import json
import sqlite3
from dataclasses import dataclass
from typing import Any

from memvisor.types import MemoryItem

ITEM_COLUMNS = ("rid, id, namespace, version, kind, user_id, agent_id, session_id, thread, position, text, "
                "context, speaker, metadata, sources, status, valid_from, valid_to, recorded_at, expired_at, seq")


@dataclass
class NewItem:
    """A validated memory about to be written (see `Memory.add`)."""

    namespace: str
    text: str
    kind: str
    user: str | None
    agent: str | None
    session: str | None
    metadata: dict[str, Any]
    sources: list[str]
    valid_from: str | None
    valid_to: str | None
    thread: str | None = None
    position: int | None = None
    context: str | None = None  # indexed with the text (e.g. the previous turn), never shown as the memory
    key: str | None = None  # idempotency key; a content hash when the client gives none

    @property
    def speaker(self) -> str | None:
        value = self.metadata.get("speaker")
        return value.strip() or None if isinstance(value, str) else None

    def idempotency_key(self) -> str:
        if self.key:
            return "client:" + self.key
        body = json.dumps([self.kind, self.user, self.agent, self.session, self.text, self.sources,
                           self.valid_from, self.thread, self.position], ensure_ascii=False)
        return "sha256:" + hashlib.sha256(body.encode()).hexdigest()


def row_to_item(row: sqlite3.Row) -> MemoryItem:
    return MemoryItem(
        id=row["id"], namespace=row["namespace"], text=row["text"], kind=row["kind"],
        user=row["user_id"], agent=row["agent_id"], session=row["session_id"],
        metadata=json.loads(row["metadata"]), sources=json.loads(row["sources"]), version=row["version"],
        status=row["status"], valid_from=row["valid_from"], valid_to=row["valid_to"],
        recorded_at=row["recorded_at"], expired_at=row["expired_at"])


def row_to_new_item(row: sqlite3.Row) -> NewItem:
    """An ``items`` row as the content of a new version (an update or invalidation copies it)."""
    return NewItem(namespace=row["namespace"], text=row["text"], kind=row["kind"], user=row["user_id"],
                   agent=row["agent_id"], session=row["session_id"], metadata=json.loads(row["metadata"]),
                   sources=json.loads(row["sources"]), valid_from=row["valid_from"],
                   valid_to=row["valid_to"], thread=row["thread"], position=row["position"],
                   context=row["context"])
