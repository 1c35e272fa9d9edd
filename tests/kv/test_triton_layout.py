"""The KIVI layout the decode kernel reads, and its torch reference path (CPU, no Triton needed)."""

import math

import pytest
import torch

from memvisor.kv.gpu import (
    KVLayoutError,
    TritonUnavailableError,
    decode_attention,
    decode_attention_reference,
    dense_decode_attention,
    dequantize_keys,
    dequantize_values,
    pack_codes,
    quantize_keys,
    quantize_layer,
    quantize_values,
    unpack_codes,
)


@pytest.mark.parametrize("bits", [2, 4])
def test_pack_bit_positions_follow_contract(bits):
    per = 8 // bits
    # one channel, 2*per tokens with codes 1, 2, ... (mod 2^bits): byte row r holds tokens r*per..r*per+per-1
    codes = (torch.arange(2 * per) % (1 << bits)).to(torch.uint8).reshape(1, 1, 2 * per, 1)
    packed = pack_codes(codes, bits, dim=2)
    assert packed.shape == (1, 1, 2, 1)
    for t in range(2 * per):
        byte = int(packed[0, 0, t // per, 0])
        assert (byte >> ((t % per) * bits)) & ((1 << bits) - 1) == int(codes[0, 0, t, 0])


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("dim", [2, 3])
def test_unpack_inverts_pack(bits, dim):
    g = torch.Generator().manual_seed(bits * 10 + dim)
    codes = torch.randint(0, 1 << bits, (2, 3, 16, 8), generator=g).to(torch.uint8)
    assert torch.equal(unpack_codes(pack_codes(codes, bits, dim), bits, dim), codes)


@pytest.mark.parametrize("bits", [2, 4])
def test_quantize_error_within_half_step(bits):
    g = torch.Generator().manual_seed(bits)
    k = torch.randn(1, 2, 64, 32, generator=g)
    k[..., 5] *= 20  # outlier channel: per-channel keys keep it from hurting the others
    v = torch.randn(1, 2, 64, 32, generator=g)
    kc, ks, kz = quantize_keys(k, bits, 32)
    vc, vs, vz = quantize_values(v, bits, 32)
    assert kc.shape == (1, 2, 64 * bits // 8, 32) and ks.shape == (1, 2, 2, 32) and ks.dtype == torch.float16
    assert vc.shape == (1, 2, 64, 32 * bits // 8) and vs.shape == (1, 2, 64, 1) and vz.dtype == torch.float16
    k_err = (dequantize_keys(kc, ks, kz, bits, 32) - k).abs()
    v_err = (dequantize_values(vc, vs, vz, bits, 32) - v).abs()
    # half a quantization step, plus fp16 rounding of zero and of code*scale (relative 2^-10)
    k_bound = ks.float().repeat_interleave(32, 2) / 2 + k.abs() * 2e-3 + 1e-3
    v_bound = vs.float().repeat_interleave(32, 3) / 2 + v.abs() * 2e-3 + 1e-3
    assert (k_err <= k_bound).all() and (v_err <= v_bound).all()
    # the outlier channel did not widen other channels' steps
    assert ks[..., 5].float().mean() > 10 * ks[..., 4].float().mean()


def test_quantize_layer_keeps_residual_window():
    k = torch.randn(1, 2, 100, 64)
    layer = quantize_layer(k, k.clone(), bits=2, group=32, residual=32)
    assert layer.t_quant == 64 and layer.k_res.shape[2] == 36 and layer.t_total == 100
    assert torch.equal(layer.k_res, k[:, :, 64:])
    expected = sum(t.numel() * t.element_size() for t in (layer.k_codes, layer.k_scale, layer.k_zero,
                   layer.v_codes, layer.v_scale, layer.v_zero, layer.k_res, layer.v_res))
    assert layer.nbytes() == expected


@pytest.mark.parametrize("bits", [2, 4])
def test_reference_equals_dense_attention_over_dequantized_cache(bits):
    g = torch.Generator().manual_seed(7)
    k = torch.randn(2, 2, 200, 64, generator=g)
    v = torch.randn(2, 2, 200, 64, generator=g)
    q = torch.randn(2, 8, 64, generator=g)  # 4 query heads per kv head
    layer = quantize_layer(k, v, bits, 32, 32)
    kd = torch.cat([dequantize_keys(layer.k_codes, layer.k_scale, layer.k_zero, bits, 32), layer.k_res], 2)
    vd = torch.cat([dequantize_values(layer.v_codes, layer.v_scale, layer.v_zero, bits, 32), layer.v_res], 2)
    want = dense_decode_attention(q, kd, vd)
    for block in (32, 64, 1024):  # block-by-block result must not depend on the block size
        got = decode_attention_reference(q, layer, block=block)
        assert torch.allclose(got.double(), want, atol=2e-5, rtol=1e-4)
    # against the unquantized attention: 4-bit close (random keys are the hard case), 2-bit far looser
    exact = dense_decode_attention(q, k, v)
    rel = float((decode_attention_reference(q, layer).double() - exact).norm() / exact.norm())
    assert rel < (0.15 if bits == 4 else 0.8)


def test_reference_maps_query_heads_to_kv_heads_like_transformers():
    # kv head 0 has values all 1, kv head 1 all -1: query heads 0,1 must read +1, heads 2,3 must read -1
    k = torch.randn(1, 2, 64, 32)
    v = torch.stack([torch.ones(64, 32), -torch.ones(64, 32)]).unsqueeze(0)
    layer = quantize_layer(k, v, 4, 32, 0)
    out = decode_attention_reference(torch.randn(1, 4, 32), layer)
    assert torch.allclose(out[0, :2], torch.ones(2, 32), atol=1e-3)
    assert torch.allclose(out[0, 2:], -torch.ones(2, 32), atol=1e-3)


def test_residual_only_and_custom_scale():
    k = torch.randn(1, 1, 10, 32)
    v = torch.randn(1, 1, 10, 32)
    q = torch.randn(1, 2, 32)
    layer = quantize_layer(k, v, 2, 32, 32)
    assert layer.t_quant == 0
    got = decode_attention_reference(q, layer, sm_scale=0.3)
    assert torch.allclose(got.double(), dense_decode_attention(q, k, v, sm_scale=0.3), atol=1e-5)
    assert not math.isclose(float(got.sum()), float(decode_attention_reference(q, layer).sum()))


def test_bad_input_raises_typed_errors():
    with pytest.raises(KVLayoutError):
        quantize_keys(torch.randn(1, 1, 33, 32), 2, 32)
    with pytest.raises(KVLayoutError):
        quantize_keys(torch.randn(1, 1, 32, 32), 3, 32)
    layer = quantize_layer(torch.randn(1, 2, 64, 32), torch.randn(1, 2, 64, 32), 2, 32, 0)
    with pytest.raises(KVLayoutError):
        decode_attention_reference(torch.randn(1, 3, 32), layer)  # 3 query heads over 2 kv heads
    layer.k_scale = layer.k_scale.float()
    with pytest.raises(KVLayoutError):
        decode_attention_reference(torch.randn(1, 2, 32), layer)


def test_dispatch_on_cpu_uses_reference_and_refuses_forced_kernel():
    layer = quantize_layer(torch.randn(1, 1, 64, 32), torch.randn(1, 1, 64, 32), 4, 32, 0)
    q = torch.randn(1, 1, 32, dtype=torch.bfloat16)
    out = decode_attention(q, layer)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), decode_attention_reference(q, layer), atol=1e-2)
    with pytest.raises(TritonUnavailableError):
        decode_attention(q, layer, use_triton=True)


@pytest.mark.parametrize("bits", [2, 4])
def test_reference_reads_the_cache_quantizer_layout(bits):
    """The kernel's reference decodes tensors made by memvisor.kv.quant (the cache's own quantizer)."""
    from memvisor.kv import quant
    from memvisor.kv.gpu import KiviLayer

    g = torch.Generator().manual_seed(11 + bits)
    k = torch.randn(1, 3, 96, 64, generator=g)
    v = torch.randn(1, 3, 96, 64, generator=g)
    q = torch.randn(1, 9, 64, generator=g)
    kc, ks, kz = quant.quantize_keys(k, bits, 32)
    vc, vs, vz = quant.quantize_values(v, bits, 32)
    res = torch.randn(1, 3, 5, 64, generator=g)
    layer = KiviLayer(bits, 32, kc, ks, kz, vc, vs, vz, res, res.clone())
    kd = torch.cat([quant.dequantize_keys(kc, ks, kz, bits, 96, group=32), res], 2)
    vd = torch.cat([quant.dequantize_values(vc, vs, vz, bits, 64), res], 2)
    got = decode_attention_reference(q, layer, block=64)
    assert torch.allclose(got.double(), dense_decode_attention(q, kd, vd), atol=2e-5, rtol=1e-4)
    # and the packing itself is the same byte for byte
    mine_kc, _, _ = quantize_keys(k, bits, 32)
    assert torch.equal(unpack_codes(kc, bits, 2), unpack_codes(pack_codes(unpack_codes(kc, bits, 2), bits, 2), bits, 2))
    assert mine_kc.shape == kc.shape and mine_kc.dtype == kc.dtype
    assert (unpack_codes(mine_kc, bits, 2).int() - unpack_codes(kc, bits, 2).int()).abs().max() <= 1


def test_reference_reads_values_of_another_width_and_planes_refuse_them():
    """Keys 4 / values 2 bits (``KiviLayer.vbits``, what ``auto`` stores at 4x): the reference decodes the cache
    quantizer's tensors at each width; the planes layout, one width for both, refuses rather than misreads."""
    from memvisor.kv import quant
    from memvisor.kv.gpu import KiviLayer
    from memvisor.kv.gpu.planes import to_planes

    g = torch.Generator().manual_seed(5)
    k, v = torch.randn(1, 2, 64, 64, generator=g), torch.randn(1, 2, 64, 64, generator=g)
    q = torch.randn(1, 6, 64, generator=g)
    kc, ks, kz = quant.quantize_keys(k, 4, 32)
    vc, vs, vz = quant.quantize_values(v, 2, 32)
    res = torch.randn(1, 2, 3, 64, generator=g)
    layer = KiviLayer(4, 32, kc, ks, kz, vc, vs, vz, res, res.clone(), vbits=2)
    kd = torch.cat([quant.dequantize_keys(kc, ks, kz, 4, 64, group=32), res], 2)
    vd = torch.cat([quant.dequantize_values(vc, vs, vz, 2, 64), res], 2)
    got = decode_attention_reference(q, layer)
    assert torch.allclose(got.double(), dense_decode_attention(q, kd, vd), atol=2e-5, rtol=1e-4)
    with pytest.raises(KVLayoutError, match="one width"):
        to_planes(layer)
    with pytest.raises(KVLayoutError):  # values read at the keys' width do not fit the layout
        KiviLayer(4, 32, kc, ks, kz, vc, vs, vz, res, res.clone()).validate()


@pytest.mark.parametrize("bits", [2, 4])
def test_planes_layout_holds_the_codes_and_scales(bits):
    """Bit field j of planes word row i*G + n is the code of token i*S*G + j*G + n (keys and values),
    S = 16 // bits groups per tile."""
    from memvisor.kv.gpu.planes import SLOTS, key_mul, to_planes, value_mul

    g = torch.Generator().manual_seed(5)
    S, mask = SLOTS[bits], (1 << bits) - 1
    tile = S * 32
    k = torch.randn(1, 2, tile + 44, 64, generator=g)
    v = torch.randn(1, 2, tile + 44, 64, generator=g)
    layer = quantize_layer(k, v, bits, 32, 12)  # one full tile and one of 1 group
    p = to_planes(layer)
    assert p.bits == bits and p.t_quant == tile + 32
    assert p.kw.shape == (1, 2, 2 * 32, 64) and p.kw.dtype == torch.int16
    kc = unpack_codes(layer.k_codes, bits, dim=2).int()
    vc = unpack_codes(layer.v_codes, bits, dim=3).int()
    words_k = p.kw.int() & 0xFFFF
    words_v = p.vw.int() & 0xFFFF
    for t in (0, 31, 32, 100, tile - 1, tile, tile + 31):
        i, j, n = t // tile, (t % tile) // 32, t % 32
        assert torch.equal((words_k[:, :, i * 32 + n] >> (bits * j)) & mask, kc[:, :, t])
        assert torch.equal((words_v[:, :, i * 32 + n] >> (bits * j)) & mask, vc[:, :, t])
    # slots past the last quantized token hold code 0
    assert int(((words_k[:, :, 32:] >> bits) & (0xFFFF >> bits)).abs().sum()) == 0
    mul = key_mul(bits)
    # what the kernel's masks leave: fields that end by bit 10 in place (fp16 mantissa), the others after a
    # shift by 10 (2-bit) or 8 (4-bit)
    assert [int(m).bit_length() - 1 for m in mul] == ([0, 2, 4, 6, 8, 0, 2, 4] if bits == 2 else [0, 4, 0, 4])
    for grp in range(p.t_quant // 32):
        assert torch.equal(p.ks[:, :, grp], layer.k_scale[:, :, grp] / mul[grp % S])
        assert torch.equal(p.kz[:, :, grp], layer.k_zero[:, :, grp])
    t_q = p.t_quant
    vmul = value_mul(bits)[(torch.arange(t_q) % tile) // 32]  # the token's tile group j: 2^(4 - bits j')
    assert [int(x).bit_length() - 1 if x >= 1 else -int(1 / x).bit_length() + 1 for x in value_mul(bits)] == (
        [4, 2, 0, -2, -4, 4, 2, 0] if bits == 2 else [4, 0, 4, 0])
    assert torch.equal(p.vsz[:, :, :, :t_q, 0], layer.v_scale.transpose(2, 3) * vmul)
    assert torch.equal(p.vsz[:, :, :, :t_q, 1], layer.v_zero.transpose(2, 3))
    assert p.nbytes() == sum(t.numel() * t.element_size() for t in (p.kw, p.ks, p.kz, p.vw, p.vsz, p.k_res, p.v_res))


def test_planes_layer_on_cpu_refuses_instead_of_guessing():
    """The planes layout has no CPU path: dispatch says so rather than reading it as the cache layout."""
    from memvisor.kv.gpu.planes import to_planes

    layer = quantize_layer(torch.randn(1, 1, 300, 32), torch.randn(1, 1, 300, 32), 2, 32, 12)
    with pytest.raises(TritonUnavailableError):
        decode_attention(torch.randn(1, 2, 32), to_planes(layer))
