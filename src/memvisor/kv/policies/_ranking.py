"""Shared ranking rule of ``select`` and the head budgets: protected first, then score, then newer."""

from __future__ import annotations

import torch
from torch import Tensor

from memvisor.kv.policies.base import PolicyError, valid_mask


def prepare(scores: Tensor, protected: Tensor, lengths: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """(scores [Hkv, T] float64 mean over batch, protected [Hkv, T] & valid, valid [Hkv, T])."""
    if scores.dim() == 3:
        scores = scores.float().mean(0)
    if scores.dim() != 2:
        raise PolicyError(f"scores must be [B, Hkv, T] or [Hkv, T], got {tuple(scores.shape)}")
    H, T = scores.shape
    valid = valid_mask(lengths, T, H)
    protected = torch.as_tensor(protected, dtype=torch.bool)
    if protected.shape == (T,):
        protected = protected.unsqueeze(0).expand(H, T)
    elif protected.shape != (H, T):
        raise PolicyError(f"protected must be BoolTensor[{T}] or [{H}, {T}], got {tuple(protected.shape)}")
    return scores.double(), protected & valid, valid


def rank_keys(scores: Tensor, protected: Tensor, valid: Tensor) -> Tensor:
    """float64 [Hkv, T] sort keys: +inf protected, -inf padding, else score; higher = kept first."""
    s = scores.clone()
    s[~valid] = float("-inf")
    s[protected] = float("inf")
    return s


def order_desc(keys_1d: Tensor) -> Tensor:
    """Indices of a 1-D tensor by descending value; among equal values the higher index (newer) first."""
    pos = torch.arange(keys_1d.numel() - 1, -1, -1)
    first = keys_1d[pos]
    return pos[torch.argsort(first, descending=True, stable=True)]
