"""Pure-torch decode attention over a KIVI-quantized layer: the CPU path and the kernel's reference.

It never dequantizes the whole history at once: it walks the quantized tokens block by block
(``block`` tokens, a multiple of the group size), dequantizes one block in float32, and folds it
into an online softmax (running max, running sum, running weighted values), then the residual.
Peak extra memory is O(B * Hkv * block * D) floats whatever the context length.
"""

from __future__ import annotations

import math

import torch

from memvisor.kv.gpu.errors import KVLayoutError
from memvisor.kv.gpu.layout import KiviLayer, unpack_codes


def _check_query(q: torch.Tensor, layer: KiviLayer) -> int:
    if q.dim() != 3:
        raise KVLayoutError(f"query must be [B, Hq, D], got shape {tuple(q.shape)}")
    b, hq, d = q.shape
    bk, hkv, _, dk = layer.k_res.shape
    if (b, d) != (bk, dk):
        raise KVLayoutError(f"query [B={b}, D={d}] does not match cache [B={bk}, D={dk}]")
    if hq % hkv:
        raise KVLayoutError(f"query heads {hq} are not a multiple of kv heads {hkv}")
    return hq // hkv


class _OnlineSoftmax:
    """Running softmax state for ``[B, Hkv, groups]`` query rows (float32)."""

    def __init__(self, b: int, hkv: int, groups: int, d: int, device: torch.device) -> None:
        self.m = torch.full((b, hkv, groups), -math.inf, device=device)
        self.l = torch.zeros((b, hkv, groups), device=device)
        self.acc = torch.zeros((b, hkv, groups, d), device=device)

    def fold(self, s: torch.Tensor, v: torch.Tensor) -> None:
        """s: scores [B, Hkv, groups, n]; v: values [B, Hkv, n, D] (float32)."""
        m_new = torch.maximum(self.m, s.amax(-1))
        alpha = torch.exp(self.m - m_new)
        p = torch.exp(s - m_new.unsqueeze(-1))
        self.l = self.l * alpha + p.sum(-1)
        self.acc = self.acc * alpha.unsqueeze(-1) + torch.einsum("bhgn,bhnd->bhgd", p, v)
        self.m = m_new

    def result(self) -> torch.Tensor:
        return self.acc / self.l.unsqueeze(-1)


def decode_attention_reference(q: torch.Tensor, layer: KiviLayer, sm_scale: float | None = None,
                               block: int = 512) -> torch.Tensor:
    """Attention of one new query token per sequence over a quantized layer.

    q: ``[B, Hq, D]`` (any float dtype; Hq = Hkv * groups, query head ``h`` reads kv head
    ``h // groups`` as in transformers' GQA); returns float32 ``[B, Hq, D]``.
    ``sm_scale`` defaults to ``1/sqrt(D)``. ``block`` (tokens, rounded up to the group size)
    bounds the float32 scratch.
    """
    layer.validate()
    groups = _check_query(q, layer)
    b, hq, d = q.shape
    hkv = layer.k_res.shape[1]
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)
    g = layer.group
    block = max(g, -(-block // g) * g)
    per = 8 // layer.bits
    qf = q.float().reshape(b, hkv, groups, d) * scale
    state = _OnlineSoftmax(b, hkv, groups, d, q.device)
    for t0 in range(0, layer.t_quant, block):
        t1 = min(t0 + block, layer.t_quant)
        kc = unpack_codes(layer.k_codes[:, :, t0 // per:t1 // per], layer.bits, dim=2).float()
        ks = layer.k_scale[:, :, t0 // g:t1 // g].float().repeat_interleave(g, dim=2)
        kz = layer.k_zero[:, :, t0 // g:t1 // g].float().repeat_interleave(g, dim=2)
        k = kc * ks + kz
        vc = unpack_codes(layer.v_codes[:, :, t0:t1], layer.value_bits, dim=3).float()
        vs = layer.v_scale[:, :, t0:t1].float().repeat_interleave(g, dim=3)
        vz = layer.v_zero[:, :, t0:t1].float().repeat_interleave(g, dim=3)
        v = vc * vs + vz
        state.fold(torch.einsum("bhgd,bhnd->bhgn", qf, k), v)
    if layer.k_res.shape[2]:
        k = layer.k_res.float()
        state.fold(torch.einsum("bhgd,bhnd->bhgn", qf, k), layer.v_res.float())
    if layer.t_total == 0:
        raise KVLayoutError("cannot attend over an empty cache")
    return state.result().reshape(b, hq, d)


def dense_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           sm_scale: float | None = None) -> torch.Tensor:
    """Plain float64 GQA decode attention: q ``[B, Hq, D]``, k/v ``[B, Hkv, T, D]`` -> ``[B, Hq, D]``."""
    b, hq, d = q.shape
    hkv = k.shape[1]
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)
    qf = q.double().reshape(b, hkv, hq // hkv, d) * scale
    s = torch.einsum("bhgd,bhnd->bhgn", qf, k.double())
    p = torch.softmax(s, dim=-1)
    return torch.einsum("bhgn,bhnd->bhgd", p, v.double()).reshape(b, hq, d)
