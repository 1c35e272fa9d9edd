"""Which rows a query may see: namespace, scope, kind, metadata, and the two time axes."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from memvisor import timeutil
from memvisor.errors import InvalidInput
from memvisor.types import KINDS


@dataclass(frozen=True)
class Filters:
    """`as_of`: world time (what was true then, by what we know now). `known_at`: system time (what we
    believed then). Both ISO-8601 strings in stored form, or None for now."""

    namespace: str
    user: str | None = None
    agent: str | None = None
    session: str | None = None
    kinds: tuple[str, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)
    as_of: str | None = None
    known_at: str | None = None

    def __post_init__(self) -> None:
        for kind in self.kinds:
            if kind not in KINDS:
                raise InvalidInput(f"unknown kind {kind!r}: use one of {', '.join(KINDS)}")
        for key in self.metadata:
            if not isinstance(key, str) or not key.replace("_", "").replace("-", "").isalnum():
                raise InvalidInput(f"metadata filter key {key!r} must be letters, digits, '_' or '-'")

    @property
    def narrows(self) -> bool:
        """Whether more than the namespace's current rows are filtered out (a scope, kind, metadata or
        time-travel filter): then the admitted rows may be few enough to read first."""
        return bool(self.user is not None or self.agent is not None or self.session is not None or self.kinds
                    or self.metadata or self.as_of or self.known_at)

    def where(self, alias: str = "items") -> tuple[str, list[Any]]:
        """A SQL condition on the items table (aliased `alias`) and its parameters."""
        a = alias
        sql = [f"{a}.namespace = ?"]
        args: list[Any] = [self.namespace]
        if self.known_at:
            sql.append(f"{a}.recorded_at <= ? AND ({a}.expired_at IS NULL OR {a}.expired_at > ?)")
            args += [self.known_at, self.known_at]
        else:
            sql.append(f"{a}.expired_at IS NULL")
        if self.as_of:
            sql.append(f"({a}.valid_from IS NULL OR {a}.valid_from <= ?) AND ({a}.valid_to IS NULL OR {a}.valid_to > ?)")
            args += [self.as_of, self.as_of]
        else:
            # Future-dated memories (a planned event) are current knowledge; ended ones are not.
            sql.append(f"({a}.valid_to IS NULL OR {a}.valid_to > ?)")
            args.append(self.known_at or timeutil.now())
        for column, value in (("user_id", self.user), ("agent_id", self.agent), ("session_id", self.session)):
            if value is not None:
                sql.append(f"{a}.{column} = ?")
                args.append(value)
        if self.kinds:
            sql.append(f"{a}.kind IN ({','.join('?' * len(self.kinds))})")
            args += list(self.kinds)
        for key, value in self.metadata.items():
            # json_extract returns SQL values; compare JSON-encoded to keep types (1 vs "1") apart.
            sql.append(f"json_quote(json_extract({a}.metadata, ?)) = json(?)")
            args += [f'$."{key}"', json.dumps(value)]
        return " AND ".join(sql), args
