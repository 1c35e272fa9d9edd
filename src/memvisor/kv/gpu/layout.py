"""The KIVI storage layout the decode kernel reads, and a plain reference packer for it.

The layout is the one agreed for ``memvisor.kv.quant`` (the cache's own quantizer is the
authority; this module restates the layout so the kernel and its reference can be checked
on their own, and tests cross-check the two):

- bits ``b`` in {2, 4}; ``per = 8 // b`` codes share one uint8, lowest bits first.
- Keys, quantized PER CHANNEL over groups of ``G`` consecutive tokens:
  ``k_codes: uint8 [B, Hkv, T*b/8, D]`` (packed along the token axis: token ``t`` sits in byte
  row ``t // per`` at bit offset ``(t % per) * b``), ``k_scale, k_zero: fp16 [B, Hkv, T/G, D]``.
- Values, quantized PER TOKEN over groups of ``G`` consecutive channels:
  ``v_codes: uint8 [B, Hkv, T, D*b/8]`` (packed along the channel axis: channel ``c`` sits in
  byte ``c // per`` at bit offset ``(c % per) * b``), ``v_scale, v_zero: fp16 [B, Hkv, T, D/G]``.
- Dequantize: ``x = code * scale + zero`` (asymmetric min-max: ``scale = (max-min)/(2^b-1)``,
  ``zero = min``).
- Only whole groups of ``G`` tokens are quantized; newer tokens sit in a full-precision residual
  ``k_res, v_res: [B, Hkv, R, D]`` in the model dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memvisor.kv.gpu.errors import KVLayoutError

SUPPORTED_BITS = (2, 4)


@dataclass
class KeyGroupMaps:
    """Where each kv head's quantized tokens find their key-scale rows, for the ragged kernel (triton_ragged.py),
    as :class:`KiviLayer`'s ``key_groups`` says for one: per head h, token ``t < prefix[h]`` has row ``rows[h][t] -
    base[h]`` (int32; ``rows[h]`` None when ``prefix[h]`` is 0) and token ``t >= prefix[h]`` row ``rest[h] + (t -
    prefix[h]) // G``. ``base`` lets maps built for several heads at once number their groups through all of them
    (the kernel offsets the head's scale pointers by it); such a head maps every token (``prefix[h]`` = its
    quantized tokens), so ``rest`` only serves heads whose ``base`` is 0."""

    rows: list[torch.Tensor | None]
    base: list[int]
    prefix: list[int]
    rest: list[int]


@dataclass
class KiviLayer:
    """One layer's quantized cache in the agreed layout (see module docstring for shapes).

    ``k_res``/``v_res`` hold the newest tokens in full precision; ``t_quant`` is the number of
    quantized tokens (a multiple of ``group``, except with ``key_groups``), so the layer holds
    ``t_quant + k_res.shape[2]`` tokens in order: quantized first, residual after. With ``key_groups``
    (groups cut by eviction) ``k_scale``/``k_zero`` hold one row per group; :meth:`validate` and the
    torch reference check the agreed layout only, and the "dequant" kernel alone reads such a layer.
    """

    bits: int
    group: int
    k_codes: torch.Tensor
    k_scale: torch.Tensor
    k_zero: torch.Tensor
    v_codes: torch.Tensor
    v_scale: torch.Tensor
    v_zero: torch.Tensor
    k_res: torch.Tensor
    v_res: torch.Tensor
    # int32 [P]: the key-scale rows of the first P quantized tokens where eviction cut groups short (the
    # cache's ``group_sizes``; then k_scale/k_zero hold one row per group, whatever its size, and t_quant need
    # not be a multiple of G); token t >= P has row ``key_group_rest + (t - P) // G`` (the groups after the cut
    # ones are whole; P = t_quant maps every token). None: token t's row is t // G. Read by the "dequant" kernel.
    key_groups: torch.Tensor | None = None
    # values' bit width where it differs from the keys' (``bits``): KIVI with 4-bit keys and 2-bit values.
    # Read by the "dequant" kernel only; None: ``bits``.
    vbits: int | None = None
    key_group_rest: int = 0

    @property
    def value_bits(self) -> int:
        return self.bits if self.vbits is None else self.vbits

    @property
    def t_quant(self) -> int:
        return self.v_codes.shape[2]

    @property
    def t_total(self) -> int:
        return self.t_quant + self.k_res.shape[2]

    def nbytes(self) -> int:
        """Bytes of every stored tensor (codes, scales, zero points, residual)."""
        return sum(
            t.numel() * t.element_size()
            for t in (self.k_codes, self.k_scale, self.k_zero, self.v_codes, self.v_scale,
                      self.v_zero, self.k_res, self.v_res)
        )

    def validate(self) -> None:
        """Raise ``KVLayoutError`` if shapes or dtypes break the agreed layout."""
        check_bits_group(self.bits, self.group)
        check_bits_group(self.value_bits, self.group)
        per, vper = 8 // self.bits, 8 // self.value_bits
        b, h, t, d_packed = self.v_codes.shape
        d = self.k_codes.shape[3]
        if self.k_res.shape[:2] != (b, h) or self.k_res.shape[3] != d:
            raise KVLayoutError(f"residual keys {tuple(self.k_res.shape)} do not match [B={b}, H={h}, R, D={d}]")
        if self.v_res.shape != self.k_res.shape:
            raise KVLayoutError(f"residual values {tuple(self.v_res.shape)} != residual keys {tuple(self.k_res.shape)}")
        if t % self.group:
            raise KVLayoutError(f"quantized token count {t} is not a multiple of group {self.group}")
        if d % self.group or d % vper:
            raise KVLayoutError(f"head_dim {d} must be a multiple of group {self.group} and of {vper}")
        expect = {
            "k_codes": ((b, h, t // per, d), torch.uint8),
            "k_scale": ((b, h, t // self.group, d), torch.float16),
            "k_zero": ((b, h, t // self.group, d), torch.float16),
            "v_codes": ((b, h, t, d // vper), torch.uint8),
            "v_scale": ((b, h, t, d // self.group), torch.float16),
            "v_zero": ((b, h, t, d // self.group), torch.float16),
        }
        for name, (shape, dtype) in expect.items():
            got = getattr(self, name)
            if tuple(got.shape) != shape or got.dtype != dtype:
                raise KVLayoutError(f"{name}: expected {dtype} {shape}, got {got.dtype} {tuple(got.shape)}")
        if d_packed * vper != d:
            raise KVLayoutError(f"v_codes last dim {d_packed} * {vper} != head_dim {d}")


def check_bits_group(bits: int, group: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise KVLayoutError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if group <= 0 or group % (8 // bits):
        raise KVLayoutError(f"group must be a positive multiple of {8 // bits} for {bits}-bit codes, got {group}")


def _minmax_codes(x: torch.Tensor, dim: int, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min-max codes of ``x`` reduced over ``dim`` (kept): (codes uint8, scale fp16, zero fp16).

    Scale and zero are rounded to fp16 FIRST and codes are computed against the rounded values,
    so dequantizing with the stored fp16 metadata stays within half a step of ``x``.
    """
    qmax = (1 << bits) - 1
    lo = x.amin(dim=dim, keepdim=True)
    hi = x.amax(dim=dim, keepdim=True)
    scale = ((hi - lo) / qmax).to(torch.float16)
    zero = lo.to(torch.float16)
    s = scale.float().clamp_min(1e-8)  # a constant group (hi == lo) gets codes 0 and scale 0
    codes = ((x.float() - zero.float()) / s).round().clamp_(0, qmax).to(torch.uint8)
    return codes, scale, zero


def pack_codes(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack uint8 codes (values < 2^bits) ``per = 8 // bits`` to a byte along ``dim``, low bits first."""
    per = 8 // bits
    codes = codes.movedim(dim, -1)
    n = codes.shape[-1]
    if n % per:
        raise KVLayoutError(f"cannot pack {n} codes along dim {dim}: not a multiple of {per}")
    c = codes.reshape(*codes.shape[:-1], n // per, per).to(torch.int32)
    shifts = torch.arange(per, device=codes.device, dtype=torch.int32) * bits
    packed = (c << shifts).sum(-1).to(torch.uint8)
    return packed.movedim(-1, dim).contiguous()


def unpack_codes(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 bytes -> uint8 codes, ``per`` times longer along ``dim``."""
    per = 8 // bits
    p = packed.movedim(dim, -1).to(torch.int32)
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * bits
    codes = (p.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    codes = codes.reshape(*p.shape[:-1], p.shape[-1] * per).to(torch.uint8)
    return codes.movedim(-1, dim).contiguous()


def quantize_keys(k: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys ``[B, H, T, D]`` (T a multiple of group) -> (k_codes [B,H,T*b/8,D], k_scale/k_zero fp16 [B,H,T/G,D])."""
    check_bits_group(bits, group)
    b, h, t, d = k.shape
    if t % group:
        raise KVLayoutError(f"key token count {t} is not a multiple of group {group}")
    grouped = k.reshape(b, h, t // group, group, d)
    codes, scale, zero = _minmax_codes(grouped, dim=3, bits=bits)
    codes = codes.reshape(b, h, t, d)
    return pack_codes(codes, bits, dim=2), scale.squeeze(3), zero.squeeze(3)


def quantize_values(v: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Values ``[B, H, T, D]`` -> (v_codes [B,H,T,D*b/8], v_scale/v_zero fp16 [B,H,T,D/G])."""
    check_bits_group(bits, group)
    b, h, t, d = v.shape
    if d % group:
        raise KVLayoutError(f"head_dim {d} is not a multiple of group {group}")
    grouped = v.reshape(b, h, t, d // group, group)
    codes, scale, zero = _minmax_codes(grouped, dim=4, bits=bits)
    codes = codes.reshape(b, h, t, d)
    return pack_codes(codes, bits, dim=3), scale.squeeze(4), zero.squeeze(4)


def dequantize_keys(k_codes: torch.Tensor, k_scale: torch.Tensor, k_zero: torch.Tensor, bits: int,
                    group: int) -> torch.Tensor:
    """Inverse of :func:`quantize_keys` up to rounding: float32 ``[B, H, T, D]``."""
    codes = unpack_codes(k_codes, bits, dim=2).float()
    scale = k_scale.float().repeat_interleave(group, dim=2)
    zero = k_zero.float().repeat_interleave(group, dim=2)
    return codes * scale + zero


def dequantize_values(v_codes: torch.Tensor, v_scale: torch.Tensor, v_zero: torch.Tensor, bits: int,
                      group: int) -> torch.Tensor:
    """Inverse of :func:`quantize_values` up to rounding: float32 ``[B, H, T, D]``."""
    codes = unpack_codes(v_codes, bits, dim=3).float()
    scale = v_scale.float().repeat_interleave(group, dim=3)
    zero = v_zero.float().repeat_interleave(group, dim=3)
    return codes * scale + zero


def quantize_layer(k: torch.Tensor, v: torch.Tensor, bits: int, group: int, residual: int) -> KiviLayer:
    """Split ``[B, H, T, D]`` keys/values into whole quantized groups + a full-precision residual.

    The residual keeps the newest ``T - T_q`` tokens where ``T_q`` is the largest multiple of
    ``group`` with at least ``min(residual, T)`` tokens left over (KIVI's residual window R).
    """
    check_bits_group(bits, group)
    t = k.shape[2]
    t_q = max(0, (t - residual) // group * group)
    kc, ks, kz = quantize_keys(k[:, :, :t_q], bits, group)
    vc, vs, vz = quantize_values(v[:, :, :t_q], bits, group)
    layer = KiviLayer(bits, group, kc, ks, kz, vc, vs, vz,
                      k[:, :, t_q:].contiguous(), v[:, :, t_q:].contiguous())
    layer.validate()
    return layer


def random_layer(batch: int, heads: int, tokens: int, head_dim: int, bits: int, group: int, residual: int,
                 dtype: torch.dtype, device: str | torch.device, generator: torch.Generator | None = None) -> KiviLayer:
    """A layer with random codes and plausible scales, built directly in the packed layout.

    For timing only (quantizing tens of thousands of random tokens would dominate a benchmark's
    set-up); ``tokens`` quantized tokens (rounded down to ``group``) plus ``residual`` residual ones.
    """
    check_bits_group(bits, group)
    per = 8 // bits
    t = tokens // group * group
    kw = dict(device=device)
    k_codes = torch.randint(0, 256, (batch, heads, t // per, head_dim), dtype=torch.uint8, generator=generator, **kw)
    v_codes = torch.randint(0, 256, (batch, heads, t, head_dim // per), dtype=torch.uint8, generator=generator, **kw)
    def meta(*shape: int) -> torch.Tensor:
        return (torch.rand(*shape, generator=generator, **kw) * 0.1).to(torch.float16)
    return KiviLayer(
        bits, group,
        k_codes, meta(batch, heads, t // group, head_dim), meta(batch, heads, t // group, head_dim) - 0.05,
        v_codes, meta(batch, heads, t, head_dim // group), meta(batch, heads, t, head_dim // group) - 0.05,
        torch.randn(batch, heads, residual, head_dim, generator=generator, **kw).to(dtype),
        torch.randn(batch, heads, residual, head_dim, generator=generator, **kw).to(dtype),
    )
