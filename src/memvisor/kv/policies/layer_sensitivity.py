"""Sensitivity-proportional layer budget (EpiCache style): layers hurt more by eviction get more.

Kim et al., "EpiCache: Episodic KV Cache Management for Long Conversational Question Answering", 2025.

EpiCache measures, per layer, how much block-wise eviction changes that layer's representations and
allocates the budget in proportion to that sensitivity (sharpened by an exponent). Here:
``measure_sensitivity(reference, compressed)`` gives ``s_l = 1 - mean cosine(reference_l, compressed_l)``
for any per-token representation of layer l (the caller runs the model twice on the same input, full
cache vs block-wise evicted cache, and passes e.g. the layer's key states or attention outputs for the
same tokens, each [..., D]); ``SensitivityLayerBudget(s)`` then gives layer l
``total * (floor / L + (1 - floor) * s_l^alpha / sum_m s_m^alpha)`` tokens, rounded by largest remainder
(sums exactly to ``total_tokens``).

Knobs: ``sensitivity`` (one non-negative float per layer, unitless), ``alpha`` (sharpness, default 1),
``floor`` (fraction of the budget shared uniformly first so no layer starves, default 0.1).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from memvisor.kv.policies.base import LayerBudget, PolicyError, check_split_args, largest_remainder


def measure_sensitivity(reference: Sequence[Tensor], compressed: Sequence[Tensor]) -> list[float]:
    """Per layer ``1 - mean cosine similarity`` of matching rows (tensors [..., D] per layer), in [0, 2]."""
    if len(reference) != len(compressed) or not reference:
        raise PolicyError(f"need one tensor per layer on both sides; got {len(reference)} and {len(compressed)}")
    out = []
    for i, (a, b) in enumerate(zip(reference, compressed)):
        if a.shape != b.shape:
            raise PolicyError(f"layer {i}: shapes differ {tuple(a.shape)} vs {tuple(b.shape)}")
        cos = F.cosine_similarity(a.float().reshape(-1, a.shape[-1]), b.float().reshape(-1, b.shape[-1]), dim=-1)
        out.append(float(1.0 - cos.mean()))
    return out


class SensitivityLayerBudget(LayerBudget):
    name = "sensitivity"

    def __init__(self, sensitivity: Sequence[float], alpha: float = 1.0, floor: float = 0.1) -> None:
        s = torch.as_tensor(list(sensitivity), dtype=torch.float64)
        if s.numel() == 0 or bool((s < 0).any()) or not bool(torch.isfinite(s).all()):
            raise PolicyError(f"sensitivity must be finite non-negative floats, one per layer; got {list(sensitivity)}")
        if alpha <= 0 or not 0.0 <= floor <= 1.0:
            raise PolicyError(f"need alpha > 0 and 0 <= floor <= 1; got {alpha}, {floor}")
        self.sensitivity = [float(x) for x in s]
        self.alpha, self.floor = float(alpha), float(floor)

    def weights(self) -> list[float]:
        s = torch.as_tensor(self.sensitivity, dtype=torch.float64).pow(self.alpha)
        n = s.numel()
        prop = s / s.sum() if float(s.sum()) > 0 else torch.full((n,), 1.0 / n, dtype=torch.float64)
        return (self.floor / n + (1.0 - self.floor) * prop).tolist()

    def split(self, total_tokens: int, n_layers: int) -> list[int]:
        check_split_args(total_tokens, n_layers)
        if n_layers != len(self.sensitivity):
            raise PolicyError(f"measured {len(self.sensitivity)} layers but asked to split over {n_layers}")
        return largest_remainder(self.weights(), total_tokens)
