"""The tokens-on-M planes kernel (triton_kivi_swap.py) against the torch reference; runs only on CUDA."""

import pytest
import torch

from memvisor.kv.gpu import decode_attention_reference, quantize_layer, triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs CUDA and Triton")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("shape", [
    (1, 32, 8, 128, 4096 + 45),   # Llama-3.1-8B heads; 4064 quantized tokens: an odd number of planes tiles
    (2, 9, 3, 64, 1000),          # SmolLM2 heads (3 query heads per kv head), batch 2
    (1, 4, 1, 256, 700),          # Gemma 3: one kv head, head_dim 256
    (1, 8, 8, 128, 20),           # residual only
    (3, 16, 4, 128, 96),          # quantized tokens without residual
    (1, 32, 8, 128, 20000),       # many splits
])
def test_swap_kernel_matches_reference(shape, bits):
    from memvisor.kv.gpu.planes import to_planes
    from memvisor.kv.gpu.triton_decode import planes_decode_attention

    b, hq, hkv, d, t = shape
    g = torch.Generator(device="cuda").manual_seed(hash(shape) % 1000 + bits)
    # keys of one sign and large values: scores spread far, value scales far from 1 (subnormal codes)
    k = torch.randn(b, hkv, t, d, device="cuda", generator=g) * 2 + 0.5
    v = torch.randn(b, hkv, t, d, device="cuda", generator=g) * 4
    residual = 0 if t == 96 else 32
    layer = quantize_layer(k.bfloat16().float(), v.bfloat16().float(), bits, 32, residual)
    layer.k_res = layer.k_res.bfloat16().contiguous()
    layer.v_res = layer.v_res.bfloat16().contiguous()
    planes = to_planes(layer)
    q = torch.randn(b, hq, d, device="cuda", generator=g).bfloat16()
    want = decode_attention_reference(q, layer)
    for kw in ([dict(), dict(waves=1.0), dict(num_stages=3, waves=8.0)] if t == 20000 else [dict()]):
        got = planes_decode_attention(q, planes, swap=True, **kw)
        assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
        assert _rel(got, want) < 1e-2, (kw, _rel(got, want))
