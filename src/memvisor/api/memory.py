"""`Memory`: the one facade of memvisor's plaintext memory. The CLI calls exactly these verbs."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from memvisor import timeutil
from memvisor.api.limits import MAX_BUDGET_TOKENS, MAX_TEXT_CHARS
from memvisor.errors import InvalidInput, KeyConflict
from memvisor.models.embedders import Embedder, default_embedder
from memvisor.models.tokenizer import HFTokenizer, default_tokenizer
from memvisor.store import portable
from memvisor.store.filters import Filters
from memvisor.store.items import NewItem, row_to_item
from memvisor.store.sqlite_store import SQLiteStore
from memvisor.text.formats import Conversation, load_conversations
from memvisor.text.pack import ContextPacker
from memvisor.text.retrieve import Candidate, HybridRetriever
from memvisor.types import KINDS, Context, IngestReport, MemoryItem, ScoreExplanation, SearchHit

BULK_WRITE = 10_000  # a write call this large saves the ANN index at its end (a reload beats a rebuild)
EMBED_WINDOW = 2_048  # memories embedded per embedder call in a bulk write (whole transactions)
Progress = Callable[[int], None]  # called with the number of items just written


def default_home() -> Path:
    return Path(os.environ.get("MEMVISOR_HOME") or Path.home() / ".memvisor")


def _raise_key_conflicts(items: list[NewItem], conflicts: list[tuple[int, str | int, list[str]]]) -> None:
    """KeyConflict, before anything is written, for keys that already name other content: skipping such an item
    as "already present" silently lost it (two JSON-lines files of the same name, two turns of one id)."""
    if not conflicts:
        return
    i, other, differ = conflicts[0]
    item, more = items[i], f" ({len(conflicts) - 1} more like it)" if len(conflicts) > 1 else ""
    where = (f"is given twice in this write (#{other} and #{i})" if isinstance(other, int)
             else f"is already stored as memory {other}")
    if item.key.startswith("turn:"):
        raise KeyConflict(
            f"turn {item.sources[0]!r} of conversation {item.thread!r} {where} with another {' and '.join(differ)}"
            f"{more}; nothing was ingested. A turn is known by its conversation and turn ids: give each "
            "conversation its own id (a JSON-lines turn's 'conversation' field defaults to the file's name) and "
            "each turn its own 'id', or ingest into another namespace")
    raise KeyConflict(f"key {item.key!r} {where} with another {' and '.join(differ)}{more}; nothing was written: "
                      "use a new key for new content")


def _checked_vectors(vectors: Any, n: int, dim: int) -> np.ndarray:
    """An embedder's output, refused before anything is written unless it is n finite rows of dim."""
    arr = np.asarray(vectors)
    if arr.shape != (n, dim) or not np.isfinite(arr).all():
        raise InvalidInput(f"the embedder returned an array of shape {arr.shape} (finite: {bool(np.isfinite(arr).all())}) "
                           f"for {n} texts; this store needs {n} finite rows of {dim} numbers: check the embedder")
    return arr


def _check_name(value: str | None, what: str, required: bool = False) -> str | None:
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip() or len(value) > 200 or not value.isprintable():
        raise InvalidInput(f"{what} must be a non-empty printable string of at most 200 characters, got {value!r}")
    return value


class Memory:
    """Plaintext memory in a home folder (SQLite + vector index), embedded in your process.

    >>> m = Memory("~/.memvisor")
    >>> item = m.add("Ana moved to Lyon", namespace="app", user="ana", valid_from="2024-03-01")
    >>> m.context("Where does Ana live?", namespace="app", budget_tokens=256).text
    """

    def __init__(self, home: str | Path | None = None, *, embedder: Embedder | None = None,
                 tokenizer: HFTokenizer | None = None, retriever: HybridRetriever | None = None,
                 packer: ContextPacker | None = None):
        self.home = Path(home).expanduser() if home is not None else default_home()
        self.embedder = embedder or default_embedder()
        self.store = SQLiteStore(self.home, self.embedder.dim, self.embedder.name)
        self.retriever = retriever or HybridRetriever()
        self._tokenizer = tokenizer
        self._packer = packer

    @property
    def packer(self) -> ContextPacker:
        if self._packer is None:
            self._packer = ContextPacker(self._tokenizer or default_tokenizer())
        return self._packer

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> "Memory":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- writes ---------------------------------------------------------------------------------

    def add(self, text: str, *, namespace: str = "default", user: str | None = None, agent: str | None = None,
            session: str | None = None, kind: str = "episodic", metadata: dict[str, Any] | None = None,
            sources: list[str] | None = None, valid_from: Any = None, valid_to: Any = None,
            key: str | None = None) -> MemoryItem:
        """Store one memory; returns it once durable. Re-adding the same content (or `key`) returns the
        existing memory and writes nothing."""
        return self.add_many([dict(text=text, user=user, agent=agent, session=session, kind=kind,
                                   metadata=metadata, sources=sources, valid_from=valid_from,
                                   valid_to=valid_to, key=key)], namespace=namespace).items[0]

    def add_many(self, records: Iterable[dict[str, Any] | str], *, namespace: str = "default",
                 batch_size: int = 256, progress: Progress | None = None) -> "AddResult":
        """Store many memories. Every record is validated before anything is written; then batches of
        `batch_size` are each one transaction (a re-run after a crash skips what was committed)."""
        items = [self._validate(namespace, r, i) for i, r in enumerate(records)]
        return self._write(items, batch_size, progress)

    def ingest(self, source: str | Path | Conversation | list[Conversation], *, namespace: str = "default",
               user: str | None = None, progress: Progress | None = None) -> IngestReport:
        """Ingest whole conversations (LoCoMo JSON, JSON-lines turns, or `Conversation` objects): each turn
        becomes an episodic memory citing its turn id; re-ingesting the same conversation adds nothing."""
        if isinstance(source, Conversation):
            conversations = [source]
        elif isinstance(source, list):
            conversations = source
        else:
            conversations = load_conversations(source)
        records, embedded_context = [], []
        for conv in conversations:
            for position, turn in enumerate(conv.turns):
                # The turns beside this one in its session are indexed for full text with it: a reply ("a
                # year ago, in Paris") is found by the words of the question it answers, and a question by
                # its answer's. Only the previous turn is embedded with it (the next one too measured
                # worse; NOTES.md, retrieval tuning).
                before, after = (_turn_line(conv.turns[p]) if 0 <= p < len(conv.turns)
                                 and conv.turns[p].session == turn.session else None
                                 for p in (position - 1, position + 1))
                embedded_context.append(before)
                records.append(dict(context="\n".join(x for x in (before, after) if x) or None,
                    text=turn.text, user=user, session=turn.session, kind="episodic",
                    metadata={"speaker": turn.speaker, "turn_id": turn.source_id, "conversation": conv.id},
                    sources=[turn.source_id], valid_from=turn.time, thread=conv.id, position=position,
                    key=f"turn:{conv.id}:{turn.source_id}"))
        items = [self._validate(namespace, r, i, f"turn {r['sources'][0]!r} of conversation {r['thread']!r}")
                 for i, r in enumerate(records)]  # errors name the turn, not its place in the whole ingest
        result = self._write(items, 256, progress, embedded_context)
        return IngestReport(namespace, result.added, result.duplicates, [i.id for i in result.items])

    def _validate(self, namespace: str, r: dict[str, Any] | str, index: int, where: str | None = None) -> NewItem:
        where = where or (f"memory #{index}" if index else "memory")
        _check_name(namespace, "namespace", required=True)
        if isinstance(r, str):  # add_many(["text", ...]): the memory's text alone
            r = {"text": r}
        if not isinstance(r, dict):
            raise InvalidInput(f"{where}: expected a dict with 'text' (or a string), got {type(r).__name__}")
        text = r.get("text")
        if not isinstance(text, str):
            raise InvalidInput(f"{where}: text must be a string, got {type(text).__name__}")
        if not text.strip():
            raise InvalidInput(f"{where}: text is empty; give the memory's text")
        if len(text) > MAX_TEXT_CHARS:
            raise InvalidInput(f"{where}: text has {len(text)} characters, more than {MAX_TEXT_CHARS}: "
                               "split it into several memories")
        kind = r.get("kind") or "episodic"
        if kind not in KINDS:
            raise InvalidInput(f"{where}: unknown kind {kind!r}; use one of {', '.join(KINDS)}")
        metadata = r.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise InvalidInput(f"{where}: metadata must be a JSON object (a dict)")
        try:  # checked here, before any batch commits: a set or a NaN would fail (or poison filters) later
            json.dumps(metadata, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise InvalidInput(f"{where}: metadata must hold only JSON values (strings, finite numbers, "
                               f"booleans, null, lists, objects): {exc}") from None
        for field, kinds in (("key", str), ("context", str), ("thread", str), ("position", int)):
            value = r.get(field)
            if value is not None and (not isinstance(value, kinds) or isinstance(value, bool)):
                raise InvalidInput(f"{where}: {field} must be {'an integer' if kinds is int else 'a string'} "
                                   f"or absent, got {type(value).__name__}")
        sources = r.get("sources") or []
        if not isinstance(sources, list) or not all(isinstance(s, str) for s in sources):
            raise InvalidInput(f"{where}: sources must be a list of id strings")
        valid_from = timeutil.to_iso(r.get("valid_from"), "valid_from")
        valid_to = timeutil.to_iso(r.get("valid_to"), "valid_to")
        if valid_from and valid_to and valid_to <= valid_from:
            raise InvalidInput(f"{where}: valid_to ({valid_to}) must be after valid_from ({valid_from})")
        return NewItem(namespace=namespace, text=text.strip(), kind=kind,
                       user=_check_name(r.get("user"), "user"), agent=_check_name(r.get("agent"), "agent"),
                       session=_check_name(r.get("session"), "session"), metadata=metadata, sources=sources,
                       valid_from=valid_from, valid_to=valid_to, thread=r.get("thread"),
                       position=r.get("position"), context=r.get("context"), key=r.get("key"))

    def _write(self, items: list[NewItem], batch_size: int, progress: Progress | None,
               embedded_context: list[str | None] | None = None) -> "AddResult":
        """`embedded_context`: per item, the context to embed when it is not the indexed one."""
        _raise_key_conflicts(items, self.store.key_conflicts(items))
        written: list[MemoryItem] = []
        added = 0
        # Several transactions are embedded at once: the embedder sorts what it gets by length, so a wider
        # window pads less (the scale bench's texts: 34% / 13% / 7% / 2% more tokens than they hold for
        # windows of 64 / 256 / 512 / 2,048, NOTES session 7); each batch still commits on its own.
        window = max(batch_size, EMBED_WINDOW // batch_size * batch_size)
        for wstart in range(0, len(items), window):
            chunk = items[wstart:wstart + window]
            contexts = embedded_context[wstart:wstart + window] if embedded_context is not None else None
            vectors = _checked_vectors(self.embedder.encode(_embedding_texts(chunk, contexts)), len(chunk),
                                       self.store.dim)
            for start in range(0, len(chunk), batch_size):
                batch = chunk[start:start + batch_size]
                for item, created in self.store.add_items(batch, vectors[start:start + batch_size]):
                    written.append(item)
                    added += created
                # The ANN index follows each batch: building it lazily at the first search cost 40 s at
                # 100k memories (and minutes at 1M) in that search, and the bulk write's rate hid it.
                self.store.vector_index(batch[0].namespace)
                if progress:
                    progress(len(batch))
        if len(items) >= BULK_WRITE:
            self.store.save_index(items[0].namespace)
        return AddResult(written, added, len(written) - added)

    def update(self, memory_id: str, *, namespace: str = "default", text: str | None = None,
               metadata: dict[str, Any] | None = None, kind: str | None = None,
               valid_from: Any = None) -> MemoryItem:
        """A new version. With `valid_from` the world changed then (the old version stays true before it);
        without, it is a correction of the old version. The old version stays in `history`.

        `metadata` is merged into the old metadata (a JSON merge patch at the top level): the keys it
        gives replace the old ones, a key given as None is removed, the others stay (an ingested turn
        keeps its speaker)."""
        if text is None and metadata is None and kind is None:
            raise InvalidInput("update needs at least one of text, metadata or kind")
        head = self.get(memory_id, namespace=namespace)
        if metadata is not None:
            if not isinstance(metadata, dict):
                raise InvalidInput(f"metadata must be a JSON object (a dict), got {type(metadata).__name__}")
            removed = {k for k, v in metadata.items() if v is None}
            metadata = {k: v for k, v in {**head.metadata, **metadata}.items() if k not in removed}
        merged = self._validate(namespace, dict(text=text if text is not None else head.text, kind=kind or head.kind,
                                                metadata=metadata if metadata is not None else head.metadata), 0)
        start = timeutil.to_iso(valid_from, "valid_from")
        if start and head.valid_from and start <= head.valid_from:
            raise InvalidInput(f"valid_from {start} must be after the current version's valid_from "
                               f"{head.valid_from}; to correct the old text, update without valid_from")
        if start and head.valid_to and start >= head.valid_to:
            raise InvalidInput(f"valid_from {start} must be before the current version's valid_to "
                               f"{head.valid_to}: it stopped being true then; add a new memory instead")
        changes = {"text": text and merged.text, "metadata": metadata, "kind": kind, "valid_from": start}
        vector = None
        row = self.store.head_row(namespace, memory_id)
        if text is not None or merged.speaker != row["speaker"]:  # the vector embeds "speaker: text"
            merged.context = self._embedded_context(row)
            vector = _checked_vectors(self.embedder.encode([_embedding_text(merged)]), 1, self.store.dim)[0]
        return self.store.revise(namespace, memory_id, "update", changes, vector)

    def _embedded_context(self, row: Any) -> str | None:
        """The context a memory's vector is computed with: what `ingest` embedded for a conversation
        turn (the previous turn of its session, as it reads now; its stored context holds the next
        turn too, for full text only), the stored context otherwise."""
        metadata = json.loads(row["metadata"] or "{}")
        if "turn_id" not in metadata or row["thread"] is None or row["position"] is None:
            return row["context"]
        before = self.store.thread_rows(row["namespace"], row["thread"], row["position"] - 1,
                                        row["position"] - 1, Filters(namespace=row["namespace"]))
        same = [r for r in before if r["session_id"] == row["session_id"]]
        return f"{same[0]['speaker']}: {same[0]['text']}" if same else None

    def invalidate(self, memory_id: str, *, namespace: str = "default", at: Any = None,
                   reason: str | None = None) -> MemoryItem:
        """It stopped being true at `at` (default now). Not deleted: `as_of` an earlier time still finds it."""
        head = self.get(memory_id, namespace=namespace)
        end = timeutil.to_iso(at, "at") or timeutil.now()
        if head.valid_from and end <= head.valid_from:
            raise InvalidInput(f"at {end} must be after the memory's valid_from {head.valid_from}; "
                               "to remove a memory that was never true, delete it")
        if head.valid_to and end > head.valid_to:  # a later end would make it true again in between, silently
            raise InvalidInput(f"memory {memory_id} already stopped being true at {head.valid_to}: invalidate it "
                               "at that time or earlier, or add a new memory if it became true again")
        return self.store.revise(namespace, memory_id, "invalidate", {"valid_to": end, "reason": reason}, None)

    def delete(self, memory_id: str, *, namespace: str = "default") -> int:
        """Remove a memory and all its versions from every index; returns the number of versions removed."""
        _check_name(namespace, "namespace", required=True)
        self.store.require_namespace(namespace)
        return self.store.delete(namespace, memory_id)

    def delete_namespace(self, namespace: str) -> int:
        """Purge a namespace: every memory, version, key and log entry in it, and its index. Its name is
        free again (to write or import into). Returns the number of memories removed."""
        _check_name(namespace, "namespace", required=True)
        self.store.require_namespace(namespace)
        return self.store.drop_namespace(namespace)

    # ---- reads ----------------------------------------------------------------------------------

    def get(self, memory_id: str, *, namespace: str = "default") -> MemoryItem:
        _check_name(namespace, "namespace", required=True)
        return self.store.head(namespace, memory_id)

    def history(self, memory_id: str, *, namespace: str = "default") -> list[MemoryItem]:
        """Every stored version of a memory, oldest first, with both valid and recorded times."""
        _check_name(namespace, "namespace", required=True)
        return self.store.versions(namespace, memory_id)

    def _filters(self, namespace: str, user: str | None, agent: str | None, session: str | None,
                 kinds: Iterable[str] | None, metadata: dict | None, as_of: Any, known_at: Any) -> Filters:
        _check_name(namespace, "namespace", required=True)
        self.store.require_namespace(namespace)
        kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds or ())  # "semantic" is one kind, not letters
        return Filters(namespace=namespace, user=user, agent=agent, session=session, kinds=kinds,
                       metadata=dict(metadata or {}), as_of=timeutil.to_iso(as_of, "as_of"),
                       known_at=timeutil.to_iso(known_at, "known_at"))

    def search(self, query: str, *, namespace: str = "default", k: int = 10, user: str | None = None,
               agent: str | None = None, session: str | None = None, kinds: Iterable[str] | None = None,
               metadata: dict | None = None, as_of: Any = None, known_at: Any = None) -> list[SearchHit]:
        """The k best memories for `query`, each with its score and an explanation of it."""
        _check_query(query)
        if not isinstance(k, int) or k < 1 or k > 10_000:
            raise InvalidInput(f"k must be an integer from 1 to 10000, got {k!r}")
        filters = self._filters(namespace, user, agent, session, kinds, metadata, as_of, known_at)
        return [_hit(c) for c in self.retriever.retrieve(self.store, self.embedder, query, filters, k)]

    def context(self, query: str, *, namespace: str = "default", budget_tokens: int = 1024,
                user: str | None = None, agent: str | None = None, session: str | None = None,
                kinds: Iterable[str] | None = None, metadata: dict | None = None, as_of: Any = None,
                known_at: Any = None) -> Context:
        """The most useful memories that fit `budget_tokens` (counted with the model's tokenizer),
        formatted for a prompt, with citations."""
        _check_query(query)
        if not isinstance(budget_tokens, int) or not 1 <= budget_tokens <= MAX_BUDGET_TOKENS:
            raise InvalidInput(f"budget_tokens must be an integer from 1 to {MAX_BUDGET_TOKENS}, "
                               f"got {budget_tokens!r}")
        filters = self._filters(namespace, user, agent, session, kinds, metadata, as_of, known_at)
        candidates = self.retriever.retrieve(self.store, self.embedder, query, filters,
                                             limit=max(50, budget_tokens // 8))
        candidates = self.packer.expand(self.store, candidates, filters)
        return self.packer.pack(candidates, budget_tokens)

    # ---- portability ----------------------------------------------------------------------------

    def export(self, namespace: str, directory: str | Path) -> Path:
        """Write a namespace as plain files (JSON lines + safetensors, with a schema version)."""
        _check_name(namespace, "namespace", required=True)
        self.store.require_namespace(namespace)
        return portable.export_namespace(self.store, namespace, Path(directory))

    def import_(self, directory: str | Path) -> IngestReport:
        """Load an exported namespace into this home (the namespace must not exist here yet: `delete_namespace`
        frees a name)."""
        return portable.import_namespace(self.store, Path(directory))


class AddResult:
    """What `add_many` wrote: the items (existing ones for duplicates), how many were new."""

    def __init__(self, items: list[MemoryItem], added: int, duplicates: int):
        self.items, self.added, self.duplicates = items, added, duplicates

    def __repr__(self) -> str:
        return f"AddResult(added={self.added}, duplicates={self.duplicates})"


def _turn_line(turn: Any) -> str:
    return f"{turn.speaker}: {turn.text}"


def _embedding_text(item: NewItem) -> str:
    line = f"{item.speaker}: {item.text}" if item.speaker else item.text
    return f"{item.context}\n{line}" if item.context else line


def _embedding_texts(items: list[NewItem], contexts: list[str | None] | None) -> list[str]:
    """What is embedded for each item: its own indexed context, or ``contexts[i]`` where given."""
    if contexts is None:
        return [_embedding_text(i) for i in items]
    return [_embedding_text(dataclasses.replace(i, context=c)) for i, c in zip(items, contexts)]


def _check_query(query: str) -> None:
    if not isinstance(query, str):
        raise InvalidInput(f"the query must be a string, got {type(query).__name__}")
    if not query.strip():
        raise InvalidInput("the query is empty; ask something")
    if len(query) > MAX_TEXT_CHARS:
        raise InvalidInput(f"the query has {len(query)} characters, more than {MAX_TEXT_CHARS}")


def _hit(c: Candidate) -> SearchHit:
    return SearchHit(item=row_to_item(c.row), score=c.score, explanation=ScoreExplanation(
        bm25_rank=c.bm25_rank, vector_rank=c.vector_rank, vector_similarity=c.vector_similarity,
        fused=c.fused, time_boost=c.time_boost, speaker_boost=c.speaker_boost, neighbour_of=c.neighbour_of))
