"""Peers run beside memvisor in the same process: kvpress presses and transformers' QuantizedCache.

Both are optional imports: asking for a peer whose package is missing raises ``PeerUnavailable``
with the install line. A peer is a :class:`Method` like memvisor's own (``kv_methods.py``):
``new_cache()`` and ``prefill(model, ids, cache)``; the runner measures every method the same way.

- kvpress (0.5.5, pins transformers<5.3): a press compresses the context during one full prefill
  (forward hooks on each attention module), then the question and the answer run on the pruned
  ``DynamicCache`` uncompressed, as kvpress's own pipeline does (a config-less ``DynamicCache``, as
  its pipeline makes: on sliding-window models every layer then keeps every token). ``compression_ratio`` is the
  claimed fraction removed; the runner reports the bytes that really stay allocated.
- transformers ``QuantizedCache`` (backend quanto, needs optimum-quanto): 2 or 4 bits, its
  defaults (group 64, residual 128, axis 0). Its bytes are fixed by the bit width, not a budget.
"""

from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

KVPRESS_PRESSES = {
    "kvpress-snapkv": "SnapKVPress",
    "kvpress-knorm": "KnormPress",
    "kvpress-streamingllm": "StreamingLLMPress",
    "kvpress-expectedattention": "ExpectedAttentionPress",
}
QUANTO_PEERS = {"quanto-2bit": 2, "quanto-4bit": 4}
ALL_PEERS = [*KVPRESS_PRESSES, *QUANTO_PEERS]


class PeerUnavailable(RuntimeError):
    """A peer's package is not installed (the message gives the pip line)."""


@dataclass
class Method:
    """One way to hold the context's KV: ``new_cache()`` makes an empty cache, ``prefill(model,
    ids, cache, key)`` runs the context into it (``key``: the forward's cache argument name) and
    returns the last-token logits or None. ``blockwise``: prefill bounded by the budget."""

    name: str
    new_cache: Callable[[], Any]
    prefill: Callable[[Any, torch.Tensor, Any, str], Any]
    info: dict = field(default_factory=dict)
    blockwise: bool = False


def peers_available() -> list[str]:
    out = []
    if importlib.util.find_spec("kvpress") is not None:
        out += list(KVPRESS_PRESSES)
    if importlib.util.find_spec("optimum") is not None and importlib.util.find_spec("optimum.quanto") is not None:
        out += list(QUANTO_PEERS)
    return out


def _full_prefill(model: Any, ids: torch.Tensor, cache: Any, key: str) -> Any:
    pos = torch.arange(ids.shape[1]).unsqueeze(0)
    return model(input_ids=ids, position_ids=pos, use_cache=True, logits_to_keep=1, **{key: cache}).logits


def plain_method(model_config: Any = None) -> Method:
    """The uncompressed reference: transformers' DynamicCache built from the model's config (so
    sliding-window layers keep only their window, as ``generate`` does), one full prefill."""
    from transformers import DynamicCache

    return Method("uncompressed", lambda: DynamicCache(config=model_config), _full_prefill)


def blocked_prefill(block: int) -> Callable[[Any, torch.Tensor, Any, str], Any]:
    """A prefill of ``block`` tokens per forward into whatever cache it is given (no compression)."""
    from memvisor.kv.prefill import forward_blocks

    return lambda model, ids, cache, key: forward_blocks(model, ids, cache, block)[0]


def lossless_blocked_method(model_config: Any = None, block: int = 512) -> Method:
    """The reference's own cache, every bf16 key and value kept, prefilled ``block`` tokens at a time:
    only the order of float sums differs from the reference. Its fidelity is the floor that rounding
    alone sets for every method (BENCHMARKS.md kv: free-running greedy agreement 0.28 on SmolLM2)."""
    from transformers import DynamicCache

    return Method(f"blocked-{block}", lambda: DynamicCache(config=model_config), blocked_prefill(block),
                  {"block": block})


def kvpress_method(name: str, compression_ratio: float, model_config: Any = None) -> Method:
    if name not in KVPRESS_PRESSES:
        raise ValueError(f"unknown kvpress peer {name!r}; known: {sorted(KVPRESS_PRESSES)}")
    if importlib.util.find_spec("kvpress") is None:
        raise PeerUnavailable(f"peer {name} needs kvpress: pip install 'kvpress==0.5.5' (it pins transformers<5.3)")
    import kvpress
    from transformers import DynamicCache

    if not 0.0 <= compression_ratio < 1.0:
        raise ValueError(f"compression_ratio must be in [0, 1), got {compression_ratio}")
    press = getattr(kvpress, KVPRESS_PRESSES[name])(compression_ratio=compression_ratio)

    def prefill(model: Any, ids: torch.Tensor, cache: Any, key: str) -> Any:
        with press(model) if compression_ratio > 0 else contextlib.nullcontext():
            return _full_prefill(model, ids, cache, key)

    return Method(name, DynamicCache, prefill, {"compression_ratio": compression_ratio, "kvpress": kvpress.__name__})


def quanto_method(name: str, model_config: Any) -> Method:
    if name not in QUANTO_PEERS:
        raise ValueError(f"unknown QuantizedCache peer {name!r}; known: {sorted(QUANTO_PEERS)}")
    if importlib.util.find_spec("optimum") is None or importlib.util.find_spec("optimum.quanto") is None:
        raise PeerUnavailable(f"peer {name} needs optimum-quanto: pip install optimum-quanto")
    from transformers import QuantizedCache

    nbits = QUANTO_PEERS[name]

    def new_cache() -> Any:
        return QuantizedCache(backend="quanto", config=model_config, nbits=nbits)

    return Method(name, new_cache, _full_prefill, {"nbits": nbits, "q_group_size": 64, "residual_length": 128})
