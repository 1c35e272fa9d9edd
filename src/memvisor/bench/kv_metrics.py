"""Measurements of the KV benchmark: real cache bytes, fidelity against the uncompressed model, peaks.

- :func:`cache_bytes`: bytes of every tensor a cache holds (memvisor's ``nbytes()``; for transformers'
  caches every tensor attribute of every layer, quantized tensor subclasses unpacked into their
  inner tensors, read by :mod:`memvisor.bench.peers.hf_caches`): what stays allocated, whatever a
  method claims.
- :func:`stored_elements`: K and V elements the cache represents (tokens kept x heads x head_dim x 2).
- :func:`fidelity`: teacher-forced top-1 agreement and mean per-token KL(P_full || P_method) over
  the reference continuation; :func:`greedy_agreement`: free-running greedy agreement up to the
  reference's end of sequence.
- :class:`KVPeakTracker`: highest cache bytes seen right after any attention module ran (forward
  hooks registered before a peer's own, so a layer a peer is about to compress is seen in full).
- :class:`RSSPeak`: peak resident memory of the process during a block (sampled, psutil).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import torch
import torch.nn.functional as F

from memvisor.bench.peers.hf_caches import layer_bytes, layer_elements


def cache_bytes(cache: Any) -> int:
    """Real bytes held by ``cache`` (memvisor CompressedCache, DynamicCache, QuantizedCache...)."""
    if hasattr(cache, "nbytes") and callable(cache.nbytes):
        return int(cache.nbytes())
    return layer_bytes(cache)


def stored_elements(cache: Any, head_dim: int) -> int:
    """K + V elements represented: for each layer and KV head, tokens stored x head_dim, times 2."""
    if hasattr(cache, "stored_tokens"):
        tokens = sum(sum(heads) for heads in cache.stored_tokens())
        return 2 * tokens * head_dim
    return layer_elements(cache)


@torch.no_grad()
def fidelity(ref_logits: torch.Tensor, logits: torch.Tensor) -> dict:
    """Teacher-forced agreement of two ``[N, vocab]`` logit sequences over the same tokens.

    Returns ``top1`` (fraction of positions whose argmax agrees) and ``kl`` (mean over positions of
    KL(softmax(ref) || softmax(logits)), nats).
    """
    ref = ref_logits.float()
    got = logits.float()
    top1 = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
    kl = F.kl_div(F.log_softmax(got, -1), F.log_softmax(ref, -1), log_target=True, reduction="none").sum(-1)
    return {"top1": top1, "kl": kl.mean().item()}


def greedy_agreement(ref_tokens: list[int], tokens: list[int], stop: frozenset[int] = frozenset()) -> float:
    """Fraction of the reference's positions where a free-running greedy continuation equals it.

    ``stop``: end-of-sequence ids. The reference then ends at its first stop token (included), as
    ``generate`` would end it: what follows an end of turn is not an answer anyone reads, and its
    near-uniform next-token choices flip on any rounding (NOTES, KV session 6)."""
    end = next((i + 1 for i, t in enumerate(ref_tokens) if t in stop), len(ref_tokens))
    if end == 0:
        return float("nan")
    return sum(1 for a, b in zip(ref_tokens[:end], tokens[:end]) if a == b) / end


class KVPeakTracker:
    """Highest ``cache_bytes(cache)`` seen right after each attention module of ``model`` ran.

    Register BEFORE a peer installs its own hooks so that each layer is seen before a peer compresses
    it. ``measure`` can be called any time; ``peak`` holds the maximum.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.cache: Any = None
        self.peak = 0
        self._handles = []
        for name, module in model.named_modules():
            if name.endswith("self_attn"):
                self._handles.append(module.register_forward_hook(self._hook))

    def _hook(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        self.measure()

    def measure(self) -> None:
        if self.cache is not None:
            self.peak = max(self.peak, cache_bytes(self.cache))

    def track(self, cache: Any) -> None:
        self.cache = cache
        self.peak = 0

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class RSSPeak:
    """Context manager: ``peak_delta`` = peak resident bytes during the block minus the bytes at entry."""

    def __init__(self, interval_s: float = 0.01) -> None:
        self.interval_s = interval_s
        self.peak_delta = 0

    def __enter__(self) -> "RSSPeak":
        import psutil

        self._proc = psutil.Process()
        self._start = self._proc.memory_info().rss
        self._peak = self._start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, self._proc.memory_info().rss)
            time.sleep(self.interval_s)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self._proc.memory_info().rss)
        self.peak_delta = self._peak - self._start
