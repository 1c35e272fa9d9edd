"""PyramidKV layer budget: budgets decrease linearly with depth.

Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling", 2024.

With ``avg = total / n_layers``, the top (deepest) layer gets ``avg / beta`` and the bottom layer
``2 * avg - avg / beta``; layers in between lie on the straight line, so the mean stays ``avg``.
Rounded by largest remainder: the integers sum exactly to ``total_tokens`` and stay non-increasing.

Shapes/units: ``split(total_tokens, n_layers) -> list[int]`` (tokens, layer 0 = closest to the input).
Knobs: ``beta`` >= 1 (default 20, as in the paper; 1 gives uniform).
"""

from __future__ import annotations

from memvisor.kv.policies.base import LayerBudget, PolicyError, check_split_args, largest_remainder


class PyramidLayerBudget(LayerBudget):
    name = "pyramid"

    def __init__(self, beta: float = 20.0) -> None:
        if beta < 1.0:
            raise PolicyError(f"beta must be >= 1, got {beta}")
        self.beta = float(beta)

    def weights(self, n_layers: int) -> list[float]:
        """Unrounded per-layer shares of an average of 1 token (sum = n_layers)."""
        if n_layers == 1:
            return [1.0]
        top = 1.0 / self.beta
        bottom = 2.0 - top
        return [bottom - (bottom - top) * i / (n_layers - 1) for i in range(n_layers)]

    def split(self, total_tokens: int, n_layers: int) -> list[int]:
        check_split_args(total_tokens, n_layers)
        return largest_remainder(self.weights(n_layers), total_tokens)
