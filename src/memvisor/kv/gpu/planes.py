"""The "planes" layout the fast decode kernel reads: the cache's KIVI codes repacked so that the
matrix units take them with one bit operation per pair of codes.

Why a second layout: the cache layout (layout.py) packs 4 two-bit codes per byte along tokens
(keys) or channels (values); unpacking it into the operand of a matrix product costs shifts, byte
permutes and shared-memory shuffles per code. Here every code of a tile of ``S * G`` tokens sits
in an int16 word with the codes of the same token slot of the other key groups of the tile, where
``S = 16 // bits`` (8 groups for 2-bit codes, 4 for 4-bit ones):

- ``kw, vw: int16 [B, H, n_tiles * G, D]``: row ``i * G + n`` (tile ``i``, slot ``n < G``),
  channel ``c``; bit field ``j`` (bits ``bits * j`` up) holds the code of token ``i * S G + j * G + n``.
  So "bit field j of a [G, D] tile" is exactly key group ``S i + j``: one bit mask turns the whole
  tile into the ``[G, D]`` code matrix of one group, in whatever register layout the matrix
  product wants (the operand is converted while still packed, S codes per int16). Slots past the
  last quantized token hold code 0 and the kernel masks their group.
- ``ks, kz: fp16 [B, H, n_tiles * S, D]``: key scale and zero per (group, channel), padded; the
  scale of group ``g`` is stored divided by ``key_mul(bits)[g % S]``, the power of two at which the
  kernel's bit mask leaves that group's codes (fields that end by bit 10, the fp16 mantissa, in place;
  the others after one shift of the word by 10 (2-bit) or 8 (4-bit)), so the division is exact.
- ``vsz: fp16 [B, H, D // G, n_tiles * S G, 2]``: value scale and zero side by side per
  (channel group, token), tokens contiguous, so the kernel reads a group's scales and zeros as one
  row of ``2G`` halves (one prefetched load: a separate zero-point load was not prefetched). The scale
  of a token of tile group ``j`` is stored times ``value_mul(bits)[j] = 2^(VALUE_EXP - bits j')``, which
  undoes the mask's power of two and adds a common ``2^VALUE_EXP`` that keeps the kernel's fp16
  ``p * scale`` of the high fields above fp16's normal range (so the kernel multiplies ``p`` by the
  stored scale alone; a scale over 65504 / 16 overflows, values never come near it).

Bytes: the same codes, scales and zeros as the cache layout (plus padding of the last tile):
a repack, done when a group is quantized, not per decode step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memvisor.kv.gpu.errors import KVLayoutError
from memvisor.kv.gpu.layout import KiviLayer, unpack_codes

SLOTS = {2: 8, 4: 4}  # key groups per tile: codes per int16 word
SPLIT = {2: 5, 4: 2}  # bit fields from this one up reach bit 10 (fp16's exponent): read after a shift by bits * SPLIT


def key_mul(bits: int) -> torch.Tensor:
    """fp16 ``[SLOTS[bits]]``: the factor the kernel's mask of bit field j leaves on a code (2^(bits j'),
    j' = j below SPLIT, else j - SPLIT); the stored key scales are divided by it."""
    return torch.tensor([2.0 ** (bits * (j if j < SPLIT[bits] else j - SPLIT[bits])) for j in range(SLOTS[bits])],
                        dtype=torch.float16)


VALUE_EXP = 4


def value_mul(bits: int) -> torch.Tensor:
    """fp16 ``[SLOTS[bits]]``: ``2^(VALUE_EXP - bits j')`` per bit field j; the stored value scales carry it."""
    return 2.0 ** VALUE_EXP / key_mul(bits)


@dataclass
class PlanesLayer:
    """One layer's quantized cache in the planes layout (module docstring) plus the residual."""

    bits: int
    group: int
    t_quant: int
    kw: torch.Tensor
    ks: torch.Tensor
    kz: torch.Tensor
    vw: torch.Tensor
    vsz: torch.Tensor
    k_res: torch.Tensor
    v_res: torch.Tensor

    def nbytes(self) -> int:
        """Bytes of every stored tensor (codes, scales, zero points, residual), padding included."""
        return sum(t.numel() * t.element_size()
                   for t in (self.kw, self.ks, self.kz, self.vw, self.vsz, self.k_res, self.v_res))

    @property
    def t_total(self) -> int:
        return self.t_quant + self.k_res.shape[2]


def _words(codes: torch.Tensor, group: int, n_tiles: int, bits: int) -> torch.Tensor:
    """uint8 codes ``[B, H, T, D]`` (T a multiple of group) -> int16 words ``[B, H, n_tiles * G, D]``."""
    b, h, t, d = codes.shape
    slots = SLOTS[bits]
    full = torch.zeros(b, h, n_tiles * slots * group, d, dtype=torch.int32, device=codes.device)
    full[:, :, :t] = codes.to(torch.int32)
    full = full.reshape(b, h, n_tiles, slots, group, d)  # token = tile * S G + j * G + n
    shifts = (torch.arange(slots, device=codes.device, dtype=torch.int32) * bits).reshape(1, 1, 1, slots, 1, 1)
    words = (full << shifts).sum(3)  # < 2^16
    words = torch.where(words >= 1 << 15, words - (1 << 16), words)  # reinterpret as int16
    return words.to(torch.int16).reshape(b, h, n_tiles * group, d)


def to_planes(layer: KiviLayer) -> PlanesLayer:
    """Repack a :class:`KiviLayer` (cache layout, 2- or 4-bit) into the planes layout (one width for keys and
    values: the planes kernels read both at ``bits``)."""
    layer.validate()
    if layer.value_bits != layer.bits:
        raise KVLayoutError(f"the planes layout holds keys and values of one width, got {layer.bits} and "
                            f"{layer.value_bits} bits")
    bits, g = layer.bits, layer.group
    slots = SLOTS[bits]
    b, h, t_r, d = layer.k_res.shape
    t = layer.t_quant
    n_tiles = -(-t // (slots * g))
    kcodes = unpack_codes(layer.k_codes, bits, dim=2)
    vcodes = unpack_codes(layer.v_codes, bits, dim=3)
    pad_g = n_tiles * slots - t // g
    ks = torch.nn.functional.pad(layer.k_scale, (0, 0, 0, pad_g))
    mul = key_mul(bits).to(ks.device).reshape(1, 1, 1, slots, 1)
    ks = (ks.reshape(b, h, n_tiles, slots, d) / mul).reshape(ks.shape)
    kz = torch.nn.functional.pad(layer.k_zero, (0, 0, 0, pad_g))
    pad_t = n_tiles * slots * g - t
    vs = torch.nn.functional.pad(layer.v_scale, (0, 0, 0, pad_t)).transpose(2, 3)  # [B, H, D/G, T_pad]
    vmul = value_mul(bits).to(vs.device).repeat_interleave(g).repeat(n_tiles)  # per token: its tile group's
    vs = vs * vmul
    vz = torch.nn.functional.pad(layer.v_zero, (0, 0, 0, pad_t)).transpose(2, 3)
    return PlanesLayer(
        bits, g, t, _words(kcodes, g, n_tiles, bits), ks.contiguous(), kz.contiguous(),
        _words(vcodes, g, n_tiles, bits), torch.stack([vs, vz], dim=-1).contiguous(), layer.k_res, layer.v_res)
