"""Measurements of the KV benchmark: real bytes, fidelity figures, peaks, aggregation, report."""

import json

import pytest
import torch
from transformers import DynamicCache

from memvisor.bench.kv_methods import parse_method
from memvisor.bench.kv_metrics import KVPeakTracker, cache_bytes, fidelity, greedy_agreement, stored_elements
from memvisor.bench.kv_report import table, write_report
from memvisor.bench.kv_run import aggregate


def _dynamic(tokens: int, layers: int = 2, heads: int = 3, dim: int = 8) -> DynamicCache:
    cache = DynamicCache()
    for i in range(layers):
        cache.update(torch.randn(1, heads, tokens, dim, dtype=torch.bfloat16),
                     torch.randn(1, heads, tokens, dim, dtype=torch.bfloat16), i)
    return cache


def test_cache_bytes_counts_every_stored_tensor():
    cache = _dynamic(10)
    assert cache_bytes(cache) == 2 * 2 * 3 * 10 * 8 * 2  # layers x (k, v) x heads x tokens x dim x 2 B
    assert stored_elements(cache, 8) == 2 * 2 * 3 * 10 * 8

    class Fake:
        def nbytes(self):
            return 1234

        def stored_tokens(self):
            return [[5, 7], [3, 1]]

    assert cache_bytes(Fake()) == 1234 and stored_elements(Fake(), 4) == 2 * 16 * 4


def test_fidelity_and_greedy_agreement():
    ref = torch.randn(6, 50)
    same = fidelity(ref, ref.clone())
    assert same["top1"] == 1.0 and abs(same["kl"]) < 1e-6
    other = ref.clone()
    other[0] = -other[0]  # one position disagrees
    f = fidelity(ref, other)
    assert f["top1"] == pytest.approx(5 / 6) and f["kl"] > 0.01
    assert greedy_agreement([1, 2, 3, 4], [1, 2, 9, 4]) == 0.75
    # with an end-of-sequence id the reference's answer ends there (included): what follows is not compared
    assert greedy_agreement([1, 2, 0, 4, 5], [1, 2, 0, 9, 9], stop=frozenset({0})) == 1.0
    assert greedy_agreement([1, 2, 0, 4, 5], [1, 9, 7, 4, 5], stop=frozenset({0})) == 1 / 3
    assert greedy_agreement([1, 2, 3], [1, 2, 9], stop=frozenset({0})) == 2 / 3  # no stop: every position


def test_peak_tracker_sees_a_layer_before_a_later_hook_shrinks_it():
    class Attn(torch.nn.Module):
        def forward(self, x):
            return x

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn = Attn()

    model = torch.nn.Sequential(Block())
    tracker = KVPeakTracker(model)
    holder = {"t": torch.zeros(100, dtype=torch.uint8)}

    class Cache:
        def nbytes(self):
            return holder["t"].numel()

    model[0].self_attn.register_forward_hook(lambda m, a, o: holder.update(t=torch.zeros(10, dtype=torch.uint8)))
    tracker.track(Cache())
    model[0].self_attn(torch.zeros(1))
    tracker.measure()
    assert tracker.peak == 100 and holder["t"].numel() == 10
    tracker.close()


def test_aggregate_and_report(tmp_path):
    ref = [{"bytes": 1000, "elements": 500, "context_tokens": 10, "needle_hit": True, "prefill_peak_bytes": 1000,
            "prefill_peak_rss_bytes": 0, "prefill_s": 1.0, "decode_tokens_per_s": 10.0},
           {"bytes": 1000, "elements": 500, "context_tokens": 10, "needle_hit": False, "prefill_peak_bytes": 1000,
            "prefill_peak_rss_bytes": 0, "prefill_s": 1.0, "decode_tokens_per_s": 10.0}]
    runs = [dict(r, bytes=250, elements=500, needle_hit=h, top1=0.9, kl=0.1, greedy_agreement=0.5)
            for r, h in zip(ref, (True, True))]
    fig = aggregate(runs, ref)
    assert fig["ratio"] == 4.0 and fig["bits_per_element"] == 4.0 and fig["bytes_per_token"] == 25.0
    assert fig["needle_retention"] == 1.0  # the second hit does not count: the reference missed it
    assert fig["needle_accuracy"] == 1.0 and fig["kl"] == pytest.approx(0.1)
    assert fig["needle_hits"] == [True, True] and aggregate(ref, ref)["needle_hits"] == [True, False]
    assert aggregate(runs, ref, ref_scale=0.5)["ratio"] == 2.0  # float32 references: the ratio stays against bf16
    results = {"model": "smollm2", "uncompressed": {"full": aggregate(ref, ref)},
               "methods": {"kivi2": {"4x": fig}}, "peers": {"kvpress-snapkv": {"4x": fig},
                                                             "quanto-2bit": {"native": {"error": "RuntimeError: x"}}},
               "sweep": {"budget_bytes": 100, "lengths": [10, 20], "methods": {"uncompressed": [
                   {"tokens": 10, "prefill_peak_bytes": 1000, "prefill_s": 1.0},
                   {"tokens": 20, "prefill_peak_bytes": 2000, "prefill_s": 2.0}]}}}
    results["methods"]["auto"] = {"4x": dict(fig, recipe="kivi2-stream")}
    text = table(results)
    assert "memvisor: auto (kivi2-stream)" in text  # the planner's rows name the recipe it chose
    assert "memvisor: kivi2" in text and "peer: kvpress-snapkv" in text and "failed" in text
    assert text.index("4x") < text.index("native")
    write_report(json.loads(json.dumps(results)), tmp_path)
    assert (tmp_path / "table.md").read_text().count("|") > 20
    assert (tmp_path / "fidelity_vs_bytes.png").exists() or (tmp_path / "plots_missing.txt").exists()


def test_method_names_parse_and_reject_typos():
    assert parse_method("kivi4+snapkv") == {"quant": "kivi4", "token": "snapkv", "head": None, "layer": None,
                                            "group": 32, "residual": 32, "sinks": 0, "span": False}
    assert parse_method("kivi-k4v2+g64+r128+s16+streaming+span") == {
        "quant": "kivi-k4v2", "token": "streaming", "head": None, "layer": None, "group": 64, "residual": 128,
        "sinks": 16, "span": True}
    assert parse_method("none")["quant"] == "none"
    for bad in ("kivi3", "kivi2+kivi4", "snapkv+h2o", "", "kivi4+g32+g64", "kivi2+span+span", "kivi4+s4+s8"):
        with pytest.raises(ValueError):
            parse_method(bad)


def test_auto_method_runs_the_planned_recipe():
    from transformers import LlamaConfig

    from memvisor.bench.kv_methods import memvisor_method
    from memvisor.kv import CacheSpec

    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=256, vocab_size=100)
    m = memvisor_method("auto", cfg, 200_000, context_tokens=1024)
    assert m.info["recipe"] == CacheSpec.plan(cfg, 200_000, 1024).recipe
    assert m.new_cache().spec.recipe == m.info["recipe"] and m.new_cache().spec.context_tokens == 1024
    with pytest.raises(ValueError):
        memvisor_method("auto", cfg, 200_000)
    assert memvisor_method("kivi2+span", cfg, 200_000, context_tokens=512).new_cache().spec.context_tokens == 512


def test_lossless_floor_prefills_in_blocks_and_keeps_every_token():
    """The floor row's cache: the same keys, values and last logits as one full prefill, every token kept."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from memvisor.bench.kv_peers import lossless_blocked_method, plain_method
    from memvisor.kv.adapter import cache_kwarg

    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, vocab_size=100)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 100, (1, 30))
    full, floor = plain_method(cfg), lossless_blocked_method(cfg, block=8)
    assert floor.name == "blocked-8"
    with torch.no_grad():
        ref_cache, cache = full.new_cache(), floor.new_cache()
        key = cache_kwarg(model)  # `cache` on newer releases, `past_key_values` on 5.2
        ref_logits = full.prefill(model, ids, ref_cache, key)
        logits = floor.prefill(model, ids, cache, key)
    assert cache.get_seq_length() == 30
    for a, b in zip(ref_cache.layers, cache.layers):
        assert torch.allclose(a.keys, b.keys, atol=1e-5) and torch.allclose(a.values, b.values, atol=1e-5)
    assert torch.allclose(ref_logits[0, -1], logits[0, -1], atol=1e-4)


def test_kvpress_claimed_ratio_is_against_bf16_bytes_in_a_float32_run():
    """kvpress keeps 1/budget of the bf16 cache's bytes: half as many tokens of a float32 cache."""
    pytest.importorskip("kvpress")
    from types import SimpleNamespace

    from transformers import LlamaConfig

    from memvisor.bench.kv_run import _peer_methods

    model = SimpleNamespace(config=LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=2,
                                               num_key_value_heads=1, intermediate_size=128, vocab_size=100))
    ratio = {b: _peer_methods("kvpress-snapkv", 4, model, 1e6, 100, b)[0][2].info["compression_ratio"] for b in (2, 4)}
    assert ratio == {2: 0.75, 4: 0.875}
