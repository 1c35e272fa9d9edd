"""On SmolLM2's real post-RoPE queries and keys, the policies' attention statistics equal the model's
own attention weights (GQA mapping, scaling, causal masking of a second prefill block)."""

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def recorded():
    pytest.importorskip("transformers")
    from transformers import AttentionInterface, DynamicCache
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
    from transformers.models.llama.modeling_llama import eager_attention_forward
    from transformers.utils import logging as hf_logging

    from memvisor.kv.adapter import cache_kwarg

    from memvisor.kv.models import ModelNotFoundError, load_local_model
    try:
        model, tok = load_local_model("smollm2", kv_attention=False)
    except ModelNotFoundError as e:  # the model package is an optional install; any other failure fails
        pytest.skip(f"smollm2 not available: {e}")
    hf_logging.disable_progress_bar()
    calls = []

    def record(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
        out, weights = eager_attention_forward(module, query, key, value, attention_mask,
                                               scaling=scaling, dropout=dropout, **kw)
        calls.append((module.layer_idx, query.detach().float(), key.detach().float(), scaling, weights.detach()))
        return out, weights

    AttentionInterface.register("policies_test_record", record)
    AttentionMaskInterface.register("policies_test_record", eager_mask)
    model.set_attn_implementation("policies_test_record")
    text = "Alice keeps the spare key under the blue flowerpot by the door. " * 6
    ids = tok(text, return_tensors="pt").input_ids[:, :80]
    cache = DynamicCache(config=model.config)
    key = cache_kwarg(model)  # `cache` on newer releases, `past_key_values` on 5.2
    with torch.no_grad():
        model(ids[:, :50], **{key: cache}, use_cache=True)
        model(ids[:, 50:], **{key: cache}, use_cache=True)
    by_layer = {}
    for layer, q, k, s, w in calls:
        by_layer.setdefault(layer, []).append((q, k, s, w))
    return by_layer


@pytest.mark.parametrize("layer", [0, 7, 29])
def test_h2o_statistics_equal_model_attention(recorded, layer):
    from memvisor.kv.policies import H2O

    blocks = recorded[layer]
    assert len(blocks) == 2 and blocks[1][0].shape[2] == 30 and blocks[1][1].shape[2] == 80
    pol = H2O(recent=0, scaling=blocks[0][2])
    want = torch.zeros(1, 3, 80)
    for q, k, _, w in blocks:
        pol.observe(q, k)
        T = k.shape[2]
        # model weights [B, Hq=9, Tq, T]; query head g*3..: repeat_kv maps query head i to KV head i // 3
        want[..., :T] += w.float().reshape(1, 3, 3, w.shape[2], T).mean(2).sum(2)
    got = pol.scores(blocks[1][1], blocks[1][1])
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)


def test_snapkv_vote_and_scissorhands_counts_equal_model_attention(recorded):
    from memvisor.kv.policies import Scissorhands, SnapKV

    q, k, s, w = recorded[12][1]  # second block: 30 queries at positions 50..79 over 80 keys
    pg = w.float().reshape(1, 3, 3, 30, 80).mean(2)  # [B, Hkv, Tq, T]
    snap = SnapKV(window=8, kernel=1, scaling=s)
    snap.observe(q, k)
    want = pg[:, :, -8:].sum(2)
    want[..., 72:] = 0.0
    assert torch.allclose(snap.vote(k), want, atol=1e-4)
    sc = Scissorhands(history=10, scaling=s)
    sc.observe(q, k)
    n_vis = torch.arange(71, 81).view(1, 1, 10, 1).float()
    # rows within float noise of the average may flip either way: bound the counts from both sides
    lo = (pg[:, :, -10:] > 1.0 / n_vis + 1e-5).sum(2)
    hi = (pg[:, :, -10:] > 1.0 / n_vis - 1e-5).sum(2)
    got = sc.counts(80)
    assert bool(((got >= lo) & (got <= hi)).all()) and int(got.sum()) > 0
