"""CPU kernels of the KV layer (numba): the decode step of a quantized layer (:mod:`memvisor.kv.cpu.cache_path`).
The torch path (:mod:`memvisor.kv.attention`) is their reference and serves whatever they do not."""

from memvisor.kv.cpu.cache_path import applies, available, decode

__all__ = ["applies", "available", "decode"]
