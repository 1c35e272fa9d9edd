"""The ONE module that touches transformers' cache and attention plumbing (tested: 5.2.0, 5.24.0).

Everything version-specific lives here:
- :class:`HFLayer` subclasses the public ``CacheLayerMixin`` and forwards to a transformers-free
  :class:`~memvisor.kv.layer.LayerCore`. Signatures that moved between releases are accepted in
  both forms: ``update(k, v, cache_kwargs)`` (5.2) / ``update(k, v, **kwargs)`` (5.24);
  ``get_mask_sizes(cache_position)`` (5.2) / ``get_mask_sizes(query_length)`` (5.24);
  ``get_max_cache_shape`` (5.2) / ``get_max_length`` (5.24).
- :class:`HFCache` subclasses the public ``Cache``.
- An attention function is registered through the public ``AttentionInterface`` under
  :data:`ATTN_NAME` (and transformers' SDPA mask under the same name in ``AttentionMaskInterface``).
  A compressed layer's ``update`` returns the forward's own new key tensor; the attention function
  recognises that exact tensor object and runs the attention (``kv/attention.py``) of the layer that
  returned it. Any other call (a plain ``DynamicCache``, a passthrough layer, no cache) goes to
  transformers' own SDPA attention unchanged, so a model switched to :data:`ATTN_NAME` computes bit-identical
  outputs whenever nothing is compressed.
- :func:`cache_kwarg`: the forward argument naming the cache (``past_key_values`` up to 5.2x,
  ``cache`` in later releases, where the old name is deprecated).
No global monkeypatching: the registry entries are additions under a new name, and a model opts in
with :func:`use_kv_attention` (the public ``set_attn_implementation``).
"""

from __future__ import annotations

import inspect
import threading
import weakref
from typing import Any

import torch
import transformers
from torch import Tensor
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from memvisor.errors import InvalidInput
from memvisor.kv.layer import LayerCore

ATTN_NAME = "memvisor_kv"
TRANSFORMERS_VERSION = transformers.__version__


class PaddedBatchError(InvalidInput):
    """A batch whose rows are padded to a common length, on a compressed cache."""


class CacheStateError(InvalidInput):
    """A compressed cache whose layers disagree: a forward stored tokens that memvisor's attention never
    read (the model is not switched to it), or a forward failed midway."""


# id(key tensor returned by update) -> (weakref to it, layer). The weakref check makes a reused id
# (after the tensor died) miss instead of routing to the wrong layer.
_pending: dict[int, tuple[weakref.ref, LayerCore]] = {}
_lock = threading.Lock()


def _attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
               attention_mask: Tensor | None, dropout: float = 0.0, scaling: float | None = None,
               **kwargs: Any) -> tuple[Tensor, None]:
    with _lock:
        entry = _pending.pop(id(key), None)
    if entry is None or entry[0]() is not key:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    core = entry[1]
    if (isinstance(attention_mask, Tensor) and attention_mask.shape[0] > 1
            and not bool((attention_mask == attention_mask[:1]).all())):
        # The compressed path masks from its own storage indices (attention.py): per-row padding would be
        # attended as if it were text, silently; refuse it instead.
        raise PaddedBatchError("the compressed KV cache does not support padded batches (rows of different "
                               "lengths): give rows of equal length, or run them one at a time")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    return core.attend(query, scaling, softcap=kwargs.get("softcap")), None


AttentionInterface.register(ATTN_NAME, _attention)
AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


def use_kv_attention(model: torch.nn.Module) -> torch.nn.Module:
    """Switch ``model`` to the memvisor attention function (needed for compressed layers; exact
    SDPA behaviour otherwise). Returns the model."""
    model.set_attn_implementation(ATTN_NAME)
    return model


def uses_kv_attention(model: torch.nn.Module) -> bool:
    return getattr(model.config, "_attn_implementation", None) == ATTN_NAME


def cache_kwarg(model: torch.nn.Module) -> str:
    """Name of the forward argument that takes the cache on this transformers release."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def text_config(config: Any) -> Any:
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def layer_windows(config: Any) -> list[int | None]:
    """Per decoder layer: its sliding window in tokens, or None for full attention."""
    cfg = text_config(config)
    window = getattr(cfg, "sliding_window", None) or getattr(cfg, "attention_chunk_size", None)
    types = getattr(cfg, "layer_types", None)
    if types is None:
        types = ["sliding_attention" if window is not None else "full_attention"] * cfg.num_hidden_layers
    return [window if t in ("sliding_attention", "chunked_attention") else None for t in types]


def kv_shape(config: Any) -> tuple[int, int, int]:
    """(n_layers, n_kv_heads, head_dim) of the decoder."""
    cfg = text_config(config)
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return cfg.num_hidden_layers, kv, head_dim


class HFLayer(CacheLayerMixin):
    """transformers view of one :class:`LayerCore`."""

    is_compileable = False
    is_croppable = False

    def __init__(self, core: LayerCore) -> None:
        super().__init__()
        self.core = core
        self.is_sliding = core.cfg.window is not None
        self.sliding_window = core.cfg.window

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.core.init(key_states)
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any
               ) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        full = self.core.update(key_states, value_states)
        if full is not None:
            return full
        with _lock:
            for k in [k for k, (ref, _) in _pending.items() if ref() is None]:
                del _pending[k]  # stale entries of forwards that raised before attention
            _pending[id(key_states)] = (weakref.ref(key_states), self.core)
        return key_states, value_states

    def get_mask_sizes(self, cache_position_or_length: Tensor | int, *args: Any) -> tuple[int, int]:
        q = (cache_position_or_length if isinstance(cache_position_or_length, int)
             else int(cache_position_or_length.shape[0]))
        return self.core.mask_sizes(q)

    def get_seq_length(self) -> int:
        return self.core.seq_length()

    def get_max_cache_shape(self) -> int:  # transformers 5.2
        return self.core.cfg.window or -1

    def get_max_length(self) -> int:  # transformers 5.24
        return self.core.cfg.window or -1

    def reset(self) -> None:
        self.core.reset()
        self.is_initialized = False

    def offload(self) -> None:  # storage is per-head objects, not .keys/.values: nothing to move
        return None

    def prefetch(self) -> None:
        return None

    def crop(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("a compressed cache cannot be cropped: evicted tokens are gone")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("beam search is not supported by the compressed cache")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("batch expansion is not supported by the compressed cache")

    def batch_select_indices(self, indices: Tensor) -> None:
        raise NotImplementedError("batch selection is not supported by the compressed cache")


class HFCache(Cache):
    """A transformers ``Cache`` over :class:`HFLayer` objects (one per decoder layer)."""

    def __init__(self, cores: list[LayerCore]) -> None:
        super().__init__(layers=[HFLayer(c) for c in cores])
        self.cores = cores

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args: Any, **kwargs: Any
               ) -> tuple[Tensor, Tensor]:
        if layer_idx == 0:  # a forward starts: the last one must have completed on every layer
            self.check_complete()
            held = {c.batch_size for c in self.cores} - {None}
            if held and held != {key_states.shape[0]}:
                raise CacheStateError(f"this cache holds a batch of {held.pop()} row(s), the forward gives "
                                      f"{key_states.shape[0]}: a cache holds one request; call cache.reset() first")
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def check_complete(self) -> None:
        """Raise :class:`CacheStateError` unless every layer saw the same tokens and its attention ran.

        Without this, a model on another attention function attends only to each forward's own tokens
        (a compressed layer's ``update`` hands back just those), silently: wrong text, and nothing is
        ever compressed. A forward that raised midway leaves the first layers a forward ahead."""
        waiting = [c.cfg.layer_idx for c in self.cores if c.awaiting_attention]
        if waiting:
            raise CacheStateError(
                f"the last forward stored tokens in layer(s) {_short(waiting)} whose attention never ran: the model "
                f"must use memvisor's attention (memvisor.kv.use_kv_attention(model); load_local_model does it "
                f"unless kv_attention=False), and a forward that failed midway leaves the cache unusable: call "
                f"cache.reset() and prefill again")
        seen = {c.cum for c in self.cores}
        if len(seen) > 1:
            raise CacheStateError(f"the cache's layers hold different token counts ({sorted(seen)}): a forward "
                                  f"failed midway; call cache.reset() and prefill again")


def _short(items: list[int]) -> str:
    return ", ".join(map(str, items[:8])) + (f" and {len(items) - 8} more" if len(items) > 8 else "")
