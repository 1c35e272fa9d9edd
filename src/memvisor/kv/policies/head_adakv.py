"""Ada-KV head budget: one top-k over all heads of a layer, so heads get unequal (ragged) shares.

Feng et al., "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for Efficient LLM
Inference", 2024.

Every head's tokens compete in one pool ranked by their score (the token policy's score, e.g.
attention mass, which is comparable across heads of a layer); protected tokens always win; each head's
count is how many of its tokens made the layer's top ``layer_budget``. ``floor`` reserves for every
head at least ``floor * layer_budget / Hkv`` tokens first (Ada-KV's later "safeguard"; 0 = pure
top-k). Passing the counts to ``select`` keeps exactly the tokens that won here; store them ragged or
nothing is saved.

Shapes/units: ``split(scores [B, Hkv, T] | [Hkv, T], protected [T] | [Hkv, T], layer_budget, lengths=)``
-> LongTensor[Hkv] tokens per head, summing to ``min(layer_budget, valid tokens)``.
If the layer budget is below the tokens every head must keep (protected + floor), the reserves shrink
in proportion so the budget still holds (``strict=True`` raises BudgetTooSmallError instead).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from memvisor.kv.policies.base import BudgetTooSmallError, HeadBudget, PolicyError, largest_remainder
from memvisor.kv.policies._ranking import order_desc, prepare, rank_keys


class AdaKVHeadBudget(HeadBudget):
    name = "adakv"

    def __init__(self, floor: float = 0.0, strict: bool = False) -> None:
        if not 0.0 <= floor <= 1.0:
            raise PolicyError(f"floor must be in [0, 1], got {floor}")
        self.floor, self.strict = float(floor), bool(strict)

    def split(self, scores: Tensor, protected: Tensor, layer_budget: int, *, lengths: Tensor | None = None) -> Tensor:
        if layer_budget < 0:
            raise PolicyError(f"layer_budget must be >= 0, got {layer_budget}")
        s, prot, valid = prepare(scores, protected, lengths)
        H, T = s.shape
        n_valid = valid.sum(1)
        if layer_budget >= int(n_valid.sum()):
            return n_valid.clone()
        n_prot = prot.sum(1)
        reserve = torch.minimum(n_valid, torch.clamp(n_prot, min=math.floor(self.floor * layer_budget / H)))
        if int(reserve.sum()) > layer_budget:
            if self.strict:
                raise BudgetTooSmallError(
                    f"layer budget {layer_budget} < {int(reserve.sum())} tokens every head must keep "
                    f"(protected {n_prot.tolist()}, floor {self.floor})"
                )
            # degrade without exceeding the budget: shrink every head's reserve in proportion
            return torch.tensor(largest_remainder(reserve.tolist(), layer_budget), dtype=torch.long)
        keys = rank_keys(s, prot, valid)
        # Per head, its own ranking; the first reserve[h] are taken, the rest compete globally.
        pool_val, pool_head = [], []
        for h in range(H):
            order = order_desc(keys[h])[: int(n_valid[h])]
            rest = order[int(reserve[h]) :]
            pool_val.append(keys[h, rest])
            pool_head.append(torch.full((rest.numel(),), h, dtype=torch.long))
        vals, heads = torch.cat(pool_val), torch.cat(pool_head)
        k = layer_budget - int(reserve.sum())
        win = torch.argsort(vals, descending=True, stable=True)[:k]
        return reserve + torch.bincount(heads[win], minlength=H)
