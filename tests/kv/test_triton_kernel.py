"""The fused Triton kernel against the torch reference; runs only where CUDA and Triton are (the device)."""

import pytest
import torch

from memvisor.kv.gpu import (
    decode_attention,
    decode_attention_reference,
    dense_decode_attention,
    quantize_layer,
    triton_available,
)
from tests.kv.planes_cases import planes_case, rel_error

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs CUDA and Triton")


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("shape", [
    (1, 32, 8, 128, 4096 + 45),   # Llama-3.1-8B heads, residual of 45 tokens
    (2, 9, 3, 64, 1000),          # SmolLM2 heads, batch 2, odd length
    (1, 4, 1, 256, 700),          # Gemma 3 270M: one kv head, head_dim 256
    (1, 8, 8, 128, 20),           # residual only
    (3, 16, 4, 128, 96),          # quantized tokens without residual (R=0 below)
])
def test_kernel_matches_reference(bits, shape):
    b, hq, hkv, d, t = shape
    g = torch.Generator(device="cuda").manual_seed(hash(shape) % 1000 + bits)
    k = torch.randn(b, hkv, t, d, device="cuda", generator=g)
    v = torch.randn(b, hkv, t, d, device="cuda", generator=g)
    residual = 0 if t == 96 else 32
    layer = quantize_layer(k.bfloat16().float(), v.bfloat16().float(), bits, 32, residual)
    layer.k_res = layer.k_res.bfloat16().contiguous()
    layer.v_res = layer.v_res.bfloat16().contiguous()
    q = torch.randn(b, hq, d, device="cuda", generator=g).bfloat16()
    want = decode_attention_reference(q, layer)
    from memvisor.kv.gpu.triton_decode import kivi_decode_attention

    variants = [dict(variant="dequant", block_n=bn) for bn in (16, 64)] + [
        dict(variant="tile", block_n=bn, v_reshape=vr, num_warps=w, waves=wv)
        for bn, vr, w, wv in ((32, False, 4, 1.0), (64, True, 4, 4.0), (128, True, 8, 2.0), (256, False, 8, 4.0))] + [
        dict(variant="factored", block_n=bn, k_reshape=kr, v_reshape=vr, waves=wv)
        for bn, kr, vr, wv in ((16, False, False, 4.0), (64, True, True, 8.0), (32, False, True, 1.0))]
    for kw in variants:
        got = kivi_decode_attention(q, layer, **kw)
        assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
        assert rel_error(got, want) < 1e-2, (kw, rel_error(got, want))
    assert rel_error(decode_attention(q, layer), want) < 1e-2


def test_dense_triton_baseline_matches_float64():
    from memvisor.kv.gpu.triton_decode import dense_decode_attention_triton

    k = torch.randn(1, 8, 5000, 128, device="cuda").bfloat16()
    v = torch.randn(1, 8, 5000, 128, device="cuda").bfloat16()
    q = torch.randn(1, 32, 128, device="cuda").bfloat16()
    assert rel_error(dense_decode_attention_triton(q, k, v), dense_decode_attention(q, k, v)) < 1e-2


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("shape", [
    (1, 32, 8, 128, 4096 + 45),   # Llama-3.1-8B heads: whole tiles + residual
    (1, 32, 8, 128, 20000),       # many splits, a part-filled last tile
    (2, 9, 3, 64, 1000),          # SmolLM2 heads (3 query heads per kv head, 2 value groups)
    (1, 4, 1, 256, 700),          # Gemma 3 270M: head_dim 256 (32 replicated rows)
    (1, 8, 8, 128, 20),           # residual only
    (3, 16, 4, 128, 96),          # quantized tokens without residual (R=0 below)
])
def test_planes_kernel_matches_reference(shape, bits):
    from memvisor.kv.gpu.triton_decode import planes_decode_attention

    planes, q, want = planes_case(shape, bits, hash(shape) % 1000 + bits)
    variants = [dict()]
    if shape[4] == 20000:  # other settings (each a compile) on one shape: splits, warps, stages, the combine's chunks
        variants += [dict(num_warps=4, waves=1.0), dict(num_stages=3, waves=8.0), dict(maxnreg=232, num_stages=1),
                     dict(combine_block_s=16, combine_db=128, combine_warps=2)]
    for kw in variants:
        got = planes_decode_attention(q, planes, **kw)
        assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
        assert rel_error(got, want) < 1e-2, (kw, rel_error(got, want))
    assert rel_error(decode_attention(q, planes), want) < 1e-2
