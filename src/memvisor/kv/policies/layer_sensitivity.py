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
``attention_mass_lost(queries_window, keys, keep)`` is a second, direct sensitivity: the share of a
layer's window attention outside its top ``keep`` tokens per head (computable from one full prefill).
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


def attention_mass_lost(queries_window: Tensor, keys: Tensor, keep: int, *, scaling: float | None = None) -> float:
    """A direct per-layer sensitivity: the share of the window's attention that falls outside the
    ``keep`` tokens per KV head that receive the most of it (what an attention-based policy would
    keep), averaged over window queries, heads and batch; in [0, 1], unitless.

    queries_window: [B, Hq, w, D] post-RoPE queries of the newest w tokens; keys: [B, Hkv, T, D] all
    keys (causal mask inside the window, GQA mean as in ``_attention``). Layers whose attention is
    diffuse lose more under a uniform budget and score higher. Calibrate on sample inputs, then pass
    one value per layer to :class:`SensitivityLayerBudget`.
    """
    from memvisor.kv.policies._attention import group_attention

    if keep < 0:
        raise PolicyError(f"keep must be >= 0, got {keep}")
    T = keys.shape[2]
    if keep >= T:
        return 0.0
    probs = torch.cat([p for _, p, _ in group_attention(queries_window, keys, scaling=scaling)], dim=2)
    top = torch.topk(probs.sum(2), keep, dim=-1).indices  # [B, Hkv, keep]
    kept_mass = torch.gather(probs, 3, top.unsqueeze(2).expand(-1, -1, probs.shape[2], -1)).sum(-1)
    return float(1.0 - kept_mass.mean())


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
