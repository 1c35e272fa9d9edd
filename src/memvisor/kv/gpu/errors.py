"""Typed errors of the GPU decode-attention path."""


class KVLayoutError(ValueError):
    """A quantized cache's tensors do not follow the agreed KIVI layout (shape, dtype, bits, group)."""


class TritonUnavailableError(RuntimeError):
    """The fused kernel was asked for but Triton or a CUDA device is missing."""
