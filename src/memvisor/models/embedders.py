"""Text embedders. The default is the packaged all-MiniLM-L6-v2 (384 dims), run locally with no download.

Bring your own: any object with `name`, `dim` and `encode(texts) -> float32 [n, dim]` (rows L2-normalised)
satisfies `Embedder` and can be passed to `Memory(home, embedder=...)`.
"""
from __future__ import annotations

import functools
import threading
from typing import Protocol

import numpy as np

from memvisor.models.packages import minilm_folder


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
    """

    name = "all-MiniLM-L6-v2"
    dim = 384
    max_tokens = 256  # the model's trained sequence length
    batch_size = 64

    def __init__(self) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        self._torch = torch
        folder = str(minilm_folder())
        hf_logging.disable_progress_bar()  # a library should not print load bars into its host's output
        hf_logging.set_verbosity_error()
        self._tokenizer = AutoTokenizer.from_pretrained(folder)
        self._model = AutoModel.from_pretrained(folder).eval()
        self._lock = threading.Lock()  # torch's thread setting is process-wide
        self._threads = torch.get_num_threads()

    def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        torch = self._torch
        out = []
        with self._lock, torch.inference_mode():
            torch.set_num_threads(1 if len(texts) == 1 else self._threads)
            # Sort by length so each batch pads little; restore the order at the end.
            order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
            for start in range(0, len(order), self.batch_size):
                batch = [texts[i] for i in order[start:start + self.batch_size]]
                enc = self._tokenizer(batch, padding=True, truncation=True,
                                      max_length=self.max_tokens, return_tensors="pt")
                hidden = self._model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled, dim=-1)
                out.append(pooled.float().numpy())
            torch.set_num_threads(self._threads)
        vectors = np.concatenate(out)
        result = np.empty_like(vectors)
        result[order] = vectors
        return result


@functools.lru_cache(maxsize=1)
def default_embedder() -> MiniLMEmbedder:
    """The process-wide default embedder (loaded once: about 1 s)."""
    return MiniLMEmbedder()
