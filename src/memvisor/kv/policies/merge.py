"""KV merging (KVMerger): fold evicted tokens into a similar adjacent kept token, Gaussian-weighted.

Wang et al., "Model Tells You Where to Merge: Adaptive KV Cache Merging for LLMs on Long-Context
Tasks", 2024 (arXiv:2407.08454).

Per KV head, in storage order:
1. Merging sets: maximal runs of consecutive tokens in which every ADJACENT pair's key cosine similarity
   exceeds ``threshold`` (similarity averaged over the batch, so all rows share the decision).
2. Pivots: the tokens the token policy kept (the paper's pivot is the set's highest-attention token;
   here the attention-based token policy has already made that choice). Each evicted token in a run is
   assigned to the NEAREST kept token of the same run (ties: the older one). Evicted tokens in a run
   with no kept token, or in no run, are dropped as usual.
3. Gaussian kernel merge: for pivot p and its set S (p included),
   ``w_i = exp(-||k_i - k_p||^2 / (2 sigma^2))`` (so w_p = 1), ``k_p' = sum w_i k_i / sum w_i`` and the
   same weights for the values ``v_p' = sum w_i v_i / sum w_i``.

Shapes/units: keys, values [B, Hkv, T, D]; kept: list over heads of sorted LongTensor indices into
``[0, lengths[h])``; returns (keys, values) lists over heads of Tensor[B, len(kept[h]), D], input dtype.
Knobs: ``threshold`` (cosine, default 0.9); ``sigma`` (key units; default None = adaptive: sigma^2 is the
mean squared distance of the merged, non-pivot tokens to their pivots in that head and batch row).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from memvisor.kv.policies.base import MergePolicy, PolicyError, valid_mask


class KVMerger(MergePolicy):
    name = "merge"

    def __init__(self, threshold: float = 0.9, sigma: float | None = None) -> None:
        if not -1.0 <= threshold <= 1.0:
            raise PolicyError(f"threshold is a cosine similarity in [-1, 1], got {threshold}")
        if sigma is not None and sigma <= 0:
            raise PolicyError(f"sigma must be > 0 or None, got {sigma}")
        self.threshold, self.sigma = float(threshold), sigma

    def assign(self, keys_h: Tensor, kept_h: Tensor) -> Tensor:
        """LongTensor[L]: for each token of one head (keys_h [B, L, D]) the kept token it merges into, -1 = dropped."""
        B, L, _ = keys_h.shape
        ar = torch.arange(L, device=keys_h.device)
        is_kept = torch.zeros(L, dtype=torch.bool, device=keys_h.device)
        is_kept[kept_h] = True
        kn = F.normalize(keys_h.float(), dim=-1)
        sim = (kn[:, :-1] * kn[:, 1:]).sum(-1).mean(0)  # [L-1] cosine of neighbours
        run = torch.cat([torch.zeros(1, dtype=torch.long, device=keys_h.device),
                         torch.cumsum((sim <= self.threshold).long(), 0)])
        prev = torch.where(is_kept, ar, -1).cummax(0).values
        nxt = torch.where(is_kept, ar, L).flip(0).cummin(0).values.flip(0)
        prev_ok = (prev >= 0) & (run[prev.clamp(min=0)] == run)
        nxt_ok = (nxt < L) & (run[nxt.clamp(max=L - 1)] == run)
        use_prev = prev_ok & (~nxt_ok | (ar - prev <= nxt - ar))
        return torch.where(use_prev, prev, torch.where(nxt_ok, nxt, torch.full_like(ar, -1)))

    def merge(
        self, keys: Tensor, values: Tensor, kept: list[Tensor], *, lengths: Tensor | None = None
    ) -> tuple[list[Tensor], list[Tensor]]:
        if keys.dim() != 4 or keys.shape != values.shape:
            raise PolicyError(f"keys and values must both be [B, Hkv, T, D]; got {tuple(keys.shape)}, {tuple(values.shape)}")
        B, Hkv, T, D = keys.shape
        dev = keys.device  # the merge runs beside the keys; ``kept`` may come from the CPU
        if len(kept) != Hkv:
            raise PolicyError(f"kept has {len(kept)} index lists for {Hkv} KV heads")
        L_all = valid_mask(lengths, T, Hkv).sum(1).tolist()
        out_k: list[Tensor] = []
        out_v: list[Tensor] = []
        for h in range(Hkv):
            L = int(L_all[h])
            idx = torch.as_tensor(kept[h], dtype=torch.long).to(dev)
            if idx.numel() and (int(idx.max()) >= L or int(idx.min()) < 0):
                raise PolicyError(f"head {h}: kept index out of [0, {L})")
            if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
                raise PolicyError(f"head {h}: kept indices must be sorted and unique")
            k = keys[:, h, :L].float()
            v = values[:, h, :L].float()
            if idx.numel() == 0 or idx.numel() == L:
                out_k.append(keys[:, h, idx].clone())
                out_v.append(values[:, h, idx].clone())
                continue
            target = self.assign(k, idx)
            member = torch.nonzero(target >= 0).flatten()
            piv = target[member]
            slot = torch.searchsorted(idx, piv)
            d2 = (k[:, member] - k[:, piv]).pow(2).sum(-1)  # [B, m]
            if self.sigma is not None:
                two_s2 = torch.full((B, 1), 2.0 * self.sigma**2, device=dev)
            else:
                moved = member != piv
                mean_d2 = d2[:, moved].mean(1, keepdim=True) if bool(moved.any()) else torch.ones(B, 1, device=dev)
                two_s2 = 2.0 * mean_d2.clamp(min=1e-12)
            w = torch.exp(-d2 / two_s2)  # [B, m]; pivots have d2 = 0 -> w = 1
            den = torch.zeros(B, idx.numel(), device=dev).index_add_(1, slot, w).unsqueeze(-1)
            nk = torch.zeros(B, idx.numel(), D, device=dev).index_add_(1, slot, w.unsqueeze(-1) * k[:, member]) / den
            nv = torch.zeros(B, idx.numel(), D, device=dev).index_add_(1, slot, w.unsqueeze(-1) * v[:, member]) / den
            out_k.append(nk.to(keys.dtype))
            out_v.append(nv.to(values.dtype))
        return out_k, out_v
