"""Scissorhands: persistence of importance over a history window.

Liu et al., "Scissorhands: Exploiting the Persistence of Importance Hypothesis for LLM KV Cache
Compression at Test Time", NeurIPS 2023.

Statistic: over the last ``history`` observed queries (prefill-block queries and decode steps, oldest
dropped first), count for each cached token how many of those queries gave it MORE than the average
attention, i.e. probability > 1 / (number of keys that query can see). GQA: a query's softmax row is
first averaged over the KV head's query group (mean, still a distribution), then compared. Prefill-block
queries are causally masked (query i sees keys up to its own position); only the block's last
``history`` queries are computed, since older ones would fall out of the window anyway.
When the budget is full the lowest counts go; the newest ``recent`` tokens (default = ``history``:
they have not yet had a full window to prove themselves) are never dropped.

Decode steps: the cache hands ``observe_probs`` the probabilities (and visible-key counts) its own attention
computed; prefill blocks through SDPA call ``observe``.

Shapes/units: ``observe(queries [B, Hq, Tq, D], keys [B, Hkv, T, D])``,
``observe_probs(probs [B, Hkv, Tq, T], n_visible [Hkv, Tq])``; internal state bool
[n <= history, B, Hkv, T]; ``scores`` -> float32 [B, Hkv, T] = count in [0, history] (ties: newer kept).
Knobs: ``history`` (queries, default 32), ``recent`` (tokens, default history), ``sinks`` (default 0),
``scaling`` (logit scale, default 1/sqrt(D)), ``chunk`` (memory only).
"""

from __future__ import annotations

import torch
from torch import Tensor

from memvisor.kv.policies.base import PolicyError
from memvisor.kv.policies._attention import AttentionStatsPolicy
from memvisor.kv.policies._stats import extend, finish_scores, reindex


class Scissorhands(AttentionStatsPolicy):
    name = "scissorhands"
    state_attrs = ("hits",)

    def __init__(
        self,
        history: int = 32,
        recent: int | None = None,
        sinks: int = 0,
        scaling: float | None = None,
        chunk: int = 256,
    ) -> None:
        recent = history if recent is None else recent
        if history < 1 or recent < 0 or sinks < 0 or chunk < 1:
            raise PolicyError(f"need history >= 1, recent >= 0, sinks >= 0; got {history}, {recent}, {sinks}")
        self.history, self.recent, self.sinks = int(history), int(recent), int(sinks)
        self.scaling, self.chunk = scaling, int(chunk)
        self.reset()

    def reset(self) -> None:
        self.hits: Tensor | None = None  # bool [n, B, Hkv, T], one row per remembered query, oldest first

    def observed_queries(self, queries: Tensor) -> Tensor:
        return queries[:, :, -self.history :]  # older ones would fall out of the window anyway

    def observe_probs(self, probs: Tensor, n_visible: Tensor, *, lengths: Tensor | None = None) -> None:
        B, Hkv, Tq, T = probs.shape
        probs, n_visible = probs[:, :, -self.history :], n_visible[:, -self.history :]
        # probs [B, Hkv, c, T]; above-average test against this query's own uniform level
        above = probs > (1.0 / n_visible.float().to(probs.device)).view(1, Hkv, -1, 1)
        new = above.permute(2, 0, 1, 3).cpu()  # [c, B, Hkv, T]
        old = torch.zeros(0, B, Hkv, T, dtype=torch.bool) if self.hits is None else extend(self.hits, T)
        self.hits = torch.cat([old, new], 0)[-self.history :]

    def counts(self, T: int) -> Tensor:
        """int64 [B, Hkv, T]: above-average hits per token over the remembered queries."""
        if self.hits is None:
            raise PolicyError("Scissorhands.counts() before any observe()")
        return extend(self.hits, T).sum(0)

    def scores(self, keys: Tensor, values: Tensor, *, lengths: Tensor | None = None) -> Tensor:
        B, Hkv, T, _ = keys.shape
        if self.hits is None:
            return finish_scores(torch.zeros(B, Hkv, T), T, lengths)
        return finish_scores(self.counts(T).float(), T, lengths)

    def on_evict(self, kept: list[Tensor]) -> None:
        if self.hits is not None:
            self.hits = reindex(self.hits, kept)
