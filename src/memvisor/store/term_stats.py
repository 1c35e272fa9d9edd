"""Full-text word statistics that plan a query (`text/retrieve.py`): which of its words have posting lists
too long to score alone, and which are in so many rows that BM25 gives them no weight. Counted on SQLite's
FTS5 table with capped or windowed queries, so a check never walks a whole posting list.
"""
from __future__ import annotations

import sqlite3

# Full-text words in more rows than this only match together (text/query.py `fts_match`): scoring every
# row of a very common word cost 37 ms p50 at 100k rows, 3.6 ms with the cut (scripts/fulltext_cut_ab.py).
COMMON_POSTINGS = 2000
# A word in more than half of the full-text rows has a BM25 IDF <= 0, which FTS5 clamps to 1e-6: it
# cannot change a ranking, only cost its posting list (a user's name in 87% of the 1M scale rows: 60 ms).
# Its share is estimated from UBIQUITY_WINDOWS windows of UBIQUITY_WINDOW consecutive rowids.
UBIQUITY_WINDOW, UBIQUITY_WINDOWS = 500, 8
UBIQUITY_SAMPLE = (UBIQUITY_WINDOW, UBIQUITY_WINDOWS)


class TermStats:
    """Statistics over the `items_fts` table of one store's connection (every namespace: what a query
    would have to score). Keeps ubiquity verdicts between queries (see `ubiquitous`)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self._verdicts: dict[str, bool] = {}  # word -> ubiquitous, while the rowid range grows < 5%
        self._at = 0

    def common(self, words: list[str], cap: int = COMMON_POSTINGS) -> set[str]:
        """The words whose posting lists hold more than `cap` rows (over every namespace: what a query
        would have to score). Counting stops at cap + 1, so each check costs at most that many
        posting entries (well under a millisecond), never the whole list."""
        return {word for word in words if self.matches_over('"' + word.replace('"', '""') + '"', cap)}

    def ubiquitous(self, words: list[str], window: int = UBIQUITY_WINDOW,
                   windows: int = UBIQUITY_WINDOWS) -> set[str]:
        """The words in more than half of the full-text rows (zero weight in BM25, see UBIQUITY_WINDOW),
        estimated from `windows` windows of `window` rowids spread evenly over the rowid range (a seek
        and at most `window` postings per window and word; about 1 ms per word at 1M rows), so that a
        store written in blocks (one user, then the next) is sampled across its blocks. Deterministic
        for a given store; a store of fewer than `windows` windows of rows has none (its common words
        are few and cheap anyway). Verdicts are kept until the rowid range grows by 5% (a share past half
        moves slowly), so a query's recurring words (names) cost nothing after their first query."""
        # two queries: SQLite's one-seek min/max optimisation takes a single min() or max() (both in
        # one SELECT scanned the table: 135 ms at 1M rows)
        lo = self.db.execute("SELECT min(rid) FROM items").fetchone()[0]
        hi = self.db.execute("SELECT max(rid) FROM items").fetchone()[0]
        if not words or hi is None or hi - lo + 1 < windows * window:
            return set()
        cache = self._verdicts if (window, windows) == UBIQUITY_SAMPLE else {}
        if cache is self._verdicts and not self._at <= hi <= self._at * 1.05:
            cache.clear()
            self._at = hi
        todo = [w for w in words if w not in cache]
        if todo:
            step = (hi - lo + 1 - window) / max(1, windows - 1)
            spans = [(lo + round(k * step), lo + round(k * step) + window - 1) for k in range(windows)]
            rows = sum(self.db.execute("SELECT count(*) FROM items WHERE rid BETWEEN ? AND ?", span)
                       .fetchone()[0] for span in spans)
            for word in todo:
                quoted = '"' + word.replace('"', '""') + '"'
                hits = sum(self.db.execute("SELECT count(*) FROM items_fts WHERE items_fts MATCH ? AND rowid "
                                           "BETWEEN ? AND ?", (quoted, *span)).fetchone()[0] for span in spans)
                cache[word] = 2 * hits > rows
        return {w for w in words if cache[w]}

    def matches_over(self, match: str, cap: int = COMMON_POSTINGS) -> bool:
        """Whether the FTS5 expression `match` admits more than `cap` rows, counting no further than cap + 1."""
        return self.db.execute("SELECT count(*) FROM (SELECT 1 FROM items_fts WHERE items_fts MATCH ? LIMIT ?)",
                               (match, cap + 1)).fetchone()[0] > cap
