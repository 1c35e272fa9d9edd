"""The "planes" layout the fast decode kernel reads: the cache's KIVI codes repacked so that the
matrix units take them with one bit operation per pair of codes.

Why a second layout: the cache layout (layout.py) packs 4 two-bit codes per byte along tokens
(keys) or channels (values); unpacking it into the operand of a matrix product costs shifts, byte
permutes and shared-memory shuffles per code. Here every code of a tile of ``8 * G`` tokens sits
in an int16 word with the codes of the same token slot of the 7 other key groups:

- ``kw, vw: int16 [B, H, n_tiles * G, D]``: row ``i * G + n`` (tile ``i``, slot ``n < G``),
  channel ``c``; bit pair ``j`` (bits ``2j, 2j+1``) holds the code of token ``i * 8G + j * G + n``.
  So "bit pair j of a [G, D] tile" is exactly key group ``8i + j``: one bit mask turns the whole
  tile into the ``[G, D]`` code matrix of one group, in whatever register layout the matrix
  product wants (the operand is converted while still packed, 8 codes per int16).
  Two-bit codes only (the layout has room for 8 of them per word); slots past the last
  quantized token hold code 0 and the kernel masks their group.
- ``ks, kz: fp16 [B, H, n_tiles * 8, D]``: key scale and zero per (group, channel), padded; the
  scale of group ``g`` is stored divided by ``4^(g % 8)`` (``4^(g % 8 - 5)`` for ``g % 8 >= 5``), the
  power of 4 at which the kernel's bit mask leaves that group's codes (exact: a power of two).
- ``vsz: fp16 [B, H, D // G, n_tiles * 8G, 2]``: value scale and zero side by side per
  (channel group, token), tokens contiguous, so the kernel reads a group's scales and zeros as one
  row of ``2G`` halves (one prefetched load: a separate zero-point load was not prefetched).

Bytes: the same codes, scales and zeros as the cache layout (plus padding of the last tile):
a repack, done when a group is quantized, not per decode step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memvisor.kv.gpu.errors import KVLayoutError
from memvisor.kv.gpu.layout import KiviLayer, unpack_codes

SLOTS = 8  # key groups per tile: 8 two-bit codes per int16 word
# 1024 + code * KEY_MUL[j] is what the kernel's mask of bit pair j (after a shift by 10 for j >= 5) gives
KEY_MUL = torch.tensor([4.0 ** (j if j <= 4 else j - 5) for j in range(SLOTS)], dtype=torch.float16)


@dataclass
class PlanesLayer:
    """One layer's quantized cache in the planes layout (module docstring) plus the residual."""

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


def _words(codes: torch.Tensor, group: int, n_tiles: int) -> torch.Tensor:
    """uint8 codes ``[B, H, T, D]`` (T a multiple of group) -> int16 words ``[B, H, n_tiles * G, D]``."""
    b, h, t, d = codes.shape
    full = torch.zeros(b, h, n_tiles * SLOTS * group, d, dtype=torch.int32, device=codes.device)
    full[:, :, :t] = codes.to(torch.int32)
    full = full.reshape(b, h, n_tiles, SLOTS, group, d)  # token = tile * 8G + j * G + n
    shifts = (torch.arange(SLOTS, device=codes.device, dtype=torch.int32) * 2).reshape(1, 1, 1, SLOTS, 1, 1)
    words = (full << shifts).sum(3)  # < 2^16
    words = torch.where(words >= 1 << 15, words - (1 << 16), words)  # reinterpret as int16
    return words.to(torch.int16).reshape(b, h, n_tiles * group, d)


def to_planes(layer: KiviLayer) -> PlanesLayer:
    """Repack a 2-bit :class:`KiviLayer` (cache layout) into the planes layout."""
    layer.validate()
    if layer.bits != 2:
        raise KVLayoutError(f"the planes layout holds 2-bit codes, got {layer.bits}-bit")
    g = layer.group
    b, h, t_r, d = layer.k_res.shape
    t = layer.t_quant
    n_tiles = -(-t // (SLOTS * g))
    kcodes = unpack_codes(layer.k_codes, 2, dim=2)
    vcodes = unpack_codes(layer.v_codes, 2, dim=3)
    pad_g = n_tiles * SLOTS - t // g
    ks = torch.nn.functional.pad(layer.k_scale, (0, 0, 0, pad_g))
    ks = (ks.reshape(b, h, n_tiles, SLOTS, d) / KEY_MUL.to(ks.device).reshape(1, 1, 1, SLOTS, 1)).reshape(ks.shape)
    kz = torch.nn.functional.pad(layer.k_zero, (0, 0, 0, pad_g))
    pad_t = n_tiles * SLOTS * g - t
    vs = torch.nn.functional.pad(layer.v_scale, (0, 0, 0, pad_t)).transpose(2, 3)  # [B, H, D/G, T_pad]
    vz = torch.nn.functional.pad(layer.v_zero, (0, 0, 0, pad_t)).transpose(2, 3)
    return PlanesLayer(
        g, t, _words(kcodes, g, n_tiles), ks.contiguous(), kz.contiguous(), _words(vcodes, g, n_tiles),
        torch.stack([vs, vz], dim=-1).contiguous(), layer.k_res, layer.v_res)
