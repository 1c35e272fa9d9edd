"""Decode attention over the KIVI-quantized cache: a fused Triton kernel on CUDA, a torch reference elsewhere.

``decode_attention(q, layer)`` picks the Triton kernel when ``q`` is on a CUDA device and Triton
imports, else the block-by-block torch reference (which is also what tests check the kernel
against). Shapes: q ``[B, Hq, D]``; ``layer`` a :class:`KiviLayer` in the agreed layout.
"""

from __future__ import annotations

import importlib.util

import torch

from memvisor.kv.gpu.errors import KVLayoutError, TritonUnavailableError
from memvisor.kv.gpu.layout import (
    KiviLayer,
    dequantize_keys,
    dequantize_values,
    pack_codes,
    quantize_keys,
    quantize_layer,
    quantize_values,
    random_layer,
    unpack_codes,
)
from memvisor.kv.gpu.planes import PlanesLayer, to_planes
from memvisor.kv.gpu.reference import decode_attention_reference, dense_decode_attention

__all__ = [
    "KVLayoutError", "KiviLayer", "PlanesLayer", "TritonUnavailableError", "decode_attention", "decode_attention_reference",
    "dense_decode_attention", "dequantize_keys", "dequantize_values", "pack_codes", "quantize_keys",
    "quantize_layer", "quantize_values", "random_layer", "to_planes", "triton_available", "unpack_codes",
]


def triton_available() -> bool:
    """True when Triton is installed and a CUDA device is visible."""
    return torch.cuda.is_available() and importlib.util.find_spec("triton") is not None


def decode_attention(q: torch.Tensor, layer: KiviLayer | PlanesLayer, sm_scale: float | None = None,
                     use_triton: bool | None = None, pdl: bool | None = None) -> torch.Tensor:
    """One decode step's attention over a quantized layer: ``[B, Hq, D]`` in q's dtype.

    A :class:`PlanesLayer` (2- or 4-bit codes repacked for the fast kernels, see planes.py) runs the
    Gluon operand-swap kernel (group 32, up to 4 query heads per kv head, head_dim 64-256) or else the
    planes kernel, and needs CUDA + Triton; a :class:`KiviLayer` runs the cache-layout kernel on
    CUDA or the block-by-block torch reference elsewhere.

    ``use_triton``: None = automatic (CUDA + Triton), True = require the kernel (raises
    ``TritonUnavailableError`` if it cannot run), False = torch reference.
    ``pdl``: the swap kernel's programmatic dependent launch (pdl.py; None = where available). Its first planes
    are read before the kernels before it end: pass False when those kernels wrote the planes.
    """
    want = use_triton if use_triton is not None else (q.is_cuda and triton_available())
    if want:
        if not (q.is_cuda and triton_available()):
            raise TritonUnavailableError("the fused kernel needs Triton and a CUDA tensor")
        from memvisor.kv.gpu.triton_decode import (
            kivi_decode_attention,
            planes_decode_attention,
            swap_decode_attention,
            swap_supported,
        )

        if isinstance(layer, PlanesLayer):
            # the Gluon operand-swap kernel where it applies (faster on H100 at 8k-64k tokens, both widths:
            # BENCHMARKS.md kv-gpu), else the Triton planes kernel
            if swap_supported(q, layer):
                return swap_decode_attention(q, layer, sm_scale, pdl=pdl)
            return planes_decode_attention(q, layer, sm_scale)
        return kivi_decode_attention(q, layer, sm_scale)
    if isinstance(layer, PlanesLayer):
        raise TritonUnavailableError("a cache in the planes layout is read by the CUDA kernel only")
    return decode_attention_reference(q, layer, sm_scale).to(q.dtype)
