"""Bounded block-wise prefill (EpiCache, Kim et al. 2025).

The input is fed ``block`` tokens per forward; after each forward every layer compresses itself
to its byte budget (the cache does it inside attention), so the KV held at any time is about the
budget plus one block, whatever the input length. A full prefill instead holds the whole input
before any compression.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from memvisor.errors import InvalidInput
from memvisor.kv.adapter import cache_kwarg
from memvisor.kv.cache import CompressedCache


@dataclass
class PrefillResult:
    """logits: [B, 1, vocab] of the last input token; peak_bytes: most cache bytes seen after any
    block's forward (before it was compressed); bytes: cache bytes at the end; blocks: forwards run."""

    logits: Tensor
    peak_bytes: int
    bytes: int
    blocks: int


@torch.no_grad()
def forward_blocks(model, input_ids: Tensor, cache, block: int) -> tuple[Tensor, int]:
    """Feed ``input_ids`` [B, T] into ``cache`` (any transformers cache) ``block`` tokens per forward, positions
    continuing the tokens the cache has seen; (logits [B, 1, vocab] of the last token, forwards run)."""
    if not isinstance(block, int) or isinstance(block, bool) or block < 1:
        raise InvalidInput(f"block must be an int >= 1, got {block!r}")
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        shape = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
        raise InvalidInput(f"input_ids must be a LongTensor [B, T] with T >= 1 (a batch of token ids), got {shape}")
    key = cache_kwarg(model)
    seen = cache.get_seq_length()
    logits = None
    n = 0
    for s in range(0, input_ids.shape[1], block):
        ids = input_ids[:, s:s + block]
        pos = torch.arange(seen + s, seen + s + ids.shape[1], device=ids.device).unsqueeze(0)
        out = model(input_ids=ids, position_ids=pos, use_cache=True, logits_to_keep=1, **{key: cache})
        logits = out.logits[:, -1:]
        n += 1
    return logits, n


def prefill_blockwise(model, input_ids: Tensor, cache: CompressedCache, block: int = 512) -> PrefillResult:
    """Prefill ``input_ids`` [B, T] into ``cache`` in blocks of ``block`` tokens.

    Peak KV ~ budget + one block. The peak is measured just after each block's tokens are stored
    and attended, before the layer compresses (i.e. the true high-water mark of every layer is
    bounded by its budget plus one block).
    """
    if not isinstance(cache, CompressedCache):  # checked first: a plain cache has no byte count to report
        raise InvalidInput(f"prefill_blockwise fills a CompressedCache (it reports its bytes), got "
                           f"{type(cache).__name__}; forward_blocks feeds any transformers cache block by block")
    logits, n = forward_blocks(model, input_ids, cache, block)
    cache.track_peak()
    return PrefillResult(logits=logits, peak_bytes=cache.peak_bytes, bytes=cache.nbytes(), blocks=n)
