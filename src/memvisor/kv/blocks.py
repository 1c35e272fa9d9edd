"""Reading a head's stored tokens block by block, oldest first (:func:`iter_blocks`): sinks, the unquantized
ThinK region, the KIVI tokens dequantized ``block`` at a time (never the whole history at once), the residual.
Works on a :class:`~memvisor.kv.storage.HeadStore` or on heads stacked as one
(:class:`~memvisor.kv.storage.StackedHeads`): tensors with any leading axes, tokens on axis -2."""

from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor

from memvisor.kv import quant


def _widen(k: Tensor, channels: Tensor | None, D: int) -> Tensor:
    """Pruned keys [..., n, Dk] -> [..., n, D] with zeros in the pruned channels (per-head sets)."""
    if channels is None:
        return k
    ch = channels.long()
    shape = [1] * k.dim()
    if ch.dim() == 2:  # stacked heads: [H, Dk] on axis -3
        shape[-3] = ch.shape[0]
    shape[-1] = ch.shape[-1]
    idx = ch.view(shape).expand(*k.shape)
    return torch.zeros(*k.shape[:-1], D, dtype=k.dtype, device=k.device).scatter_(-1, idx, k)


# Above this many runs of equal-size key groups in a block, a gather of per-token scales is faster.
MAX_KEY_RUNS = 8


def group_runs(sizes: list[int], start: int, end: int) -> list[tuple[int, int, int, int]]:
    """Key groups over tokens [start, end) as runs of equal-size groups: ``(first group row, groups,
    tokens per group, first token - start)``; a group cut by ``start`` or ``end`` is its own run.
    ``sizes``: tokens per key group, oldest first (``group_sizes``)."""
    runs: list[list[int]] = []
    t = 0
    for g, n in enumerate(sizes):
        lo, hi = max(t, start), min(t + n, end)
        t += n
        if hi <= lo:
            if t >= end:
                break
            continue
        whole = hi - lo == n
        last = runs[-1] if runs else None
        if last is not None and whole and last[4] and last[2] == n and last[0] + last[1] == g:
            last[1] += 1
        else:
            runs.append([g, 1, hi - lo, lo - start, whole])
        if t >= end:
            break
    return [(g0, m, size, t0) for g0, m, size, t0, _ in runs]


def iter_blocks(st, block: int, dtype: torch.dtype = torch.float32
                ) -> Iterator[tuple[Tensor, Tensor, Tensor | None]]:
    """Blocks of a :class:`HeadStore` or a :class:`StackedHeads` (tensors with any leading axes,
    tokens on axis -2; positions on the last axis). See :meth:`HeadStore.blocks`."""
    if block % 8:
        raise ValueError(f"block must be a multiple of 8, got {block}")
    b = st.q.bits
    ns = st.ns
    if ns:  # the sinks: full precision, oldest first
        yield st.k_sink.to(dtype), st.v_sink.to(dtype), (st.pos[..., :ns].long() if st.pos is not None else None)
    if b is None and st.channels is not None:  # unquantized ThinK region
        for s in range(0, st.nq, block):
            e = min(s + block, st.nq)
            k = _widen(st.k_old.narrow(-2, s, e - s).to(dtype), st.channels, st.D)
            yield k, st.v_old.narrow(-2, s, e - s).to(dtype), (st.pos[..., s:e].long() if st.pos is not None else None)
    sizes = st.group_sizes.tolist() if b is not None and st.nq else []
    # Key scales in float32 once per pass (ng rows, a few KB), not once per block and run.
    k_scale, k_zero = (st.k_scale.float(), st.k_zero.float()) if sizes else (None, None)
    for s in range(0, st.nq if b is not None else 0, block):
        e = min(s + block, st.nq)
        per = 8 // b
        kc = st.k_codes.narrow(-2, s // per, (e + per - 1) // per - s // per)
        runs = group_runs(sizes, s, e)
        if len(runs) <= MAX_KEY_RUNS:
            k = quant.dequantize_key_runs(kc, k_scale, k_zero, b, e - s, runs, dtype=dtype)
        else:  # scattered evictions (H2O, SnapKV): one gather of the scales beats many small runs
            k = quant.dequantize_keys(kc, k_scale, k_zero, b, e - s, st.group_of_tokens(s, e), dtype=dtype)
        v = quant.dequantize_values(st.v_codes.narrow(-2, s, e - s), st.v_scale.narrow(-2, s, e - s),
                                    st.v_zero.narrow(-2, s, e - s), st.q.vbits, st.D, dtype=dtype)
        yield _widen(k, st.channels, st.D), v, (st.pos[..., ns + s:ns + e].long() if st.pos is not None else None)
    for s in range(0, st.nr, block):
        e = min(s + block, st.nr)
        p = st.pos[..., ns + st.nq + s: ns + st.nq + e].long() if st.pos is not None else None
        yield st.k_res.narrow(-2, s, e - s).to(dtype), st.v_res.narrow(-2, s, e - s).to(dtype), p
