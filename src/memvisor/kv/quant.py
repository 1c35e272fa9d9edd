"""KIVI quantization (Liu et al. 2024): the storage layout the cache and the GPU kernel share.

Asymmetric min-max quantization to ``bits`` in {2, 4}:
``scale = (max - min) / (2**bits - 1)``, ``zero = min``, ``code = round((x - zero) / scale)``,
dequantized ``x = code * scale + zero``. Scales and zero points are fp16.

- **Keys per channel**: for each group of ``G`` consecutive tokens and each channel one (scale, zero):
  keys have outlier channels, so a channel's range is tight along tokens.
  ``k_codes: uint8 [..., ceil(T*bits/8), D]`` packed along the TOKEN axis, ``8/bits`` tokens per
  byte, token ``t`` at bit offset ``(t % (8/bits)) * bits`` (low bits first);
  ``k_scale, k_zero: fp16 [..., T/G, D]``.
- **Values per token**: for each token and each group of ``G`` channels one (scale, zero):
  ``v_codes: uint8 [..., T, D*bits/8]`` packed along the CHANNEL axis (same bit order);
  ``v_scale, v_zero: fp16 [..., T, D/G]``.

The quantization step uses the fp16-rounded scale and zero, so the reconstruction error of one
element is at most ``scale/2`` plus the fp16 rounding of ``zero`` (see :func:`error_bound`).
Storage overhead: keys ``bits + 32/G`` bits per element, values the same; at G=32 that is 3 bits
(KIVI-2) and 5 bits (KIVI-4).
"""

from __future__ import annotations

import torch
from torch import Tensor

from memvisor.errors import InvalidInput


class QuantError(InvalidInput):
    """Bad input to the KIVI quantizer (bit width, group size, shapes)."""


SUPPORTED_BITS = (2, 4)


def check_bits(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise QuantError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    return bits


def pack(codes: Tensor, bits: int, dim: int) -> Tensor:
    """Pack integer codes in [0, 2**bits) along ``dim``: that axis shrinks to ceil(n*bits/8) uint8.

    Element ``i`` goes to byte ``i // (8/bits)`` at bit offset ``(i % (8/bits)) * bits``.
    The tail is zero-padded; the caller keeps the true length.
    """
    check_bits(bits)
    per = 8 // bits
    dim = dim % codes.dim()
    c = codes.to(torch.uint8)
    pad = (-c.shape[dim]) % per
    if pad:
        shape = list(c.shape)
        shape[dim] = pad
        c = torch.cat([c, c.new_zeros(shape)], dim)
    # Bit fields OR-ed in place through strided views: no moved axis, no per-field copy (with keep()'s
    # index_select, an eviction's re-pack got 2.4-3x faster: scripts/kv_cpu_attention_speed.py).
    fields = c.unflatten(dim, (-1, per))
    out = fields.select(dim + 1, 0).clone(memory_format=torch.contiguous_format)
    for i in range(1, per):
        out |= fields.select(dim + 1, i) << (i * bits)
    return out


def unpack(packed: Tensor, bits: int, dim: int, n: int) -> Tensor:
    """Inverse of :func:`pack`: uint8 codes with ``n`` entries along ``dim``."""
    check_bits(bits)
    dim = dim % packed.dim()
    mask = (1 << bits) - 1
    # Scalar shifts (vectorised on uint8) stacked on a new axis after ``dim``, then merged into it.
    parts = [packed & mask] + [(packed >> (i * bits)) & mask for i in range(1, 8 // bits)]
    c = torch.stack(parts, dim=dim + 1).flatten(dim, dim + 1)
    return c if c.shape[dim] == n else c.narrow(dim, 0, n)


def unpack_float(packed: Tensor, bits: int, dim: int, n: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """:func:`unpack` straight into ``dtype`` (float codes for dequantization): each bit field is
    converted into its slot of one output buffer, so no uint8 copy of the codes is stacked first."""
    check_bits(bits)
    dim = dim % packed.dim()
    per, mask = 8 // bits, (1 << bits) - 1
    shape = list(packed.shape)
    out = torch.empty(shape[:dim + 1] + [per] + shape[dim + 1:], dtype=dtype, device=packed.device)
    for i in range(per):
        field = packed if i == 0 else packed >> (i * bits)
        out.select(dim + 1, i).copy_(field if i == per - 1 else field & mask)  # the top field needs no mask
    out = out.flatten(dim, dim + 1)
    return out if out.shape[dim] == n else out.narrow(dim, 0, n)


def minmax_quant(x: Tensor, bits: int, reduce_dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """Codes (uint8, unpacked), fp16 scale and zero of ``x`` grouped along ``reduce_dim`` (kept, size 1)."""
    xf = x.float()
    lo = xf.amin(reduce_dim, keepdim=True)
    hi = xf.amax(reduce_dim, keepdim=True)
    qmax = (1 << bits) - 1
    zero = lo.to(torch.float16)
    scale = ((hi - zero.float()) / qmax).to(torch.float16)
    s = scale.float()
    # A constant group has scale 0: every code is 0 and x == zero (up to fp16 rounding).
    safe = torch.where(s > 0, s, torch.ones_like(s))
    codes = torch.round((xf - zero.float()) / safe).clamp_(0, qmax).to(torch.uint8)
    return codes, scale, zero


def quantize_keys(k: Tensor, bits: int, group: int) -> tuple[Tensor, Tensor, Tensor]:
    """Keys ``[..., T, D]`` with ``T % group == 0`` -> (k_codes uint8 [..., T*bits/8, D],
    k_scale fp16 [..., T/G, D], k_zero fp16 [..., T/G, D]). One (scale, zero) per G tokens per channel."""
    check_bits(bits)
    *lead, T, D = k.shape
    if group < 1 or T % group:
        raise QuantError(f"key token count {T} must be a positive multiple of group {group}")
    g = k.reshape(*lead, T // group, group, D)
    codes, scale, zero = minmax_quant(g, bits, reduce_dim=-2)
    codes = codes.reshape(*lead, T, D)
    return pack(codes, bits, dim=-2), scale.squeeze(-2), zero.squeeze(-2)


def dequantize_keys(
    codes: Tensor, scale: Tensor, zero: Tensor, bits: int, n_tokens: int, group_of_token: Tensor | None = None,
    group: int | None = None, dtype: torch.dtype = torch.float32,
) -> Tensor:
    """k_codes [..., ceil(n*bits/8), D] -> keys [..., n, D] in ``dtype``.

    Token t uses scale row ``group_of_token[t]`` (LongTensor[n]); if None, row ``t // group``
    (``scale``/``zero`` then hold exactly ``ceil(n / group)`` rows for these tokens).
    """
    # Float codes, then scale and zero applied in place (addcmul into the codes' own buffer): one
    # float32 tensor per block, the CPU decode step's main cost.
    if group_of_token is None:
        if group is None:
            raise QuantError("dequantize_keys needs group_of_token or group")
        if n_tokens % group == 0:  # whole groups: one run, scales broadcast, no gather
            return dequantize_key_runs(codes, scale.float(), zero.float(), bits, n_tokens,
                                       [(0, n_tokens // group, group, 0)], dtype)
        group_of_token = torch.arange(n_tokens, device=codes.device) // group
    c = unpack_float(codes, bits, dim=-2, n=n_tokens)
    s = scale.index_select(-2, group_of_token).float()
    z = zero.index_select(-2, group_of_token).float()
    return torch.addcmul(z, c, s, out=c).to(dtype)


def dequantize_key_runs(codes: Tensor, scale: Tensor, zero: Tensor, bits: int, n_tokens: int,
                        runs: list[tuple[int, int, int, int]], dtype: torch.dtype = torch.float32) -> Tensor:
    """k_codes [..., ceil(n*bits/8), D] -> keys [..., n, D], with scales given by ``runs``: tuples
    ``(first group row, groups, tokens per group, first token)`` covering the n tokens in order.

    After eviction key groups hold different token counts; a run of equal-size groups is dequantized
    with its scales broadcast over a [groups, size, D] view, so no per-token copy of the scales is
    gathered. ``scale``/``zero`` [..., ng, D] may be given in float32 already (converted once per
    pass over the history, not per run). Equal to :func:`dequantize_keys` with the per-token group
    rows, element for element."""
    c = unpack_float(codes, bits, dim=-2, n=n_tokens)
    for g0, m, size, t0 in runs:
        seg = c.narrow(-2, t0, m * size).unflatten(-2, (m, size))
        torch.addcmul(zero.narrow(-2, g0, m).unsqueeze(-2), seg, scale.narrow(-2, g0, m).unsqueeze(-2), out=seg)
    return c.to(dtype)


def quantize_values(v: Tensor, bits: int, group: int) -> tuple[Tensor, Tensor, Tensor]:
    """Values ``[..., T, D]`` with ``D % group == 0`` -> (v_codes uint8 [..., T, D*bits/8],
    v_scale fp16 [..., T, D/G], v_zero fp16 [..., T, D/G]). One (scale, zero) per token per G channels."""
    check_bits(bits)
    *lead, T, D = v.shape
    if group < 1 or D % group:
        raise QuantError(f"head dim {D} must be a positive multiple of group {group}")
    g = v.reshape(*lead, T, D // group, group)
    codes, scale, zero = minmax_quant(g, bits, reduce_dim=-1)
    codes = codes.reshape(*lead, T, D)
    return pack(codes, bits, dim=-1), scale.squeeze(-1), zero.squeeze(-1)


def dequantize_values(
    codes: Tensor, scale: Tensor, zero: Tensor, bits: int, head_dim: int, dtype: torch.dtype = torch.float32
) -> Tensor:
    """v_codes [..., T, D*bits/8] -> values [..., T, D] in ``dtype``."""
    c = unpack_float(codes, bits, dim=-1, n=head_dim)
    *lead, T, D = c.shape
    ng = scale.shape[-1]
    g = c.reshape(*lead, T, ng, D // ng)
    torch.addcmul(zero.float().unsqueeze(-1), g, scale.float().unsqueeze(-1), out=g)
    return g.reshape(*lead, T, D).to(dtype)


def error_bound(x: Tensor, bits: int, group: int, axis: str) -> Tensor:
    """Largest reconstruction error allowed per element of ``x`` [..., T, D] for ``axis`` in
    {"keys", "values"}: half a quantization step plus fp16 rounding of the min and the max."""
    *lead, T, D = x.shape
    xf = x.float()
    if axis == "keys":
        g = xf.reshape(*lead, T // group, group, D)
        lo, hi = g.amin(-2, keepdim=True), g.amax(-2, keepdim=True)
        b = ((hi - lo) / ((1 << bits) - 1) / 2 + (lo.abs() + hi.abs()) * 2.0**-10)
        return b.expand_as(g).reshape(*lead, T, D)
    if axis == "values":
        g = xf.reshape(*lead, T, D // group, group)
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        b = ((hi - lo) / ((1 << bits) - 1) / 2 + (lo.abs() + hi.abs()) * 2.0**-10)
        return b.expand_as(g).reshape(*lead, T, D)
    raise QuantError(f"axis must be 'keys' or 'values', got {axis!r}")


def bits_per_element(bits: int, group: int) -> float:
    """Stored bits per key or value element of a quantized token: codes plus fp16 scale and zero."""
    return bits + 32.0 / group
