-- memvisor embedded store, schema version 1.
-- The log (events) is the source of truth; items, items_fts and vectors are views derived from it,
-- written in the same transaction. The ANN index on disk is a cache rebuilt from `vectors` + `events`.
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);

CREATE TABLE IF NOT EXISTS namespaces (name TEXT PRIMARY KEY, created_at TEXT NOT NULL);

CREATE TABLE IF NOT EXISTS events (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    namespace   TEXT NOT NULL,
    op          TEXT NOT NULL,          -- add | update | invalidate | delete
    item_id     TEXT NOT NULL,
    payload     TEXT NOT NULL,          -- JSON: the change, plus `rids` written / `removed_rids`;
                                        -- a delete redacts the text of the item's earlier events
    recorded_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_item ON events (namespace, item_id);
CREATE INDEX IF NOT EXISTS events_by_seq ON events (namespace, seq);

CREATE TABLE IF NOT EXISTS items (
    rid         INTEGER PRIMARY KEY,    -- one row per stored version; also the FTS rowid and the ANN key
    id          TEXT NOT NULL,
    namespace   TEXT NOT NULL,
    version     INTEGER NOT NULL,
    kind        TEXT NOT NULL,
    user_id     TEXT,
    agent_id    TEXT,
    session_id  TEXT,
    thread      TEXT,                   -- the stream it came from (a conversation), for neighbours
    position    INTEGER,                -- its place in that stream
    text        TEXT NOT NULL,
    context     TEXT,                   -- what gives the text its meaning (the previous turn): indexed, not shown
    speaker     TEXT,                   -- who said it (metadata.speaker), indexed for speaker-aware ranking
    metadata    TEXT NOT NULL,          -- JSON object
    sources     TEXT NOT NULL,          -- JSON list of source ids
    status      TEXT NOT NULL,          -- active | superseded | invalidated
    valid_from  TEXT,
    valid_to    TEXT,
    recorded_at TEXT NOT NULL,
    expired_at  TEXT,
    seq         INTEGER NOT NULL        -- the event that wrote this row
);
CREATE INDEX IF NOT EXISTS items_by_id ON items (namespace, id, version);
CREATE INDEX IF NOT EXISTS items_current ON items (namespace, expired_at, valid_from);
CREATE INDEX IF NOT EXISTS items_thread ON items (namespace, thread, position);
CREATE INDEX IF NOT EXISTS items_speaker ON items (namespace, speaker);
-- A scoped search (one user, agent or session) counts and reads that scope's rows first
-- (`text.retrieve.vector_search`); expired_at third so that these, not items_current, serve it.
-- Built on an older store's next open.
CREATE INDEX IF NOT EXISTS items_user ON items (namespace, user_id, expired_at);
CREATE INDEX IF NOT EXISTS items_agent ON items (namespace, agent_id, expired_at);
CREATE INDEX IF NOT EXISTS items_session ON items (namespace, session_id, expired_at);

-- Idempotency: a client key or a content hash maps to the memory it created.
CREATE TABLE IF NOT EXISTS item_keys (
    namespace TEXT NOT NULL, key TEXT NOT NULL, id TEXT NOT NULL,
    PRIMARY KEY (namespace, key)
);
-- A delete finds its memory's keys by id (without this: a scan of the namespace's keys, 0.18 s at 100k).
-- Added after release 1's first stores: IF NOT EXISTS builds it on their next open.
CREATE INDEX IF NOT EXISTS item_keys_by_id ON item_keys (namespace, id);

CREATE VIRTUAL TABLE IF NOT EXISTS items_fts USING fts5 (
    text, context, content='items', content_rowid='rid', tokenize='porter unicode61 remove_diacritics 2'
);

CREATE TABLE IF NOT EXISTS vectors (rid INTEGER PRIMARY KEY, vec BLOB NOT NULL);  -- float16, unit norm
