"""Bookkeeping for per-token statistics kept by a policy: grow with new tokens, follow eviction.

A statistic is a tensor ``[..., Hkv, T]`` (head axis second to last, token axis last) in the padded
ragged layout of ``base``: head h's tokens at ``[0, lengths[h])``, zeros beyond. Statistics live on the
CPU whatever the cache's device: they are one number per token and head, and the eviction decisions that
read them (scores, ``select``) run there; only the attention that feeds them runs beside the keys.
"""

from __future__ import annotations

import torch
from torch import Tensor

from memvisor.kv.policies.base import PolicyError, valid_mask


def extend(stat: Tensor, T: int) -> Tensor:
    """Zero-pad the token axis to T. New tokens (appended after each head's valid ones) start at 0."""
    if stat.shape[-1] > T:
        raise PolicyError(
            f"policy holds statistics for {stat.shape[-1]} tokens but the layer now has {T}: "
            "the cache evicted without calling on_evict()"
        )
    if stat.shape[-1] == T:
        return stat
    pad = torch.zeros(*stat.shape[:-1], T - stat.shape[-1], dtype=stat.dtype, device=stat.device)
    return torch.cat([stat, pad], dim=-1)


def reindex(stat: Tensor, kept: list[Tensor]) -> Tensor:
    """New statistic whose head h holds ``stat[..., h, kept[h]]`` at ``[0, len(kept[h]))``, zeros after."""
    n_heads = stat.shape[-2]
    if len(kept) != n_heads:
        raise PolicyError(f"on_evict got {len(kept)} index lists for {n_heads} KV heads")
    T_new = max((len(k) for k in kept), default=0)
    # Tokens appended after the last observe() have no statistic yet: they count as 0.
    need = max((int(torch.as_tensor(k).max()) + 1 for k in kept if len(k)), default=0)
    if need > stat.shape[-1]:
        stat = extend(stat, need)
    out = torch.zeros(*stat.shape[:-1], T_new, dtype=stat.dtype, device=stat.device)
    for h, idx in enumerate(kept):
        idx = torch.as_tensor(idx, dtype=torch.long).to(stat.device)
        if idx.numel() and int(idx.min()) < 0:
            raise PolicyError(f"on_evict: head {h} keeps a negative index")
        out[..., h, : idx.numel()] = stat[..., h, idx]
    return out


def ends(T: int, sinks: int, recent: int) -> Tensor:
    """BoolTensor[T]: True at the first ``sinks`` and the last ``recent`` of T tokens (what most policies protect)."""
    p = torch.zeros(T, dtype=torch.bool)
    p[:sinks] = True
    p[max(0, T - recent) :] = True  # recent == 0 marks nothing (the slice starts at T)
    return p


def finish_scores(stat: Tensor, T: int, lengths: Tensor | None) -> Tensor:
    """float32 [B, Hkv, T] scores on the CPU from a [B, Hkv, <=T] statistic (on any device), ``-inf`` at
    padding."""
    out = extend(stat.float().cpu(), T)
    if lengths is not None:
        out = out.masked_fill(~valid_mask(lengths, T, out.shape[-2]), float("-inf"))
    return out
