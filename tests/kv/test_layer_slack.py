"""Decode-time eviction hysteresis (``LayerCore.compress``): the slack grows with the head's capacity, so a
long history is re-packed rarely; ``slack=0`` still evicts at every step the cap is exceeded."""

import torch

import memvisor.kv.layer as layer_mod
from memvisor.kv.layer import SLACK_SHARE, LayerConfig, LayerCore
from memvisor.kv.policies.streaming import StreamingLLM
from memvisor.kv.storage import QuantConfig

D = 64


def _prefilled(slack: int, tokens: int, budget: int) -> LayerCore:
    core = LayerCore(LayerConfig(0, None, QuantConfig(4, 32, 32), policy=StreamingLLM(4), budget_bytes=budget,
                                 slack=slack))
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, 1, tokens, D, generator=g).bfloat16()
    core.update(k, k)
    core.attend(torch.randn(1, 2, tokens, D, generator=g).bfloat16(), D ** -0.5)
    return core


def _decode_until_eviction(core: LayerCore, limit: int = 2000) -> tuple[int, int]:
    """Steps until the next eviction, and the tokens it left below the capacity (after the step)."""
    g = torch.Generator().manual_seed(1)
    before = core.evictions
    for step in range(1, limit):
        k = torch.randn(1, 1, 1, D, generator=g).bfloat16()
        core.update(k, k)
        core.attend(torch.randn(1, 2, 1, D, generator=g).bfloat16(), D ** -0.5)
        if core.evictions > before:
            return step, core.head_caps() - len(core.stores[0])
    raise AssertionError("no eviction")


def test_slack_grows_with_the_capacity_of_a_long_history(monkeypatch):
    budget = 400_000  # ~4,900 KIVI-4 tokens of one head of 64 channels, beside the bf16 residual
    runs = {}
    for share in (SLACK_SHARE, 10**9):  # the rule, and the fixed 32-token slack it replaced
        monkeypatch.setattr(layer_mod, "SLACK_SHARE", share)
        core = _prefilled(32, 12_000, budget)
        cap = core.head_caps()
        assert cap > 32 * SLACK_SHARE and len(core.stores[0]) <= cap  # the prefill sits at the cap: no slack
        _decode_until_eviction(core)  # the first decode eviction
        runs[share] = [_decode_until_eviction(core) for _ in range(4)]
        assert core.nbytes() <= budget
    assert all(below >= cap // SLACK_SHARE - 2 for _, below in runs[SLACK_SHARE]), (runs, cap)
    assert all(below == 32 for _, below in runs[10**9]), runs
    steps = {share: sum(s for s, _ in r) for share, r in runs.items()}
    assert steps[SLACK_SHARE] >= 3 * steps[10**9], steps  # re-packed a third as often, or less


def test_slack_zero_evicts_whenever_the_cap_is_exceeded():
    core = _prefilled(0, 12_000, 400_000)
    evicted = 0
    g = torch.Generator().manual_seed(2)
    for _ in range(20):
        before = core.evictions
        k = torch.randn(1, 1, 1, D, generator=g).bfloat16()
        core.update(k, k)
        core.attend(torch.randn(1, 2, 1, D, generator=g).bfloat16(), D ** -0.5)
        evicted += core.evictions > before
        assert core.nbytes() <= 400_000
    assert evicted >= 15


def test_short_histories_keep_the_fixed_slack():
    core = _prefilled(32, 1_500, 40_000)  # a cap under 32 * SLACK_SHARE tokens
    assert core.head_caps() < 32 * SLACK_SHARE
    _decode_until_eviction(core)
    _, below = _decode_until_eviction(core)
    assert 24 <= below <= 40, below
