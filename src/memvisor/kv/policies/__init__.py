"""KV-cache compression policies (pure tensor code). See ``base`` for the protocol."""

from memvisor.kv.policies.base import (
    BudgetTooSmallError,
    ChannelPolicy,
    HeadBudget,
    LayerBudget,
    MergePolicy,
    PolicyError,
    TokenPolicy,
    select,
    valid_mask,
)

__all__ = [
    "BudgetTooSmallError",
    "ChannelPolicy",
    "HeadBudget",
    "LayerBudget",
    "MergePolicy",
    "PolicyError",
    "TokenPolicy",
    "select",
    "valid_mask",
]
