"""The CPU decode step of a quantized layer through :func:`memvisor.kv.cpu.kernels.decode_head`.

A decode step (one new token) of a KIVI layer on the CPU reads each head's codes once in a compiled loop
instead of the block-wise torch path (:func:`memvisor.kv.attention.layer_attention`), which stays the reference
and serves everything else: prefill and multi-token forwards, unquantized layers, policies that take this step's
attention probabilities (H2O, Scissorhands: ``LayerCore._hands_probs``), and machines without numba. Heads run
one by one, ragged or not: nothing is stacked or copied but the small float32 conversions below.
"""

from __future__ import annotations

import functools
import importlib.util

import numpy as np
import torch
from torch import Tensor

from memvisor.kv.storage import HeadStore


@functools.cache
def available() -> bool:
    """True when numba is installed (the ``kv`` extra)."""
    return importlib.util.find_spec("numba") is not None


def applies(stores: list[HeadStore], query: Tensor) -> bool:
    """Whether this step can run :func:`decode`: one new token on the CPU, a quantized layer, numba installed.
    query: [B, Hq, Tq, D]."""
    return (query.device.type == "cpu" and query.shape[2] == 1 and stores[0].q.bits is not None
            and available())


def _f32(t: Tensor) -> np.ndarray:
    return t.float().contiguous().numpy()


def decode(query: Tensor, stores: list[HeadStore], scaling: float, q_pos: int, window: int | None = None,
           softcap: float | None = None) -> Tensor:
    """query: [B, Hq, 1, D] (the step's token at absolute position ``q_pos``), one :class:`HeadStore` per KV
    head (Hq a multiple of their count). Returns [B, 1, Hq, D] in the query's dtype, as ``layer_attention``."""
    from memvisor.kv.cpu.kernels import decode_head

    B, Hq, _, D = query.shape
    Hkv = len(stores)
    g = Hq // Hkv
    qf = (query[:, :, 0].float() * scaling).reshape(B, Hkv, g, D)
    out = np.empty((Hkv, B, g, D), np.float32)  # head-major: each head writes a contiguous block
    no_pos = np.empty(0, np.int64)
    empty = np.empty((B, 0, D), np.float32)
    for h, st in enumerate(stores):
        q = qf[:, h].contiguous()
        qk = q if st.channels is None else q[..., st.channels.long()].contiguous()
        # visible iff pos > q_pos - window (attention.py's rule), i.e. pos >= q_pos - window + 1
        pos, min_pos = (no_pos, 0) if window is None else (st.positions().contiguous().numpy(), q_pos - window + 1)
        sinks = (_f32(st.k_sink), _f32(st.v_sink)) if st.ns else (empty, empty)
        decode_head(q.numpy(), qk.numpy(), *sinks, st.k_codes.contiguous().numpy(), _f32(st.k_scale),
                    _f32(st.k_zero), st.group_sizes.contiguous().numpy(), st.v_codes.contiguous().numpy(), _f32(st.v_scale),
                    _f32(st.v_zero), _f32(st.k_res), _f32(st.v_res), st.q.bits, st.q.vbits, st.nq, pos, min_pos,
                    float(softcap or 0.0), out[h])
    return torch.from_numpy(out).permute(1, 0, 2, 3).reshape(B, 1, Hq, D).to(query.dtype)
