"""The fast KIVI decode split kernel: integer codes straight into the matrix units, scales folded out.

Why it is shaped this way (a first version that dequantized every element with int->float
conversions ran at 6% of copy bandwidth: conversions and per-element FMAs, not bytes, bound it):

- Codes become fp16 without a conversion instruction: ``(code | 0x6400)`` read as fp16 is exactly
  ``1024 + code``; one fp16 subtract makes it ``code`` (exact small integers).
- Keys (per-channel scale ``ks[g, d]``, zero ``kz[g, d]`` for a group ``g`` of G tokens):
  ``q . k_t = (q * ks[g]) . codes_t + q . kz[g]``, so a tile is exactly one key group and the scale
  multiplies the small query, not the ``[G, D]`` tile.
- Values (per-token scale ``vs[t, j]`` over channel group ``j``): the query rows are replicated
  once per channel group, row ``r = j * GROUPS + h``. Row ``r``'s probabilities are scaled by
  ``vs[:, j]`` before ONE dot with the raw codes, and only columns of group ``j`` of row ``r`` are
  kept at the end: ``out[h, d] = acc[j(d) * GROUPS + h, d]``. With Llama's 4 query heads per kv
  head and 4 channel groups these 16 rows are exactly the matrix unit's minimum M: no waste.
- The zero points of the values add ``sum_t p[r, t] * vz[t, j]``: a per-row scalar per tile.
"""

from __future__ import annotations

import triton
import triton.language as tl

from memvisor.kv.gpu.triton_common import STEP_VARYING, _replicated_query, _residual_program, _store_replicated


@triton.jit
def _codes_to_f16(b, shift, MASK: tl.constexpr):
    """uint8 bytes (already broadcast to the element grid) >> shift & MASK -> fp16 code values."""
    bits = ((b.to(tl.int16) >> shift) & MASK) | 0x6400
    return bits.to(tl.float16, bitcast=True) - 1024.0


@triton.jit(do_not_specialize=STEP_VARYING)
def _kivi_split_kernel_rep(Q, KC, KS, KZ, VC, VS, VZ, KR, VR, OP, LP, sm_scale_log2,
                           T_q, T_r, tps, skc_bh, sks_bh, svc_bh, svs_bh, skr_bh, svr_bh,
                           GROUPS: tl.constexpr, GP: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr,
                           BITS: tl.constexpr, G: tl.constexpr, BLOCK_R: tl.constexpr,
                           K_RESHAPE: tl.constexpr, V_RESHAPE: tl.constexpr):
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_rows = tl.num_programs(1)
    PER: tl.constexpr = 8 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    NGV: tl.constexpr = D // G
    offs_d = tl.arange(0, D)
    if pid_s < n_rows - 1:
        qrep, h, j, r_ok = _replicated_query(Q, pid_bh, sm_scale_log2, GROUPS, ROWS, D, NGV)  # log2 units
        m_i = tl.full([ROWS], float("-inf"), tl.float32)
        l_i = tl.zeros([ROWS], tl.float32)
        acc = tl.zeros([ROWS, D], tl.float32)
        accz = tl.zeros([ROWS], tl.float32)
        offs_t = tl.arange(0, G)
        start = pid_s * tps
        end = tl.minimum(start + tps, T_q)
        kc_base = KC + pid_bh * skc_bh
        vc_base = VC + pid_bh * svc_bh
        for n0 in range(start, end, G):
            grp = n0 // G
            # keys [G, D]: byte row t // PER holds PER consecutive tokens of a channel
            if K_RESHAPE:
                kb = tl.load(kc_base + (n0 // PER + tl.arange(0, G // PER))[:, None] * D + offs_d[None, :])
                ksh = (tl.arange(0, PER) * BITS).to(tl.int16)
                kq = tl.reshape(_codes_to_f16(kb[:, None, :], ksh[None, :, None], MASK), [G, D])
            else:
                kb = tl.load(kc_base + ((n0 + offs_t) // PER)[:, None] * D + offs_d[None, :])
                kq = _codes_to_f16(kb, ((offs_t % PER) * BITS).to(tl.int16)[:, None], MASK)
            ks = tl.load(KS + pid_bh * sks_bh + grp * D + offs_d).to(tl.float32)
            kz = tl.load(KZ + pid_bh * sks_bh + grp * D + offs_d).to(tl.float32)
            qs = (qrep * ks[None, :]).to(tl.float16)
            s = tl.dot(qs, tl.trans(kq)) + tl.sum(qrep * kz[None, :], 1)[:, None]  # [ROWS, G]
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            # values [G, D]: byte c // PER of a token row holds PER consecutive channels
            t_idx = n0 + offs_t
            if V_RESHAPE:
                vb = tl.load(vc_base + t_idx[:, None] * (D // PER) + tl.arange(0, D // PER)[None, :])
                vsh = (tl.arange(0, PER) * BITS).to(tl.int16)
                vq = tl.reshape(_codes_to_f16(vb[:, :, None], vsh[None, None, :], MASK), [G, D])
            else:
                vb = tl.load(vc_base + t_idx[:, None] * (D // PER) + (offs_d // PER)[None, :])
                vq = _codes_to_f16(vb, ((offs_d % PER) * BITS).to(tl.int16)[None, :], MASK)
            vofs = pid_bh * svs_bh + t_idx[None, :] * NGV + j[:, None]  # [ROWS, G]
            vs = tl.load(VS + vofs, mask=r_ok[:, None], other=0.0).to(tl.float32)
            vz = tl.load(VZ + vofs, mask=r_ok[:, None], other=0.0).to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot((p * vs).to(tl.float16), vq)
            accz = accz * alpha + tl.sum(p * vz, 1)
            m_i = m_new
        _store_replicated(OP, LP, acc, accz, l_i, m_i, pid_bh, pid_s, n_rows, h, j, r_ok, GROUPS, D, G)
    else:
        _residual_program(Q, KR, VR, OP, LP, pid_bh, pid_s, n_rows, T_r, skr_bh, svr_bh, sm_scale_log2,
                          GROUPS, GP, D, BLOCK_R)


@triton.jit(do_not_specialize=STEP_VARYING)
def _kivi_split_kernel_tile(Q, KC, KS, KZ, VC, VS, VZ, KR, VR, OP, LP, sm_scale_log2,
                            T_q, T_r, tps, skc_bh, sks_bh, svc_bh, svs_bh, skr_bh, svr_bh,
                            GROUPS: tl.constexpr, GP: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr,
                            BITS: tl.constexpr, G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                            V_RESHAPE: tl.constexpr):
    """Large tiles (``BLOCK_N`` tokens, several key groups) so that enough bytes are in flight.

    The per-group kernel above moved ~3 KB per loop step and was bound by memory latency, not
    bandwidth. Here keys are dequantized in fp16 (``code * scale + zero``, packed half2 math,
    scales kept as ``[BLOCK_N / G, D]`` and broadcast: full-tile scales cost 128 registers), so one dot covers ``BLOCK_N`` tokens across groups; values keep
    the replicated-row trick (their scale varies along the token axis, so it goes into ``p``).
    """
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_rows = tl.num_programs(1)
    PER: tl.constexpr = 8 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    NGV: tl.constexpr = D // G
    NG: tl.constexpr = BLOCK_N // G
    offs_d = tl.arange(0, D)
    ksh = (tl.arange(0, PER) * BITS).to(tl.int16)
    if pid_s < n_rows - 1:
        qrep, h, j, r_ok = _replicated_query(Q, pid_bh, sm_scale_log2, GROUPS, ROWS, D, NGV)
        qrep = qrep.to(tl.float16)  # [ROWS, D], log2 units
        m_i = tl.full([ROWS], float("-inf"), tl.float32)
        l_i = tl.zeros([ROWS], tl.float32)
        acc = tl.zeros([ROWS, D], tl.float32)
        accz = tl.zeros([ROWS], tl.float32)
        offs_n = tl.arange(0, BLOCK_N)
        start = pid_s * tps
        end = tl.minimum(start + tps, T_q)
        kc_base = KC + pid_bh * skc_bh
        vc_base = VC + pid_bh * svc_bh
        for n0 in range(start, end, BLOCK_N):
            t = n0 + offs_n
            nm = t < end
            # keys: each code byte loaded once, unpacked to [NG, G, D]; scales stay [NG, D] and broadcast
            rr = n0 // PER + tl.arange(0, BLOCK_N // PER)
            kb = tl.load(kc_base + rr[:, None] * D + offs_d[None, :], mask=(rr * PER < end)[:, None], other=0)
            kq = tl.reshape(_codes_to_f16(kb[:, None, :], ksh[None, :, None], MASK), [NG, G, D])
            gi = n0 // G + tl.arange(0, NG)
            kofs = pid_bh * sks_bh + gi[:, None] * D + offs_d[None, :]
            ks = tl.load(KS + kofs, mask=(gi * G < end)[:, None], other=0.0)
            kz = tl.load(KZ + kofs, mask=(gi * G < end)[:, None], other=0.0)
            k = tl.reshape(kq * ks[:, None, :] + kz[:, None, :], [BLOCK_N, D])  # fp16
            s = tl.dot(qrep, tl.trans(k))
            s = tl.where(nm[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if V_RESHAPE:
                vb = tl.load(vc_base + t[:, None] * (D // PER) + tl.arange(0, D // PER)[None, :], mask=nm[:, None],
                             other=0)
                vq = tl.reshape(_codes_to_f16(vb[:, :, None], ksh[None, None, :], MASK), [BLOCK_N, D])
            else:
                vb = tl.load(vc_base + t[:, None] * (D // PER) + (offs_d // PER)[None, :], mask=nm[:, None], other=0)
                vq = _codes_to_f16(vb, ((offs_d % PER) * BITS).to(tl.int16)[None, :], MASK)
            vofs = pid_bh * svs_bh + t[None, :] * NGV + j[:, None]  # [ROWS, BLOCK_N]
            vmask = r_ok[:, None] & nm[None, :]
            vs = tl.load(VS + vofs, mask=vmask, other=0.0).to(tl.float32)
            vz = tl.load(VZ + vofs, mask=vmask, other=0.0).to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot((p * vs).to(tl.float16), vq)
            accz = accz * alpha + tl.sum(p * vz, 1)
            m_i = m_new
        _store_replicated(OP, LP, acc, accz, l_i, m_i, pid_bh, pid_s, n_rows, h, j, r_ok, GROUPS, D, G)
    else:
        _residual_program(Q, KR, VR, OP, LP, pid_bh, pid_s, n_rows, T_r, skr_bh, svr_bh, sm_scale_log2,
                          GROUPS, GP, D, BLOCK_R)
