"""Decode attention over a layer whose kv heads hold different tokens, in ONE launch (and its combine).

Per-head token choices and budgets (SnapKV, Knorm, Ada-KV) leave each kv head of a layer its own tensors, of its
own length, so the stacked kernels (``[B, Hkv, ...]`` at one head stride) cannot read them. Launching the
stacked kernel once per head costs ~0.4 ms of host time per head-launch (256 a step for a Llama-8B-shaped model:
session 16, BENCHMARKS.md kv-gpu). Here every head's tensors are reached through a small per-head table instead:

``meta: int64 [Hkv, NCOL]``, row h = head h's base addresses (bytes) of its eight tensors in the order of
:data:`TENSORS`, then their batch strides (elements), then the address of its key-group map (0: none), its number
of quantized tokens and of full-precision ones, the row its map gives its first key group (maps built for several
heads at once number the groups of all of them: cache_path.py), the tokens its map covers and the row of the first
token after them (layout.KeyGroupMaps). Program ``(b * Hkv + h, s)`` takes
head h's query heads (GQA: the ``Hq / Hkv`` consecutive ones), batch row b, tokens ``[s * tps, (s + 1) * tps)``
of that head's quantized tokens (none past its own length: such a program stores an empty partial, which the
combine skips), and the last program of each row the head's full-precision tokens. The tiles are the stacked
"dequant" kernel's (triton_common.py ``_dequant_tiles``), so both paths dequantize alike.

A head's tensors: ``[B, ...]`` laid out as layout.py says for one head, with contiguous rows (the cache's per-head
storage, storage.py; any batch stride; a tensor whose rows are not contiguous is copied for the launch).
Unquantized heads (a budget without KIVI) run :func:`dense_ragged_attention`, the same over each head's
full-precision keys and values.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from memvisor.kv.gpu.errors import KVLayoutError
from memvisor.kv.gpu.layout import KeyGroupMaps
from memvisor.kv.gpu.triton_common import _dense_tiles, _dequant_tiles, _query_rows, _residual_and_store
from memvisor.kv.gpu.triton_decode import (_LOG2E, _check, _combine, _rows_contiguous, _sm_count, _split_plan,
                                             with_smaller_tiles)

# a head's tensors in the table's order (quantized heads); the dense kernel uses the last two (keys, values)
TENSORS = ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero", "k_full", "v_full")
NT = len(TENSORS)
COL_MAP, COL_TQ, COL_TR, COL_BASE, COL_P, COL_R0 = (2 * NT + i for i in range(6))
NCOL = 2 * NT + 6


# the table's columns as the kernels' constants (a jit function reads a global only as a constexpr)
_NT = tl.constexpr(NT)
_NCOL = tl.constexpr(NCOL)
_MAP = tl.constexpr(COL_MAP)
_TQ = tl.constexpr(COL_TQ)
_TR = tl.constexpr(COL_TR)
_BASE = tl.constexpr(COL_BASE)
_P = tl.constexpr(COL_P)
_R0 = tl.constexpr(COL_R0)


@triton.jit
def _ptr(ROW, col: tl.constexpr, b, ELEM: tl.constexpr):
    """Head tensor ``col`` of a table row at batch row ``b``, as a pointer to ``ELEM``."""
    return tl.load(ROW + col).to(tl.pointer_type(ELEM)) + b * tl.load(ROW + _NT + col)


@triton.jit
def _kivi_ragged_kernel(Q, META, OP, LP, sm_scale_log2, tps, H,
                        GROUPS: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr,
                        VB: tl.constexpr, G: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_MAP: tl.constexpr):
    """Grid ``(B * Hkv, n_split + 1)`` over the table ``META`` (module docstring); q ``[B, Hq, D]``, partials
    ``OP [B*Hq, n_split + 1, D]`` and their log2-sum-exps ``LP`` for ``_combine``."""
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_rows = tl.num_programs(1)
    b = pid_bh // H
    row = META + (pid_bh % H) * _NCOL
    q, m_i, l_i, acc = _query_rows(Q, pid_bh, GROUPS, GP, D)
    T_q = tl.load(row + _TQ).to(tl.int32)
    if pid_s < n_rows - 1:
        start = pid_s * tps
        kgi = tl.load(row + _MAP).to(tl.pointer_type(tl.int32))
        base = tl.load(row + _BASE)  # the map's row of this head's first group: its scale pointers start before
        m_i, l_i, acc = _dequant_tiles(q, _ptr(row, 0, b, tl.uint8), _ptr(row, 1, b, tl.float16) - base * D,
                                       _ptr(row, 2, b, tl.float16) - base * D, _ptr(row, 3, b, tl.uint8),
                                       _ptr(row, 4, b, tl.float16), _ptr(row, 5, b, tl.float16), kgi,
                                       tl.load(row + _P).to(tl.int32), tl.load(row + _R0).to(tl.int32), start,
                                       tl.minimum(start + tps, T_q), m_i, l_i, acc, sm_scale_log2,
                                       D, BITS, VB, G, BLOCK_N, GROUP_MAP)
    # the residual program: the head's full-precision tokens, addressed through its own pointers (stride 0)
    _residual_and_store(q, _ptr(row, 6, b, Q.dtype.element_ty), _ptr(row, 7, b, Q.dtype.element_ty), OP, LP,
                        pid_bh, pid_s, n_rows, tl.load(row + _TR).to(tl.int32), 0, 0, sm_scale_log2,
                        m_i, l_i, acc, pid_s == n_rows - 1, GROUPS, GP, D, BLOCK_N)


@triton.jit
def _dense_ragged_kernel(Q, META, OP, LP, sm_scale_log2, tps, H,
                         GROUPS: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid ``(B * Hkv, n_split)``: split s of head h's full-precision tokens (the table's ``k_full``/``v_full``
    and their count), partials as :func:`_kivi_ragged_kernel`'s."""
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = pid_bh // H
    row = META + (pid_bh % H) * _NCOL
    q, m_i, l_i, acc = _query_rows(Q, pid_bh, GROUPS, GP, D)
    start = pid_s * tps
    m_i, l_i, acc = _dense_tiles(q, _ptr(row, 6, b, Q.dtype.element_ty), _ptr(row, 7, b, Q.dtype.element_ty),
                                 start, tl.minimum(start + tps, tl.load(row + _TR).to(tl.int32)),
                                 m_i, l_i, acc, sm_scale_log2, D, BLOCK_N)
    _residual_and_store(q, Q, Q, OP, LP, pid_bh, pid_s, tl.num_programs(1), 0, 0, 0, sm_scale_log2,
                        m_i, l_i, acc, False, GROUPS, GP, D, BLOCK_N)


def _table(heads: list[dict[str, torch.Tensor]], maps: KeyGroupMaps | None, t_quant: list[int], t_full: list[int],
           device: torch.device) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The per-head table (module docstring) on ``device``, one host-to-device copy of Hkv x NCOL integers, and the
    copies made of head tensors whose rows were not contiguous (to keep alive until the launch is queued)."""
    rows, copies = [], []
    for h, t in enumerate(heads):
        ts = [t.get(name) for name in TENSORS]
        for i, x in enumerate(ts):
            if x is not None and not _rows_contiguous(x):
                ts[i] = x.contiguous()
                copies.append(ts[i])
        rows += [0 if x is None else x.data_ptr() for x in ts]
        rows += [0 if x is None else x.stride(0) for x in ts]
        m = None if maps is None else maps.rows[h]
        rows += [0 if m is None else m.data_ptr(), t_quant[h], t_full[h]]
        rows += [0, 0, 0] if maps is None else [maps.base[h], maps.prefix[h], maps.rest[h]]
    return torch.tensor(rows, dtype=torch.int64).view(len(heads), NCOL).to(device, non_blocking=True), copies


def _check_heads(q: torch.Tensor, heads: list[dict[str, torch.Tensor]], t_quant: list[int], t_full: list[int],
                 quantized: bool) -> int:
    """What the kernels' addressing and types assume of q ``[B, Hq, D]`` and the heads; the query heads per kv head."""
    b, _, d = q.shape
    groups = _check(q, len(heads), d, b)
    if not q.is_contiguous():
        raise KVLayoutError("the ragged kernel needs a contiguous query")
    if any(tq + tf == 0 for tq, tf in zip(t_quant, t_full)):
        raise KVLayoutError("cannot attend over a head holding no token")
    for t in heads:
        k, v = t["k_full"], t["v_full"]
        if k.dtype != q.dtype or v.dtype != q.dtype or k.shape != v.shape or k.shape[0] != b or k.shape[-1] != d:
            raise KVLayoutError(f"full-precision keys and values must be [B={b}, n, D={d}] in the query's {q.dtype}")
        if quantized and (t["k_codes"].dtype != torch.uint8 or t["v_codes"].dtype != torch.uint8
                          or any(t[n].dtype != torch.float16 for n in ("k_scale", "k_zero", "v_scale", "v_zero"))):
            raise KVLayoutError("the ragged kernel reads uint8 codes and fp16 scales and zero points")
        if any(x.device != q.device for x in t.values()):
            raise KVLayoutError("every head tensor must be on the query's device")
    return groups


def kivi_ragged_attention(q: torch.Tensor, heads: list[dict[str, torch.Tensor]], bits: int, vbits: int, group: int,
                          sm_scale: float | None = None, key_groups: KeyGroupMaps | None = None, *,
                          block_n: int = 64, num_warps: int = 4, num_stages: int = 2,
                          waves: float = 4.0) -> torch.Tensor:
    """q ``[B, Hq, D]`` (bf16/fp16, CUDA) over ``Hkv = len(heads)`` kv heads of a KIVI layer -> ``[B, Hq, D]``.

    ``heads[h]``: head h's tensors by the names of :data:`TENSORS`, each ``[B, ...]`` in layout.py's one-head
    layout (``k_codes uint8 [B, ceil(nq*bits/8), D]``, ``k_scale/k_zero fp16 [B, ng, D]``, ``v_codes uint8
    [B, nq, D*vbits/8]``, ``v_scale/v_zero fp16 [B, nq, D/G]``, ``k_full/v_full [B, nr, D]`` in q's dtype: the
    full-precision tokens). ``key_groups``: where each head's quantized tokens find their key-scale rows when
    eviction cut groups (layout.KeyGroupMaps; None: token t's row is t // G in every head)."""
    b, _, d = q.shape
    t_quant = [int(t["v_codes"].shape[1]) for t in heads]
    t_full = [int(t["k_full"].shape[1]) for t in heads]
    groups = _check_heads(q, heads, t_quant, t_full, quantized=True)
    if key_groups is not None and any(m is not None and m.device != q.device for m in key_groups.rows):
        raise KVLayoutError("key-group maps must be on the query's device")
    meta, _copies = _table(heads, key_groups, t_quant, t_full, q.device)
    scale = (sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)) * _LOG2E

    def launch(block: int, stages: int) -> torch.Tensor:
        n_split, tps = _split_plan(b * len(heads), max(t_quant), block, _sm_count(q.device), waves)
        if tps % group and n_split > 1:
            tps = math.ceil(tps / group) * group  # splits start on whole groups (and whole code bytes)
            n_split = math.ceil(max(t_quant) / tps)
        op = torch.empty((b * q.shape[1], n_split + 1, d), device=q.device, dtype=torch.float32)
        lp = torch.empty((b * q.shape[1], n_split + 1), device=q.device, dtype=torch.float32)
        _kivi_ragged_kernel[(b * len(heads), n_split + 1)](
            q, meta, op, lp, scale, tps, len(heads), GROUPS=groups, GP=max(16, triton.next_power_of_2(groups)),
            D=d, BITS=bits, VB=vbits, G=group, BLOCK_N=block, GROUP_MAP=key_groups is not None,
            num_warps=num_warps, num_stages=stages)
        return _combine(op, lp, q, n_split + 1)

    return with_smaller_tiles(launch, block_n, num_stages)


def dense_ragged_attention(q: torch.Tensor, heads: list[dict[str, torch.Tensor]], sm_scale: float | None = None,
                           *, block_n: int = 64, num_warps: int = 4, num_stages: int = 2,
                           waves: float = 4.0) -> torch.Tensor:
    """q ``[B, Hq, D]`` over ``len(heads)`` unquantized kv heads (``heads[h]["k_full"/"v_full"]``: ``[B, n_h, D]``
    in q's dtype) -> ``[B, Hq, D]``: the flash-decoding split over each head's own length, one launch."""
    b, _, d = q.shape
    lengths = [int(t["k_full"].shape[1]) for t in heads]
    groups = _check_heads(q, heads, [0] * len(heads), lengths, quantized=False)
    meta, _copies = _table(heads, None, [0] * len(heads), lengths, q.device)
    scale = (sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)) * _LOG2E

    def launch(block: int, stages: int) -> torch.Tensor:
        n_split, tps = _split_plan(b * len(heads), max(lengths), block, _sm_count(q.device), waves)
        op = torch.empty((b * q.shape[1], n_split, d), device=q.device, dtype=torch.float32)
        lp = torch.empty((b * q.shape[1], n_split), device=q.device, dtype=torch.float32)
        _dense_ragged_kernel[(b * len(heads), n_split)](
            q, meta, op, lp, scale, tps, len(heads), GROUPS=groups, GP=max(16, triton.next_power_of_2(groups)),
            D=d, BLOCK_N=block, num_warps=num_warps, num_stages=stages)
        return _combine(op, lp, q, n_split)

    return with_smaller_tiles(launch, block_n, num_stages)
