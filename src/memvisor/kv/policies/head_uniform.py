"""Uniform head budget: each KV head of a layer keeps the same number of tokens.

Shapes/units: ``split(scores [B, Hkv, T] | [Hkv, T], protected [T] | [Hkv, T], layer_budget)`` ->
LongTensor[Hkv] of tokens per head, summing to ``min(layer_budget, valid tokens)``. ``layer_budget``
counts one token of one head as 1. The division remainder goes to the first heads; a head with fewer
valid tokens than its share passes the surplus to the others. ``strict=True`` raises
BudgetTooSmallError when a share is below the head's protected tokens (default: ``select`` degrades).
"""

from __future__ import annotations

import torch
from torch import Tensor

from memvisor.kv.policies.base import BudgetTooSmallError, HeadBudget, PolicyError
from memvisor.kv.policies._ranking import prepare


class UniformHeadBudget(HeadBudget):
    name = "head-uniform"

    def __init__(self, strict: bool = False) -> None:
        self.strict = bool(strict)

    def split(self, scores: Tensor, protected: Tensor, layer_budget: int, *, lengths: Tensor | None = None) -> Tensor:
        if layer_budget < 0:
            raise PolicyError(f"layer_budget must be >= 0, got {layer_budget}")
        _, prot, valid = prepare(scores, protected, lengths)
        cap = valid.sum(1)
        H = cap.numel()
        out = torch.zeros(H, dtype=torch.long)
        left = min(int(layer_budget), int(cap.sum()))
        while left > 0:
            open_ = torch.nonzero(out < cap).flatten()
            share, rest = divmod(left, open_.numel())
            for i, h in enumerate(open_.tolist()):
                add = min(share + (1 if i < rest else 0), int(cap[h] - out[h]))
                out[h] += add
                left -= add
        need = prot.sum(1)
        if self.strict and bool((out < need).any()):
            raise BudgetTooSmallError(f"uniform head budget {out.tolist()} below protected counts {need.tolist()}")
        return out
