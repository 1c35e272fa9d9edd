"""SnapKV: the last ``window`` queries vote for the earlier tokens; pooled; top per KV head + window.

Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", NeurIPS 2024.

``observe`` only remembers the newest ``window`` post-RoPE queries (across calls: a decode step adds
one, a prefill block replaces them with its last ``window``). ``scores`` then lets them vote: each
remembered query's softmax row over the keys (causally masked: the window's query i sees keys up to its
own position; GQA: mean over the KV head's query group), summed over the window, restricted to the
prefix (tokens older than the window; window tokens are protected, not scored), then pooled along the
token axis with a 1-D ``pooling`` ("avg", default, as in the authors' code and kvpress; or "max") of odd
``kernel`` (default 5), stride 1, zero padding (counted in the average), so neighbours of a voted token
survive with it.

Shapes/units: queries [B, Hq, Tq, D], keys [B, Hkv, T, D]; ``scores`` -> float32 [B, Hkv, T] in
attention-probability mass (sum of ``window`` rows; pooled). ``protected(T)``: the last ``window``.
Knobs: ``window`` (tokens, default 32; the paper uses 32-64, its code 64), ``kernel`` (default 5), ``pooling``,
``scaling`` (logit scale, default 1/sqrt(D)), ``sinks`` (default 0).
The remembered queries must be the newest ``window`` tokens of the layer; they stay valid across
eviction because the window is protected. ``observe`` reads only the queries (``observe_uses_keys`` is
False: the cache may pass ``keys=None``). Sliding-window layers: the vote ignores the layer's window
(keys older than it are dropped by the cache anyway).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from memvisor.kv.policies.base import PolicyError, TokenPolicy, valid_mask
from memvisor.kv.policies._attention import check_qk, group_attention
from memvisor.kv.policies._stats import ends, finish_scores


class SnapKV(TokenPolicy):
    name = "snapkv"
    needs_queries = True
    state_attrs = ("queries",)
    observe_uses_keys = False

    def __init__(
        self,
        window: int = 32,
        kernel: int = 5,
        pooling: str = "avg",
        scaling: float | None = None,
        sinks: int = 0,
    ) -> None:
        if window < 1 or kernel < 1 or kernel % 2 == 0 or sinks < 0:
            raise PolicyError(f"need window >= 1, odd kernel >= 1, sinks >= 0; got {window}, {kernel}, {sinks}")
        if pooling not in ("max", "avg"):
            raise PolicyError(f"pooling must be 'max' or 'avg', got {pooling!r}")
        self.window, self.kernel, self.pooling, self.scaling, self.sinks = int(window), int(kernel), pooling, scaling, int(sinks)
        self.reset()

    def reset(self) -> None:
        self.queries: Tensor | None = None  # [B, Hq, <=window, D], newest last

    def planned_state_bytes(self, batch: int, query_heads: int, head_dim: int, dtype_bytes: int) -> int:
        """Its ``window`` newest queries of every query head, in the model's dtype."""
        return batch * query_heads * self.window * head_dim * dtype_bytes

    def observe(
        self,
        queries: Tensor,
        keys: Tensor | None,
        *,
        lengths: Tensor | None = None,
        positions: Tensor | None = None,
        window: int | None = None,
    ) -> None:
        """Remember the newest ``self.window`` queries; keys/positions are not needed (may be None)."""
        if queries.dim() != 4:
            raise PolicyError(f"queries must be [B, Hq, Tq, D], got {tuple(queries.shape)}")
        if keys is not None:
            check_qk(queries, keys)
        q = queries.detach()
        if self.queries is not None and self.queries.shape[:2] == q.shape[:2] and self.queries.shape[3] == q.shape[3]:
            q = torch.cat([self.queries, q], dim=2)
        self.queries = q[:, :, -self.window :].clone()

    def vote(self, keys: Tensor, *, lengths: Tensor | None = None) -> Tensor:
        """float32 [B, Hkv, T]: summed window attention on prefix tokens, before pooling (0 elsewhere)."""
        B, Hkv, T, _ = keys.shape
        if self.queries is None:
            return torch.zeros(B, Hkv, T)
        # After a deep eviction a head may hold fewer tokens than the window: vote with the newest queries
        # that every head can still match (their own keys are the newest stored ones).
        held = int(valid_mask(lengths, T, Hkv).sum(1).min())
        queries = self.queries[:, :, -held:] if held < self.queries.shape[2] else self.queries
        w = queries.shape[2]
        vote = torch.zeros(B, Hkv, T)
        if w == 0:
            return vote
        for _, probs, _ in group_attention(queries, keys, lengths=lengths, scaling=self.scaling):
            vote += probs.sum(2).cpu()
        L = valid_mask(lengths, T, Hkv).sum(1)
        prefix = torch.arange(T).unsqueeze(0) < (L - w).unsqueeze(1)  # [Hkv, T]
        return vote * prefix

    def scores(self, keys: Tensor, values: Tensor, *, lengths: Tensor | None = None) -> Tensor:
        B, Hkv, T, _ = keys.shape
        v = self.vote(keys, lengths=lengths).reshape(B * Hkv, 1, T)
        pad = self.kernel // 2
        if self.pooling == "max":
            pooled = F.max_pool1d(v, self.kernel, stride=1, padding=pad)
        else:
            pooled = F.avg_pool1d(v, self.kernel, stride=1, padding=pad, count_include_pad=True)
        return finish_scores(pooled.reshape(B, Hkv, T), T, lengths)

    def protected(self, T: int) -> Tensor:
        return ends(T, self.sinks, self.window)
