"""Triton pieces shared by the decode kernels: one tile into an online softmax, the residual program and
the partial-result stores, and the split combiner (see triton_decode.py for the overall design)."""

from __future__ import annotations

import triton
import triton.language as tl

from memvisor.kv.gpu.gdc import tl_gdc_launch_dependents, tl_gdc_wait

# Integer arguments that change from one decode step to the next (quantized and residual lengths, tokens per split),
# passed to ``do_not_specialize``: Triton would otherwise compile a new variant of a kernel whenever one of them
# turns 1 or a multiple of 16, a 1-2.5 s step in the middle of a decode with a cold kernel cache (H200,
# scripts/kv_gpu_block_size.py --profile steps). The kernels' loads are contiguous along channels, not tokens, so
# the hints those variants carry buy nothing.
STEP_VARYING = ["T_q", "T_r", "tps"]


@triton.jit
def _query_rows(Q, pid_bh, GROUPS: tl.constexpr, GP: tl.constexpr, D: tl.constexpr):
    """The opening of a program of kv head ``pid_bh``: its ``GROUPS`` query heads' rows of ``Q`` ``[B*Hq, D]``
    (padded to ``GP`` rows with zeros) and an empty online-softmax state: max ``[GP]``, sum ``[GP]``, output
    ``[GP, D]``, float32."""
    offs_g = tl.arange(0, GP)
    offs_d = tl.arange(0, D)
    q = tl.load(Q + (pid_bh * GROUPS + offs_g)[:, None] * D + offs_d[None, :], mask=(offs_g < GROUPS)[:, None],
                other=0.0)
    return q, tl.full([GP], float("-inf"), tl.float32), tl.zeros([GP], tl.float32), tl.zeros([GP, D], tl.float32)


@triton.jit
def _replicated_query(Q, pid_bh, sm_scale_log2, GROUPS: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr,
                      NGV: tl.constexpr):
    """Query rows replicated once per value channel group (the rep/tile/planes kernels): row ``r`` is query
    head ``h = r % GROUPS`` of kv head ``pid_bh`` for channel group ``j = r // GROUPS``; rows past ``NGV *
    GROUPS`` (``r_ok`` False) are zeros. Returns ``(q [ROWS, D] float32 times sm_scale_log2, h, j, r_ok)``."""
    r = tl.arange(0, ROWS)
    h = r % GROUPS
    j = r // GROUPS
    r_ok = r < NGV * GROUPS
    offs_d = tl.arange(0, D)
    q = tl.load(Q + (pid_bh * GROUPS + h)[:, None] * D + offs_d[None, :], mask=r_ok[:, None], other=0.0)
    return q.to(tl.float32) * sm_scale_log2, h, j, r_ok


@triton.jit
def _fold(q, k, v, m_i, l_i, acc, n_mask, sm_scale_log2):
    """One tile into the online softmax: q [GP, D], k/v [BLOCK_N, D] (model dtype)."""
    s = tl.dot(q, tl.trans(k)) * sm_scale_log2
    s = tl.where(n_mask[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _dequant_tiles(q, KC, KS, KZ, VC, VS, VZ, KGI, KG_P, KG_R0, start, end, m_i, l_i, acc, sm_scale_log2,
                   D: tl.constexpr, BITS: tl.constexpr, VB: tl.constexpr, G: tl.constexpr, BLOCK_N: tl.constexpr,
                   GROUP_MAP: tl.constexpr):
    """Quantized tokens [start, end) of ONE kv head (pointers at that head's batch row) into the online softmax,
    each ``BLOCK_N``-token tile dequantized in registers (the cache layout of layout.py: keys ``BITS`` wide per
    channel, values ``VB`` wide per token). ``GROUP_MAP``: token t's key scale row is ``KGI[t]`` for t < ``KG_P``
    (int32: key groups cut by eviction) and ``KG_R0 + (t - KG_P) // G`` after them (whole groups), else t // G."""
    PER: tl.constexpr = 8 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    VPER: tl.constexpr = 8 // VB
    VMASK: tl.constexpr = (1 << VB) - 1
    offs_d = tl.arange(0, D)
    v_shift = ((offs_d % VPER) * VB)[None, :]
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        m2 = n_mask[:, None]
        # keys: byte row t // PER holds PER consecutive tokens of one channel
        kb = tl.load(KC + (offs_n // PER)[:, None] * D + offs_d[None, :], mask=m2, other=0)
        kq = (kb.to(tl.int32) >> ((offs_n % PER) * BITS)[:, None]) & MASK
        if GROUP_MAP:
            in_map = offs_n < KG_P
            krow = tl.where(in_map, tl.load(KGI + offs_n, mask=n_mask & in_map, other=0), KG_R0 + (offs_n - KG_P) // G)
        else:
            krow = offs_n // G
        kofs = krow[:, None] * D + offs_d[None, :]
        ks = tl.load(KS + kofs, mask=m2, other=0.0).to(tl.float32)
        kz = tl.load(KZ + kofs, mask=m2, other=0.0).to(tl.float32)
        k = (kq.to(tl.float32) * ks + kz).to(q.dtype)
        # values: byte c // VPER of a token row holds VPER consecutive channels
        vb = tl.load(VC + offs_n[:, None] * (D // VPER) + (offs_d // VPER)[None, :], mask=m2, other=0)
        vq = (vb.to(tl.int32) >> v_shift) & VMASK
        vofs = offs_n[:, None] * (D // G) + (offs_d // G)[None, :]
        vs = tl.load(VS + vofs, mask=m2, other=0.0).to(tl.float32)
        vz = tl.load(VZ + vofs, mask=m2, other=0.0).to(tl.float32)
        v = (vq.to(tl.float32) * vs + vz).to(q.dtype)
        m_i, l_i, acc = _fold(q, k, v, m_i, l_i, acc, n_mask, sm_scale_log2)
    return m_i, l_i, acc


@triton.jit
def _dense_tiles(q, K, V, start, end, m_i, l_i, acc, sm_scale_log2, D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Full-precision tokens [start, end) of ONE kv head (``K``/``V`` at that head's batch row, rows of ``D``)
    into the online softmax."""
    offs_d = tl.arange(0, D)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        ofs = offs_n[:, None] * D + offs_d[None, :]
        k = tl.load(K + ofs, mask=n_mask[:, None], other=0.0)
        v = tl.load(V + ofs, mask=n_mask[:, None], other=0.0)
        m_i, l_i, acc = _fold(q, k, v, m_i, l_i, acc, n_mask, sm_scale_log2)
    return m_i, l_i, acc


@triton.jit
def _residual_and_store(q, KR, VR, OP, LP, pid_bh, pid_s, n_rows, T_r, skr_bh, svr_bh, sm_scale_log2,
                        m_i, l_i, acc, do_residual,
                        GROUPS: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_g = tl.arange(0, GP)
    offs_d = tl.arange(0, D)
    if do_residual:
        m_i, l_i, acc = _dense_tiles(q, KR + pid_bh * skr_bh, VR + pid_bh * svr_bh, 0, T_r, m_i, l_i, acc,
                                     sm_scale_log2, D, BLOCK_N)
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
    rows = pid_bh * GROUPS + offs_g
    g_mask = offs_g < GROUPS
    tl.store(OP + (rows[:, None] * n_rows + pid_s) * D + offs_d[None, :], out, mask=g_mask[:, None])
    tl.store(LP + rows * n_rows + pid_s, lse, mask=g_mask)


@triton.jit
def _residual_program(Q, KR, VR, OP, LP, pid_bh, pid_s, n_rows, T_r, skr_bh, svr_bh, sm_scale_log2,
                      GROUPS: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK_R: tl.constexpr):
    """The last program of each kv head: its query heads over the full-precision residual."""
    q, m_i, l_i, acc = _query_rows(Q, pid_bh, GROUPS, GP, D)
    _residual_and_store(q, KR, VR, OP, LP, pid_bh, pid_s, n_rows, T_r, skr_bh, svr_bh, sm_scale_log2,
                        m_i, l_i, acc, True, GROUPS, GP, D, BLOCK_R)


@triton.jit
def _store_replicated(OP, LP, acc, z, l_i, m_i, pid_bh, pid_s, n_rows, h, jv, r_ok,
                      GROUPS: tl.constexpr, D: tl.constexpr, G: tl.constexpr):
    """Partial result of a program whose rows ``r`` replicate query head ``h(r)`` once per value channel
    group ``jv(r)`` (acc [ROWS, D] and the zero-point sums z [ROWS], normaliser l_i and max m_i [ROWS],
    base 2): row r stores only the channels of its group, and the rows of group 0 the log-sum-exp."""
    offs_d = tl.arange(0, D)
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = (acc + z[:, None]) / l_safe[:, None]
    lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
    rows = pid_bh * GROUPS + h
    keep = r_ok[:, None] & (jv[:, None] == (offs_d // G)[None, :])
    tl.store(OP + (rows[:, None] * n_rows + pid_s) * D + offs_d[None, :], out, mask=keep)
    tl.store(LP + rows * n_rows + pid_s, lse, mask=r_ok & (jv == 0))


@triton.jit(do_not_specialize=["n_rows"])
def _combine_kernel(OP, LP, O, n_rows, D: tl.constexpr, BLOCK_S: tl.constexpr, DB: tl.constexpr,
                    PDL: tl.constexpr = False, PDL_TRIGGER: tl.constexpr = 2):
    """Program (row, c): channels [c * DB, (c + 1) * DB) of one query row, merged over its n_rows partials.
    ``PDL``: launched as a programmatic dependent launch (pdl.py): it waits for the split launch before reading
    the partials; ``PDL_TRIGGER``: the next launch may start once every program has reached its start (0), the
    end of that wait (1: the split launch has ended) or its exit (2) (the next launch waits for this one before it
    reads anything this one writes)."""
    if PDL:
        if PDL_TRIGGER == 0:
            tl_gdc_launch_dependents()
        tl_gdc_wait()
        if PDL_TRIGGER == 1:
            tl_gdc_launch_dependents()
    row = tl.program_id(0)
    offs_d = tl.program_id(1) * DB + tl.arange(0, DB)
    m = float("-inf")
    l = 0.0
    acc = tl.zeros([DB], tl.float32)
    for s0 in range(0, n_rows, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        s_mask = offs_s < n_rows
        # the partials are loaded before the maximum of their log-sum-exps is reduced: both loads are then in
        # flight together (loaded after it, they waited for that reduction's barrier: two memory round trips)
        o = tl.load(OP + (row * n_rows + offs_s)[:, None] * D + offs_d[None, :], mask=s_mask[:, None], other=0.0)
        lse = tl.load(LP + row * n_rows + offs_s, mask=s_mask, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(lse, 0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # all-empty chunk so far: no NaN
        alpha = tl.exp2(m - m_ref)
        w = tl.exp2(lse - m_ref)
        acc = acc * alpha + tl.sum(o * w[:, None], 0)
        l = l * alpha + tl.sum(w, 0)
        m = m_new
    tl.store(O + row * D + offs_d, (acc / l).to(O.dtype.element_ty))
