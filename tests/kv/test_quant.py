"""KIVI quantization: exact packing, error within the bound of the bit width, the agreed layout."""

import pytest
import torch

from memvisor.kv import quant


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("dim", [-2, -1])
def test_pack_unpack_roundtrip_any_length(bits, dim):
    g = torch.Generator().manual_seed(0)
    for n in (1, 3, 8, 37):
        shape = (2, 3, n, 5) if dim == -2 else (2, 3, 5, n)
        codes = torch.randint(0, 1 << bits, shape, generator=g, dtype=torch.uint8)
        packed = quant.pack(codes, bits, dim)
        assert packed.dtype == torch.uint8 and packed.is_contiguous()
        assert packed.shape[dim] == -(-n * bits // 8)
        assert torch.equal(quant.unpack(packed, bits, dim, n), codes)


def test_bit_order_is_low_bits_first_along_tokens():
    # tokens 0..3 with codes 1, 2, 3, 0 at 2 bits -> byte 0b00_11_10_01
    codes = torch.tensor([1, 2, 3, 0], dtype=torch.uint8).view(1, 4, 1)
    assert quant.pack(codes, 2, dim=1).item() == 0b00111001


@pytest.mark.parametrize("bits", [2, 4])
def test_keys_error_within_bound_and_layout(bits):
    g = torch.Generator().manual_seed(1)
    k = torch.randn(2, 3, 64, 64, generator=g) * 2
    k[..., 5] += 30  # an outlier channel: per-channel scales keep the other channels precise
    codes, scale, zero = quant.quantize_keys(k, bits, 32)
    assert codes.shape == (2, 3, 64 * bits // 8, 64) and codes.dtype == torch.uint8
    assert scale.shape == zero.shape == (2, 3, 2, 64) and scale.dtype == torch.float16
    deq = quant.dequantize_keys(codes, scale, zero, bits, 64, group=32)
    err = (deq - k).abs()
    assert (err <= quant.error_bound(k, bits, 32, "keys") + 1e-6).all()
    # the bound is tight enough to mean something: half a step of the group's range
    step = (k.amax(-2) - k.amin(-2)).max() / ((1 << bits) - 1)
    assert err.max() <= step / 2 * 1.01 + 0.05
    # and it is really used: 4 bits is much more precise than 2
    assert err.mean() < (0.2 if bits == 4 else 0.8)


@pytest.mark.parametrize("bits", [2, 4])
def test_values_error_within_bound_and_layout(bits):
    g = torch.Generator().manual_seed(2)
    v = torch.randn(1, 3, 40, 64, generator=g)
    codes, scale, zero = quant.quantize_values(v, bits, 32)
    assert codes.shape == (1, 3, 40, 64 * bits // 8)
    assert scale.shape == zero.shape == (1, 3, 40, 2)
    deq = quant.dequantize_values(codes, scale, zero, bits, 64)
    assert ((deq - v).abs() <= quant.error_bound(v, bits, 32, "values") + 1e-6).all()


def test_constant_group_is_exact():
    k = torch.full((1, 32, 8), 0.5)
    codes, scale, zero = quant.quantize_keys(k, 2, 32)
    assert torch.equal(quant.dequantize_keys(codes, scale, zero, 2, 32, group=32), k)


def test_gathered_scales_equal_broadcast_scales():
    k = torch.randn(1, 64, 16)
    codes, scale, zero = quant.quantize_keys(k, 4, 32)
    a = quant.dequantize_keys(codes, scale, zero, 4, 64, group=32)
    b = quant.dequantize_keys(codes, scale, zero, 4, 64, group_of_token=torch.arange(64) // 32)
    assert torch.equal(a, b)


def test_bad_input_raises_typed_errors():
    with pytest.raises(quant.QuantError):
        quant.quantize_keys(torch.randn(1, 30, 8), 2, 32)  # not whole groups
    with pytest.raises(quant.QuantError):
        quant.quantize_values(torch.randn(1, 4, 48), 2, 32)  # channels not a multiple of G
    with pytest.raises(quant.QuantError):
        quant.quantize_keys(torch.randn(1, 32, 8), 3, 32)


def test_bits_per_element_goals():
    assert quant.bits_per_element(2, 32) == 3.0 <= 3.2
    assert quant.bits_per_element(4, 32) == 5.0 <= 5.2
