"""Register and shared-memory layouts of the Gluon operand-swap decode kernel (gluon_kivi_swap.py), and the
relabellings (reshape/permute: no data moves) from the order in which a thread loads memory to the order the
matrix products index.

Notation: ``W`` warps per program, ``D`` head channels, ``NP = D / 64`` pairs of value channel groups, ``S`` key
groups per planes tile. A layout here is a linear map from (register, lane, warp) bits to tensor indices
(``gl.DistributedLinearLayout``), written so that each thread's registers cover contiguous memory.

- Keys: physical channel ``c = (D/4) i + 4 s + 2 t + e`` is the products' K index ``16 s + 8 t + 2 i + e``
  (i = lane % 4): each thread reads D/4 contiguous channels of a row (16-byte loads), and both operands of
  the key product (codes and ``q * scale``) use the same order.
- Token slots of a unit: slot ``4 i + 2 t + e`` is product index ``8 t + 2 i + e`` (M of the key product,
  K of the value product): a thread's 4 slots are contiguous (the value scales: one 16-byte load).
- Values: row ``m = 32 x + 8 r + q`` of the value product is channel ``32 x + 4 q + r`` of a pair of channel
  groups (x: the group within the pair), so a thread reads 4 contiguous channels per group (8-byte loads).
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl


@gluon.constexpr_function
def _log2(n):
    return n.bit_length() - 1


@gluon.constexpr_function
def mma_layout(W):
    return gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[W, 1, 1], instr_shape=[1, 16, 8])


@gluon.constexpr_function
def op_layout(W, idx):
    return gl.DotOperandLayout(idx, mma_layout(W), 2)


@gluon.constexpr_function
def _warps(W):
    return [[1 << b, 0, 0] for b in range(_log2(W))]


@gluon.constexpr_function
def keys_phys(W, D):
    """[W, 16 rows, D physical channels]: thread (lane l) holds rows l//4 and l//4 + 8, channels
    (D/4)(l%4) + [0, D/4) (contiguous: 16-byte loads)."""
    regs = [[0, 0, 1 << b] for b in range(_log2(D // 4))] + [[0, 8, 0]]
    lanes = [[0, 0, D // 4], [0, 0, D // 2], [0, 1, 0], [0, 2, 0], [0, 4, 0]]
    return gl.DistributedLinearLayout(regs, lanes, _warps(W), [], [W, 16, D])


@gluon.constexpr_function
def bop_phys(W, D, N):
    """[W, D physical channels, N columns]: the B operand's threads, channels as in keys_phys."""
    regs = [[0, 1 << b, 0] for b in range(_log2(D // 4))] + [[0, 0, 8 << b] for b in range(_log2(N // 8))]
    lanes = [[0, D // 4, 0], [0, D // 2, 0], [0, 0, 1], [0, 0, 2], [0, 0, 4]]
    return gl.DistributedLinearLayout(regs, lanes, _warps(W), [], [W, D, N])


@gluon.constexpr_function
def vals_phys(W, NP):
    """[W NP, 16 token slots, 64 channels of a pair of channel groups]: thread l holds slots 4(l%4) + [0, 4),
    channels 32 x + 4 (l//4) + [0, 4) for x = 0, 1 (8-byte loads). Batch b = pair * W + warp."""
    regs = [[0, 0, 1], [0, 0, 2], [0, 1, 0], [0, 2, 0], [0, 0, 32]] + [[W << b, 0, 0] for b in range(_log2(NP))]
    lanes = [[0, 4, 0], [0, 8, 0], [0, 0, 4], [0, 0, 8], [0, 0, 16]]
    return gl.DistributedLinearLayout(regs, lanes, _warps(W), [], [W * NP, 16, 64])


@gluon.constexpr_function
def sz_phys(W, R, N):
    """[W R, 4 slot quads, N, 8 = 4 slots x (scale, zero)]: thread l holds quad l%4 (16 contiguous bytes) of
    column l//4 (and + 8 for N = 16)."""
    regs = [[0, 0, 0, 1], [0, 0, 0, 2], [0, 0, 0, 4]] + [[0, 0, 8 << b, 0] for b in range(_log2(N // 8))] + [
        [W << b, 0, 0, 0] for b in range(_log2(R))]
    lanes = [[0, 1, 0, 0], [0, 2, 0, 0], [0, 0, 1, 0], [0, 0, 2, 0], [0, 0, 4, 0]]
    warps = [[1 << b, 0, 0, 0] for b in range(_log2(W))]
    return gl.DistributedLinearLayout(regs, lanes, warps, [], [W * R, 4, N, 8])


@gluon.constexpr_function
def copy_layout(W, R, E):
    """[R, E] fp16 rows copied to shared memory 16 bytes per thread by W warps."""
    te = min(32, E // 8)
    return gl.BlockedLayout([1, 8], [32 // te, te], [W, 1], [1, 0])


@gluon.constexpr_function
def sz_smem_layout(W, NP):
    """[W, NGV 32]: a group's (scale, zero) pairs read from shared memory, element ``32 (2 pair + x) + 8 i + e``
    held where sz_phys wants it, replicated over the lanes of the 4 heads (lanes 2 and 3)."""
    regs = [[0, 1], [0, 2], [0, 4]] + [[0, 64 << b] for b in range(_log2(NP))]
    lanes = [[0, 8], [0, 16], [0, 0], [0, 0], [0, 32]]
    return gl.DistributedLinearLayout(regs, lanes, _warps2(W), [], [W, NP * 64])


@gluon.constexpr_function
def _warps2(W):
    return [[1 << b, 0] for b in range(_log2(W))]


@gluon.constexpr_function
def sz6_layout(W, NP):
    """[W, NP, 2 (x), 4 (h), 4 slot quads, 8]: sz_smem_layout with the heads as a dimension."""
    regs = [[0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 2], [0, 0, 0, 0, 0, 4]] + [
        [0, 1 << b, 0, 0, 0, 0] for b in range(_log2(NP))]
    lanes = [[0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 2, 0], [0, 0, 0, 1, 0, 0], [0, 0, 0, 2, 0, 0], [0, 0, 1, 0, 0, 0]]
    warps = [[1 << b, 0, 0, 0, 0, 0] for b in range(_log2(W))]
    return gl.DistributedLinearLayout(regs, lanes, warps, [], [W, NP, 2, 4, 4, 8])


@gluon.constexpr_function
def out_layout(W, NP):
    """[NP, 2 (x), 8 (column n), 8 (q), 4 (r)]: the value accumulator (mma_layout, rows m = 32 x + 8 r + q) with
    its registers reordered so that a thread's 4 channels ``32 x + 4 q + r`` of a column are its first 4
    registers (16-byte stores); the same threads hold the same elements (no data moves). Warps: replicated
    (the warps' states are summed before)."""
    regs = [[0, 0, 0, 0, 1], [0, 0, 0, 0, 2], [0, 0, 1, 0, 0], [0, 1, 0, 0, 0]] + [
        [1 << b, 0, 0, 0, 0] for b in range(_log2(NP))]
    lanes = [[0, 0, 2, 0, 0], [0, 0, 4, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 2, 0], [0, 0, 0, 4, 0]]
    return gl.DistributedLinearLayout(regs, lanes, [[0, 0, 0, 0, 0]] * _log2(W), [], [NP, 2, 8, 8, 4])


@gluon.constexpr_function
def keys_smem_layout(W, D):
    """[W 16 rows (warp, physical slot), D]: keys_phys over shared memory, rows still in slot order (the
    relabelling to product rows follows)."""
    regs = [[0, 1 << b] for b in range(_log2(D // 4))] + [[2, 0]]
    lanes = [[0, D // 4], [0, D // 2], [1, 0], [4, 0], [8, 0]]
    return gl.DistributedLinearLayout(regs, lanes, [[16 << b, 0] for b in range(_log2(W))], [], [W * 16, D])


@gluon.constexpr_function
def vals_smem_layout(W, NP):
    """[W 16 rows, NP 64]: vals_phys over shared memory."""
    regs = [[0, 1], [0, 2], [1, 0], [2, 0], [0, 32]] + [[0, 64 << b] for b in range(_log2(NP))]
    lanes = [[4, 0], [8, 0], [0, 4], [0, 8], [0, 16]]
    return gl.DistributedLinearLayout(regs, lanes, [[16 << b, 0] for b in range(_log2(W))], [], [W * 16, NP * 64])


@gluon.constexpr_function
def kz_smem_layout(W, D, S):
    """[S W rows (group j, warp w), D]: the zero points as bop_phys(W, D, 16) wants them (columns g % S)."""
    regs = [[0, 1 << b] for b in range(_log2(D // 4))]
    lanes = [[0, D // 4], [0, D // 2]] + [[W << b, 0] if (1 << b) < S else [0, 0] for b in range(3)]
    return gl.DistributedLinearLayout(regs, lanes, _warps2(W), [], [S * W, D])


@gluon.jit
def _chan_perm_rows(x, D: gl.constexpr):
    """[B, R, D physical] -> [B, R, D logical] (k = 16 s + 8 t + 2 i + e for c = (D/4) i + 4 s + 2 t + e)."""
    B: gl.constexpr = x.shape[0]
    R: gl.constexpr = x.shape[1]
    return x.reshape([B, R, 4, D // 16, 2, 2]).permute((0, 1, 3, 4, 2, 5)).reshape([B, R, D])


@gluon.jit
def _chan_perm_cols(x, D: gl.constexpr):
    """[B, D physical, N] -> [B, D logical, N]."""
    B: gl.constexpr = x.shape[0]
    N: gl.constexpr = x.shape[2]
    return x.reshape([B, 4, D // 16, 2, 2, N]).permute((0, 2, 3, 1, 4, 5)).reshape([B, D, N])


@gluon.jit
def _slot_perm(x):
    """[B, 16 slots, N] -> [B, 16 product index, N]: slot 4 i + 2 t + e is index 8 t + 2 i + e."""
    B: gl.constexpr = x.shape[0]
    N: gl.constexpr = x.shape[2]
    return x.reshape([B, 2, 2, 2, 2, N]).permute((0, 3, 1, 2, 4, 5)).reshape([B, 16, N])


@gluon.jit
def _sigma(r):
    """Token slot of product index r (0..15): the inverse of _slot_perm's relabelling."""
    return (r % 2) + 4 * ((r // 2) % 4) + 2 * (r // 8)


@gluon.jit
def _arange3(n: gl.constexpr, dim: gl.constexpr, layout: gl.constexpr):
    """arange(n) along dimension ``dim`` of a rank-3 ``layout``, expanded to rank 3."""
    if dim == 0:
        return gl.arange(0, n, gl.SliceLayout(1, gl.SliceLayout(2, layout)))[:, None, None]
    elif dim == 1:
        return gl.arange(0, n, gl.SliceLayout(0, gl.SliceLayout(2, layout)))[None, :, None]
    else:
        return gl.arange(0, n, gl.SliceLayout(0, gl.SliceLayout(1, layout)))[None, None, :]


@gluon.jit
def _arange4(n: gl.constexpr, dim: gl.constexpr, layout: gl.constexpr):
    if dim == 0:
        return gl.arange(0, n, gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, layout))))[:, None, None, None]
    elif dim == 1:
        return gl.arange(0, n, gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, layout))))[None, :, None, None]
    elif dim == 2:
        return gl.arange(0, n, gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, layout))))[None, None, :, None]
    else:
        return gl.arange(0, n, gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, layout))))[None, None, None, :]


@gluon.jit
def _arange5(n: gl.constexpr, dim: gl.constexpr, layout: gl.constexpr):
    """arange(n) along dimension ``dim`` of a rank-5 ``layout``, expanded to rank 5."""
    if dim == 0:
        L: gl.constexpr = gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, gl.SliceLayout(4, layout))))
        return gl.arange(0, n, L)[:, None, None, None, None]
    elif dim == 1:
        L: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, gl.SliceLayout(4, layout))))
        return gl.arange(0, n, L)[None, :, None, None, None]
    elif dim == 2:
        L: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, gl.SliceLayout(4, layout))))
        return gl.arange(0, n, L)[None, None, :, None, None]
    elif dim == 3:
        L: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(4, layout))))
        return gl.arange(0, n, L)[None, None, None, :, None]
    else:
        L: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, layout))))
        return gl.arange(0, n, L)[None, None, None, None, :]


@gluon.jit
def _dup_batch(x, NP: gl.constexpr):
    """[W, ...] -> [NP W, ...]: the same tensor for every pair (batch b = pair * W + warp)."""
    W: gl.constexpr = x.shape[0]
    K: gl.constexpr = x.shape[1]
    N: gl.constexpr = x.shape[2]
    y = x
    if NP >= 2:
        y = gl.join(y, y).permute((3, 0, 1, 2)).reshape([2 * W, K, N])
    if NP == 4:
        y = gl.join(y, y).permute((3, 0, 1, 2)).reshape([4 * W, K, N])
    return y


@gluon.jit
def _vals_relabel(x, W: gl.constexpr, NP: gl.constexpr, A_L: gl.constexpr):
    """[W NP, 16 slots, 64 channels] (vals_phys) -> the A operand [W NP, 64 rows m, 16]: m = 32 x + 8 r + q for
    channel 32 x + 4 q + r, product index 8 t + 2 i + e for slot 4 i + 2 t + e."""
    x = x.reshape([W * NP, 2, 2, 2, 2, 2, 8, 4]).permute((0, 5, 7, 6, 3, 1, 2, 4)).reshape([W * NP, 64, 16])
    return gl.convert_layout(x, A_L)
