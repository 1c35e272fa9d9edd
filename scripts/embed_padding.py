"""How many more tokens than they hold the embedder's batches pad, on the scale bench's synthetic texts (session 7,
NOTES.md "Ingest rate"): the old batching (64 texts sorted by characters) against token-sorted batches of at most
`MiniLMEmbedder.batch_tokens` padded tokens, for sort windows of 64 to 10,000 texts (add_many embeds one window per
embedder call: `EMBED_WINDOW` memories).

    python scripts/embed_padding.py
"""
from memvisor.bench.synthetic import SyntheticCorpus
from memvisor.models.embedders import MiniLMEmbedder, token_batches

texts = [r["text"] for r in SyntheticCorpus(10000, seed=7).records()]
embedder = MiniLMEmbedder()
lens = [len(x) for x in embedder._tokenizer(texts, truncation=True, max_length=embedder.max_tokens)["input_ids"]]
print(f"tokens per text: mean {sum(lens) / len(lens):.1f}, max {max(lens)}")


def padded(window: int, batches) -> float:
    """Padded tokens / real tokens when each window of texts is cut by ``batches(indices) -> [[index, ...]]``."""
    pad = 0
    for c in range(0, len(texts), window):
        for b in batches(list(range(c, min(c + window, len(texts))))):
            pad += max(lens[i] for i in b) * len(b)
    return pad / sum(lens)


def by_chars_64(idx):
    idx = sorted(idx, key=lambda i: len(texts[i]))
    return [idx[s:s + 64] for s in range(0, len(idx), 64)]


def by_token_budget(idx):
    idx = sorted(idx, key=lambda i: lens[i])
    return [[idx[j] for j in r] for r in token_batches([lens[i] for i in idx], embedder.batch_tokens)]


print(f"64 texts by characters, window 512: {padded(512, by_chars_64) - 1:.1%} padding")
for window in (64, 256, 512, 2048, 10000):
    print(f"token batches of <= {embedder.batch_tokens} padded tokens, window {window}: "
          f"{padded(window, by_token_budget) - 1:.1%} padding")
