"""The one module that reads transformers' own caches from the outside (DynamicCache, QuantizedCache):
the KV benchmark's peers expose no byte count, so their layers' attributes are walked here. This is
the only place that reads a private attribute of transformers (QuantizedCache's ``_quantized_keys``:
its quantized history has no public accessor); memvisor's own caches are measured through their
public ``nbytes()`` / ``stored_tokens()``.
"""

from __future__ import annotations

from typing import Any

import torch


def _tensor_bytes(t: torch.Tensor, seen: set[int]) -> int:
    if id(t) in seen:
        return 0
    seen.add(id(t))
    flatten = getattr(type(t), "__tensor_flatten__", None)
    if flatten is not None and type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter):
        names, _ = t.__tensor_flatten__()  # quanto's packed tensors: count their inner tensors
        return sum(_tensor_bytes(getattr(t, n), seen) for n in names)
    return t.numel() * t.element_size()


def _object_bytes(obj: Any, seen: set[int], depth: int = 0) -> int:
    if isinstance(obj, torch.Tensor):
        return _tensor_bytes(obj, seen)
    if depth > 3 or id(obj) in seen:
        return 0
    if isinstance(obj, (list, tuple)):
        seen.add(id(obj))
        return sum(_object_bytes(x, seen, depth + 1) for x in obj)
    if isinstance(obj, dict):
        seen.add(id(obj))
        return sum(_object_bytes(x, seen, depth + 1) for x in obj.values())
    return 0


def layer_bytes(cache: Any) -> int:
    """Bytes of every tensor held by any attribute of any layer of a transformers cache (each tensor
    once, tensor subclasses unpacked): what stays allocated, whatever a method claims."""
    seen: set[int] = set()
    return sum(_object_bytes(value, seen) for layer in getattr(cache, "layers", []) for value in vars(layer).values())


def layer_elements(cache: Any) -> int:
    """K + V elements a transformers cache represents: its full-precision ``keys`` plus QuantizedCache's
    quantized history, times 2."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for keys in (getattr(layer, "keys", None), getattr(layer, "_quantized_keys", None)):
            if keys is not None and hasattr(keys, "shape") and len(keys.shape) == 4:
                b, h, t, d = keys.shape
                total += 2 * b * h * t * d
    return total
