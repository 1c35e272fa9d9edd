"""Decode split kernel over the planes layout (planes.py): codes go from int16 words to the matrix
units with one bit operation per two codes, and nothing is dequantized element by element.

Per program: kv head ``bh``, tokens ``[s * tps, (s + 1) * tps)`` in tiles of 8 key groups (8G tokens).
Rows ``r = jv * GROUPS + h`` replicate the query of head ``h`` once per value channel group ``jv``
(ROWS = 16 for Llama's 4 heads x 4 groups: the matrix unit's smallest M, so the copies are free).

- Codes: ``lop3(w, 3 << 2j, 0x6400)`` read as fp16 is ``1024 + code * 4^j`` for bit pair ``j <= 4``
  (``w >> 10`` first for j = 5..7), done on the int16 words AFTER they are in the operand's register
  layout (one 32-bit register = the two codes the operand wants together), by inline PTX; an exact
  ``sub.f16x2`` removes the 1024 (left in, it cost 1% accuracy: the matrix units' fp32 sums of
  ``p * 1024`` lose the low bits that the correction needs).
- Keys, group g = bit pair j of the tile: ``q . k_t = (q * ks_g / 4^j) . (code_t * 4^j) + q . kz_g``.
  The query is scaled once per group (``[ROWS, D]``, not per token). The zero-point term
  ``q . kz_g`` of all 8 groups of a tile comes from one small product, split into fp16 hi + lo
  parts, and is added to the scores by a K=16 product with a one-hot matrix (no cross-thread
  extraction); groups past the program's range get -30000 there.
- Values: row r's probabilities are scaled by the value scale of its channel group ``vs[jv, t]``
  before ONE product with the raw codes; zero points add ``sum_t p * vz[jv, t]``. Scales and zeros
  of a group arrive in one load of (scale, zero) pairs: a load that feeds a matrix product is what
  Triton's pipeliner prefetches, and the zeros alone feed none (as their own load they were waited
  for group after group in the middle of each tile).
- Softmax once per half tile (4 groups): one max and one rescale per 4G tokens; the row sums are
  kept as [ROWS, G] element-wise accumulators and reduced once at the end.
"""

from __future__ import annotations

import triton
import triton.language as tl

from memvisor.kv.gpu.triton_common import _residual_program, _store_replicated


def _key_asm(j: int) -> str:
    mask = hex((3 << (2 * (j if j <= 4 else j - 5))) * 0x10001)
    src = "$1" if j <= 4 else "t"
    pre = "" if j <= 4 else "shr.b32 t, $1, 10; "
    return ("{ .reg .b32 t, o; " + pre + f"lop3.b32 t, {src}, {mask}, 0x64006400, 0xea; "
            "mov.b32 o, 0x64006400; sub.rn.f16x2 $0, t, o; }")


def _value_asm(j: int) -> str:
    shift = f"shr.b32 t, $1, {2 * j}; " if j else "mov.b32 t, $1; "
    return ("{ .reg .b32 t, o; " + shift + "lop3.b32 t, t, 0x00030003, 0x64006400, 0xea; "
            "mov.b32 o, 0x64006400; sub.rn.f16x2 $0, t, o; }")


KEY_ASM = tl.constexpr(tuple(_key_asm(j) for j in range(8)))
VALUE_ASM = tl.constexpr(tuple(_value_asm(j) for j in range(8)))
KEY_MUL = tl.constexpr(tuple(float(4 ** (j if j <= 4 else j - 5)) for j in range(8)))


@triton.jit
def _key_codes(w, J: tl.constexpr):
    """int16 words -> fp16 ``code_J * 4^J`` (J <= 4) or ``code_J * 4^(J-5)``, exact."""
    return tl.inline_asm_elementwise(KEY_ASM[J], "=r,r", [w], dtype=tl.float16, is_pure=True, pack=2)


@triton.jit
def _value_codes(w, J: tl.constexpr):
    """int16 words -> fp16 ``code_j``, exact."""
    return tl.inline_asm_elementwise(VALUE_ASM[J], "=r,r", [w], dtype=tl.float16, is_pure=True, pack=2)


@triton.jit
def _group_scores(qrep, kwt, zba, ks_base, g0, k16, J: tl.constexpr, G: tl.constexpr):
    """Scores [ROWS, G] (log2 units) of key group g0 + J: bit pair J of the tile's words."""
    D: tl.constexpr = qrep.shape[1]
    ksm = tl.load(ks_base + (g0 + J) * D + tl.arange(0, D))  # already divided by 4^J (planes.py)
    onehot = ((k16[:, None] % 8) == J).to(tl.float16) + tl.zeros([16, G], tl.float16)
    a = tl.inline_asm_elementwise("mul.rn.f16x2 $0, $1, $2;", "=r,r,r", [qrep, ksm[None, :]], dtype=tl.float16,
                                  is_pure=True, pack=2)  # two channels per instruction (plain * went one by one)
    return tl.dot(a, _key_codes(kwt, J), acc=tl.dot(zba, onehot))


@triton.jit
def _group_values(s, m, acc, sums, vw, vsz_base, t0, J: tl.constexpr, G: tl.constexpr):
    """Fold group J's probabilities into the value accumulator and the [ROWS, G] row-sum accumulators."""
    l_acc, z_acc = sums
    p = tl.exp2(s - m)
    vsz = tl.load(vsz_base + (2 * (t0 + J * G) + tl.arange(0, 2 * G))[None, :])  # [ROWS, 2G]: (scale, zero) pairs
    vs, vz = tl.split(tl.reshape(vsz, [vsz.shape[0], G, 2]))
    acc = tl.dot((p * vs.to(tl.float32)).to(tl.float16), _value_codes(vw, J), acc=acc)
    return acc, (l_acc + p, z_acc + p * vz.to(tl.float32))


@triton.jit
def _half_tile(qrep, kwt, vw, zba, ks_base, vsz_base, g0, t0, k16, m_i, acc, l_acc, z_acc,
               J0: tl.constexpr, G: tl.constexpr):
    """Groups J0..J0+3 of a tile: scores, one online-softmax step, values (written out: a static loop
    cannot keep a list of tiles)."""
    s0 = _group_scores(qrep, kwt, zba, ks_base, g0, k16, J0, G)
    s1 = _group_scores(qrep, kwt, zba, ks_base, g0, k16, J0 + 1, G)
    s2 = _group_scores(qrep, kwt, zba, ks_base, g0, k16, J0 + 2, G)
    s3 = _group_scores(qrep, kwt, zba, ks_base, g0, k16, J0 + 3, G)
    m_new = tl.maximum(m_i, tl.max(tl.maximum(tl.maximum(s0, s1), tl.maximum(s2, s3)), 1))
    alpha = tl.exp2(m_i - m_new)[:, None]
    mm = m_new[:, None]
    sums = (l_acc * alpha, z_acc * alpha)
    acc = acc * alpha
    acc, sums = _group_values(s0, mm, acc, sums, vw, vsz_base, t0, J0, G)
    acc, sums = _group_values(s1, mm, acc, sums, vw, vsz_base, t0, J0 + 1, G)
    acc, sums = _group_values(s2, mm, acc, sums, vw, vsz_base, t0, J0 + 2, G)
    acc, sums = _group_values(s3, mm, acc, sums, vw, vsz_base, t0, J0 + 3, G)
    return m_new, acc, sums[0], sums[1]


@triton.jit
def _planes_split_kernel(Q, KW, KS, KZ, VW, VSZ, KR, VR, OP, LP, sm_scale_log2,
                         T_q, T_r, tps, skw_bh, sks_bh, svsz_bh, t_pad, skr_bh, svr_bh,
                         GROUPS: tl.constexpr, GP: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr,
                         G: tl.constexpr, BLOCK_R: tl.constexpr):
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_rows = tl.num_programs(1)
    NGV: tl.constexpr = D // G
    TILE: tl.constexpr = 8 * G
    offs_d = tl.arange(0, D)
    if pid_s < n_rows - 1:
        r = tl.arange(0, ROWS)
        h = r % GROUPS
        jv = r // GROUPS
        r_ok = r < NGV * GROUPS
        qrep = tl.load(Q + (pid_bh * GROUPS + h)[:, None] * D + offs_d[None, :], mask=r_ok[:, None], other=0.0)
        qrep = (qrep.to(tl.float32) * sm_scale_log2).to(tl.float16)  # [ROWS, D], log2 units
        offs_n = tl.arange(0, G)
        k16 = tl.arange(0, 16)
        kz_rows = k16 % 8  # groups 0..7 twice: hi and lo halves of the zero-point term
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
            # two halves of 4 groups: one max and one rescale per half (fewer live score tiles)
            # zero-point term of the tile's 8 groups, as fp16 hi (cols 0-7) + lo (cols 8-15)
            kz8 = tl.load(KZ + pid_bh * sks_bh + (g0 + kz_rows)[:, None] * D + offs_d[None, :])
            zb = tl.dot(qrep, tl.trans(kz8))  # [ROWS, 16] fp32
            hi = zb.to(tl.float16)
            lo = (zb - hi.to(tl.float32)).to(tl.float16)
            col = tl.arange(0, 16)[None, :]
            dead = (g0 + (col % 8)) * G >= end  # groups past the range: scores pushed to -30000
            zba = tl.where(col < 8, tl.where(dead, -30000.0, hi), tl.where(dead, 0.0, lo)).to(tl.float16)
            # two halves of 4 groups: one max and one rescale per half (fewer live score tiles)
            m_i, acc, l_acc, z_acc = _half_tile(qrep, kwt, vw, zba, ks_base, vsz_base, g0, t0, k16, m_i, acc,
                                                l_acc, z_acc, 0, G)
            m_i, acc, l_acc, z_acc = _half_tile(qrep, kwt, vw, zba, ks_base, vsz_base, g0, t0, k16, m_i, acc,
                                                l_acc, z_acc, 4, G)
        _store_replicated(OP, LP, acc, tl.sum(z_acc, 1), tl.sum(l_acc, 1), m_i, pid_bh, pid_s, n_rows, h, jv, r_ok,
                          GROUPS, D, G)
    else:
        _residual_program(Q, KR, VR, OP, LP, pid_bh, pid_s, n_rows, T_r, skr_bh, svr_bh, sm_scale_log2,
                          GROUPS, GP, D, BLOCK_R)
