"""The quantized layer both decode kernels' tests (test_triton_kernel.py, test_gpu_swap_kernel.py) check
against the torch reference."""

import torch

from memvisor.kv.gpu import decode_attention_reference, quantize_layer


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def planes_case(shape: tuple[int, int, int, int, int], bits: int, seed: int, device: str = "cuda"):
    """(planes layer, bf16 query [B, Hq, D], reference output) for ``shape = (B, Hq, Hkv, D, T)``.

    Keys of one sign and large values, so scores spread far and value scales are far from 1 (subnormal
    codes); no full-precision residual when T == 96, 32 tokens otherwise."""
    from memvisor.kv.gpu.planes import to_planes

    b, hq, hkv, d, t = shape
    g = torch.Generator(device=device).manual_seed(seed)
    k = torch.randn(b, hkv, t, d, device=device, generator=g) * 2 + 0.5
    v = torch.randn(b, hkv, t, d, device=device, generator=g) * 4
    residual = 0 if t == 96 else 32
    layer = quantize_layer(k.bfloat16().float(), v.bfloat16().float(), bits, 32, residual)
    layer.k_res = layer.k_res.bfloat16().contiguous()
    layer.v_res = layer.v_res.bfloat16().contiguous()
    q = torch.randn(b, hq, d, device=device, generator=g).bfloat16()
    return to_planes(layer), q, decode_attention_reference(q, layer)
