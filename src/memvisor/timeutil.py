"""Times are stored as fixed-width ISO-8601 UTC strings, so that string order is time order in SQL."""
from __future__ import annotations

import functools
from datetime import datetime, timezone

from memvisor.errors import InvalidInput

_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"


def now() -> str:
    return datetime.now(timezone.utc).strftime(_FORMAT)


def to_iso(value: str | datetime | None, field: str = "time") -> str | None:
    """Normalise a user-given time (ISO-8601 string or datetime; naive means UTC) to the stored form."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if not text:
            raise InvalidInput(f"{field} is empty: give an ISO-8601 time such as 2024-05-08 or 2024-05-08T13:56:00Z")
        try:
            value = datetime.fromisoformat(text.replace("z", "Z"))
        except ValueError:
            raise InvalidInput(f"{field} {text!r} is not an ISO-8601 time: "
                               "write it like 2024-05-08 or 2024-05-08T13:56:00+02:00") from None
    if not isinstance(value, datetime):
        raise InvalidInput(f"{field} must be an ISO-8601 string or a datetime, not {type(value).__name__}")
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    try:
        utc = value.astimezone(timezone.utc)
    except OverflowError:
        utc = None
    # Stored times compare as strings, so the year must have exactly four digits.
    if utc is None or not 1000 <= utc.year <= 9999:
        raise InvalidInput(f"{field} {value.isoformat()} is outside the years 1000-9999 (in UTC) that memvisor stores")
    return utc.strftime(_FORMAT)


def parse(stored: str) -> datetime:
    return datetime.strptime(stored, _FORMAT).replace(tzinfo=timezone.utc)


@functools.lru_cache(maxsize=8192)  # context packing asks for the same dates many times
def human_date(stored: str | None) -> str:
    """'8 May 2023': the day only (a prompt rarely needs the minute, and each digit costs a token)."""
    if not stored:
        return ""
    t = parse(stored)
    return f"{t.day} {t.strftime('%B %Y')}"


def human(stored: str | None) -> str:
    """A compact human form for prompts: '8 May 2023, 13:56' (time omitted at midnight)."""
    if not stored:
        return ""
    t = parse(stored)
    day = human_date(stored)
    return day if (t.hour, t.minute) == (0, 0) else f"{day}, {t.strftime('%H:%M')}"
