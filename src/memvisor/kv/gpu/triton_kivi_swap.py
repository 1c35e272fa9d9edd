"""Decode split kernel over the planes layout with the operands swapped: tokens on the matrix unit's M side.

The planes kernel (triton_kivi_planes.py) puts the query heads on M (replicated to 16 rows) and 32 tokens
on N, in warp-level products. Here one program is one warpgroup (4 warps) and the products are Hopper's
warpgroup products with M = 64: two consecutive planes tiles (``2 S G`` tokens, ``S = 16 // BITS``) are
read as one ``[2G, D]`` block of int16 words, and bit field J of that block is the code matrix of TWO key
groups (rows ``0..G-1``: group ``g0 + J``, rows ``G..2G-1``: group ``g0 + S + J``), in the token order of
the rows. Per field J (tensor shapes, fp16 unless said):

- Keys: ``s [2G, NCK] fp32 = codes_J [2G, D] . Bq [D, NCK]``, column ``c = 2 h + x`` holding query head
  ``h`` scaled by the key scale of the block's group ``x`` (``q_h * ks_{g0 + x S + J}``, divided by the
  field's power of two: planes.py). A row's scores sit in the column of its own group; the other column
  is masked. Scores carry 2^-24 (subnormal codes, as in the planes kernel); the zero-point term
  ``q_h . kz_g`` is added per column in fp32.
- Softmax: one max per head and 4 fields (a column max over the rows, then the pair of columns of a head).
- Values: ``pv [2G, NCV] fp32 = p [2G, NCK] . R [NCK, NCV]`` moves each row's probability from its group's
  column to the columns ``c = jv GROUPS + h`` of every value channel group ``jv`` (R is one-hot, so this
  is exact in fp16), times the per-(jv, token) value scale; then
  ``acc [D, NCV] fp32 += vcodes_J^T [D, 2G] . (pv * vs) [2G, NCV]``, and row d keeps column ``(d // G, h)``.
  Row sums and zero-point sums are element-wise ``[2G, NCV]`` accumulators, reduced once at the end.

The code operands stay in registers (the AND runs in the product's operand layout, as in the planes kernel);
the small operands (Bq, pv * vs) go through shared memory, which warpgroup products require.
"""

from __future__ import annotations

import triton
import triton.language as tl

from memvisor.kv.gpu.triton_common import _residual_program
from memvisor.kv.gpu.triton_kivi_planes import TWO24, VEXP, SHR_ASM, _codes


@triton.jit
def _field_scores(q16, q16h, kw, kw_hi, ks_ptr, kz_ptr, g_ok, col_ok, tok, end, J: tl.constexpr,
                  G: tl.constexpr, BITS: tl.constexpr):
    """Scores [2G, NCK] fp32 of field J of the double tile, log2 units, -inf where masked. ``ks_ptr``,
    ``kz_ptr`` [NCK, D]: field 0's key scales / zeros of each column's group; ``col_ok`` [2G, NCK]: the
    column holds the row's group; ``tok`` [2G]: field 0's token of each row."""
    D: tl.constexpr = q16.shape[1]
    ksm = tl.load(ks_ptr + J * D, mask=g_ok, other=0.0)  # already divided by the field's 2^(BITS J')
    kzm = tl.load(kz_ptr + J * D, mask=g_ok, other=0.0)
    bq = tl.inline_asm_elementwise("mul.rn.f16x2 $0, $1, $2;", "=r,r,r", [q16h, ksm], dtype=tl.float16,
                                   is_pure=True, pack=2)  # [NCK, D], two channels per instruction
    zk = tl.sum(q16 * kzm.to(tl.float32), 1)  # [NCK] fp32: q_h . kz of the column's group
    s = tl.dot(_codes(kw, kw_hi, J, BITS), tl.trans(bq))  # [2G, NCK], times 2^-24
    ok = col_ok & ((tok + J * G) < end)[:, None]
    return tl.where(ok, s * TWO24 + zk[None, :], float("-inf"))


@triton.jit
def _field_values(s, m_k, acc, l_acc, z_acc, vwt, vwt_hi, R, vsz_ptr, tok, t_pad, cv_ok, J: tl.constexpr,
                  G: tl.constexpr, BITS: tl.constexpr):
    """Fold field J's probabilities into acc [D, NCV] and the [2G, NCV] row-sum / zero-point accumulators.
    ``vsz_ptr`` [2G, NCV]: field 0's (scale, zero) pair of each row's token and column's channel group."""
    p = tl.exp2(s - m_k[None, :]).to(tl.float16)  # [2G, NCK]; masked entries 0
    pv = tl.dot(p, R)  # [2G, NCV] fp32: each row's p in the columns of its head (R one-hot: exact)
    v_ok = ((tok + J * G) < t_pad)[:, None] & cv_ok[None, :]
    vs = tl.load(vsz_ptr + 2 * J * G, mask=v_ok, other=0.0).to(tl.float32)  # carries 2^(VEXP - BITS J')
    vz = tl.load(vsz_ptr + 2 * J * G + 1, mask=v_ok, other=0.0).to(tl.float32)
    acc = tl.dot(_codes(vwt, vwt_hi, J, BITS), (pv * vs).to(tl.float16), acc=acc)
    return acc, l_acc + pv, z_acc + pv * vz


@triton.jit
def _head_max(smax, HP: tl.constexpr):
    """[NCK] column maxima -> [HP] per head (the max of its two columns)."""
    return tl.max(tl.reshape(smax, [HP, 2]), 1)


@triton.jit
def _to_cols(x_h, NCK: tl.constexpr):
    """[HP] per head -> [NCK] per key column (c = 2 h + x)."""
    HP: tl.constexpr = NCK // 2
    return tl.reshape(tl.broadcast_to(x_h[:, None], [HP, 2]), [NCK])


@triton.jit
def _to_vcols(x_h, hv, HP: tl.constexpr):
    """[HP] per head -> [NCV] per value column (head hv[c])."""
    hh = tl.arange(0, HP)
    return tl.sum(tl.where(hv[:, None] == hh[None, :], x_h[None, :], 0.0), 1)


@triton.jit
def _four_fields(q16, q16h, kw, vwt, R, ks_ptr, kz_ptr, vsz_ptr, g_ok, col_ok, t_pad, cv_ok, tok, end, hv,
                 m_h, acc, l_acc, z_acc, J0: tl.constexpr, G: tl.constexpr, BITS: tl.constexpr):
    """Fields J0..J0+3: scores, one online-softmax step per head, values."""
    SPLIT: tl.constexpr = 10 // BITS
    NCK: tl.constexpr = q16.shape[0]
    HP: tl.constexpr = NCK // 2
    if J0 + 3 >= SPLIT:
        kw_hi = tl.inline_asm_elementwise(SHR_ASM[BITS // 2 - 1], "=r,r", [kw], dtype=tl.int16, is_pure=True, pack=2)
        vwt_hi = tl.inline_asm_elementwise(SHR_ASM[BITS // 2 - 1], "=r,r", [vwt], dtype=tl.int16, is_pure=True,
                                           pack=2)
    else:
        kw_hi = kw
        vwt_hi = vwt
    s0 = _field_scores(q16, q16h, kw, kw_hi, ks_ptr, kz_ptr, g_ok, col_ok, tok, end, J0, G, BITS)
    s1 = _field_scores(q16, q16h, kw, kw_hi, ks_ptr, kz_ptr, g_ok, col_ok, tok, end, J0 + 1, G, BITS)
    s2 = _field_scores(q16, q16h, kw, kw_hi, ks_ptr, kz_ptr, g_ok, col_ok, tok, end, J0 + 2, G, BITS)
    s3 = _field_scores(q16, q16h, kw, kw_hi, ks_ptr, kz_ptr, g_ok, col_ok, tok, end, J0 + 3, G, BITS)
    smax = tl.max(tl.maximum(tl.maximum(s0, s1), tl.maximum(s2, s3)), 0)  # [NCK]
    m_new = tl.maximum(m_h, _head_max(smax, HP))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # heads with nothing yet (padding): no NaN
    alpha = _to_vcols(tl.exp2(m_h - m_ref), hv, HP)
    m_k = _to_cols(m_ref, NCK)
    acc = acc * alpha[None, :]
    l_acc = l_acc * alpha[None, :]
    z_acc = z_acc * alpha[None, :]
    acc, l_acc, z_acc = _field_values(s0, m_k, acc, l_acc, z_acc, vwt, vwt_hi, R, vsz_ptr, tok, t_pad, cv_ok, J0, G, BITS)
    acc, l_acc, z_acc = _field_values(s1, m_k, acc, l_acc, z_acc, vwt, vwt_hi, R, vsz_ptr, tok, t_pad, cv_ok, J0 + 1, G, BITS)
    acc, l_acc, z_acc = _field_values(s2, m_k, acc, l_acc, z_acc, vwt, vwt_hi, R, vsz_ptr, tok, t_pad, cv_ok, J0 + 2, G, BITS)
    acc, l_acc, z_acc = _field_values(s3, m_k, acc, l_acc, z_acc, vwt, vwt_hi, R, vsz_ptr, tok, t_pad, cv_ok, J0 + 3, G, BITS)
    return m_new, acc, l_acc, z_acc


@triton.jit
def _swap_split_kernel(Q, KW, KS, KZ, VW, VSZ, KR, VR, OP, LP, sm_scale_log2,
                       T_q, T_r, tps, skw_bh, sks_bh, svsz_bh, t_pad, skr_bh, svr_bh,
                       GROUPS: tl.constexpr, GP: tl.constexpr, NCK: tl.constexpr, NCV: tl.constexpr,
                       D: tl.constexpr, G: tl.constexpr, BLOCK_R: tl.constexpr, BITS: tl.constexpr):
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_rows = tl.num_programs(1)
    NGV: tl.constexpr = D // G
    SLOTS: tl.constexpr = 16 // BITS
    TILE2: tl.constexpr = 2 * SLOTS * G  # tokens per double tile
    HP: tl.constexpr = NCK // 2
    offs_d = tl.arange(0, D)
    if pid_s < n_rows - 1:
        ck = tl.arange(0, NCK)
        hk = ck // 2
        xk = ck % 2
        c_ok = hk < GROUPS
        q16 = tl.load(Q + (pid_bh * GROUPS + hk)[:, None] * D + offs_d[None, :], mask=c_ok[:, None], other=0.0)
        q16 = q16.to(tl.float32) * sm_scale_log2  # [NCK, D], log2 units
        q16h = q16.to(tl.float16)
        cv = tl.arange(0, NCV)
        hv = cv % GROUPS
        jv = cv // GROUPS
        cv_ok = jv < NGV
        R = tl.where((hk[:, None] == hv[None, :]) & c_ok[:, None] & cv_ok[None, :], 1.0, 0.0).to(tl.float16)
        r = tl.arange(0, 2 * G)
        row_x = r // G
        tok0 = row_x * (SLOTS * G) + r % G  # field 0's token of each row, from the double tile's start
        col_ok = (row_x[:, None] == xk[None, :]) & c_ok[None, :]
        n_grp = sks_bh // D  # padded key groups per head (n_tiles * SLOTS)
        n_wrows = skw_bh // D
        m_h = tl.full([HP], float("-inf"), tl.float32)
        acc = tl.zeros([D, NCV], tl.float32)
        l_acc = tl.zeros([2 * G, NCV], tl.float32)
        z_acc = tl.zeros([2 * G, NCV], tl.float32)
        start = pid_s * tps
        end = tl.minimum(start + tps, T_q)
        kw_base = KW + pid_bh * skw_bh
        vw_base = VW + pid_bh * skw_bh
        vsz_cols = VSZ + pid_bh * svsz_bh + tl.minimum(jv, NGV - 1)[None, :] * (2 * t_pad)
        for t0 in range(start, end, TILE2):
            g0 = t0 // G
            wrow = (t0 // (SLOTS * G)) * G + r
            w_ok = (wrow < n_wrows)[:, None]
            kw = tl.load(kw_base + wrow[:, None] * D + offs_d[None, :], mask=w_ok, other=0)  # [2G, D] int16
            # [D, 2G], loaded transposed (channels contiguous): the pipeliner then stages it in shared memory
            # and the AND runs in the product's operand layout (tl.trans of a loaded tile went through registers)
            vwt = tl.load(vw_base + wrow[None, :] * D + offs_d[:, None], mask=tl.trans(w_ok), other=0)
            grp = g0 + xk * SLOTS  # field 0's group of each column
            g_ok = (c_ok & (grp < n_grp))[:, None]
            ks_ptr = KS + pid_bh * sks_bh + grp[:, None] * D + offs_d[None, :]
            kz_ptr = KZ + pid_bh * sks_bh + grp[:, None] * D + offs_d[None, :]
            tok = t0 + tok0
            vsz_ptr = vsz_cols + 2 * tok[:, None]
            m_h, acc, l_acc, z_acc = _four_fields(q16, q16h, kw, vwt, R, ks_ptr, kz_ptr, vsz_ptr, g_ok, col_ok,
                                                  t_pad, cv_ok, tok, end, hv, m_h, acc, l_acc, z_acc, 0, G, BITS)
            if SLOTS == 8:
                m_h, acc, l_acc, z_acc = _four_fields(q16, q16h, kw, vwt, R, ks_ptr, kz_ptr, vsz_ptr, g_ok, col_ok,
                                                      t_pad, cv_ok, tok, end, hv, m_h, acc, l_acc, z_acc, 4, G, BITS)
        l_v = tl.sum(l_acc, 0)  # [NCV]
        z_v = tl.sum(z_acc, 0)
        m_v = _to_vcols(tl.where(m_h == float("-inf"), 0.0, m_h), hv, HP)
        l_safe = tl.where(l_v > 0, l_v, 1.0)
        out = (acc * 2.0 ** (24 - VEXP) + z_v[None, :]) / l_safe[None, :]  # [D, NCV]
        lse = tl.where(l_v > 0, m_v + tl.log2(l_safe), float("-inf"))
        rows = pid_bh * GROUPS + hv
        keep = cv_ok[None, :] & (jv[None, :] == (offs_d // G)[:, None])
        tl.store(OP + (rows[None, :] * n_rows + pid_s) * D + offs_d[:, None], out, mask=keep)
        tl.store(LP + rows * n_rows + pid_s, lse, mask=cv_ok & (jv == 0))
    else:
        _residual_program(Q, KR, VR, OP, LP, pid_bh, pid_s, n_rows, T_r, skr_bh, svr_bh, sm_scale_log2,
                          GROUPS, GP, D, BLOCK_R)
