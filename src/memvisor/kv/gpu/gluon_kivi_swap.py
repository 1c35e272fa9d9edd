"""Decode split kernel over the planes layout (planes.py) written in Gluon, with the operands swapped:
tokens on the M side of ``mma.sync.m16n8k16`` and the query heads of a KV group on its N = 8 side.

Why Gluon: Triton's ``tl.dot`` needs N >= 16, so the swap in Triton (round 2, BENCHMARKS ``kv-gpu``) still
padded 4 query heads to 16 columns. Gluon exposes ``mma_v2`` (m16n8k16) and explicit register layouts, so
the 4 heads fill 8 columns, twice: columns ``n = 4 x + h`` hold head ``h`` for ``x = 0, 1``.

Work: a unit is 16 token slots of a planes tile (``S = 16 // BITS`` key groups of ``G = 32`` tokens, so
``16 S`` tokens; 2 units per tile). Program ``(bh, s)`` has ``W`` warps and units ``[s ups, (s + 1) ups)`` of
kv head ``bh``; each warp takes every W-th unit and is independent until the end (every tensor has a leading
warp dimension), where the warps' online-softmax states merge and the program writes one partial
``[GROUPS, D]`` plus its log2-sum-exp for the existing combine launch. The last program of each kv head
takes the full-precision residual with the same products in the model dtype.

Staged (the default): each warp copies its next unit (code words, key zero points and scales, value scales
and zeros: 12 KB for 2-bit codes, D = 128) into shared memory with ``cp.async`` while it computes the current
one, so a unit costs one memory round trip, overlapped (``LATE``: the next copy starts once the current unit
has landed, so at a launch's start every warp waits for one unit's bytes, not two). Unstaged: words into
registers, scales per group.

Per unit and group ``j`` (bit field ``j`` of the words; subnormal codes as in triton_kivi_planes.py):

- Keys: ``S^T [16 tokens, 8] = codes_j [16, D] . (q * ks_j) [D, 8]`` plus the zero-point term ``q . kz_j``,
  added by a K=16 product of a one-hot matrix (ones of 2^-24) with the tile's zero-point terms split into
  fp16 hi + lo (those come from one product ``q [16, D] . kz^T [D, 16]`` per unit). Scores carry 2^-24 (the
  subnormal codes); the softmax's exponent takes it back. One online-softmax step per ``SMG`` groups: 8 for
  2-bit codes (one per unit: H100, 32k tokens, 453.3 us per step with 4 against 438.0 with 8), 4 for 4-bit.
  ``ZLAST``: the one-hot product ends each group's score chain instead of starting it, so the key products
  need not wait for the zero-point terms (2-bit; in the 4-bit build ptxas then spills).
- Values: ``out^T [64, 8] += codes_j^T [64, 16] . (p * vs) [16, 8]`` per pair of channel groups (a batch
  index of the product). The value scale is per (token, channel group of 32): a 16-row block of ``out^T``
  lies in one channel group, and columns ``4 x + h`` carry the scale of group ``2 pair + x``, so one B
  operand serves both groups of the pair (the other group's columns of a block are discarded).
- Zero points and row sums: ``ones [16, 16] . (p * vz)`` and ``ones . p`` (all rows equal), so no
  cross-lane reduction is needed in the loop.
- The probabilities move from the score product's accumulator layout (tokens on rows) to the value
  product's B operand layout (tokens on K) with one layout conversion per group.

Layouts and the channel/slot orders that make every load 8 or 16 bytes wide: gluon_swap_layouts.py; the copies
into shared memory and the operand loads: gluon_swap_stage.py.
Programmatic dependent launch (``PDL``, pdl.py): the first unit's copy starts before the kernels before this one
have ended; q, the residual and the partials are read or written after ``griddepcontrol.wait``.

Shapes (one program): q ``[GROUPS, D]`` (model dtype), kw/vw ``int16 [n_tiles G, D]``, ks/kz
``fp16 [n_tiles S, D]``, vsz ``fp16 [D/G, n_tiles S G, 2]``, residual ``[T_r, D]`` (model dtype); outputs
``OP fp32 [B Hq, n_rows, D]`` (normalised partial), ``LP fp32 [B Hq, n_rows]`` (log2-sum-exp).
Supported: G = 32, GROUPS <= 4, D in {64, 128, 256}, BITS in {2, 4}; other shapes use the Triton kernel.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2

from memvisor.kv.gpu.gdc import gl_gdc_launch_dependents, gl_gdc_wait
from memvisor.kv.gpu.gluon_swap_layouts import (
    _arange3,
    _arange5,
    _chan_perm_cols,
    _chan_perm_rows,
    _dup_batch,
    _sigma,
    bop_phys,
    keys_phys,
    mma_layout,
    op_layout,
    out_layout,
)
from memvisor.kv.gpu.gluon_swap_stage import (
    _bop_rows,
    _ks_smem,
    _kz_global,
    _kz_smem,
    _load_keys,
    _load_vals,
    _scales,
    _scales_smem,
    _stage_unit,
    _unit,
    _words_smem,
)
from memvisor.kv.gpu.planes import VALUE_EXP

VEXP = gl.constexpr(VALUE_EXP)
TWO24 = gl.constexpr(16777216.0)
DEAD = gl.constexpr(-30000.0)  # score (log2 units) of a group past the range: exp2 of it is 0


def _and_asm(bits: int, jj: int) -> str:
    return f"and.b32 $0, $1, {hex((((1 << bits) - 1) << (bits * jj)) * 0x10001)};"


AND_ASM = gl.constexpr(tuple(_and_asm(2, jj) for jj in range(5)) + tuple(_and_asm(4, jj) for jj in range(5)))
SHR_ASM = gl.constexpr(("shr.b32 $0, $1, 10;", "shr.b32 $0, $1, 8;"))


@gluon.jit
def _codes(w, w_hi, J: gl.constexpr, BITS: gl.constexpr):
    SPLIT: gl.constexpr = 10 // BITS
    JJ: gl.constexpr = J if J < SPLIT else J - SPLIT
    src = w if J < SPLIT else w_hi
    return gl.inline_asm_elementwise(AND_ASM[(BITS // 2 - 1) * 5 + JJ], "=r,r", [src], dtype=gl.float16,
                                     is_pure=True, pack=2)


@gluon.jit
def _shr(w, BITS: gl.constexpr):
    return gl.inline_asm_elementwise(SHR_ASM[BITS // 2 - 1], "=r,r", [w], dtype=gl.int16, is_pure=True, pack=2)


@gluon.jit
def _hmul2(a, b):
    return gl.inline_asm_elementwise("mul.rn.f16x2 $0, $1, $2;", "=r,r,r", [a, b], dtype=gl.float16,
                                     is_pure=True, pack=2)


@gluon.jit
def _transpose_p(p, B_L: gl.constexpr):
    """Probabilities ``[W, 16 tokens, 8]`` from the accumulator layout to the B operand's (tokens on K)."""
    return gl.convert_layout(p, B_L)


@gluon.jit
def _scores4(kw, kw_hi, qs, zb, KS, ks_base, u_lo, it, u_hi, ks_smem, J0: gl.constexpr, D: gl.constexpr,
             W: gl.constexpr, S: gl.constexpr, BITS: gl.constexpr, MMA: gl.constexpr, A_L: gl.constexpr,
             B_L: gl.constexpr, SMEM: gl.constexpr, ZLAST: gl.constexpr):
    """Scores ``[W, 16, 8]`` of groups J0 .. J0 + 3 (:func:`_group_scores`)."""
    return (_group_scores(kw, kw_hi, qs, zb, KS, ks_base, u_lo, it, u_hi, ks_smem, J0, D, W, S, BITS, MMA, A_L, B_L,
                          SMEM, ZLAST),
            _group_scores(kw, kw_hi, qs, zb, KS, ks_base, u_lo, it, u_hi, ks_smem, J0 + 1, D, W, S, BITS, MMA, A_L, B_L,
                          SMEM, ZLAST),
            _group_scores(kw, kw_hi, qs, zb, KS, ks_base, u_lo, it, u_hi, ks_smem, J0 + 2, D, W, S, BITS, MMA, A_L, B_L,
                          SMEM, ZLAST),
            _group_scores(kw, kw_hi, qs, zb, KS, ks_base, u_lo, it, u_hi, ks_smem, J0 + 3, D, W, S, BITS, MMA, A_L, B_L,
                          SMEM, ZLAST))


@gluon.jit
def _values4(s0, s1, s2, s3, mm, vw, vw_hi, acc, lacc, zacc, ones, VSZ, vsz_base, t_pad, u_lo, it, u_hi, vs_smem,
             J0: gl.constexpr, NGV: gl.constexpr, NP: gl.constexpr, W: gl.constexpr, G: gl.constexpr, S: gl.constexpr,
             BITS: gl.constexpr, MMA: gl.constexpr, B_L: gl.constexpr, SMEM: gl.constexpr):
    """Groups J0 .. J0 + 3: probabilities from their scores and the running max ``mm [W, 1, 8]`` (times 2^24 of the
    scores' scale) into the accumulators (:func:`_group_values`)."""
    acc, lacc, zacc = _group_values(gl.exp2(s0 * TWO24 - mm), vw, vw_hi, acc, lacc, zacc, ones, VSZ, vsz_base, t_pad,
                                    u_lo, it, u_hi, vs_smem, J0, NGV, NP, W, G, S, BITS, MMA, B_L, SMEM)
    acc, lacc, zacc = _group_values(gl.exp2(s1 * TWO24 - mm), vw, vw_hi, acc, lacc, zacc, ones, VSZ, vsz_base, t_pad,
                                    u_lo, it, u_hi, vs_smem, J0 + 1, NGV, NP, W, G, S, BITS, MMA, B_L, SMEM)
    acc, lacc, zacc = _group_values(gl.exp2(s2 * TWO24 - mm), vw, vw_hi, acc, lacc, zacc, ones, VSZ, vsz_base, t_pad,
                                    u_lo, it, u_hi, vs_smem, J0 + 2, NGV, NP, W, G, S, BITS, MMA, B_L, SMEM)
    return _group_values(gl.exp2(s3 * TWO24 - mm), vw, vw_hi, acc, lacc, zacc, ones, VSZ, vsz_base, t_pad, u_lo, it,
                         u_hi, vs_smem, J0 + 3, NGV, NP, W, G, S, BITS, MMA, B_L, SMEM)


@gluon.jit
def _rescale(smax, m_i, acc, lacc, zacc, NP: gl.constexpr, MMA: gl.constexpr):
    """The new running max ``[W, 8]`` from a step's score max ``smax`` (times 2^-24) and the accumulators rescaled."""
    m_new = gl.maximum(m_i, smax * TWO24)
    alpha = gl.exp2(m_i - m_new)
    a3 = alpha[:, None, :]
    lacc = lacc * a3
    ab = gl.convert_layout(_dup_batch(a3, NP), MMA)
    return m_new, acc * ab, lacc, zacc * ab


@gluon.jit
def _group_values(p, vw, vw_hi, acc, lacc, zacc, ones, VSZ, vsz_base, t_pad, u_lo, it, u_hi, vs_smem,
                  J: gl.constexpr, NGV: gl.constexpr, NP: gl.constexpr, W: gl.constexpr, G: gl.constexpr,
                  S: gl.constexpr, BITS: gl.constexpr, MMA: gl.constexpr, B_L: gl.constexpr, SMEM: gl.constexpr):
    """Group J's probabilities ``[W, 16, 8]`` into the value accumulator, the zero-point sums and the row sums."""
    pb = _transpose_p(p.to(gl.float16), B_L)
    lacc = mma_v2(ones, pb, lacc)
    if SMEM:
        vs, vz = _scales_smem(vs_smem, J, NP, W, B_L)
    else:
        vs, vz = _scales(VSZ, vsz_base, t_pad, J, NGV, NP, W, G, S, u_lo, it, u_hi, B_L)
    pbd = gl.convert_layout(_dup_batch(pb, NP), B_L)
    onesd = gl.convert_layout(_dup_batch(ones, NP), ones.type.layout)
    zacc = mma_v2(onesd, _hmul2(pbd, vz), zacc)
    acc = mma_v2(_codes(vw, vw_hi, J, BITS), _hmul2(pbd, vs), acc)
    return acc, lacc, zacc


@gluon.jit
def _group_scores(kw, kw_hi, qb, zb, KS, ks_base, u_lo, it, u_hi, ks_smem, J: gl.constexpr, D: gl.constexpr,
                  W: gl.constexpr, S: gl.constexpr, BITS: gl.constexpr, MMA: gl.constexpr, A_L: gl.constexpr,
                  B_L: gl.constexpr, SMEM: gl.constexpr, ZLAST: gl.constexpr):
    """Scores ``[W, 16 tokens, 8]`` of group J of each warp's unit, log2 units times 2^-24."""
    if SMEM:
        ks = _ks_smem(ks_smem, J, D, W, B_L)  # already divided by the field's power of two
    else:
        BP: gl.constexpr = bop_phys(W, D, 8)
        tile, half = _unit(u_lo + it * W + _arange3(W, 0, BP), u_hi)
        ks = _bop_rows(KS + ks_base, tile * S + J, D, W, B_L)
    k16 = _arange3(16, 2, A_L)
    onehot = gl.where((k16 % S == J) & (k16 < 2 * S), 2.0 ** -24, 0.0).to(gl.float16) + gl.zeros(
        [W, 16, 16], gl.float16, A_L)
    if ZLAST:  # the key product does not wait for the zero-point terms (computed at the unit's start)
        s = mma_v2(_codes(kw, kw_hi, J, BITS), _hmul2(qb, ks), gl.zeros([W, 16, 8], gl.float32, MMA))
        return mma_v2(onehot, zb, s)
    s = mma_v2(onehot, zb, gl.zeros([W, 16, 8], gl.float32, MMA))
    return mma_v2(_codes(kw, kw_hi, J, BITS), _hmul2(qb, ks), s)


@gluon.jit
def _zero_terms(qa, kzb, u_lo, it, u_hi, T_q, W: gl.constexpr, G: gl.constexpr, S: gl.constexpr,
                MMA: gl.constexpr, B_L: gl.constexpr):
    """``q . kz_g`` of the unit's tile groups as the B operand ``[W, 16, 8]`` of the one-hot product: row g < S
    the fp16 high part of group g's term (DEAD for a group past the quantized tokens or a unit past the
    range), row S + g the low part."""
    z = mma_v2(qa, kzb, gl.zeros([W, 16, 16], gl.float32, MMA))  # [W, 8 heads (twice), 16 groups]
    hi = z.to(gl.float16)
    lo = (z - hi.to(gl.float32)).to(gl.float16)
    gz = _arange3(16, 2, MMA)
    u = u_lo + it * W + _arange3(W, 0, MMA)
    tz, hz = _unit(u, u_hi)
    dead = ((tz * S + gz % S) * G >= T_q) | (u >= u_hi)
    zsel = gl.where(gz < S, gl.where(dead, DEAD, hi), gl.where(gz < 2 * S, gl.where(dead, 0.0, lo), 0.0)).to(gl.float16)
    # rows 0-7 of z (heads) transposed: [W, 16 groups, 8 heads], which is the B operand's layout
    zt, _ = gl.split(zsel.reshape([W, 2, 8, 16]).permute((0, 3, 2, 1)))
    return gl.convert_layout(zt, B_L)


@gluon.jit
def _load_q(Q, pid_bh, GROUPS: gl.constexpr, D: gl.constexpr, W: gl.constexpr):
    """The kv head's query heads as the keys' B operand ``[W, D, 8]`` (column n: head n % 4) and as an A operand
    ``[W, 16, D]`` (row n: head n % 4), in physical channel order, model dtype."""
    BP: gl.constexpr = bop_phys(W, D, 8)
    nb = _arange3(8, 2, BP) % 4 + 0 * _arange3(W, 0, BP)
    qb = gl.load(Q + (pid_bh * GROUPS + nb) * D + _arange3(D, 1, BP), mask=nb < GROUPS, other=0.0)
    KP: gl.constexpr = keys_phys(W, D)
    na = _arange3(16, 1, KP) % 4 + 0 * _arange3(W, 0, KP)
    qa = gl.load(Q + (pid_bh * GROUPS + na) * D + _arange3(D, 2, KP), mask=na < GROUPS, other=0.0)
    return qb, qa


@gluon.jit
def _epilogue(OP, LP, pid_bh, pid_s, n_rows, m_i, acc, lacc, zacc, out_scale, GROUPS: gl.constexpr,
              D: gl.constexpr, NP: gl.constexpr, W: gl.constexpr, MMA: gl.constexpr):
    """Merge the warps' states and store the program's partial: ``OP[row, s, c]`` normalised, ``LP[row, s]``.

    acc ``[W NP, 64, 8]`` (batch ``pair W + w``, row ``m = 32 x + 8 r + q`` = channel ``64 pair + 32 x + 4 q +
    r``, column ``4 x' + h``: kept where x' = x), lacc / zacc rows all equal (products with a ones matrix).
    A warp whose max is DEAD saw no token of the range and is left out. The normalisation is one reciprocal
    per column (a division per element was ~400 of the epilogue's ~1,100 instructions), and each thread
    stores its 4 contiguous channels of a column at once (16 bytes) from the accumulator's own registers."""
    m_all = gl.max(m_i, axis=0)  # [8]
    sc = gl.where(m_i > DEAD / 2, gl.exp2(m_i - m_all[None, :]), 0.0)  # [W, 8]
    l_all = gl.sum(gl.max(lacc, axis=1) * sc, axis=0)  # [8]
    inv = gl.where(l_all > 0, 1.0 / gl.where(l_all > 0, l_all, 1.0), 0.0)
    f = gl.convert_layout(_dup_batch((sc * inv[None, :])[:, None, :], NP), MMA)  # [W NP, 1, 8]
    zrow = gl.max(zacc, axis=1)[:, None, :]
    o = acc * (f * out_scale) + zrow * f
    o = gl.sum(o.reshape([NP, W, 64, 8]), axis=1)  # [NP, 64, 8]
    OL: gl.constexpr = out_layout(W, NP)
    o = gl.convert_layout(o.reshape([NP, 2, 4, 8, 8]).permute((0, 1, 4, 3, 2)), OL)  # [NP, x, n, q, r]
    x = _arange5(2, 1, OL)
    n = _arange5(8, 2, OL)
    h = n % 4
    c = 64 * _arange5(NP, 0, OL) + 32 * x + 4 * _arange5(8, 3, OL) + _arange5(4, 4, OL)
    gl.store(OP + ((pid_bh * GROUPS + h) * n_rows + pid_s) * D + c, o, mask=(n // 4 == x) & (h < GROUPS))
    LL: gl.constexpr = gl.BlockedLayout([1], [32], [W], [0])
    nl = gl.arange(0, 8, LL)
    l_o = gl.convert_layout(l_all, LL)
    m_o = gl.convert_layout(m_all, LL)
    lse = gl.where(l_o > 0, m_o + gl.log2(gl.where(l_o > 0, l_o, 1.0)), float("-inf"))
    gl.store(LP + (pid_bh * GROUPS + nl) * n_rows + pid_s, lse, mask=nl < GROUPS)


@gluon.jit(do_not_specialize=["T_r"])
def _swap_split_kernel(Q, KW, KS, KZ, VW, VSZ, KR, VR, OP, LP, sm_scale_log2,
                       T_q, T_r, ups, skw_bh, sks_bh, svsz_bh, t_pad, skr_bh, svr_bh,
                       GROUPS: gl.constexpr, D: gl.constexpr, BITS: gl.constexpr, STAGED: gl.constexpr,
                       LATE: gl.constexpr = True, PDL: gl.constexpr = False, PDL_TRIGGER: gl.constexpr = 1,
                       SMG: gl.constexpr = 4, ZLAST: gl.constexpr = False,
                       EVEN: gl.constexpr = False, FASTCOPY: gl.constexpr = False):
    """``PDL``: launched as a programmatic dependent launch (pdl.py): the first unit's copy (codes and scales,
    written at earlier steps) starts before ``griddepcontrol.wait``; everything the kernels just before may
    write (q, the residual, the partials) is read or written after it. ``PDL_TRIGGER``: the next launch (the
    combine) may start once every program has reached its start (0), the end of its loop (1) or its exit (2).
    ``ups``: units per program; ``EVEN``: program s takes units ``[s n // (n_rows - 1), (s + 1) n // (n_rows - 1))``
    of the ``n`` instead (the plans of swap_plan.py). ``FASTCOPY``: one-warp programs copy from per-unit base
    pointers (gluon_swap_stage.py; the 2-bit default: the 4-bit build then spills unless ``maxnreg`` is set)."""
    W: gl.constexpr = gl.num_warps()
    G: gl.constexpr = 32
    S: gl.constexpr = 16 // BITS
    NGV: gl.constexpr = D // G
    NP: gl.constexpr = D // 64
    MMA: gl.constexpr = mma_layout(W)
    A_L: gl.constexpr = op_layout(W, 0)
    B_L: gl.constexpr = op_layout(W, 1)
    pid_bh = gl.program_id(0)
    pid_s = gl.program_id(1)
    n_rows = gl.num_programs(1)
    if PDL and PDL_TRIGGER == 0:
        gl_gdc_launch_dependents()
    ones = gl.full([W, 16, 16], 1.0, gl.float16, A_L)
    m_i = gl.full([W, 8], DEAD, gl.float32, gl.SliceLayout(1, MMA))
    acc = gl.zeros([W * NP, 64, 8], gl.float32, MMA)
    lacc = gl.zeros([W, 16, 8], gl.float32, MMA)
    zacc = gl.zeros([W * NP, 16, 8], gl.float32, MMA)
    if pid_s < n_rows - 1:
        TILE: gl.constexpr = S * G
        if EVEN:  # the units spread evenly over the splits (ups or ups - 1 each)
            u_lo = (pid_s * (2 * ((T_q + TILE - 1) // TILE))) // (n_rows - 1)
            u_hi = ((pid_s + 1) * (2 * ((T_q + TILE - 1) // TILE))) // (n_rows - 1)
        else:
            u_lo = pid_s * ups  # units of 16 slots (2 per tile)
            u_hi = gl.minimum(u_lo + ups, 2 * ((T_q + TILE - 1) // TILE))
        n_it = (u_hi - u_lo + W - 1) // W
        kw_base = pid_bh * skw_bh
        ks_base = pid_bh * sks_bh
        vsz_base = pid_bh * svsz_bh
        if STAGED:  # two buffer sets: unit it + 1 copies in while unit it is computed
            WL: gl.constexpr = gl.SwizzledSharedLayout(8, 1, 8, [1, 0])  # 16-byte chunks XOR row: no conflicts
            SL: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
            kw_s = gl.allocate_shared_memory(gl.int16, [2, W * 16, D], WL)
            vw_s = gl.allocate_shared_memory(gl.int16, [2, W * 16, D], WL)
            kz_s = gl.allocate_shared_memory(gl.float16, [2, S * W, D], WL)
            ks_s = gl.allocate_shared_memory(gl.float16, [2, S * W, D], SL)
            vs_s = gl.allocate_shared_memory(gl.float16, [2, S * W, NGV * 32], SL)
            _stage_unit(kw_s.index(0), vw_s.index(0), kz_s.index(0), ks_s.index(0), vs_s.index(0), KW, KZ, KS, VW,
                        VSZ, kw_base, ks_base, vsz_base, t_pad, u_lo, 0, u_hi, n_it > 0, D, NGV, W, G, S, FASTCOPY)
        if PDL:  # q is written by the kernels before this one
            gl_gdc_wait()
        qb, qa = _load_q(Q, pid_bh, GROUPS, D, W)
        qs = gl.convert_layout(_chan_perm_cols((qb.to(gl.float32) * sm_scale_log2).to(gl.float16), D), B_L)
        qz = gl.convert_layout(_chan_perm_rows((qa.to(gl.float32) * sm_scale_log2).to(gl.float16), D), A_L)
        for it in range(0, n_it):
            if STAGED:
                st = it % 2
                if LATE:  # wait for unit it, then start unit it + 1's copy
                    async_copy.wait_group(0)
                    gl.thread_barrier()  # unit it visible to every lane; every read of unit it - 1's set is done
                    _stage_unit(kw_s.index(1 - st), vw_s.index(1 - st), kz_s.index(1 - st), ks_s.index(1 - st),
                                vs_s.index(1 - st), KW, KZ, KS, VW, VSZ, kw_base, ks_base, vsz_base, t_pad, u_lo,
                                it + 1, u_hi, it + 1 < n_it, D, NGV, W, G, S, FASTCOPY)
                else:  # start unit it + 1's copy, then wait for unit it
                    gl.thread_barrier()  # every read of the other buffer set (unit it - 1) is done
                    _stage_unit(kw_s.index(1 - st), vw_s.index(1 - st), kz_s.index(1 - st), ks_s.index(1 - st),
                                vs_s.index(1 - st), KW, KZ, KS, VW, VSZ, kw_base, ks_base, vsz_base, t_pad, u_lo,
                                it + 1, u_hi, it + 1 < n_it, D, NGV, W, G, S, FASTCOPY)
                    async_copy.wait_group(1)
                    gl.thread_barrier()
                kw, vw = _words_smem(kw_s.index(st), vw_s.index(st), D, NP, W, A_L)
                kzb = _kz_smem(kz_s.index(st), D, W, S, B_L)
                ks_smem = ks_s.index(st)
                vs_smem = vs_s.index(st)
            else:
                kw = _load_keys(KW, kw_base, u_lo, it, u_hi, 1 << 30, D, W, G, A_L, 2)
                vw = _load_vals(VW, kw_base, u_lo, it, u_hi, 1 << 30, D, NP, W, G, A_L, 2)
                kzb = _kz_global(KZ, ks_base, u_lo, it, u_hi, D, W, S, B_L)
                ks_smem = 0
                vs_smem = 0
            # fields from bit 10 up are read from the words shifted once; shifted where first needed (fewer
            # live registers: the unshifted words die after their last low field)
            kw_hi = kw
            vw_hi = vw
            zb = _zero_terms(qz, kzb, u_lo, it, u_hi, T_q, W, G, S, MMA, B_L)
            for J0 in gl.static_range(0, S, SMG):
                if J0 + SMG > 10 // BITS and J0 <= 10 // BITS:
                    kw_hi = _shr(kw, BITS)
                    vw_hi = _shr(vw, BITS)
                s0, s1, s2, s3 = _scores4(kw, kw_hi, qs, zb, KS, ks_base, u_lo, it, u_hi, ks_smem, J0, D, W, S, BITS,
                                          MMA, A_L, B_L, STAGED, ZLAST)
                smax = gl.maximum(gl.maximum(s0, s1), gl.maximum(s2, s3))
                if SMG == 8:
                    s4, s5, s6, s7 = _scores4(kw, kw_hi, qs, zb, KS, ks_base, u_lo, it, u_hi, ks_smem, J0 + 4, D, W, S,
                                              BITS, MMA, A_L, B_L, STAGED, ZLAST)
                    smax = gl.maximum(smax, gl.maximum(gl.maximum(s4, s5), gl.maximum(s6, s7)))
                m_i, acc, lacc, zacc = _rescale(gl.max(smax, axis=1), m_i, acc, lacc, zacc, NP, MMA)
                mm = m_i[:, None, :]
                acc, lacc, zacc = _values4(s0, s1, s2, s3, mm, vw, vw_hi, acc, lacc, zacc, ones, VSZ, vsz_base, t_pad,
                                           u_lo, it, u_hi, vs_smem, J0, NGV, NP, W, G, S, BITS, MMA, B_L, STAGED)
                if SMG == 8:
                    acc, lacc, zacc = _values4(s4, s5, s6, s7, mm, vw, vw_hi, acc, lacc, zacc, ones, VSZ, vsz_base,
                                               t_pad, u_lo, it, u_hi, vs_smem, J0 + 4, NGV, NP, W, G, S, BITS, MMA, B_L,
                                               STAGED)
        if PDL and PDL_TRIGGER == 1:
            gl_gdc_launch_dependents()
        _epilogue(OP, LP, pid_bh, pid_s, n_rows, m_i, acc, lacc, zacc, 2.0 ** (24 - VEXP), GROUPS, D, NP, W, MMA)
    else:
        # the full-precision residual, 16 tokens per warp and step: the same products in the model dtype
        if PDL:  # q and the residual are written by the kernels before this one
            gl_gdc_wait()
        qb, qa = _load_q(Q, pid_bh, GROUPS, D, W)
        dt = qb.dtype
        qr = gl.convert_layout(_chan_perm_cols(qb, D), B_L)
        onesr = ones.to(dt)
        u_hi = (T_r + 15) // 16
        for it in range(0, (u_hi + W - 1) // W):
            # a 16-token chunk is a "tile" of 16 rows and one unit
            kr = _load_keys(KR, pid_bh * skr_bh, 0, it, u_hi, T_r, D, W, 16, A_L, 1)
            vr = _load_vals(VR, pid_bh * svr_bh, 0, it, u_hi, T_r, D, NP, W, 16, A_L, 1)
            s = mma_v2(kr, qr, gl.zeros([W, 16, 8], gl.float32, MMA)) * sm_scale_log2
            tok = (it * W + _arange3(W, 0, MMA)) * 16 + _sigma(_arange3(16, 1, MMA))
            s = gl.where(tok < T_r, s, DEAD)
            m_new = gl.maximum(m_i, gl.max(s, axis=1))
            alpha = gl.exp2(m_i - m_new)[:, None, :]
            lacc = lacc * alpha
            acc = acc * gl.convert_layout(_dup_batch(alpha, NP), MMA)
            m_i = m_new
            pb = _transpose_p(gl.exp2(s - m_new[:, None, :]).to(dt), B_L)
            lacc = mma_v2(onesr, pb, lacc)
            acc = mma_v2(vr, gl.convert_layout(_dup_batch(pb, NP), B_L), acc)
        if PDL and PDL_TRIGGER == 1:
            gl_gdc_launch_dependents()
        _epilogue(OP, LP, pid_bh, pid_s, n_rows, m_i, acc, lacc, zacc, 1.0, GROUPS, D, NP, W, MMA)
