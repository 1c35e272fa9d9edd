"""Uniform layer budget: every layer gets the same share of the model-wide token budget.

Shapes/units: ``split(total_tokens, n_layers) -> list[int]`` in tokens (whatever unit the caller's
total is in: tokens per KV head, or KV-head-tokens); sums exactly to ``total_tokens``; the remainder of
the division goes to the first layers, one token each. No knobs.
"""

from __future__ import annotations

from memvisor.kv.policies.base import LayerBudget, check_split_args


class UniformLayerBudget(LayerBudget):
    name = "uniform"

    def split(self, total_tokens: int, n_layers: int) -> list[int]:
        check_split_args(total_tokens, n_layers)
        base, rest = divmod(total_tokens, n_layers)
        return [base + (1 if i < rest else 0) for i in range(n_layers)]
