"""Attention probabilities for statistics-gathering policies (H2O, Scissorhands, SnapKV).

One function, ``group_attention``: softmax(q·k * scaling) with the causal mask of a prefill block
and the padding of ragged heads, reduced over each KV head's query group by MEAN (GQA), in float32.
It yields query chunks so a 4k-token prefill block never materialises a [Hq, 4k, 4k] matrix.
The products run on the keys' device (a GPU cache's history stays there); lengths and positions may come
from the CPU. The policies reduce what it yields and keep their statistics on the CPU (see ``_stats``).
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
from torch import Tensor

from memvisor.kv.policies._stats import ends
from memvisor.kv.policies.base import PolicyError, TokenPolicy, valid_mask


def check_qk(queries: Tensor, keys: Tensor) -> tuple[int, int, int, int, int, int]:
    """Validate shapes; returns (B, Hq, Tq, D, Hkv, T)."""
    if queries.dim() != 4 or keys.dim() != 4:
        raise PolicyError(
            f"queries must be [B, Hq, Tq, D] and keys [B, Hkv, T, D]; got {tuple(queries.shape)} and {tuple(keys.shape)}"
        )
    B, Hq, Tq, D = queries.shape
    Bk, Hkv, T, Dk = keys.shape
    if Bk != B or Dk != D:
        raise PolicyError(f"batch/head_dim mismatch: queries {tuple(queries.shape)}, keys {tuple(keys.shape)}")
    if Hkv == 0 or Hq % Hkv:
        raise PolicyError(f"query heads ({Hq}) must be a multiple of KV heads ({Hkv}) (GQA)")
    return B, Hq, Tq, D, Hkv, T


def group_attention(
    queries: Tensor,
    keys: Tensor,
    *,
    lengths: Tensor | None = None,
    scaling: float | None = None,
    chunk: int = 256,
    positions: Tensor | None = None,
    window: int | None = None,
) -> Iterator[tuple[int, Tensor, Tensor]]:
    """Yield ``(start, probs, n_visible)`` per chunk of queries.

    queries: [B, Hq, Tq, D]; keys: [B, Hkv, T, D]; lengths: LongTensor[Hkv] or None (all T valid).
    Query i of the block is the token at position ``lengths[h] - Tq + i`` of head h and attends keys
    ``j <= lengths[h] - Tq + i`` (causal inside the block, everything older before it).
    probs: float32 [B, Hkv, c, T] on the keys' device, the mean over the query group of the softmax rows
    (each row sums to 1, zeros at masked keys), for queries ``start .. start + c - 1``.
    n_visible: LongTensor[Hkv, c] (same device), how many keys each query row sees (for "above average"
    tests).
    scaling: logit scale, default 1/sqrt(D) (pass the model's own, e.g. Gemma's query_pre_attn_scalar**-0.5).
    window, positions: sliding-window layers. ``positions`` LongTensor[Hkv, T] gives each stored key's
    absolute position (queries are at the positions of the newest Tq keys); a query at p then also
    needs ``key_pos > p - window`` (the transformers rule). Both or neither.
    """
    B, Hq, Tq, D, Hkv, T = check_qk(queries, keys)
    groups = Hq // Hkv
    dev = keys.device
    valid = valid_mask(lengths, T, Hkv).to(dev)  # [Hkv, T]
    L = valid.sum(1)  # [Hkv]
    if int(L.min()) < Tq:
        raise PolicyError(
            f"every head must hold at least the block's own {Tq} keys (observe() after the cache appended them); lengths={L.tolist()}"
        )
    if (window is None) != (positions is None):
        raise PolicyError("sliding-window masking needs both window and positions")
    if positions is not None:
        positions = torch.as_tensor(positions, dtype=torch.long).to(dev)
        if positions.shape != (Hkv, T):
            raise PolicyError(f"positions must be LongTensor[{Hkv}, {T}], got {tuple(positions.shape)}")
    scale = float(scaling) if scaling is not None else 1.0 / math.sqrt(D)
    k = keys.float()
    pos = torch.arange(T, device=dev)
    for start in range(0, Tq, chunk):
        stop = min(Tq, start + chunk)
        q = queries[:, :, start:stop].float().reshape(B, Hkv, groups, stop - start, D)
        logits = torch.einsum("bhgqd,bhtd->bhgqt", q, k) * scale
        limit = L.unsqueeze(1) - Tq + torch.arange(start, stop, device=dev).unsqueeze(0)  # [Hkv, c] last visible key
        allowed = pos.view(1, 1, T) <= limit.unsqueeze(2)  # [Hkv, c, T]; padding lies beyond limit
        if positions is not None:
            q_abs = torch.gather(positions, 1, limit)  # [Hkv, c] absolute position of each query
            allowed &= positions.unsqueeze(1) > (q_abs - window).unsqueeze(2)
        logits = logits.masked_fill(~allowed.view(1, Hkv, 1, stop - start, T), float("-inf"))
        probs = torch.softmax(logits, dim=-1).mean(2)
        yield start, probs, allowed.sum(-1)


class AttentionStatsPolicy(TokenPolicy):
    """A token policy whose statistics are functions of the attention probabilities alone (H2O, Scissorhands).

    A subclass implements ``observe_probs`` (the statistic), ``scores``, ``on_evict`` and ``reset``, and sets the
    knobs ``sinks``, ``recent`` (tokens kept at each end), ``scaling`` and ``chunk`` (as ``group_attention``'s).
    ``observe`` computes the rows of :meth:`observed_queries` with :func:`group_attention` and hands them to
    ``observe_probs``; the cache hands decode steps' rows straight to ``observe_probs`` (``observes_probs``).
    """

    needs_queries = True
    observes_probs = True
    scores_use_kv = False  # scores come from accumulated statistics and positions
    sinks: int
    recent: int
    scaling: float | None
    chunk: int

    def state_bytes(self, tokens: int) -> int:
        """Their statistics hold one entry per stored token (last axis, the longest head's length): they scale
        with ``tokens``."""
        now = self.nbytes()
        stats = [getattr(self, a, None) for a in self.state_attrs]
        held = max((t.shape[-1] for t in stats if isinstance(t, Tensor)), default=0)
        return now * tokens // held if held else now

    def observed_queries(self, queries: Tensor) -> Tensor:
        """The queries of a forward ([B, Hq, Tq, D]) whose rows the statistic needs (default: all)."""
        return queries

    def observe(
        self,
        queries: Tensor,
        keys: Tensor,
        *,
        lengths: Tensor | None = None,
        positions: Tensor | None = None,
        window: int | None = None,
    ) -> None:
        for _, probs, n_visible in group_attention(
            self.observed_queries(queries), keys, lengths=lengths, scaling=self.scaling, chunk=self.chunk,
            positions=positions, window=window,
        ):
            self.observe_probs(probs, n_visible, lengths=lengths)

    def protected(self, T: int) -> Tensor:
        return ends(T, self.sinks, self.recent)
