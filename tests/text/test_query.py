"""Full-text query building: query text is data, and very common words only match together."""
from __future__ import annotations

from memvisor.store.filters import Filters
from memvisor.text.query import fts_match, terms


def test_words_are_quoted_so_query_text_is_never_fts_syntax():
    assert fts_match('garden OR "shed" NEAR(x) text:foo') == '"garden" OR "shed" OR "near" OR "text" OR "foo"'
    assert fts_match("the and of") is None  # stopwords only: no full-text query at all
    assert terms("Caroline's garden, garden!") == ["caroline", "garden"]


def test_common_words_are_conjoined_rare_ones_stay_alternatives():
    assert fts_match(["kayak", "garden", "shed"], common={"garden", "shed"}) == '"kayak" OR ("garden" AND "shed")'
    assert fts_match(["garden", "kayak"], common={"garden"}) == '"kayak"'  # a lone common word beside rarer ones: out
    assert fts_match(["garden"], common={"garden"}) is None  # one common word alone: the dense half ranks it
    assert fts_match(["garden"]) == '"garden"'
    assert fts_match(["kayak", "garden", "shed"], {"garden", "shed"}, conjoin_common=False) == '"kayak"'
    assert fts_match(["garden", "shed"], {"garden", "shed"}, conjoin_common=False) is None


def test_store_counts_postings_up_to_the_cap_and_pruned_query_skips_lone_common_words(memory):
    texts = [f"my garden shed number {i}" for i in range(4)] + \
            ["the garden was green", "a shed by the lake", "I bought a kayak", "nothing here"]
    memory.add_many(texts, namespace="q")
    store = memory.store
    assert store.terms.common(["garden", "shed", "kayak"], cap=3) == {"garden", "shed"}
    assert store.terms.common(["garden", "shed", "kayak"], cap=6) == set()
    both = fts_match(["garden", "shed"], {"garden", "shed"})  # 4 rows hold both words
    assert both == '("garden" AND "shed")'
    assert store.terms.matches_over(both, cap=3) and not store.terms.matches_over(both, cap=4)
    words = ["garden", "shed", "kayak"]
    pruned = fts_match(words, store.terms.common(words, cap=3))
    hits = {store.rows([rid])[rid]["text"] for rid, _ in store.full_text(pruned, Filters(namespace="q"), 50)}
    # Rows with the rare word or with both common words; not the rows holding one common word alone.
    assert hits == {"I bought a kayak"} | {f"my garden shed number {i}" for i in range(4)}
    full = {store.rows([rid])[rid]["text"] for rid, _ in store.full_text(fts_match(words), Filters(namespace="q"), 50)}
    assert full == hits | {"the garden was green", "a shed by the lake"}


def test_retriever_leaves_out_a_conjunction_of_common_words_that_is_common_too(memory):
    """End to end at the real cap (2,000 rows): "garden" and "shed" are each in 2,100 rows and together
    in all of them, so full text keeps only the rare word; the dense half still ranks everything."""
    from memvisor.store.term_stats import COMMON_POSTINGS
    from memvisor.text.retrieve import HybridRetriever

    memory.add_many([f"garden shed note {i}" for i in range(COMMON_POSTINGS + 100)] + ["a red kayak"],
                    namespace="q")
    filters = Filters(namespace="q")
    candidates = HybridRetriever().retrieve(memory.store, memory.embedder, "garden shed kayak", filters, 50)
    in_full_text = {c.row["text"] for c in candidates if c.bm25_rank is not None}
    assert in_full_text == {"a red kayak"}
    assert sum(c.vector_rank is not None for c in candidates) == 50


def test_store_finds_words_in_more_than_half_of_the_rows_from_spread_windows(memory):
    texts = [f"alpha {'gamma' if i % 4 == 0 else 'beta'} row {i}" for i in range(40)]
    memory.add_many(texts, namespace="q")
    store = memory.store
    # alpha in every row, beta in 3 of 4, gamma in 1 of 4, delta in none
    assert store.terms.ubiquitous(["alpha", "beta", "gamma", "delta"], window=4, windows=4) == {"alpha", "beta"}
    assert store.terms.ubiquitous(["alpha"], window=11, windows=4) == set()  # fewer than 4 windows of rows


def test_retriever_leaves_out_a_word_in_most_rows_at_the_real_window(memory):
    """"ines" is in every row but one (zero BM25 weight, the longest posting list); "garden" and "shed" are
    each in a third: the full-text query keeps their conjunction without "ines", and finds the same rows."""
    from memvisor.text.retrieve import HybridRetriever, full_text_match

    rows = [f"ines {kind} {i}" for i in range(2100) for kind in ("garden note", "shed memo", "filler")]
    memory.add_many(rows + [f"ines garden shed item {i}" for i in range(5)] + ["a red kayak"], namespace="q")
    words = ["ines", "garden", "shed", "kayak"]
    assert full_text_match(memory.store, words) == '"kayak" OR ("garden" AND "shed")'
    assert fts_match(words, {"ines", "garden", "shed"}) == '"kayak" OR ("ines" AND "garden" AND "shed")'
    candidates = HybridRetriever().retrieve(memory.store, memory.embedder, "ines garden shed kayak",
                                            Filters(namespace="q"), 50)
    in_full_text = {c.row["text"] for c in candidates if c.bm25_rank is not None}
    assert in_full_text == {"a red kayak"} | {f"ines garden shed item {i}" for i in range(5)}
