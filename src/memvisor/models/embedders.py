"""Text embedders. The default is the packaged all-MiniLM-L6-v2 (384 dims), run locally with no download.

Bring your own: any object with `name`, `dim` and `encode(texts) -> float32 [n, dim]` (rows L2-normalised)
satisfies `Embedder` and can be passed to `Memory(home, embedder=...)`.
"""
from __future__ import annotations

import functools
import os
import threading
from pathlib import Path
from typing import Protocol

import numpy as np

from memvisor.errors import InvalidInput
from memvisor.models.packages import minilm_folder, quiet_loading


class Embedder(Protocol):
    name: str
    dim: int

    def encode(self, texts: list[str]) -> np.ndarray:
        """float32 [len(texts), dim], each row of unit L2 norm."""
        ...


class MiniLMEmbedder:
    """sentence-transformers/all-MiniLM-L6-v2: BERT encoder, mean pooling over tokens, L2 normalisation.

    Runs with transformers on the CPU. Single queries use one thread: with torch's default thread
    pool on 2 busy cores a single sentence slowed 25x (see ENVIRONMENT.md); batches use all cores.
    `dtype`: "float32", "bfloat16", or "auto" (the default: bfloat16 where the CPU multiplies bf16 in
    hardware, float32 elsewhere; `MEMVISOR_EMBED_DTYPE` overrides). On the project's CPU (AMX) a bf16
    matmul ran 2.5x faster than fp32, and LoCoMo dev recall@1024 was the same to three decimals
    (0.832 both); vectors differ from fp32 by cosine >= 0.996.

    Batches: the texts are tokenized once, sorted by token count and cut into batches of at most
    `batch_tokens` padded tokens (many short texts or a few long ones per batch). Against 64 texts per
    batch sorted by characters this pads 7% instead of 49% of the scale bench's synthetic texts (in
    add_many's chunks of 512) and encoded them 1.4-1.7x faster on the project's 2 cores (NOTES.md,
    session 7).
    """

    name = "all-MiniLM-L6-v2"
    dim = 384
    max_tokens = 256  # the model's trained sequence length
    batch_tokens = 1024  # padded tokens per forward (1,024 and 2,048 ran alike; 4,096 no faster)

    def __init__(self, dtype: str = "auto") -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        self._torch = torch
        folder = str(minilm_folder())
        with quiet_loading():
            self._tokenizer = AutoTokenizer.from_pretrained(folder)
            self._model = AutoModel.from_pretrained(folder).eval()
        self.dtype = resolve_dtype(dtype)
        if self.dtype == "bfloat16":
            self._model = self._model.to(torch.bfloat16)
        self._lock = threading.Lock()  # torch's thread setting is process-wide
        self._threads = torch.get_num_threads()

    def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        torch = self._torch
        out = []
        ids = self._tokenizer(texts, truncation=True, max_length=self.max_tokens)["input_ids"]
        # Sorted by token count, so each batch pads little; the order is restored at the end.
        order = sorted(range(len(texts)), key=lambda i: len(ids[i]))
        with self._lock, torch.inference_mode():
            torch.set_num_threads(1 if len(texts) == 1 else self._threads)
            for batch in token_batches([len(ids[i]) for i in order], self.batch_tokens):
                enc = self._tokenizer.pad({"input_ids": [ids[order[j]] for j in batch]}, return_tensors="pt")
                hidden = self._model(**enc).last_hidden_state.float()  # pool in fp32 whatever the compute type
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled, dim=-1)
                out.append(pooled.float().numpy())
            torch.set_num_threads(self._threads)
        if len(texts) > 1:
            release_free_memory()
        vectors = np.concatenate(out)
        result = np.empty_like(vectors)
        result[order] = vectors
        return result


def token_batches(lengths: list[int], budget: int) -> list[range]:
    """Consecutive batches over ``lengths`` (token counts sorted ascending) whose padded size, the batch's
    longest text times its number of texts, stays within ``budget`` tokens; a text longer than the budget
    is a batch of its own."""
    batches, start = [], 0
    for i, n in enumerate(lengths):
        if i > start and n * (i - start + 1) > budget:  # sorted: n is the longest so far
            batches.append(range(start, i))
            start = i
    if start < len(lengths):
        batches.append(range(start, len(lengths)))
    return batches


def release_free_memory() -> None:
    """Give freed heap pages back to the OS (glibc only; elsewhere nothing). Batches of varying
    sequence length fragment glibc's heap: RSS grew from 0.56 to 1.65 GB over 20k texts in batches
    of 512 without this, to 0.77 GB with it (see NOTES, scale)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.lru_cache(maxsize=1)
def _glibc():
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


DTYPES = ("float32", "bfloat16")


def resolve_dtype(dtype: str) -> str:
    """The embedder's compute type: an explicit choice, `MEMVISOR_EMBED_DTYPE`, or the CPU's best."""
    if dtype == "auto":
        dtype = os.environ.get("MEMVISOR_EMBED_DTYPE", "auto")
    if dtype == "auto":
        return "bfloat16" if cpu_has_native_bf16() else "float32"
    if dtype not in DTYPES:
        raise InvalidInput(f"embedder dtype must be one of {DTYPES} or 'auto', got {dtype!r}")
    return dtype


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """AMX or AVX-512 BF16 in /proc/cpuinfo's flags (Linux). Elsewhere bf16 is emulated, hence slower."""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


@functools.lru_cache(maxsize=1)
def default_embedder() -> MiniLMEmbedder:
    """The process-wide default embedder (loaded once: about 1 s)."""
    return MiniLMEmbedder()
