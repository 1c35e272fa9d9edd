"""MiniLM's forward alone (what bounds bulk ingest): ms per batch of 64 at fixed padded lengths, SDPA
against eager attention, in the embedder's compute type (bf16 on AMX CPUs). NOTES.md, ingest (session 5).

    python scripts/embedder_forward_speed.py
"""
import time

import torch

from memvisor.bench.synthetic import SyntheticCorpus
from memvisor.models.embedders import MiniLMEmbedder

embedder = MiniLMEmbedder()
model = embedder._model  # a measurement script may reach inside; the library does not
text = " ".join(r["text"] for r in SyntheticCorpus(300, seed=3).records())
print(f"dtype {embedder.dtype}, {torch.get_num_threads()} threads, batch 64")
with torch.inference_mode():
    for length in (16, 32, 48, 64, 96, 128, 192, 256):
        enc = embedder._tokenizer([text] * 64, truncation=True, max_length=length, return_tensors="pt")
        best = {}
        for impl in ("sdpa", "eager", "sdpa", "eager"):
            model.set_attn_implementation(impl)
            model(**enc)
            t = time.perf_counter()
            for _ in range(3):
                model(**enc)
            best[impl] = min(best.get(impl, 1e9), (time.perf_counter() - t) / 3 * 1e3)
        print(f"{length:4d} tokens: sdpa {best['sdpa']:7.1f} ms ({64e3 / best['sdpa']:5.0f} texts/s), "
              f"eager {best['eager']:7.1f} ms ({best['eager'] / best['sdpa']:.2f}x)")
