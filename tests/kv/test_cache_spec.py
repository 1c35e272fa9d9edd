"""CacheSpec validation, budget arithmetic and the dense export, without running a model."""

import pytest
import torch
from transformers import LlamaConfig

from memvisor.kv import BudgetError, CacheSpec, CacheSpecError, CompressedCache, token_cost
from memvisor.kv.budget import split_layers
from memvisor.kv.policies import PyramidLayerBudget

CFG = LlamaConfig(num_hidden_layers=4, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=256, vocab_size=100)


@pytest.mark.parametrize("kw, message", [
    (dict(quant="kivi3"), "quant must be"), (dict(budget_bytes=-1), "budget_bytes"), (dict(group=0), "group"),
    (dict(block=100), "multiple of 8"), (dict(quant="kivi2", group=12), "multiple of 8"),
    (dict(budget_bytes=1.5), "budget_bytes"), (dict(budget_bytes=True), "budget_bytes"),
    (dict(fused_decode="no"), "fused_decode"), (dict(token_policy="h2o"), "make_policy"),
    (dict(head_budget=object()), "head_budget"), (dict(quant="kivi4", group=24), "divide the model's head_dim"),
])
def test_bad_spec_raises_typed_error(kw, message):
    with pytest.raises(CacheSpecError, match=message):
        CompressedCache(CFG, CacheSpec(**kw))


def test_statistics_of_a_fixed_size_over_a_layer_budget_are_refused_when_the_cache_is_built():
    """SnapKV keeps its window of queries whatever the layer holds: 32 x 4 query heads x 32 channels x 4 bytes
    (float32) = 16 KiB a layer. A budget leaving a layer less can never be met: refused now, not mid-forward."""
    from memvisor.kv.policies import SnapKV

    with pytest.raises(BudgetError, match="snapkv policy keeps 16384 B"):
        CompressedCache(CFG, CacheSpec(budget_bytes=4 * 12_000, quant="kivi4", token_policy=SnapKV(window=32)))
    CompressedCache(CFG, CacheSpec(budget_bytes=4 * 40_000, quant="kivi4", token_policy=SnapKV(window=32)))


def test_a_spec_or_config_of_the_wrong_kind_is_named():
    with pytest.raises(CacheSpecError, match="spec must be a CacheSpec"):
        CompressedCache(CFG, {"quant": "kivi4"})
    with pytest.raises(CacheSpecError, match="model.config"):
        CompressedCache(object(), CacheSpec())


def test_numpy_integer_budgets_are_integers():
    import numpy as np

    cache = CompressedCache(CFG, CacheSpec(budget_bytes=np.int64(200_000), context_tokens=np.int32(100)))
    assert cache.spec.budget_bytes == 200_000 and type(cache.spec.budget_bytes) is int


def test_uncompressed_bytes_counts_every_layer_head_and_row():
    from memvisor.kv import uncompressed_bytes

    # 4 layers x 2 KV heads x 32 channels x (k, v) x 4 bytes (float32 by default) x 10 tokens x 3 rows
    assert uncompressed_bytes(CFG, 10, batch_size=3) == 4 * 2 * 32 * 2 * 4 * 10 * 3
    assert uncompressed_bytes(CFG, 10, dtype=torch.bfloat16) == 4 * 2 * 32 * 2 * 2 * 10
    with pytest.raises(CacheSpecError, match="tokens"):
        uncompressed_bytes(CFG, -1)


def test_token_cost_matches_layout():
    c = token_cost(1, 64, 2, 2, 32, 32, track_pos=False)
    # 2-bit codes for k and v (2 * 16 B) + key scale/zero per 32 tokens (64 * 4 / 32 B)
    # + value scale/zero (2 groups * 4 B) + int16 group size (2 / 32 B)
    assert c.q == 32 + 8 + 8 + 0.0625
    # mixed precision: 4-bit key codes (32 B) + 2-bit value codes (16 B), same scales
    assert token_cost(1, 64, 2, 4, 32, 32, False, value_bits=2).q == 32 + 16 + 8 + 8 + 0.0625
    assert c.fp == 256 and c.residual_max == 63
    assert c.capacity(63 * 256 + 10 * c.q) == 73
    assert token_cost(1, 64, 2, None, 32, 32, False).capacity(2560) == 10


def test_split_layers_respects_total_and_windows():
    costs = [token_cost(1, 64, 2, None, 32, 32, w is not None) for w in (8, None, 8, None)]
    budget = 400 * int(costs[0].fp)  # a whole number of tokens per layer: equal shares to start
    per = split_layers(budget, costs, 2, [8, None, 8, None], None)
    assert sum(per) <= budget
    assert per[0] == per[2] == 7 * 2 * costs[0].fp  # sliding layers need at most window-1 tokens
    assert per[1] == per[3] > per[0]  # the rest went to the full layers
    pyr = split_layers(100_000, [costs[1]] * 4, 2, [None] * 4, PyramidLayerBudget())
    assert pyr[0] > pyr[-1] and sum(pyr) <= 100_000
    with pytest.raises(BudgetError):
        CompressedCache(CFG, CacheSpec(budget_bytes=10))


def test_dense_layer_export_has_agreed_layout():
    cache = CompressedCache(CFG, CacheSpec(quant="kivi2"))
    core = cache.cores[0]
    k, v = torch.randn(1, 2, 100, 32), torch.randn(1, 2, 100, 32)
    assert core.update(k, v) is None
    core.attend(torch.randn(1, 4, 100, 32), 32 ** -0.5)
    d = cache.dense_layer(0)
    assert d["k_codes"].shape == (1, 2, 64 * 2 // 8, 32) and d["k_codes"].dtype == torch.uint8
    assert d["k_scale"].shape == (1, 2, 2, 32) and d["v_codes"].shape == (1, 2, 64, 8)
    assert d["v_scale"].shape == (1, 2, 64, 1) and d["k_res"].shape == (1, 2, 36, 32)
    group_sizes = 2 * 2 * 2  # per head: 2 int16 group sizes
    assert sum(t.numel() * t.element_size() for t in d.values()) + group_sizes == cache.nbytes()
    with pytest.raises(CacheSpecError):
        cache.dense_layer(1)


def test_mixed_precision_cache_stores_each_width_and_refuses_the_dense_layout():
    cache = CompressedCache(CFG, CacheSpec(quant="kivi-k4v2"))
    core = cache.cores[0]
    core.update(torch.randn(1, 2, 100, 32), torch.randn(1, 2, 100, 32))
    core.attend(torch.randn(1, 4, 100, 32), 32 ** -0.5)
    st = core.stores[0]
    assert st.k_codes.shape == (1, 64 * 4 // 8, 32) and st.v_codes.shape == (1, 64, 32 * 2 // 8)
    assert cache.nbytes() == sum(t.numel() * t.element_size() for s in core.stores for t in s.tensors().values())
    with pytest.raises(CacheSpecError):
        cache.dense_layer(0)


def test_recipe_builds_its_spec_and_keeps_sinks_plus_newest_under_the_budget():
    from memvisor.kv.cache import RECIPES
    from memvisor.kv.policies import StreamingLLM

    a, b = CacheSpec.from_recipe("kivi4-stream", 400_000), CacheSpec.from_recipe("kivi4-stream", 400_000)
    assert (a.quant, a.group, a.residual, a.budget_bytes) == ("kivi4", 32, 128, 400_000)
    assert isinstance(a.token_policy, StreamingLLM) and a.token_policy.sinks == 4
    assert a.token_policy is not b.token_policy  # fresh policy objects per spec
    assert CacheSpec.from_recipe("kivi4-stream", None, residual=64).residual == 64
    with pytest.raises(CacheSpecError):
        CacheSpec.from_recipe("nope", 1000)
    assert set(RECIPES) >= {"kivi4-stream"}
    cache = CompressedCache(CFG, a)
    g = torch.Generator().manual_seed(0)
    T = 600
    k, v = torch.randn(1, 2, T, 32, generator=g), torch.randn(1, 2, T, 32, generator=g)
    core = cache.cores[0]
    core.update(k, v)
    core.attend(torch.randn(1, 4, T, 32, generator=g), 32 ** -0.5)
    assert core.nbytes() <= cache.layer_budget_bytes[0]
    for h, st in enumerate(core.stores):
        kd, _ = st.dense(torch.float32)
        n = kd.shape[1]
        assert 200 < n < T  # evicted, but not wholesale
        nearest = torch.cdist(kd[0], k[0, h]).argmin(-1).tolist()  # which input token each kept key is
        assert nearest == [0, 1, 2, 3] + list(range(T - (n - 4), T))


def _feed(core, T, step, g):
    """Append T random tokens to one layer core in forwards of ``step`` tokens (update + attend)."""
    for s in range(0, T, step):
        n = min(step, T - s)
        core.update(torch.randn(1, 2, n, 32, generator=g), torch.randn(1, 2, n, 32, generator=g))
        core.attend(torch.randn(1, 4, n, 32, generator=g), 32 ** -0.5)


@pytest.mark.parametrize("residual", [32, 128])
def test_prefilled_cache_sits_at_its_budget_not_below(residual):
    """Block forwards evict to the budget exactly (no decode slack), and the cap counts the residual
    the heads hold, not its largest size: the old planner left kivi4 r128 ~16% under its budget."""
    from memvisor.kv.policies import StreamingLLM

    cache = CompressedCache(CFG, CacheSpec(budget_bytes=400_000, quant="kivi4", residual=residual,
                                           token_policy=StreamingLLM(sinks=4)))
    core, cap = cache.cores[0], cache.layer_budget_bytes[0]
    g = torch.Generator().manual_seed(1)
    _feed(core, 1200, 100, g)
    assert 0.99 * cap <= core.nbytes() <= cap
    for _ in range(40):  # decode: one token per forward, under the cap after every step
        _feed(core, 1, 1, g)
        assert core.nbytes() <= cap
    assert core.nbytes() >= 0.8 * cap  # the decode slack is bounded (<= 32 tokens)


def test_capacity_counts_the_residual_held():
    c = token_cost(1, 64, 2, 2, 32, 32, track_pos=False)
    room = 63 * 256 + 10 * c.q
    assert c.capacity(room, residual=63) == c.capacity(room) == 73
    # a 32-token residual frees 31 full-precision slots: each holds fp / q quantized tokens
    assert c.capacity(room, residual=32) == 32 + int((room - 32 * 256) // c.q)
    assert c.capacity(room, residual=500) == 73  # capped at R + G - 1
