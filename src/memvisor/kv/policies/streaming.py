"""StreamingLLM: attention sinks + a window of recent tokens.

Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024.

Keeps the first ``sinks`` tokens (the model dumps attention on them) and the newest tokens up to
the budget; everything in between is forgotten. Needs no queries.

Shapes/units: ``scores`` returns float32 [B, Hkv, T] = the token's index in storage order (0 = oldest
kept token), plus T for the sinks, so the top-k under a budget is "sinks + the newest budget - sinks
tokens" even when the budget is below the protected count.
Knobs: ``sinks`` (tokens, default 4); ``window`` (tokens always kept at the recent end, default 0:
the window is whatever the budget leaves after the sinks).
Positions: StreamingLLM re-assigns RoPE positions inside the cache; that is the cache's business
(this policy only decides which tokens stay).
"""

from __future__ import annotations

import torch
from torch import Tensor

from memvisor.kv.policies.base import PolicyError, TokenPolicy
from memvisor.kv.policies._stats import ends, finish_scores


class StreamingLLM(TokenPolicy):
    name = "streaming"
    needs_queries = False
    scores_use_kv = False  # scores come from positions / accumulated statistics

    def __init__(self, sinks: int = 4, window: int = 0) -> None:
        if sinks < 0 or window < 0:
            raise PolicyError(f"sinks and window must be >= 0, got sinks={sinks}, window={window}")
        self.sinks = int(sinks)
        self.window = int(window)

    def scores(self, keys: Tensor, values: Tensor, *, lengths: Tensor | None = None) -> Tensor:
        B, H, T, _ = keys.shape
        recency = torch.arange(T, dtype=torch.float32)
        # sinks outrank every other token, so a budget below sinks + window drops window tokens first
        recency[: self.sinks] += T
        return finish_scores(recency.expand(B, H, T), T, lengths)

    def protected(self, T: int) -> Tensor:
        return ends(T, self.sinks, self.window)
