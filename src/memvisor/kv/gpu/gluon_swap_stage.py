"""How the Gluon swap decode kernel (gluon_kivi_swap.py) moves a unit's bytes: the staged path copies each warp's
next unit (code words, key zero points and scales, value scale/zero pairs) into shared memory with ``cp.async``
and reads it back in the matrix products' operand layouts; the unstaged path loads the same operands from global
memory. Notation as in gluon_kivi_swap.py: ``W`` warps, ``D`` head channels, ``S`` key groups of ``G`` tokens per
tile, ``NP`` pairs and ``NGV`` value channel groups; a unit is 16 token slots (2 per tile); the layouts are in
gluon_swap_layouts.py.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy

from memvisor.kv.gpu.gluon_swap_layouts import (
    _arange3,
    _arange4,
    _chan_perm_cols,
    _chan_perm_rows,
    _sigma,
    _slot_perm,
    _vals_relabel,
    bop_phys,
    copy_layout,
    keys_phys,
    keys_smem_layout,
    kz_smem_layout,
    sz6_layout,
    sz_phys,
    sz_smem_layout,
    vals_phys,
    vals_smem_layout,
)


@gluon.jit
def _unit(u, u_hi, HALVES: gl.constexpr = 2):
    """Tile and half (16-slot unit) of unit ``u``, clamped into the range (a unit past it is read, then masked)."""
    uc = gl.minimum(u, u_hi - 1)
    return uc // HALVES, uc % HALVES


@gluon.jit
def _load_vals(VW, base, u_lo, it, u_hi, limit, D: gl.constexpr, NP: gl.constexpr, W: gl.constexpr,
               G: gl.constexpr, A_L: gl.constexpr, HALVES: gl.constexpr):
    """Value rows of each warp's unit as the A operand ``[W NP, 64 channels, 16 slots]`` (words or residual)."""
    VP: gl.constexpr = vals_phys(W, NP)
    b = _arange3(W * NP, 0, VP)
    tile, half = _unit(u_lo + it * W + b % W, u_hi, HALVES)
    row = tile * G + 16 * half + _arange3(16, 1, VP)
    ch = _arange3(64, 2, VP)
    x = gl.load(VW + base + row * D + 64 * (b // W) + ch, mask=(row < limit) & (ch < 64), other=0)
    return _vals_relabel(x, W, NP, A_L)


@gluon.jit
def _load_keys(KW, base, u_lo, it, u_hi, limit, D: gl.constexpr, W: gl.constexpr, G: gl.constexpr,
               A_L: gl.constexpr, HALVES: gl.constexpr):
    """Key rows of each warp's unit as the A operand ``[W, 16 slots, D]`` (words or residual)."""
    KP: gl.constexpr = keys_phys(W, D)
    tile, half = _unit(u_lo + it * W + _arange3(W, 0, KP), u_hi, HALVES)
    row = tile * G + 16 * half + _sigma(_arange3(16, 1, KP))
    c = _arange3(D, 2, KP)
    x = gl.load(KW + base + row * D + c, mask=(row < limit) & (c < D), other=0)
    return gl.convert_layout(_chan_perm_rows(x, D), A_L)


@gluon.jit
def _bop_rows(PTR, row, D: gl.constexpr, W: gl.constexpr, B_L: gl.constexpr):
    """fp16 row ``row[w]`` of ``[*, D]`` broadcast over the 8 columns: the B operand ``[W, D, 8]``."""
    BP: gl.constexpr = bop_phys(W, D, 8)
    x = gl.load(PTR + row * D + _arange3(D, 1, BP) + 0 * _arange3(8, 2, BP))  # lanes of the 8 columns: one address
    return gl.convert_layout(_chan_perm_cols(x, D), B_L)


@gluon.jit
def _scales(VSZ, base, t_pad, j, NGV: gl.constexpr, NP: gl.constexpr, W: gl.constexpr,
            G: gl.constexpr, S: gl.constexpr, u_lo, it, u_hi, B_L: gl.constexpr):
    """Value (scale, zero) of group j's 16 slots as B-operand factors ``[W NP, 16, 8]``: column ``4 x + h``
    of batch ``pair W + w`` holds channel group ``2 pair + x``."""
    SZ: gl.constexpr = sz_phys(W, NP, 8)
    b = _arange4(W * NP, 0, SZ)
    tile, half = _unit(u_lo + it * W + b % W, u_hi)
    n = _arange4(8, 2, SZ)
    cg = gl.minimum(2 * (b // W) + n // 4, NGV - 1)
    tok = tile * (S * G) + j * G + 16 * half + 4 * _arange4(4, 1, SZ)
    x = gl.load(VSZ + base + cg * (2 * t_pad) + 2 * tok + _arange4(8, 3, SZ))
    vs, vz = gl.split(x.reshape([W * NP, 4, 8, 4, 2]))
    vs = _slot_perm(vs.permute((0, 1, 3, 2)).reshape([W * NP, 16, 8]))
    vz = _slot_perm(vz.permute((0, 1, 3, 2)).reshape([W * NP, 16, 8]))
    return gl.convert_layout(vs, B_L), gl.convert_layout(vz, B_L)


@gluon.jit
def _ks_smem(ks_smem, J: gl.constexpr, D: gl.constexpr, W: gl.constexpr, B_L: gl.constexpr):
    """Group J's key scales from shared memory as the B operand ``[W, D, 8]`` (broadcast over columns)."""
    BP: gl.constexpr = bop_phys(W, D, 8)
    x, _ = gl.broadcast(ks_smem.slice(J * W, W).load(gl.SliceLayout(2, BP))[:, :, None],
                        gl.zeros([W, D, 8], gl.float16, BP))
    return gl.convert_layout(_chan_perm_cols(x, D), B_L)


@gluon.jit
def _scales_smem(vs_smem, J: gl.constexpr, NP: gl.constexpr, W: gl.constexpr, B_L: gl.constexpr):
    """Group J's value (scale, zero) factors from shared memory, as :func:`_scales` gives them."""
    L6: gl.constexpr = sz6_layout(W, NP)
    y = vs_smem.slice(J * W, W).load(sz_smem_layout(W, NP)).reshape([W, NP, 2, 4, 8])
    y, _ = gl.broadcast(gl.convert_layout(y, gl.SliceLayout(3, L6))[:, :, :, None, :, :],
                        gl.zeros([W, NP, 2, 4, 4, 8], gl.float16, L6))
    x = y.permute((1, 0, 4, 2, 3, 5)).reshape([NP * W, 4, 8, 8])
    vs, vz = gl.split(x.reshape([W * NP, 4, 8, 4, 2]))
    vs = _slot_perm(vs.permute((0, 1, 3, 2)).reshape([W * NP, 16, 8]))
    vz = _slot_perm(vz.permute((0, 1, 3, 2)).reshape([W * NP, 16, 8]))
    return gl.convert_layout(vs, B_L), gl.convert_layout(vz, B_L)


@gluon.jit
def _stage_unit1(kw_b, vw_b, kz_b, ks_b, vs_b, KW, KZ, KS, VW, VSZ, kw_base, ks_base, vsz_base, t_pad, uc, n,
                 D: gl.constexpr, NGV: gl.constexpr, G: gl.constexpr, S: gl.constexpr):
    """:func:`_stage_unit` for one-warp programs: unit ``uc`` (16 slots: rows ``16 uc ..`` of the words, its tile
    ``uc // 2``'s scale rows), copied when ``n`` is 1. The unit's offset goes into the scalar base pointers, so each
    thread's addresses are one base plus constants (no per-copy index arithmetic)."""
    CW: gl.constexpr = copy_layout(1, 16, D)
    r = gl.arange(0, 16, gl.SliceLayout(1, CW))[:, None]
    off = r * D + gl.arange(0, D, gl.SliceLayout(0, CW))[None, :]
    live = (gl.zeros([16, D], gl.int32, CW) + n) > 0
    async_copy.async_copy_global_to_shared(kw_b, (KW + (kw_base + uc * (16 * D))) + off, mask=live)
    async_copy.async_copy_global_to_shared(vw_b, (VW + (kw_base + uc * (16 * D))) + off, mask=live)
    tile = uc // 2
    CK: gl.constexpr = copy_layout(1, S, D)
    off = gl.arange(0, S, gl.SliceLayout(1, CK))[:, None] * D + gl.arange(0, D, gl.SliceLayout(0, CK))[None, :]
    live = (gl.zeros([S, D], gl.int32, CK) + n) > 0
    async_copy.async_copy_global_to_shared(kz_b, (KZ + (ks_base + tile * (S * D))) + off, mask=live)
    async_copy.async_copy_global_to_shared(ks_b, (KS + (ks_base + tile * (S * D))) + off, mask=live)
    CV: gl.constexpr = copy_layout(1, S, NGV * 32)
    e = gl.arange(0, NGV * 32, gl.SliceLayout(0, CV))[None, :]
    off = gl.arange(0, S, gl.SliceLayout(1, CV))[:, None] * (2 * G) + (e // 32) * (2 * t_pad) + e % 32
    live = (gl.zeros([S, NGV * 32], gl.int32, CV) + n) > 0
    async_copy.async_copy_global_to_shared(vs_b, (VSZ + (vsz_base + 2 * (tile * (S * G) + 16 * (uc % 2)))) + off,
                                           mask=live)
    async_copy.commit_group()


@gluon.jit
def _stage_unit(kw_b, vw_b, kz_b, ks_b, vs_b, KW, KZ, KS, VW, VSZ, kw_base, ks_base, vsz_base, t_pad,
                u_lo, it, u_hi, live, D: gl.constexpr, NGV: gl.constexpr, W: gl.constexpr, G: gl.constexpr,
                S: gl.constexpr, FAST: gl.constexpr):
    """Start copying everything each warp's unit ``u_lo + it W + w`` reads into one buffer set (one asynchronous
    group; nothing is copied when ``live`` is false): code words (row ``16 w + slot``), and per group j (row
    ``j W + w``) key zero points, key scales and value (scale, zero) pairs."""
    n = gl.where(live, 1, 0)
    if W == 1 and FAST:
        _stage_unit1(kw_b, vw_b, kz_b, ks_b, vs_b, KW, KZ, KS, VW, VSZ, kw_base, ks_base, vsz_base, t_pad,
                     gl.minimum(u_lo + it, u_hi - 1), n, D, NGV, G, S)
        return
    CW: gl.constexpr = copy_layout(W, W * 16, D)
    r = gl.arange(0, W * 16, gl.SliceLayout(1, CW))[:, None]
    c = gl.arange(0, D, gl.SliceLayout(0, CW))[None, :]
    tile, half = _unit(u_lo + it * W + r // 16, u_hi)
    off = kw_base + (tile * G + 16 * half + r % 16) * D + c
    async_copy.async_copy_global_to_shared(kw_b, KW + off, mask=r < n * (W * 16))
    async_copy.async_copy_global_to_shared(vw_b, VW + off, mask=r < n * (W * 16))
    CK: gl.constexpr = copy_layout(W, S * W, D)
    r = gl.arange(0, S * W, gl.SliceLayout(1, CK))[:, None]
    c = gl.arange(0, D, gl.SliceLayout(0, CK))[None, :]
    tile, half = _unit(u_lo + it * W + r % W, u_hi)
    off = ks_base + (tile * S + r // W) * D + c
    async_copy.async_copy_global_to_shared(kz_b, KZ + off, mask=r < n * (S * W))
    async_copy.async_copy_global_to_shared(ks_b, KS + off, mask=r < n * (S * W))
    CV: gl.constexpr = copy_layout(W, S * W, NGV * 32)
    r = gl.arange(0, S * W, gl.SliceLayout(1, CV))[:, None]
    tile, half = _unit(u_lo + it * W + r % W, u_hi)
    e = gl.arange(0, NGV * 32, gl.SliceLayout(0, CV))[None, :]
    tok = tile * (S * G) + (r // W) * G + 16 * half
    async_copy.async_copy_global_to_shared(vs_b, VSZ + vsz_base + (e // 32) * (2 * t_pad) + 2 * tok + e % 32,
                                           mask=r < n * (S * W))
    async_copy.commit_group()


@gluon.jit
def _words_smem(kw_b, vw_b, D: gl.constexpr, NP: gl.constexpr, W: gl.constexpr, A_L: gl.constexpr):
    """The staged code words as the keys' ``[W, 16, D]`` and the values' ``[W NP, 64, 16]`` A operands."""
    k = kw_b.load(keys_smem_layout(W, D))
    k = k.reshape([W, 2, 2, 2, 2, D]).permute((0, 3, 1, 2, 4, 5)).reshape([W, 16, D])  # rows: product order
    v = vw_b.load(vals_smem_layout(W, NP)).reshape([W, 16, NP, 64]).permute((2, 0, 1, 3)).reshape([NP * W, 16, 64])
    return gl.convert_layout(_chan_perm_rows(k, D), A_L), _vals_relabel(v, W, NP, A_L)


@gluon.jit
def _kz_smem(kz_b, D: gl.constexpr, W: gl.constexpr, S: gl.constexpr, B_L: gl.constexpr):
    """The staged key zero points as the B operand ``[W, D, 16]`` of :func:`_zero_terms` (column g: group g % S)."""
    x = kz_b.load(kz_smem_layout(W, D, S)).reshape([S, W, D]).permute((1, 2, 0))  # [W, D, S]
    x = gl.join(x, x)
    if S == 4:
        x = gl.join(x, x).permute((0, 1, 4, 3, 2))
    else:
        x = x.permute((0, 1, 3, 2))
    return gl.convert_layout(_chan_perm_cols(x.reshape([W, D, 16]), D), B_L)


@gluon.jit
def _kz_global(KZ, kz_base, u_lo, it, u_hi, D: gl.constexpr, W: gl.constexpr, S: gl.constexpr, B_L: gl.constexpr):
    """The unit's tile's key zero points as the B operand ``[W, D, 16]`` (column g: group g % S)."""
    BP: gl.constexpr = bop_phys(W, D, 16)
    tile, half = _unit(u_lo + it * W + _arange3(W, 0, BP), u_hi)
    kz = gl.load(KZ + kz_base + (tile * S + _arange3(16, 2, BP) % S) * D + _arange3(D, 1, BP))
    return gl.convert_layout(_chan_perm_cols(kz, D), B_L)
