"""The embedded store: SQLite in WAL mode holding the log, the item versions, FTS5 and the vectors.

Every write is one transaction covering the event, the version rows, the full-text index and the
vectors; a write is acknowledged (the method returns) only after COMMIT with synchronous=FULL, so an
acknowledged write survives a process kill or a power cut. The ANN index (`vector_index.py`) is a
cache of the `vectors` table that catches up from the log.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import secrets
import sqlite3
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from memvisor import timeutil
from memvisor.errors import InvalidInput, UnknownMemory, UnknownNamespace
from memvisor.store.filters import Filters
from memvisor.store.items import ITEM_COLUMNS, NewItem, row_to_item, row_to_new_item
from memvisor.store.term_stats import TermStats
from memvisor.store.vector_index import VectorIndex
from memvisor.types import MemoryItem

SCHEMA_VERSION = 1
# Save the ANN cache after this many changes, or a quarter of the index if more (a 1M index is ~0.9 GB
# to write); the log replays the rest after a crash.
SAVE_EVERY = 50_000

# meta key prefix, + namespace: a delete there still has traces in the files to scrub (at close)
SCRUB_MARK = "scrub_pending:"


def _index_name(namespace: str) -> str:
    """The file stem of a namespace's ANN index (names may hold any printable character)."""
    return hashlib.sha256(namespace.encode()).hexdigest()[:16]


class SQLiteStore:
    """One SQLite file per memvisor home; namespaces are partitions inside it."""

    def __init__(self, home: Path, dim: int, embedder_name: str):
        self.home = home
        if home.exists() and not home.is_dir():
            raise InvalidInput(f"the memvisor home {home} is a file: give a folder (it is created if missing)")
        home.mkdir(parents=True, exist_ok=True)
        self.dim = dim
        self.db = sqlite3.connect(home / "memvisor.db", isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        try:
            self.db.execute("PRAGMA journal_mode=WAL")
        except sqlite3.DatabaseError as e:  # the first read of the file: "file is not a database"
            self.db.close()
            raise InvalidInput(f"{home / 'memvisor.db'} is not a memvisor database ({e}): give another home "
                               "folder, or move that file away") from None
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA busy_timeout=10000")
        # Deleted rows are overwritten with zeros, not left readable in free pages (delete is a purge).
        self.db.execute("PRAGMA secure_delete=ON")
        self.db.executescript(resources.files("memvisor.store").joinpath("schema.sql").read_text())
        self._check_meta(embedder_name)
        (home / "vectors").mkdir(exist_ok=True)
        self._indexes: dict[str, VectorIndex] = {}
        self._speakers: dict[str, tuple[int, frozenset[str]]] = {}
        self.terms = TermStats(self.db)  # full-text word statistics for query planning (text/retrieve.py)

    def _check_meta(self, embedder_name: str) -> None:
        meta = dict(self.db.execute("SELECT key, value FROM meta").fetchall())
        expected = {"schema_version": str(SCHEMA_VERSION), "embedder": embedder_name, "dim": str(self.dim)}
        if not meta:
            with self.transaction() as cur:
                cur.executemany("INSERT INTO meta VALUES (?, ?)", expected.items())
            return
        if meta.get("schema_version") != str(SCHEMA_VERSION):
            raise InvalidInput(f"{self.home} holds schema version {meta.get('schema_version')}, this memvisor "
                               f"reads version {SCHEMA_VERSION}: export with the older release and import here")
        if (meta.get("embedder"), meta.get("dim")) != (embedder_name, str(self.dim)):
            raise InvalidInput(f"{self.home} was built with embedder {meta.get('embedder')} "
                               f"(dim {meta.get('dim')}); open it with that embedder, or export and import "
                               f"into a new home to re-embed with {embedder_name}")

    def close(self) -> None:
        self._scrub_deleted()
        for namespace, index in self._indexes.items():
            if index.dirty:
                # caught up first: a delete by another process must not be saved back into the file
                self._catch_up(namespace, index)
                index.save()
        self.db.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Cursor]:
        """BEGIN IMMEDIATE ... COMMIT; any exception rolls everything back (nothing is partly written)."""
        cur = self.db.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            yield cur
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        cur.execute("COMMIT")

    # ---- writes ---------------------------------------------------------------------------------

    def key_conflicts(self, items: list[NewItem]) -> list[tuple[int, str | int, list[str]]]:
        """(index, the other, differing fields) of each item whose client key already names other content with
        another kind, text, user, agent or session: the other is a stored memory's id (its first version counts:
        later updates do not) or the index of an earlier item of ``items``. A content-hash key cannot conflict:
        the same key is the same content."""
        out: list[tuple[int, str | int, list[str]]] = []
        first: dict[tuple[str, str], tuple[str | int, tuple]] = {}
        for i, item in enumerate(items):
            if not item.key:
                continue
            key, mine = item.idempotency_key(), (item.kind, item.text, item.user, item.agent, item.session)
            seen = first.get((item.namespace, key))
            if seen is None:
                hit = self.db.execute("SELECT id FROM item_keys WHERE namespace=? AND key=?",
                                      (item.namespace, key)).fetchone()
                if hit:
                    row = self.db.execute("SELECT kind, text, user_id, agent_id, session_id FROM items WHERE "
                                          "namespace=? AND id=? ORDER BY rid LIMIT 1", (item.namespace, hit[0]))
                    seen = (hit[0], tuple(row.fetchone()))
                else:
                    seen = (i, mine)
                first[(item.namespace, key)] = seen
            differ = [name for name, a, b in zip(("kind", "text", "user", "agent", "session"), seen[1], mine) if a != b]
            if differ:
                out.append((i, seen[0], differ))
        return out

    def add_items(self, items: list[NewItem], vectors: np.ndarray) -> list[tuple[MemoryItem, bool]]:
        """Write new memories in ONE transaction. Returns (item, created); created is False when the
        idempotency key already existed (the existing memory is returned, nothing is written)."""
        now = timeutil.now()
        results: list[tuple[str, bool]] = []
        with self.transaction() as cur:
            for item, vec in zip(items, vectors):
                key = item.idempotency_key()
                hit = cur.execute("SELECT id FROM item_keys WHERE namespace=? AND key=?",
                                  (item.namespace, key)).fetchone()
                if hit:
                    results.append((hit[0], False))
                    continue
                cur.execute("INSERT OR IGNORE INTO namespaces VALUES (?, ?)", (item.namespace, now))
                item_id = secrets.token_hex(8)
                cur.execute("INSERT INTO item_keys VALUES (?, ?, ?)", (item.namespace, key, item_id))
                payload = {"text": item.text, "kind": item.kind, "user": item.user, "agent": item.agent,
                           "session": item.session, "metadata": item.metadata, "sources": item.sources,
                           "valid_from": item.valid_from, "valid_to": item.valid_to, "key": key,
                           "thread": item.thread, "position": item.position, "context": item.context}
                seq = self._event(cur, item.namespace, "add", item_id, payload, now)
                rid = self._insert_row(cur, seq, item_id, 1, item, "active", item.valid_from, item.valid_to,
                                       now, vec)
                self._set_rids(cur, seq, payload, [rid])
                results.append((item_id, True))
        # Duplicates inside one batch resolve to the first; read everything back once, after commit.
        return [(self.head(items[0].namespace, item_id), created) for item_id, created in results]

    def _event(self, cur: sqlite3.Cursor, namespace: str, op: str, item_id: str, payload: dict, at: str) -> int:
        cur.execute("INSERT INTO events (namespace, op, item_id, payload, recorded_at) VALUES (?, ?, ?, ?, ?)",
                    (namespace, op, item_id, json.dumps(payload, ensure_ascii=False), at))
        return cur.lastrowid

    def _set_rids(self, cur: sqlite3.Cursor, seq: int, payload: dict, rids: list[int]) -> None:
        payload["rids"] = rids
        cur.execute("UPDATE events SET payload=? WHERE seq=?", (json.dumps(payload, ensure_ascii=False), seq))

    def _insert_row(self, cur: sqlite3.Cursor, seq: int, item_id: str, version: int, item: NewItem,
                    status: str, valid_from: str | None, valid_to: str | None, recorded_at: str,
                    vec: np.ndarray | bytes) -> int:
        cur.execute(
            "INSERT INTO items (id, namespace, version, kind, user_id, agent_id, session_id, thread, position, "
            "text, context, speaker, metadata, sources, status, valid_from, valid_to, recorded_at, expired_at, seq) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, ?)",
            (item_id, item.namespace, version, item.kind, item.user, item.agent, item.session, item.thread,
             item.position, item.text, item.context, item.speaker, json.dumps(item.metadata, ensure_ascii=False),
             json.dumps(item.sources, ensure_ascii=False), status, valid_from, valid_to, recorded_at, seq))
        rid = cur.lastrowid
        cur.execute("INSERT INTO items_fts (rowid, text, context) VALUES (?, ?, ?)", (rid, item.text, item.context))
        blob = vec if isinstance(vec, bytes) else np.asarray(vec, dtype=np.float16).tobytes()
        cur.execute("INSERT INTO vectors VALUES (?, ?)", (rid, blob))
        return rid

    def revise(self, namespace: str, item_id: str, op: str, changes: dict[str, Any],
               new_vector: np.ndarray | None) -> MemoryItem:
        """Update or invalidate: the head version is expired (system time) and superseded by new rows.

        - `update` with `valid_from` T (the world changed at T): a copy of the old version bounded to
          valid_to=T stays believed, and version v+1 holds the new content from T.
        - `update` without it (a correction): version v+1 replaces v over the same validity.
        - `invalidate` with `valid_to` T: a copy of the head bounded to T, status invalidated.
        """
        now = timeutil.now()
        with self.transaction() as cur:
            head = self.head_row(namespace, item_id, cur)
            old = row_to_new_item(head)
            cur.execute("UPDATE items SET expired_at=?, status='superseded' WHERE rid=?", (now, head["rid"]))
            seq = self._event(cur, namespace, op, item_id, dict(changes), now)
            old_vec = cur.execute("SELECT vec FROM vectors WHERE rid=?", (head["rid"],)).fetchone()[0]
            rids = []
            if op == "invalidate":
                rids.append(self._insert_row(cur, seq, item_id, head["version"], old, "invalidated",
                                             head["valid_from"], changes["valid_to"], now, old_vec))
            else:
                new = row_to_new_item(head)
                for field in ("text", "kind", "metadata"):
                    if changes.get(field) is not None:
                        setattr(new, field, changes[field])
                start = changes.get("valid_from")
                if start is not None:
                    rids.append(self._insert_row(cur, seq, item_id, head["version"], old, "active",
                                                 head["valid_from"], start, now, old_vec))
                vec = new_vector if new_vector is not None else old_vec
                rids.append(self._insert_row(cur, seq, item_id, head["version"] + 1, new, "active",
                                             start if start is not None else head["valid_from"],
                                             head["valid_to"], now, vec))
            self._set_rids(cur, seq, dict(changes), rids)
        return self.head(namespace, item_id)

    def delete(self, namespace: str, item_id: str) -> int:
        """Hard delete: every version leaves the items, full-text and vector tables; earlier events of the
        item keep only a tombstone (their text is redacted). Returns the number of version rows removed."""
        now = timeutil.now()
        with self.transaction() as cur:
            rows = cur.execute("SELECT rid, text, context FROM items WHERE namespace=? AND id=?",
                               (namespace, item_id)).fetchall()
            if not rows:
                raise UnknownMemory(f"no memory {item_id!r} in namespace {namespace!r}")
            rids = [r["rid"] for r in rows]
            for r in rows:
                cur.execute("INSERT INTO items_fts (items_fts, rowid, text, context) VALUES ('delete', ?, ?, ?)",
                            (r["rid"], r["text"], r["context"]))
            marks = ",".join("?" * len(rids))
            cur.execute(f"DELETE FROM vectors WHERE rid IN ({marks})", rids)
            cur.execute(f"DELETE FROM items WHERE rid IN ({marks})", rids)
            cur.execute("DELETE FROM item_keys WHERE namespace=? AND id=?", (namespace, item_id))
            cur.execute("UPDATE events SET payload=? WHERE namespace=? AND item_id=?",
                        (json.dumps({"redacted": True}), namespace, item_id))
            self._event(cur, namespace, "delete", item_id, {"removed_rids": rids}, now)
            # The files are scrubbed at close (_scrub_deleted); the mark is written with the delete, so a
            # process that dies first leaves it to the next one's close.
            cur.execute("INSERT OR REPLACE INTO meta VALUES (?, '1')", (SCRUB_MARK + namespace,))
        return len(rids)

    def drop_namespace(self, namespace: str) -> int:
        """Purge a whole namespace: its rows, keys, log and ANN index, as if it never existed (its name can
        be written or imported again). Returns the number of memories it held. The files are scrubbed at
        close, as after `delete`."""
        with self.transaction() as cur:
            count = cur.execute("SELECT count(DISTINCT id) FROM items WHERE namespace=?", (namespace,)).fetchone()[0]
            rows = cur.execute("SELECT rid, text, context FROM items WHERE namespace=?", (namespace,)).fetchall()
            cur.executemany("INSERT INTO items_fts (items_fts, rowid, text, context) VALUES ('delete', ?, ?, ?)",
                            [(r["rid"], r["text"], r["context"]) for r in rows])
            cur.execute("DELETE FROM vectors WHERE rid IN (SELECT rid FROM items WHERE namespace=?)", (namespace,))
            for table, column in (("items", "namespace"), ("item_keys", "namespace"), ("events", "namespace"),
                                  ("namespaces", "name")):
                cur.execute(f"DELETE FROM {table} WHERE {column}=?", (namespace,))
            cur.execute("INSERT OR REPLACE INTO meta VALUES (?, '1')", (SCRUB_MARK + namespace,))
        # The index file is a cache of what was just removed: gone with it. Another process holding the
        # index in memory resets it at its next catch-up (`_catch_up`: the log's first event moved on).
        self._indexes.pop(namespace, None)
        self._speakers.pop(namespace, None)
        for path in (self._index_path(namespace), self.home / "vectors" / f"{_index_name(namespace)}.json"):
            path.unlink(missing_ok=True)
        return count

    def _scrub_deleted(self) -> None:
        """What is still on disk of deleted rows goes too, once per close for the namespaces marked by a
        delete (not per delete: a rewrite costs ~0.9 s at 10k memories): FTS5 keeps deleted words in its
        segments until they merge ('optimize' rewrites them; SQLite 3.44's secure-delete option would avoid
        it), a saved ANN index keeps removed vectors (`VectorIndex.save` overwrites their slots first), and
        the WAL keeps old page images until a truncating checkpoint."""
        marks = [r[0] for r in self.db.execute("SELECT key FROM meta WHERE substr(key, 1, ?) = ?",
                                               (len(SCRUB_MARK), SCRUB_MARK))]
        if not marks:
            return
        with self.transaction() as cur:
            cur.execute("INSERT INTO items_fts (items_fts) VALUES ('optimize')")
        for mark in marks:
            namespace = mark[len(SCRUB_MARK):]
            # An index neither loaded nor saved holds nothing on disk: only those are caught up and rewritten.
            if namespace in self._indexes or self._index_path(namespace).exists():
                index = self.vector_index(namespace)
                if index.removed:
                    index.save()
        with self.transaction() as cur:
            cur.executemany("DELETE FROM meta WHERE key=?", [(m,) for m in marks])
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    # ---- reads ----------------------------------------------------------------------------------

    def head_row(self, namespace: str, item_id: str, cur: sqlite3.Cursor | None = None) -> sqlite3.Row:
        """The row of the newest believed version."""
        row = (cur or self.db).execute(f"SELECT {ITEM_COLUMNS} FROM items WHERE namespace=? AND id=? AND expired_at IS NULL "
                          "ORDER BY version DESC, rid DESC LIMIT 1", (namespace, item_id)).fetchone()
        if row is None:
            self.require_namespace(namespace)
            raise UnknownMemory(f"no memory {item_id!r} in namespace {namespace!r}")
        return row

    def head(self, namespace: str, item_id: str) -> MemoryItem:
        """The newest believed version of a memory."""
        return row_to_item(self.head_row(namespace, item_id))

    def versions(self, namespace: str, item_id: str) -> list[MemoryItem]:
        rows = self.db.execute(f"SELECT {ITEM_COLUMNS} FROM items WHERE namespace=? AND id=? ORDER BY rid",
                               (namespace, item_id)).fetchall()
        if not rows:
            self.require_namespace(namespace)
            raise UnknownMemory(f"no memory {item_id!r} in namespace {namespace!r}")
        return [row_to_item(r) for r in rows]

    def require_namespace(self, namespace: str) -> None:
        if not self.db.execute("SELECT 1 FROM namespaces WHERE name=?", (namespace,)).fetchone():
            raise UnknownNamespace(f"namespace {namespace!r} has no memories: add some first, "
                                   f"or check the name (known: {', '.join(self.namespaces()) or 'none'})")

    def namespaces(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT name FROM namespaces ORDER BY name")]

    def rows(self, rids: list[int], filters: Filters | None = None) -> dict[int, sqlite3.Row]:
        """Rows by rid, keeping only those the filters admit."""
        out: dict[int, sqlite3.Row] = {}
        for start in range(0, len(rids), 900):  # SQLite's bound-parameter limit
            chunk = rids[start:start + 900]
            # NOT INDEXED: look rows up by primary key; otherwise SQLite walks the namespace's
            # `items_current` index (every current row: 4 ms at 10k, linear in the store's size).
            sql = f"SELECT {ITEM_COLUMNS} FROM items NOT INDEXED WHERE rid IN ({','.join('?' * len(chunk))})"
            args: list[Any] = list(chunk)
            if filters is not None:
                where, extra = filters.where()
                sql += " AND " + where
                args += extra
            out.update({r["rid"]: r for r in self.db.execute(sql, args)})
        return out

    def full_text(self, match: str, filters: Filters, limit: int,
                  context_weight: float = 0.5) -> list[tuple[int, float]]:
        """(rid, bm25) best first; `match` is an FTS5 expression built by the caller from quoted terms.
        A term found in `context` counts `context_weight` as much as one in the text itself.
        FTS5's bm25() is lower-is-better; it is negated here so higher is better everywhere."""
        where, args = filters.where()
        rank = f"bm25(items_fts, 1.0, {float(context_weight)!r})"
        rows = self.db.execute(
            f"SELECT items.rid, {rank} FROM items_fts JOIN items ON items.rid = items_fts.rowid "
            f"WHERE items_fts MATCH ? AND {where} ORDER BY {rank} LIMIT ?", [match, *args, limit])
        return [(r[0], -r[1]) for r in rows]

    def thread_rows(self, namespace: str, thread: str, first: int, last: int,
                    filters: Filters) -> list[sqlite3.Row]:
        where, args = filters.where()
        return self.db.execute(
            f"SELECT {ITEM_COLUMNS} FROM items WHERE thread=? AND position BETWEEN ? AND ? AND {where} "
            "ORDER BY position", [thread, first, last, *args]).fetchall()

    def last_seq(self, namespace: str) -> int:
        return self.db.execute("SELECT max(seq) FROM events WHERE namespace=?", (namespace,)).fetchone()[0] or 0

    def speakers(self, namespace: str) -> frozenset[str]:
        """Distinct speakers of a namespace; cached until the namespace's log moves on."""
        seq = self.last_seq(namespace)
        cached = self._speakers.get(namespace)
        if cached is None or cached[0] != seq:
            names = frozenset(r[0] for r in self.db.execute(
                "SELECT DISTINCT speaker FROM items WHERE namespace=? AND speaker IS NOT NULL", (namespace,)))
            cached = self._speakers[namespace] = (seq, names)
        return cached[1]

    def count(self, filters: Filters) -> int:
        where, args = filters.where()
        return self.db.execute(f"SELECT count(*) FROM items WHERE {where}", args).fetchone()[0]

    # ---- vectors --------------------------------------------------------------------------------

    def vector_index(self, namespace: str) -> VectorIndex:
        """The namespace's ANN index, caught up with the log (cheap when nothing changed)."""
        index = self._indexes.get(namespace)
        if index is None:
            index = self._indexes[namespace] = VectorIndex(self.home / "vectors", _index_name(namespace), self.dim)
        self._catch_up(namespace, index)
        return index

    def _catch_up(self, namespace: str, index: VectorIndex) -> None:
        last = self.last_seq(namespace)
        if last == index.applied_seq:
            return
        # its own one-row seek on events_by_seq (min and max in one SELECT would scan the namespace's events)
        first = self.db.execute("SELECT min(seq) FROM events WHERE namespace=?", (namespace,)).fetchone()[0] or 0
        # Newer than the database (a restored backup?), or built before the namespace was dropped and written
        # again (its log now starts after what the index applied): rebuilt from the log.
        if last < index.applied_seq or first > index.applied_seq:
            index.reset()
        added: list[int] = []
        for op, payload in self.db.execute("SELECT op, payload FROM events WHERE namespace=? AND seq>? "
                                           "ORDER BY seq", (namespace, index.applied_seq)):
            body = json.loads(payload)
            if op == "delete":
                removed = set(body["removed_rids"])
                added = [r for r in added if r not in removed]
                index.remove(list(removed))
            else:
                added += body.get("rids", [])
        for start in range(0, len(added), 10_000):
            chunk = added[start:start + 10_000]
            found = self.db.execute(f"SELECT rid, vec FROM vectors WHERE rid IN ({','.join('?' * len(chunk))})",
                                    chunk).fetchall()
            if found:
                keys = np.array([r[0] for r in found], dtype=np.int64)
                vecs = np.frombuffer(b"".join(r[1] for r in found), dtype=np.float16).reshape(len(found), self.dim)
                index.add(keys, vecs)
        index.applied_seq = last
        if index.dirty >= max(SAVE_EVERY, len(index) // 4):
            index.save()

    def _index_path(self, namespace: str) -> Path:
        return VectorIndex.file_path(self.home / "vectors", _index_name(namespace))

    def save_index(self, namespace: str) -> None:
        """Write the namespace's ANN index to disk now if it holds unsaved changes (after a bulk write,
        so the next process loads it instead of rebuilding it from the log)."""
        index = self._indexes.get(namespace)
        if index is not None and index.dirty:
            index.save()

    def admitted_rids(self, filters: Filters, cap: int) -> list[int] | None:
        """The rids of every row the filters admit, or None when more than `cap` do (reading stops at
        cap + 1 rows)."""
        where, args = filters.where()
        got = [r[0] for r in self.db.execute(f"SELECT rid FROM items WHERE {where} LIMIT ?", [*args, cap + 1])]
        return None if len(got) > cap else got

    def scope_size(self, filters: Filters, cap: int) -> int | None:
        """How many current rows the filters' user / agent / session scope holds, counted on its index
        alone and only up to cap + 1 (an upper bound of what the filters admit); None without a scope."""
        scope = [(c, v) for c, v in (("user_id", filters.user), ("agent_id", filters.agent),
                                     ("session_id", filters.session)) if v is not None]
        if not scope:
            return None
        column, value = scope[0]
        return self.db.execute(f"SELECT count(*) FROM (SELECT 1 FROM items WHERE namespace=? AND {column}=? "
                               "AND expired_at IS NULL LIMIT ?)", (filters.namespace, value, cap + 1)).fetchone()[0]

    def vectors_of(self, rids: list[int]) -> np.ndarray:
        """float32 [len(rids), dim] in the order given. One statement, rows in rid order, one buffer:
        about 2.5 us a row (a dict of rows and a stack of arrays took twice that)."""
        order = np.argsort(np.asarray(rids, dtype=np.int64), kind="stable")
        wanted = [int(rids[i]) for i in order]
        blobs = [r[0] for r in self.db.execute(
            "SELECT vec FROM vectors WHERE rid IN (SELECT value FROM json_each(?)) ORDER BY rid",
            (json.dumps(wanted),))]
        if len(blobs) != len(set(wanted)):
            found = {r[0] for r in self.db.execute(
                "SELECT rid FROM vectors WHERE rid IN (SELECT value FROM json_each(?))", (json.dumps(wanted),))}
            raise KeyError(f"no stored vector for rows {sorted(set(wanted) - found)[:10]}")
        unique = np.frombuffer(b"".join(blobs), dtype=np.float16).reshape(len(blobs), self.dim)
        # A repeated rid comes back once: each sorted position maps to its row among the unique ones.
        row_of = np.cumsum([0] + [a != b for a, b in zip(wanted, wanted[1:])])
        out = np.empty((len(rids), self.dim), dtype=np.float32)
        out[order] = unique[row_of]
        return out
