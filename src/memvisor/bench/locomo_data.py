"""LoCoMo as the harness reads it: turns for the systems, questions and evidence for the scorer only.

The split is the point of this module. A system under test is handed `system_view(conversation)`:
the LoCoMo-format object with nothing but `sample_id` and the `conversation` (speakers, sessions,
dates, turns). The answers, evidence, adversarial answers and the derived summaries
(`observation`, `session_summary`, `event_summary`), which leak answers, stay with the harness.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from memvisor.errors import InvalidInput, MalformedFile

FORBIDDEN_KEYS = ("qa", "answer", "adversarial_answer", "evidence", "observation",
                  "session_summary", "event_summary")
_SESSION = re.compile(r"^session_(\d+)$")
_DIA_ID = re.compile(r"D\d+:\d+")


@dataclass(frozen=True)
class Turn:
    dia_id: str
    speaker: str
    text: str  # the turn's own text; an image turn's caption is kept apart
    session: int
    date: str  # the session's date as LoCoMo writes it ("1:56 pm on 8 May, 2023")
    caption: str = ""

    @property
    def index_text(self) -> str:
        """What retrieval baselines index: speaker, text and any shared image, no date."""
        extra = f" [shares {self.caption}]" if self.caption else ""
        return f"{self.speaker}: {self.text}{extra}"


@dataclass(frozen=True)
class Question:
    index: int  # position in the conversation's `qa` list
    question: str
    category: int
    answer: str  # cast with str(); for category 5 the adversarial answer (scored apart)
    evidence: tuple[str, ...]  # valid dia_ids of this conversation, in the order given
    malformed: tuple[str, ...] = ()  # evidence entries that are not a dia_id of this conversation
    recovered: int = 0  # dia_ids pulled out of malformed entries such as "D8:6; D9:17"


@dataclass
class Conversation:
    sample_id: str
    turns: list[Turn]
    questions: list[Question]
    raw: dict = field(repr=False)  # the original object (holds the forbidden keys: harness only)

    def turn(self, dia_id: str) -> Turn:
        return self._by_id[dia_id]

    def __post_init__(self) -> None:
        self._by_id = {t.dia_id: t for t in self.turns}


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _sessions(conv: dict) -> list[tuple[int, list]]:
    found = []
    for key, value in conv.items():
        m = _SESSION.match(key)
        if m and isinstance(value, list):
            found.append((int(m.group(1)), value))
    return sorted(found)


def parse_turns(obj: dict) -> list[Turn]:
    """The turns of one LoCoMo conversation object, sessions in numeric order."""
    conv = obj.get("conversation")
    if not isinstance(conv, dict):
        raise MalformedFile(f"conversation {obj.get('sample_id')!r} has no 'conversation' object")
    turns: list[Turn] = []
    for number, session in _sessions(conv):
        date = str(conv.get(f"session_{number}_date_time", ""))
        for t in session:
            if not isinstance(t, dict) or "dia_id" not in t or "text" not in t:
                raise MalformedFile(f"{obj.get('sample_id')}: session_{number} has a turn without "
                                    f"dia_id/text: {str(t)[:80]}")
            turns.append(Turn(dia_id=str(t["dia_id"]), speaker=str(t.get("speaker", "")),
                              text=str(t["text"]), session=number, date=date,
                              caption=str(t.get("blip_caption") or "")))
    return turns


def parse_evidence(entries, valid: set[str]) -> tuple[tuple[str, ...], tuple[str, ...], int]:
    """Split a question's evidence list into (valid ids, malformed entries, ids recovered).

    An entry that is exactly a dia_id of the conversation is valid. Any other entry (empty, a typo,
    two ids in one string) is malformed and counted; dia_ids found inside it that exist in the
    conversation are still used (counted as recovered), so "D8:6; D9:17" is not silently lost.
    """
    good: list[str] = []
    bad: list[str] = []
    recovered = 0
    if not isinstance(entries, list):
        entries = [entries]
    for e in entries:
        e = str(e) if e is not None else ""
        if e in valid:
            if e not in good:
                good.append(e)
            continue
        bad.append(e)
        for part in _DIA_ID.findall(e):
            if part in valid and part not in good:
                good.append(part)
                recovered += 1
    return tuple(good), tuple(bad), recovered


def parse_conversation(obj: dict) -> Conversation:
    if not isinstance(obj, dict) or "sample_id" not in obj:
        raise MalformedFile("a LoCoMo conversation must be an object with a 'sample_id'")
    turns = parse_turns(obj)
    valid = {t.dia_id for t in turns}
    questions = []
    for i, q in enumerate(obj.get("qa") or []):
        if not isinstance(q, dict) or "question" not in q or "category" not in q:
            raise MalformedFile(f"{obj['sample_id']}: qa[{i}] lacks question/category")
        answer = q.get("answer", q.get("adversarial_answer", ""))
        good, bad, rec = parse_evidence(q.get("evidence", []), valid)
        questions.append(Question(index=i, question=str(q["question"]), category=int(q["category"]),
                                  answer=str(answer), evidence=good, malformed=bad, recovered=rec))
    return Conversation(sample_id=str(obj["sample_id"]), turns=turns, questions=questions, raw=obj)


def load_conversations(path: str | Path, ids: list[str] | None = None) -> list[Conversation]:
    """Read a LoCoMo JSON file (a list of conversation objects), optionally only `ids`."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidInput(f"LoCoMo file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise MalformedFile(f"{path}: not JSON ({e})") from None
    if not isinstance(data, list):
        raise MalformedFile(f"{path}: expected a JSON list of conversations")
    convs = [parse_conversation(o) for o in data]
    if ids:
        known = {c.sample_id for c in convs}
        missing = [i for i in ids if i not in known]
        if missing:
            raise InvalidInput(f"conversations not in {path}: {missing}; known: {sorted(known)}")
        convs = [c for c in convs if c.sample_id in set(ids)]
    return convs


def system_view(conv: Conversation) -> dict:
    """What a system under test may read: a fresh LoCoMo-format object with only the turns.

    Built from scratch (not a filtered copy) so no key added to the dataset later can leak through.
    Turns keep speaker, dia_id, text and blip_caption; sessions keep their dates.
    """
    out: dict = {}
    c = conv.raw["conversation"]
    out["speaker_a"] = str(c.get("speaker_a", ""))
    out["speaker_b"] = str(c.get("speaker_b", ""))
    for number, session in _sessions(c):
        out[f"session_{number}_date_time"] = str(c.get(f"session_{number}_date_time", ""))
        out[f"session_{number}"] = [
            {k: t[k] for k in ("speaker", "dia_id", "text", "blip_caption") if k in t}
            for t in session]
    return {"sample_id": conv.sample_id, "conversation": out}


def find_forbidden(obj, path: str = "") -> list[str]:
    """Paths of every forbidden key anywhere in `obj` (dicts and lists walked recursively)."""
    hits: list[str] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in FORBIDDEN_KEYS:
                hits.append(f"{path}/{k}")
            hits.extend(find_forbidden(v, f"{path}/{k}"))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            hits.extend(find_forbidden(v, f"{path}[{i}]"))
    return hits
