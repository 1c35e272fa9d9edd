"""Key-norm scoring (as kvpress's KnormPress): keep the tokens whose keys have the SMALLEST L2 norm.

Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression", EMNLP 2024:
low-norm keys tend to receive high attention. Needs no queries.

Shapes/units: ``scores`` returns float32 [B, Hkv, T] = ``-||k||_2`` (key units), higher = keep.
Knobs: ``sinks`` and ``recent`` (tokens always kept at the start / end; default 0, as in kvpress).
"""

from __future__ import annotations

from torch import Tensor

from memvisor.kv.policies.base import PolicyError, TokenPolicy
from memvisor.kv.policies._stats import ends, finish_scores


class KeyNorm(TokenPolicy):
    name = "knorm"
    needs_queries = False

    def __init__(self, sinks: int = 0, recent: int = 0) -> None:
        if sinks < 0 or recent < 0:
            raise PolicyError(f"sinks and recent must be >= 0, got {sinks}, {recent}")
        self.sinks = int(sinks)
        self.recent = int(recent)

    def scores(self, keys: Tensor, values: Tensor, *, lengths: Tensor | None = None) -> Tensor:
        return finish_scores(-keys.float().norm(dim=-1), keys.shape[2], lengths)

    def protected(self, T: int) -> Tensor:
        return ends(T, self.sinks, self.recent)
