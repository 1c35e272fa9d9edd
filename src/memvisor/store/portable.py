"""Export and import a namespace as plain files — never pickle.

    DIR/manifest.json         format name, schema version, namespace, embedder, counts
    DIR/items.jsonl           every stored version row, all columns
    DIR/events.jsonl          the namespace's log
    DIR/keys.jsonl            idempotency keys
    DIR/vectors.safetensors   `rids` int64 [n] and `vectors` float16 [n, dim], the rows' embeddings

Import is one transaction and keeps every field (ids, versions, both times), so search over the
imported copy gives the same results as over the original.
"""
from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from memvisor import timeutil
from memvisor.errors import InvalidInput, MalformedFile
from memvisor.store.sqlite_store import SCHEMA_VERSION, SQLiteStore
from memvisor.types import IngestReport

FORMAT = "memvisor-namespace"
ITEM_FIELDS = ("rid", "id", "version", "kind", "user_id", "agent_id", "session_id", "thread", "position", "text",
               "context", "speaker", "metadata", "sources", "status", "valid_from", "valid_to", "recorded_at", "expired_at", "seq")


def export_namespace(store: SQLiteStore, namespace: str, directory: Path) -> Path:
    if directory.exists() and not directory.is_dir():
        raise InvalidInput(f"{directory} is a file: export into a new or empty folder")
    directory.mkdir(parents=True, exist_ok=True)
    if any(directory.iterdir()):
        raise InvalidInput(f"{directory} is not empty: export into a new or empty folder")
    db = store.db
    items = db.execute(f"SELECT {', '.join(ITEM_FIELDS)} FROM items WHERE namespace=? ORDER BY rid",
                       (namespace,)).fetchall()
    with open(directory / "items.jsonl", "w", encoding="utf-8") as f:
        for row in items:
            f.write(json.dumps(dict(zip(ITEM_FIELDS, row)), ensure_ascii=False) + "\n")
    events = db.execute("SELECT seq, op, item_id, payload, recorded_at FROM events WHERE namespace=? ORDER BY seq",
                        (namespace,)).fetchall()
    with open(directory / "events.jsonl", "w", encoding="utf-8") as f:
        for seq, op, item_id, payload, at in events:
            f.write(json.dumps({"seq": seq, "op": op, "item_id": item_id, "payload": json.loads(payload),
                                "recorded_at": at}, ensure_ascii=False) + "\n")
    with open(directory / "keys.jsonl", "w", encoding="utf-8") as f:
        for key, item_id in db.execute("SELECT key, id FROM item_keys WHERE namespace=?", (namespace,)):
            f.write(json.dumps({"key": key, "id": item_id}, ensure_ascii=False) + "\n")
    rids = [row[0] for row in items]
    vectors = (store.vectors_of(rids).astype(np.float16) if rids else np.zeros((0, store.dim), np.float16))
    save_file({"rids": np.asarray(rids, dtype=np.int64), "vectors": vectors}, str(directory / "vectors.safetensors"))
    meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
    manifest = {"format": FORMAT, "schema_version": SCHEMA_VERSION, "namespace": namespace,
                "embedder": meta["embedder"], "dim": store.dim, "items": len(items), "events": len(events)}
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return directory


def _read_jsonl(path: Path) -> list[dict]:
    out = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise MalformedFile(f"{path}: not UTF-8 text (offset {e.start}): give the file memvisor export "
                            "wrote") from None
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise MalformedFile(f"{path}: line {number}: {e.msg}") from None
    return out


def _is_timestamp(value: object) -> bool:
    try:
        timeutil.parse(value)
        return True
    except (TypeError, ValueError):
        return False


def _check_rows(directory: Path, items: list, events: list, keys: list, tensors: dict, dim: int) -> None:
    """Everything an import writes is checked before its transaction: a bad row is a MalformedFile that
    names it, never a KeyError mid-import or a stored value that breaks later searches."""
    def fail(name: str, number: int, what: str) -> None:
        raise MalformedFile(f"{directory / name}: line {number}: {what}")

    rows_seen: set = set()
    for number, row in enumerate(items, start=1):
        if not isinstance(row, dict) or not set(ITEM_FIELDS) <= set(row):
            fail("items.jsonl", number, f"a row needs the fields {', '.join(ITEM_FIELDS)}")
        if not all(isinstance(row[f], str) for f in ("id", "text", "kind", "status", "recorded_at")) \
                or not all(isinstance(row[f], int) for f in ("rid", "version", "seq")):
            fail("items.jsonl", number, "id, text, kind, status and recorded_at must be strings; rid, version and "
                                        "seq integers")
        for field in ("valid_from", "valid_to", "recorded_at", "expired_at"):  # searches parse them
            if row[field] is not None and not _is_timestamp(row[field]):
                fail("items.jsonl", number, f"{field} {row[field]!r} is not a stored time like 2024-03-01T00:00:00"
                                            ".000000Z")
        if row["rid"] in rows_seen:  # (id, version) may repeat: a version re-recorded with a bounded validity
            fail("items.jsonl", number, f"a second row with rid {row['rid']}")
        rows_seen.add(row["rid"])
        for field, kind in (("metadata", dict), ("sources", list)):
            try:
                ok = isinstance(json.loads(row[field]), kind)
            except (TypeError, json.JSONDecodeError):
                ok = False
            if not ok:
                fail("items.jsonl", number, f"{field} must be a JSON {kind.__name__} written as text")
    for number, e in enumerate(events, start=1):
        if not isinstance(e, dict) or not {"seq", "op", "item_id", "payload", "recorded_at"} <= set(e) \
                or not isinstance(e["payload"], dict):
            fail("events.jsonl", number, "an event needs seq, op, item_id, recorded_at and a payload object")
        for field in ("rids", "removed_rids"):
            value = e["payload"].get(field)
            if value is not None and not (isinstance(value, list) and all(isinstance(r, int) for r in value)):
                fail("events.jsonl", number, f"payload {field} must be a list of integers")
    keys_seen: set = set()
    for number, k in enumerate(keys, start=1):
        if not isinstance(k, dict) or not isinstance(k.get("key"), str) or not isinstance(k.get("id"), str):
            fail("keys.jsonl", number, "a key row needs the strings key and id")
        if k["key"] in keys_seen:
            fail("keys.jsonl", number, f"the key {k['key']!r} is given twice")
        keys_seen.add(k["key"])
    rids, vectors = tensors.get("rids"), tensors.get("vectors")
    if rids is None or vectors is None or vectors.shape != (len(items), dim) or rids.shape != (len(items),) \
            or set(int(r) for r in rids) != {row["rid"] for row in items} or not np.isfinite(vectors).all():
        raise MalformedFile(f"{directory / 'vectors.safetensors'}: needs rids [{len(items)}] and finite vectors "
                            f"[{len(items)}, {dim}] for exactly the rows of items.jsonl")


def import_namespace(store: SQLiteStore, directory: Path) -> IngestReport:
    manifest_path = directory / "manifest.json"
    if not manifest_path.is_file():
        raise InvalidInput(f"{directory} has no manifest.json: give a folder written by `memvisor export`")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise MalformedFile(f"{manifest_path}: {e.msg}") from None
    except UnicodeDecodeError:
        raise MalformedFile(f"{manifest_path}: not UTF-8 text: give the file memvisor export wrote") from None
    if not isinstance(manifest, dict):
        raise MalformedFile(f"{manifest_path}: expected a JSON object, got {type(manifest).__name__}")
    if manifest.get("format") != FORMAT or manifest.get("schema_version") != SCHEMA_VERSION:
        raise InvalidInput(f"{directory}: format {manifest.get('format')!r} version {manifest.get('schema_version')!r}"
                           f" is not {FORMAT!r} version {SCHEMA_VERSION}")
    meta = dict(store.db.execute("SELECT key, value FROM meta").fetchall())
    if (manifest.get("embedder"), manifest.get("dim")) != (meta["embedder"], store.dim):
        raise InvalidInput(f"{directory} was embedded with {manifest.get('embedder')} (dim {manifest.get('dim')}), "
                           f"this home uses {meta['embedder']} (dim {store.dim})")
    namespace = manifest.get("namespace")
    if not isinstance(namespace, str) or not namespace.strip() or not namespace.isprintable() or len(namespace) > 200:
        raise MalformedFile(f"{manifest_path}: namespace {namespace!r} is not a non-empty printable name")
    for name in ("items.jsonl", "events.jsonl", "keys.jsonl", "vectors.safetensors"):
        if not (directory / name).is_file():
            raise MalformedFile(f"{directory} has no {name}: give a complete folder written by `memvisor export`")
    if namespace in store.namespaces():
        raise InvalidInput(f"namespace {namespace!r} already exists in {store.home}: import into another home, "
                           f"or remove it first (`memvisor delete-namespace {shlex.quote(namespace)}`)")
    items = _read_jsonl(directory / "items.jsonl")
    events = _read_jsonl(directory / "events.jsonl")
    keys = _read_jsonl(directory / "keys.jsonl")
    try:
        tensors = load_file(str(directory / "vectors.safetensors"))
    except Exception as e:  # safetensors raises its own error types for a damaged file
        raise MalformedFile(f"{directory / 'vectors.safetensors'}: {e}") from None
    if len(items) != manifest.get("items"):
        raise MalformedFile(f"{directory}: counts disagree with manifest.json (a truncated export?)")
    _check_rows(directory, items, events, keys, tensors, store.dim)
    vec_by_rid = {int(r): v for r, v in zip(tensors["rids"], tensors["vectors"])}

    seq_map: dict[int, int] = {}
    rid_map: dict[int, int] = {}
    with store.transaction() as cur:
        first = events[0]["recorded_at"] if events else items[0]["recorded_at"]
        cur.execute("INSERT INTO namespaces VALUES (?, ?)", (namespace, first))
        for e in events:
            cur.execute("INSERT INTO events (namespace, op, item_id, payload, recorded_at) VALUES (?, ?, ?, '{}', ?)",
                        (namespace, e["op"], e["item_id"], e["recorded_at"]))
            seq_map[e["seq"]] = cur.lastrowid
        for row in items:
            values = [row[f] for f in ITEM_FIELDS[1:]]
            values[-1] = seq_map.get(row["seq"], 0)
            cur.execute(f"INSERT INTO items (namespace, {', '.join(ITEM_FIELDS[1:])}) "
                        f"VALUES (?, {', '.join('?' * (len(ITEM_FIELDS) - 1))})", [namespace, *values])
            rid = rid_map[row["rid"]] = cur.lastrowid
            cur.execute("INSERT INTO items_fts (rowid, text, context) VALUES (?, ?, ?)",
                        (rid, row["text"], row["context"]))
            cur.execute("INSERT INTO vectors VALUES (?, ?)", (rid, vec_by_rid[row["rid"]].astype(np.float16).tobytes()))
        for e in events:  # the log refers to rows by rid: rewrite to the new ones
            payload = dict(e["payload"])
            for field in ("rids", "removed_rids"):
                if field in payload:
                    # rows deleted before the export were never exported: they simply do not exist here
                    payload[field] = [rid_map[r] for r in payload[field] if r in rid_map]
            cur.execute("UPDATE events SET payload=? WHERE seq=?",
                        (json.dumps(payload, ensure_ascii=False), seq_map[e["seq"]]))
        cur.executemany("INSERT INTO item_keys VALUES (?, ?, ?)", [(namespace, k["key"], k["id"]) for k in keys])
    ids = list(dict.fromkeys(row["id"] for row in items))
    return IngestReport(namespace, len(ids), 0, ids)
