"""H2O: heavy hitters (largest accumulated attention received) + recent tokens.

Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language
Models", NeurIPS 2023.

Statistic: for each KV head and cached token, the sum over every query observed so far (prefill blocks
and decode steps) of the attention probability it received. GQA: each query's softmax row is averaged
over the KV head's query group (mean), so one query contributes a total mass of 1 per KV head.
Prefill-block queries are causally masked (query i sees keys up to its own position), so in one block
older tokens collect more mass than newer ones, as in the paper.

Decode steps: the cache hands ``observe_probs`` the probabilities its own attention computed (the model's
scale; no second pass over the dequantized history); prefill blocks through SDPA call ``observe``.

Shapes/units: ``observe(queries [B, Hq, Tq, D], keys [B, Hkv, T, D])``,
``observe_probs(probs [B, Hkv, Tq, T], n_visible [Hkv, Tq])``; ``scores`` -> float32
[B, Hkv, T], unit = attention probability mass (sum over queries). Tokens appended without being
observed score 0.
Knobs: ``recent`` (tokens always kept at the recent end, default 32), ``sinks`` (default 0),
``scaling`` (logit scale, default 1/sqrt(D)), ``chunk`` (queries per softmax chunk, memory only).
"""

from __future__ import annotations

import torch
from torch import Tensor

from memvisor.kv.policies.base import PolicyError
from memvisor.kv.policies._attention import AttentionStatsPolicy
from memvisor.kv.policies._stats import extend, finish_scores, reindex


class H2O(AttentionStatsPolicy):
    name = "h2o"
    state_attrs = ("acc",)

    def __init__(self, recent: int = 32, sinks: int = 0, scaling: float | None = None, chunk: int = 256) -> None:
        if recent < 0 or sinks < 0 or chunk < 1:
            raise PolicyError(f"recent, sinks must be >= 0 and chunk >= 1; got {recent}, {sinks}, {chunk}")
        self.recent, self.sinks, self.scaling, self.chunk = int(recent), int(sinks), scaling, int(chunk)
        self.reset()

    def reset(self) -> None:
        self.acc: Tensor | None = None  # float32 [B, Hkv, T]

    def observe_probs(self, probs: Tensor, n_visible: Tensor, *, lengths: Tensor | None = None) -> None:
        B, Hkv, _, T = probs.shape
        acc = torch.zeros(B, Hkv, 0) if self.acc is None else self.acc
        self.acc = extend(acc, T) + probs.sum(2).cpu()

    def scores(self, keys: Tensor, values: Tensor, *, lengths: Tensor | None = None) -> Tensor:
        B, Hkv, T, _ = keys.shape
        acc = torch.zeros(B, Hkv, 0) if self.acc is None else self.acc
        return finish_scores(acc, T, lengths)

    def on_evict(self, kept: list[Tensor]) -> None:
        if self.acc is not None:
            self.acc = reindex(self.acc, kept)
