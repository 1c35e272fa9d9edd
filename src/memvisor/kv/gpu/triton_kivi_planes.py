"""Decode split kernel over the planes layout (planes.py), 2- or 4-bit codes: the codes go from int16 words
to the matrix units with one AND per two codes, and nothing is dequantized element by element.

Per program: kv head ``bh``, tokens ``[s * tps, (s + 1) * tps)`` in tiles of ``S`` key groups (``S G``
tokens; ``S = 16 // BITS``). Rows ``r = jv * GROUPS + h`` replicate the query of head ``h`` once per value
channel group ``jv`` (ROWS = 16 for Llama's 4 heads x 4 groups: the matrix unit's smallest M, so the
copies are free).

- Codes: ``w & (mask << BITS j')`` read as fp16 is the SUBNORMAL number ``code * 2^(BITS j') * 2^-24``,
  exact, and the matrix units multiply subnormal fp16 operands exactly. Bit fields that reach bit 10 (the
  exponent's bits) are first shifted down by one shift per word, shared by those fields. The AND runs
  on the int16 words AFTER they are in the operand's register layout (one 32-bit register = the two codes
  the operand wants together), by inline PTX. (The earlier form, ``(w & m) | 0x6400`` read as
  ``1024 + code`` then a subtraction, took three instructions per two codes where this takes one.)
- Keys, group g = bit field J of the tile: ``q . k_t = (q * ks_g / 2^(BITS J')) . (code_t * 2^(BITS J'))
  + q . kz_g`` (the stored key scale is already divided: planes.py). Scores come out times 2^-24 and stay
  so through the max; the exponent of the softmax multiplies them back (one FFMA, as the subtraction
  was). The query is scaled once per group (``[ROWS, D]``, not per token). The zero-point term
  ``q . kz_g`` of the tile's groups comes from one small product, split into fp16 hi + lo parts, and is
  added by a K=16 product with a one-hot matrix whose ones are 2^-24 (no cross-thread extraction);
  groups past the program's range get -30000 there.
- Values: row r's probabilities times the value scale of its channel group ``vs[jv, t]`` go into ONE
  product with the raw subnormal codes. The stored scale already
  carries ``2^(VEXP - BITS J')`` (planes.py), so the accumulator holds ``2^(VEXP - 24)`` times the
  output (undone once at the end); ``2^VEXP`` keeps ``p * vs`` of the high fields in fp16's normal range.
  Zero points add ``sum_t p * vz[jv, t]``. Scales and zeros of a group arrive in one load of (scale,
  zero) pairs: a load that feeds a matrix product is what Triton's pipeliner prefetches, and the zeros
  alone feed none.
- Softmax once per 4 groups: one max and one rescale per 4G tokens; the row sums are kept as
  [ROWS, G] element-wise accumulators and reduced once at the end.
"""

from __future__ import annotations

import triton
import triton.language as tl

from memvisor.kv.gpu.planes import VALUE_EXP
from memvisor.kv.gpu.triton_common import STEP_VARYING, _replicated_query, _residual_program, _store_replicated


def _and_asm(bits: int, jj: int) -> str:
    return f"and.b32 $0, $1, {hex((((1 << bits) - 1) << (bits * jj)) * 0x10001)};"


# index (BITS // 2 - 1) * 5 + J': field J' of a word (J' < 5 for 2-bit codes, < 2 for 4-bit ones)
AND_ASM = tl.constexpr(tuple(_and_asm(2, jj) for jj in range(5)) + tuple(_and_asm(4, jj) for jj in range(5)))
SHR_ASM = tl.constexpr(("shr.b32 $0, $1, 10;", "shr.b32 $0, $1, 8;"))  # index BITS // 2 - 1
VEXP = tl.constexpr(VALUE_EXP)
TWO24 = tl.constexpr(16777216.0)


@triton.jit
def _codes(w, w_hi, J: tl.constexpr, BITS: tl.constexpr):
    """Group J's code operand, subnormal ``code * 2^(BITS J') * 2^-24``, from the words ``w`` (``w_hi``: the
    words shifted by 10 or 8, for the fields that reach bit 10)."""
    SPLIT: tl.constexpr = 10 // BITS
    JJ: tl.constexpr = J if J < SPLIT else J - SPLIT
    src = w if J < SPLIT else w_hi
    return tl.inline_asm_elementwise(AND_ASM[(BITS // 2 - 1) * 5 + JJ], "=r,r", [src], dtype=tl.float16,
                                     is_pure=True, pack=2)


@triton.jit
def _group_scores(qrep, kwt, kwt_hi, zba, ks_base, g0, k16, J: tl.constexpr, G: tl.constexpr,
                  BITS: tl.constexpr):
    """Scores [ROWS, G] of key group g0 + J, in log2 units times 2^-24."""
    D: tl.constexpr = qrep.shape[1]
    ksm = tl.load(ks_base + (g0 + J) * D + tl.arange(0, D))  # already divided by 2^(BITS J') (planes.py)
    # the zero-point term in the scores' units: ones of 2^-24
    onehot = tl.where((k16[:, None] % 8) == J, 2.0 ** -24, 0.0).to(tl.float16) + tl.zeros([16, G], tl.float16)
    a = tl.inline_asm_elementwise("mul.rn.f16x2 $0, $1, $2;", "=r,r,r", [qrep, ksm[None, :]], dtype=tl.float16,
                                  is_pure=True, pack=2)  # two channels per instruction
    return tl.dot(a, _codes(kwt, kwt_hi, J, BITS), acc=tl.dot(zba, onehot))


@triton.jit
def _group_values(s, m, acc, sums, vw, vw_hi, vsz_base, t0, J: tl.constexpr, G: tl.constexpr,
                  BITS: tl.constexpr):
    """Fold group J's probabilities into the value accumulator and the [ROWS, G] row-sum accumulators."""
    l_acc, z_acc = sums
    p = tl.exp2(s * TWO24 - m)
    vsz = tl.load(vsz_base + (2 * (t0 + J * G) + tl.arange(0, 2 * G))[None, :])  # [ROWS, 2G]: (scale, zero) pairs
    vs, vz = tl.split(tl.reshape(vsz, [vsz.shape[0], G, 2]))
    # the stored value scale carries 2^(VEXP - BITS J') already (planes.py). p * vs in fp32, rounded once: as
    # one fp16 product (p rounded first) it ran no faster and a 2-layer Llama's logits moved 2.04e-2 from the
    # torch path's (H100)
    acc = tl.dot((p * vs.to(tl.float32)).to(tl.float16), _codes(vw, vw_hi, J, BITS), acc=acc)
    return acc, (l_acc + p, z_acc + p * vz.to(tl.float32))


@triton.jit
def _four_groups(qrep, kwt, vw, zba, ks_base, vsz_base, g0, t0, k16, m_i, acc, l_acc, z_acc,
                 J0: tl.constexpr, G: tl.constexpr, BITS: tl.constexpr):
    """Groups J0..J0+3 of a tile: scores, one online-softmax step, values (written out: a static loop
    cannot keep a list of tiles). The high bit fields read the words shifted once for all of them."""
    SPLIT: tl.constexpr = 10 // BITS
    if J0 + 3 >= SPLIT:
        kwt_hi = tl.inline_asm_elementwise(SHR_ASM[BITS // 2 - 1], "=r,r", [kwt], dtype=tl.int16, is_pure=True,
                                           pack=2)
        vw_hi = tl.inline_asm_elementwise(SHR_ASM[BITS // 2 - 1], "=r,r", [vw], dtype=tl.int16, is_pure=True,
                                          pack=2)
    else:
        kwt_hi = kwt
        vw_hi = vw
    s0 = _group_scores(qrep, kwt, kwt_hi, zba, ks_base, g0, k16, J0, G, BITS)
    s1 = _group_scores(qrep, kwt, kwt_hi, zba, ks_base, g0, k16, J0 + 1, G, BITS)
    s2 = _group_scores(qrep, kwt, kwt_hi, zba, ks_base, g0, k16, J0 + 2, G, BITS)
    s3 = _group_scores(qrep, kwt, kwt_hi, zba, ks_base, g0, k16, J0 + 3, G, BITS)
    smax = tl.max(tl.maximum(tl.maximum(s0, s1), tl.maximum(s2, s3)), 1)
    m_new = tl.maximum(m_i, smax * TWO24)
    alpha = tl.exp2(m_i - m_new)[:, None]
    mm = m_new[:, None]
    sums = (l_acc * alpha, z_acc * alpha)
    acc = acc * alpha
    acc, sums = _group_values(s0, mm, acc, sums, vw, vw_hi, vsz_base, t0, J0, G, BITS)
    acc, sums = _group_values(s1, mm, acc, sums, vw, vw_hi, vsz_base, t0, J0 + 1, G, BITS)
    acc, sums = _group_values(s2, mm, acc, sums, vw, vw_hi, vsz_base, t0, J0 + 2, G, BITS)
    acc, sums = _group_values(s3, mm, acc, sums, vw, vw_hi, vsz_base, t0, J0 + 3, G, BITS)
    return m_new, acc, sums[0], sums[1]


@triton.jit(do_not_specialize=STEP_VARYING)
def _planes_split_kernel(Q, KW, KS, KZ, VW, VSZ, KR, VR, OP, LP, sm_scale_log2,
                         T_q, T_r, tps, skw_bh, sks_bh, svsz_bh, t_pad, skr_bh, svr_bh,
                         GROUPS: tl.constexpr, GP: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr,
                         G: tl.constexpr, BLOCK_R: tl.constexpr, BITS: tl.constexpr):
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_rows = tl.num_programs(1)
    NGV: tl.constexpr = D // G
    SLOTS: tl.constexpr = 16 // BITS
    TILE: tl.constexpr = SLOTS * G
    offs_d = tl.arange(0, D)
    if pid_s < n_rows - 1:
        qrep, h, jv, r_ok = _replicated_query(Q, pid_bh, sm_scale_log2, GROUPS, ROWS, D, NGV)
        qrep = qrep.to(tl.float16)  # [ROWS, D], log2 units
        offs_n = tl.arange(0, G)
        k16 = tl.arange(0, 16)
        kz_rows = k16 % SLOTS  # the tile's groups, then again: hi and lo halves of the zero-point term
        m_i = tl.full([ROWS], float("-inf"), tl.float32)
        l_acc = tl.zeros([ROWS, G], tl.float32)
        z_acc = tl.zeros([ROWS, G], tl.float32)
        acc = tl.zeros([ROWS, D], tl.float32)
        start = pid_s * tps
        end = tl.minimum(start + tps, T_q)
        kw_base = KW + pid_bh * skw_bh
        vw_base = VW + pid_bh * skw_bh
        ks_base = KS + pid_bh * sks_bh
        vsz_base = VSZ + pid_bh * svsz_bh + tl.minimum(jv, NGV - 1)[:, None] * (2 * t_pad)  # padded rows: any group
        for t0 in range(start, end, TILE):
            g0 = t0 // G
            wrow = (t0 // TILE) * G + offs_n
            kw = tl.load(kw_base + wrow[:, None] * D + offs_d[None, :])  # [G, D] int16
            vw = tl.load(vw_base + wrow[:, None] * D + offs_d[None, :])
            kwt = tl.trans(kw)
            # zero-point term of the tile's groups, as fp16 hi (cols 0-7) + lo (cols 8-15)
            kz8 = tl.load(KZ + pid_bh * sks_bh + (g0 + kz_rows)[:, None] * D + offs_d[None, :])
            zb = tl.dot(qrep, tl.trans(kz8))  # [ROWS, 16] fp32
            hi = zb.to(tl.float16)
            lo = (zb - hi.to(tl.float32)).to(tl.float16)
            col = tl.arange(0, 16)[None, :]
            dead = (g0 + (col % SLOTS)) * G >= end  # groups past the range: scores pushed to -30000
            zba = tl.where(col < 8, tl.where(dead, -30000.0, hi), tl.where(dead, 0.0, lo)).to(tl.float16)
            # 4 groups at a time: one max and one rescale per 4 (fewer live score tiles)
            m_i, acc, l_acc, z_acc = _four_groups(qrep, kwt, vw, zba, ks_base, vsz_base, g0, t0, k16, m_i, acc,
                                                  l_acc, z_acc, 0, G, BITS)
            if SLOTS == 8:
                m_i, acc, l_acc, z_acc = _four_groups(qrep, kwt, vw, zba, ks_base, vsz_base, g0, t0, k16, m_i, acc,
                                                      l_acc, z_acc, 4, G, BITS)
        acc = acc * 2.0 ** (24 - VEXP)
        _store_replicated(OP, LP, acc, tl.sum(z_acc, 1), tl.sum(l_acc, 1), m_i, pid_bh, pid_s, n_rows, h, jv, r_ok,
                          GROUPS, D, G)
    else:
        _residual_program(Q, KR, VR, OP, LP, pid_bh, pid_s, n_rows, T_r, skr_bh, svr_bh, sm_scale_log2,
                          GROUPS, GP, D, BLOCK_R)
