"""A statistics policy fed by the cache's own attention (``observe_probs``, decode steps and short appends)
gathers the same statistics, and so keeps the same tokens, as when it recomputes the attention from the
whole dequantized history (``observe``, what prefill blocks through SDPA still do)."""

import pytest
import torch

from memvisor.kv.layer import LayerConfig, LayerCore
from memvisor.kv.policies.h2o import H2O
from memvisor.kv.policies.head_adakv import AdaKVHeadBudget
from memvisor.kv.policies.scissorhands import Scissorhands
from memvisor.kv.storage import QuantConfig

RECIPES = {
    "h2o": lambda: dict(policy=H2O(recent=16, sinks=4)),
    "h2o-adakv": lambda: dict(policy=H2O(recent=16, sinks=4), head_budget=AdaKVHeadBudget()),
    "scissorhands": lambda: dict(policy=Scissorhands(history=16, sinks=4)),
}


def _run(recipe: str, window: int | None, handed: bool, monkeypatch) -> tuple[LayerCore, list, list]:
    if not handed:
        monkeypatch.setattr(LayerCore, "_hands_probs", lambda self, scaling, softcap: False)
    g = torch.Generator().manual_seed(5)
    B, Hq, Hkv, D = 1, 8, 4, 64
    core = LayerCore(LayerConfig(0, window, QuantConfig(4, 32, 32), budget_bytes=160_000, slack=8,
                                 **RECIPES[recipe]()))
    outs, lengths, calls = [], [], []
    pol = core.cfg.policy
    real = pol.observe  # count the forwards whose statistics were recomputed from the history
    pol.observe = lambda *a, **k: (calls.append("observe"), real(*a, **k))[1]
    for n in [200] + [1] * 40 + [7] + [1] * 20:
        k, v, q = (torch.randn(B, h, n, D, generator=g) for h in (Hkv, Hkv, Hq))
        core.update(k, v)
        outs.append(core.attend(q, D ** -0.5))
        lengths.append(core.lengths())
    monkeypatch.undo()
    return core, outs, lengths, calls


@pytest.mark.parametrize("recipe", sorted(RECIPES))
@pytest.mark.parametrize("window", [None, 96])
def test_statistics_from_the_attention_equal_the_recomputed_ones(recipe, window, monkeypatch):
    core, outs, lengths, calls = _run(recipe, window, True, monkeypatch)
    ref, ref_outs, ref_lengths, ref_calls = _run(recipe, window, False, monkeypatch)
    # the 200-token prefill goes through SDPA and recomputes; every later forward hands its probabilities
    assert len(calls) == 1 and len(ref_calls) == len(outs)
    assert lengths == ref_lengths and (window is not None or core.evictions >= 3)
    for a, b in zip(outs, ref_outs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    if recipe.startswith("h2o"):
        torch.testing.assert_close(core.cfg.policy.acc, ref.cfg.policy.acc, atol=1e-5, rtol=1e-5)
    else:
        assert torch.equal(core.cfg.policy.hits, ref.cfg.policy.hits)


def test_a_policy_with_its_own_logit_scale_recomputes(monkeypatch):
    """H2O told another scale than the model's computes its statistics itself (``observe``)."""
    core = LayerCore(LayerConfig(0, None, QuantConfig(4, 32, 32), budget_bytes=160_000,
                                 policy=H2O(recent=16, scaling=0.3)))
    calls = []
    real = core.cfg.policy.observe
    monkeypatch.setattr(core.cfg.policy, "observe", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    for n in (100, 1, 1):
        core.update(torch.randn(1, 2, n, 64), torch.randn(1, 2, n, 64))
        core.attend(torch.randn(1, 4, n, 64), 64 ** -0.5)
    assert len(calls) == 3 and core.cfg.policy.acc.shape == (1, 2, 102)
