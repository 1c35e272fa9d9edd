"""Activation memory: a compressed KV cache for transformers models under a real byte budget.

Public API (see each module's docstring):
- :class:`CompressedCache`, :class:`CacheSpec` — the cache and its knobs (``budget_bytes``,
  ``quant`` none/kivi2/kivi4, ``group``, ``residual``, policies); ``cache.nbytes()``.
- :func:`uncompressed_bytes` — a plain cache's bytes, what a budget is a fraction of.
- :func:`prefill_blockwise` — bounded block-wise prefill (peak ~ budget + one block).
- :func:`load_local_model` — SmolLM2 / Gemma 3 from their PyPI packages.
- :func:`use_kv_attention`, :func:`cache_kwarg`, :data:`ATTN_NAME` — transformers wiring.
- :mod:`memvisor.kv.quant` — the KIVI layout shared with the GPU kernel.
"""

from memvisor.kv.adapter import (ATTN_NAME, TRANSFORMERS_VERSION, CacheStateError, PaddedBatchError, cache_kwarg,
                                 use_kv_attention)
from memvisor.kv.budget import BudgetError, BudgetWarning, TokenCost, token_cost
from memvisor.kv.cache import CacheSpec, CacheSpecError, CompressedCache, uncompressed_bytes
from memvisor.kv.models import ModelNotFoundError, load_local_model
from memvisor.kv.prefill import PrefillResult, prefill_blockwise
from memvisor.kv.storage import HeadStore, QuantConfig

__all__ = [
    "ATTN_NAME",
    "BudgetError",
    "BudgetWarning",
    "CacheSpec",
    "CacheSpecError",
    "CacheStateError",
    "CompressedCache",
    "HeadStore",
    "ModelNotFoundError",
    "PaddedBatchError",
    "PrefillResult",
    "QuantConfig",
    "TRANSFORMERS_VERSION",
    "TokenCost",
    "cache_kwarg",
    "load_local_model",
    "prefill_blockwise",
    "token_cost",
    "uncompressed_bytes",
    "use_kv_attention",
]
