"""The CPU decode step of a quantized layer through :func:`memvisor.kv.cpu.kernels.decode_head`.

A decode step (one new token) of a KIVI layer on the CPU reads each head's codes once in a compiled loop
instead of the block-wise torch path (:func:`memvisor.kv.attention.layer_attention`), which stays the reference
and serves everything else: prefill and multi-token forwards, unquantized layers, ``CacheSpec.fused_decode=False``
and machines without numba. Heads run one by one, ragged or not (H2O, SnapKV, Ada-KV budgets): nothing is stacked
or copied but the small float32 conversions below. Policies that take the step's attention probabilities (H2O,
Scissorhands) get them from the kernel (``with_probs``).
"""

from __future__ import annotations

import functools
import importlib.util
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from memvisor.kv.storage import HeadStore


@functools.cache
def available() -> bool:
    """True when numba is installed (the ``kv`` extra)."""
    return importlib.util.find_spec("numba") is not None


@functools.cache
def _warn_unavailable() -> None:
    warnings.warn("memvisor.kv: numba is not installed, so CPU decode steps of quantized layers run the block-wise "
                  "torch path (2-3x slower a layer); install the kv extra: pip install 'memvisor[kv]'", stacklevel=3)


def _kernel_shape(stores: list[HeadStore], query: Tensor) -> bool:
    """One new token of a quantized layer whose value groups span whole code bytes (G a multiple of 8 / value
    bits: the kernel's lanes). query: [B, Hq, Tq, D]."""
    q = stores[0].q
    return query.shape[2] == 1 and q.bits is not None and q.group % (8 // q.vbits) == 0


def applies(stores: list[HeadStore], query: Tensor) -> bool:
    """Whether this step can run :func:`decode`: :func:`_kernel_shape` on the CPU, numba installed (warns once
    when it is not). query: [B, Hq, Tq, D]."""
    if query.device.type != "cpu" or not _kernel_shape(stores, query):
        return False
    if not available():
        _warn_unavailable()
        return False
    return True


def _f32(t: Tensor) -> np.ndarray:
    return t.float().contiguous().numpy()


def decode(query: Tensor, stores: list[HeadStore], scaling: float, q_pos: int, window: int | None = None,
           softcap: float | None = None, with_probs: bool = False) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """query: [B, Hq, 1, D] (the step's token at absolute position ``q_pos``), one :class:`HeadStore` per KV
    head (Hq a multiple of their count). Returns [B, 1, Hq, D] in the query's dtype, as ``layer_attention``;
    ``with_probs``: also what ``layer_attention(..., with_probs=True)`` gives for policies that observe the
    step's attention: probs float32 [B, Hkv, 1, T] (each head's softmax averaged over its query group, zero
    past its length and at masked tokens; T the longest head) and n_visible LongTensor[Hkv, 1]."""
    from memvisor.kv.cpu.kernels import decode_head

    q0 = stores[0].q
    if not _kernel_shape(stores, query):
        raise ValueError(f"the CPU decode kernel takes one new token of a quantized layer whose value groups span "
                         f"whole code bytes (got {query.shape[2]} tokens, {q0.vbits}-bit values in groups of "
                         f"{q0.group}): check applies() first; layer_attention serves the rest")
    if window is not None and any(st.pos is None for st in stores):
        raise ValueError("a sliding-window head must store token positions")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"softcap must be > 0 or None, got {softcap}")
    B, Hq, _, D = query.shape
    Hkv = len(stores)
    g = Hq // Hkv
    qf = (query[:, :, 0].float() * scaling).reshape(B, Hkv, g, D)
    out = np.empty((Hkv, B, g, D), np.float32)  # head-major: each head writes a contiguous block
    no_pos = np.empty(0, np.int64)
    empty = np.empty((B, 0, D), np.float32)
    no_probs = np.empty((0, 0), np.float32)
    probs, visible = [], []
    for h, st in enumerate(stores):
        probs.append(np.empty((B, len(st)), np.float32) if with_probs else no_probs)
        q = qf[:, h].contiguous()
        qk = q if st.channels is None else q[..., st.channels.long()].contiguous()
        # visible iff pos > q_pos - window (attention.py's rule), i.e. pos >= q_pos - window + 1
        pos, min_pos = (no_pos, 0) if window is None else (st.positions().contiguous().numpy(), q_pos - window + 1)
        sinks = (_f32(st.k_sink), _f32(st.v_sink)) if st.ns else (empty, empty)
        decode_head(q.numpy(), qk.numpy(), *sinks, st.k_codes.contiguous().numpy(), _f32(st.k_scale),
                    _f32(st.k_zero), st.group_sizes.contiguous().numpy(), st.v_codes.contiguous().numpy(),
                    _f32(st.v_scale), _f32(st.v_zero), _f32(st.k_res), _f32(st.v_res), st.q.bits, st.q.vbits, st.nq,
                    pos, min_pos, float(softcap or 0.0), out[h], probs[h])
        visible.append(len(st) if window is None else int((pos >= min_pos).sum()))
    result = torch.from_numpy(out).permute(1, 0, 2, 3).reshape(B, 1, Hq, D).to(query.dtype)
    if not with_probs:
        return result
    T = max(len(st) for st in stores)
    padded = torch.stack([F.pad(torch.from_numpy(p), (0, T - p.shape[1])) for p in probs], 1)  # [B, Hkv, T]
    return result, padded.unsqueeze(2), torch.tensor(visible).view(Hkv, 1)
