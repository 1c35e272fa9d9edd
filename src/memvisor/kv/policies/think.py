"""ThinK: query-driven key channel pruning.

Xu et al., "ThinK: Thinner Key Cache by Query-Driven Pruning", ICLR 2025.

Channel j of KV head h is scored by how much it can contribute to q·k over the observation window:
``score[h, j] = sum_{g, t in window} Q[g, t, j]^2  *  sum_{tokens s} K[h, s, j]^2``, i.e. the squared
column norms |Q_win[:, j]|^2 |K[:, j]|^2 of the paper (the Frobenius norm of the outer product
Q_win[:, j] K[:, j]^T), with the query side summed over the head's GQA group (sum of squares over the
group's query heads and over the batch; key side summed over the batch). The top ``keep`` channels
are kept; the cache stores only those and projects queries onto them (q[kept] · k[kept]), so the
pruned channels cost no bytes. The recent tokens stay full width (the cache's job).

Shapes/units: queries_window [B, Hq, w, D], keys [B, Hkv, T, D] (post-RoPE, the tensors attention uses)
-> LongTensor[Hkv, keep], each row sorted ascending. Scores are in (query units * key units)^2.
Knobs: ``ratio`` r in [0, 1): fraction of channels pruned (paper: about 0.4), giving
``keep_count(D) = D - floor(r * D)`` rounded up to ``multiple_of`` (default 1; 8 or 16 suits kernels).

Helpers for the cache: ``gather_keys(keys [B, Hkv, T, D], channels) -> [B, Hkv, T, keep]`` (what to
store) and ``gather_queries(queries [B, Hq, Tq, D], channels) -> [B, Hq, Tq, keep]`` (query head i
reads KV head i // groups' channels), so ``gather_queries(q) @ gather_keys(k)^T`` is the pruned logit.
Scale the logits with the ORIGINAL head dim (the model's scaling), not ``keep``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from memvisor.kv.policies.base import ChannelPolicy, PolicyError
from memvisor.kv.policies._attention import check_qk


class ThinK(ChannelPolicy):
    name = "think"

    def __init__(self, ratio: float = 0.4, multiple_of: int = 1) -> None:
        if not 0.0 <= ratio < 1.0 or multiple_of < 1:
            raise PolicyError(f"need 0 <= ratio < 1 and multiple_of >= 1; got {ratio}, {multiple_of}")
        self.ratio, self.multiple_of = float(ratio), int(multiple_of)

    def keep_count(self, head_dim: int) -> int:
        keep = head_dim - math.floor(self.ratio * head_dim)
        keep = math.ceil(keep / self.multiple_of) * self.multiple_of
        return max(1, min(head_dim, keep))

    def channel_scores(self, queries_window: Tensor, keys: Tensor) -> Tensor:
        """float32 [Hkv, D]: |Q_win[:, j]|^2 * |K[:, j]|^2 per KV head."""
        B, Hq, w, D, Hkv, T = check_qk(queries_window, keys)
        q2 = queries_window.float().pow(2).sum(dim=(0, 2)).reshape(Hkv, Hq // Hkv, D).sum(1)
        k2 = keys.float().pow(2).sum(dim=(0, 2))
        return q2 * k2

    def keep_channels(self, queries_window: Tensor, keys: Tensor, keep: int) -> Tensor:
        D = keys.shape[-1]
        if not 1 <= keep <= D:
            raise PolicyError(f"keep must be in [1, {D}], got {keep}")
        s = self.channel_scores(queries_window, keys)
        top = torch.topk(s, keep, dim=-1).indices
        return torch.sort(top, dim=-1).values

    @staticmethod
    def gather_keys(keys: Tensor, channels: Tensor) -> Tensor:
        """keys [B, Hkv, T, D], channels LongTensor[Hkv, keep] -> [B, Hkv, T, keep]."""
        B, Hkv, T, _ = keys.shape
        if channels.dim() != 2 or channels.shape[0] != Hkv:
            raise PolicyError(f"channels must be LongTensor[{Hkv}, keep], got {tuple(channels.shape)}")
        idx = channels.to(keys.device).view(1, Hkv, 1, -1).expand(B, Hkv, T, channels.shape[1])
        return torch.gather(keys, 3, idx)

    @staticmethod
    def gather_queries(queries: Tensor, channels: Tensor) -> Tensor:
        """queries [B, Hq, Tq, D], channels LongTensor[Hkv, keep] -> [B, Hq, Tq, keep] (GQA: head i uses row i // groups)."""
        B, Hq, Tq, _ = queries.shape
        Hkv = channels.shape[0]
        if channels.dim() != 2 or Hq % Hkv:
            raise PolicyError(f"channels must be [Hkv, keep] with Hq ({Hq}) a multiple of Hkv ({Hkv})")
        per_q = channels.to(queries.device).repeat_interleave(Hq // Hkv, dim=0)  # [Hq, keep]
        idx = per_q.view(1, Hq, 1, -1).expand(B, Hq, Tq, per_q.shape[1])
        return torch.gather(queries, 3, idx)
