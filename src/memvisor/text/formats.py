"""Conversations in, turns out: LoCoMo JSON and a simple JSON-lines format of turns.

Both readers validate the whole file before anything is written, so a malformed file adds nothing.

JSON-lines format, one turn per line (blank lines ignored):
    {"speaker": "Ana", "text": "I moved to Lyon.", "time": "2024-03-02T10:00:00Z",
     "session": "s1", "conversation": "chat-42", "id": "t17"}
`speaker` and `text` are required; `time` (ISO-8601), `session`, `conversation` and `id` are optional
(`id` defaults to "<conversation>:<line number>", `conversation` to the file name).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from memvisor import timeutil
from memvisor.errors import InvalidInput, MalformedFile

# Keys of a LoCoMo sample that are derived from the annotations: a system under test must never read them.
LOCOMO_FORBIDDEN = ("qa", "observation", "session_summary", "event_summary")


@dataclass(frozen=True)
class Turn:
    speaker: str
    text: str
    source_id: str          # the turn's id in its source (LoCoMo dia_id), cited by memories
    session: str | None = None
    time: str | None = None  # stored ISO form


@dataclass(frozen=True)
class Conversation:
    id: str
    turns: list[Turn] = field(default_factory=list)


def load_conversations(path: str | Path) -> list[Conversation]:
    """Read a LoCoMo JSON file (a list of samples, or one sample) or a JSON-lines file of turns."""
    path = Path(path)
    if not path.is_file():
        raise InvalidInput(f"no such file: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise MalformedFile(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); save it "
                            "as UTF-8") from None
    if path.suffix == ".jsonl":
        return _read_jsonl(text, path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if text.lstrip().startswith("{") and "\n{" in text.strip():
            return _read_jsonl(text, path)
        raise MalformedFile(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    samples = data if isinstance(data, list) else [data]
    return [locomo_conversation(s, f"{path.name}[{i}]") for i, s in enumerate(samples)]


def _read_jsonl(text: str, path: Path) -> list[Conversation]:
    by_conversation: dict[str, list[Turn]] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}: line {number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise MalformedFile(f"{where}: not valid JSON ({e.msg}); each line must be one JSON object") from None
        if not isinstance(obj, dict):
            raise MalformedFile(f"{where}: expected a JSON object with 'speaker' and 'text'")
        for key in ("speaker", "text"):
            if not isinstance(obj.get(key), str) or not obj[key].strip():
                raise MalformedFile(f"{where}: '{key}' must be a non-empty string")
        conversation = str(obj.get("conversation") or path.stem)
        try:
            time = timeutil.to_iso(obj.get("time"), field="time")
        except InvalidInput as e:
            raise MalformedFile(f"{where}: {e}") from None
        by_conversation.setdefault(conversation, []).append(Turn(
            speaker=obj["speaker"].strip(), text=obj["text"].strip(),
            source_id=str(obj.get("id") or f"{conversation}:{number}"),
            session=None if obj.get("session") is None else str(obj["session"]), time=time))
    if not by_conversation:
        raise MalformedFile(f"{path}: no turns found")
    return [Conversation(cid, turns) for cid, turns in by_conversation.items()]


_LOCOMO_TIME = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*([ap]m)\s+on\s+(\d{1,2})\s+(\w+),?\s+(\d{4})\s*$", re.I)


def parse_locomo_time(value: str) -> str:
    """'1:56 pm on 8 May, 2023' -> stored ISO form (times are taken as UTC)."""
    m = _LOCOMO_TIME.match(value) if isinstance(value, str) else None
    if not m:
        raise MalformedFile(f"unreadable LoCoMo session time {value!r} (expected like '1:56 pm on 8 May, 2023')")
    hour, minute, half, day, month, year = m.groups()
    hour = int(hour) % 12 + (12 if half.lower() == "pm" else 0)
    try:
        when = datetime.strptime(f"{day} {month} {year}", "%d %B %Y").replace(hour=hour, minute=int(minute))
    except ValueError:
        raise MalformedFile(f"unreadable LoCoMo session time {value!r} (expected like '1:56 pm on 8 May, "
                            "2023')") from None
    return timeutil.to_iso(when)


def render_locomo_turn(turn: dict[str, Any]) -> str:
    """A LoCoMo turn as text; an image turn's caption is rendered inline."""
    text = str(turn.get("text", "")).strip()
    caption = turn.get("blip_caption")
    if caption:
        text = f"{text} [shares {str(caption).strip()}]".strip()
    return text


def locomo_conversation(sample: dict[str, Any], where: str = "sample") -> Conversation:
    """One LoCoMo sample -> Conversation. Reads ONLY `sample_id` and `conversation` (never the QA or the
    derived summaries, which leak answers)."""
    if not isinstance(sample, dict) or not isinstance(sample.get("conversation"), dict):
        raise MalformedFile(f"{where}: not a LoCoMo sample (expected an object with a 'conversation' object)")
    conv = sample["conversation"]
    sessions = sorted((int(k.split("_")[1]) for k in conv
                       if re.fullmatch(r"session_\d+", k) and isinstance(conv[k], list)))
    turns: list[Turn] = []
    for n in sessions:
        date_key = f"session_{n}_date_time"
        try:
            time = parse_locomo_time(conv[date_key]) if conv.get(date_key) else None
        except MalformedFile as e:
            raise MalformedFile(f"{where}: {date_key}: {e}") from None
        for i, t in enumerate(conv[f"session_{n}"]):
            if not isinstance(t, dict) or not t.get("speaker"):
                raise MalformedFile(f"{where}: session_{n} turn {i} has no speaker")
            text = render_locomo_turn(t)
            if not text:
                continue
            turns.append(Turn(speaker=str(t["speaker"]), text=text,
                              source_id=str(t.get("dia_id") or f"D{n}:{i + 1}"), session=f"session_{n}",
                              time=time))
    if not turns:
        raise MalformedFile(f"{where}: the conversation has no turns")
    return Conversation(str(sample.get("sample_id") or where), turns)
