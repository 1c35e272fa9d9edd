"""H2O keeps the tokens with the largest accumulated attention plus the recent window."""

import pytest
import torch

from memvisor.kv.policies import H2O, select

STRONG = 60.0  # logit gap: softmax puts 1 - O(e^-60) on the targeted key, i.e. exactly 1 in float32


def onehot_keys(T, D, Hkv=1):
    k = torch.zeros(1, Hkv, T, D)
    for t in range(T):
        k[0, :, t, t] = 1.0
    return k


def targeted(targets, D):
    """targets[head][i] = key index query i of that query head looks at -> queries [1, Hq, Tq, D]."""
    q = torch.zeros(1, len(targets), len(targets[0]), D)
    for h, row in enumerate(targets):
        for i, t in enumerate(row):
            q[0, h, i, t] = STRONG
    return q


def test_h2o_scores_are_group_mean_attention_mass_and_keep_heavy_hitters():
    T = D = 8
    k = onehot_keys(T, D)
    # query head 0 looks at 0,1 then token 2; query head 1 at itself then token 5 (both share KV head 0)
    q = targeted([[0, 1, 2, 2, 2, 2, 2, 2], [0, 1, 2, 3, 4, 5, 5, 5]], D)
    pol = H2O(recent=2, scaling=1.0)
    pol.observe(q, k)
    s = pol.scores(k, k)
    # each query contributes 0.5 per query head (GQA mean over the group of 2)
    expect = torch.tensor([1.0, 1.0, 3.5, 0.5, 0.5, 1.5, 0.0, 0.0])
    assert torch.allclose(s[0, 0], expect, atol=1e-5)
    kept = select(s, pol.protected(T), 4)
    assert kept[0].tolist() == [2, 5, 6, 7]


def test_h2o_causal_mask_in_prefill_block():
    T = D = 4
    k = onehot_keys(T, D)
    # query 0 "wants" token 3 but cannot see it: its softmax is uniform over the one key it sees
    q = targeted([[3, 3, 3, 3]], D)
    pol = H2O(recent=0, scaling=1.0)
    pol.observe(q, k)
    s = pol.scores(k, k)[0, 0]
    # query 0 sees {0}: 1 to token 0; query 1 sees {0,1}: 1/2 each; query 2: 1/3 to 0,1,2; query 3: token 3
    assert torch.allclose(s, torch.tensor([1 + 1 / 2 + 1 / 3, 1 / 2 + 1 / 3, 1 / 3, 1.0]), atol=1e-5)


def test_h2o_statistics_follow_tokens_after_eviction_and_accumulate_decode_steps():
    T = D = 8
    k = onehot_keys(T, D)
    q = targeted([[0, 1, 2, 2, 2, 2, 2, 2], [0, 1, 2, 3, 4, 5, 5, 5]], D)
    pol = H2O(recent=2, scaling=1.0)
    pol.observe(q, k)
    before = pol.scores(k, k)[0, 0].clone()
    kept = select(pol.scores(k, k), pol.protected(T), 4)  # [2, 5, 6, 7]
    pol.on_evict(kept)
    k2 = k[:, :, kept[0]]
    assert torch.allclose(pol.scores(k2, k2)[0, 0], before[kept[0]])
    # decode step: a new token (key along channel 3, no longer used by a kept token) is appended and
    # both query heads look at channel 5, i.e. the old token 5, now stored at position 1
    new_key = torch.zeros(1, 1, 1, D)
    new_key[0, 0, 0, 3] = 1.0
    k3 = torch.cat([k2, new_key], dim=2)
    dq = torch.zeros(1, 2, 1, D)
    dq[0, :, 0, 5] = STRONG
    pol.observe(dq, k3)
    s = pol.scores(k3, k3)[0, 0]
    assert torch.allclose(s, torch.tensor([3.5, 2.5, 0.0, 0.0, 0.0]), atol=1e-5)
    # budget 3 with recent 2 (positions 3, 4) leaves one slot: the heaviest, old token 2 (3.5)
    assert select(pol.scores(k3, k3), pol.protected(5), 3)[0].tolist() == [0, 3, 4]


def test_h2o_ragged_heads_and_reset():
    D = 6
    k = torch.zeros(1, 2, 5, D)
    for t in range(5):
        k[0, :, t, t] = 1.0
    lengths = torch.tensor([5, 3])
    q = torch.zeros(1, 2, 1, D)
    q[0, :, 0, 1] = STRONG
    pol = H2O(recent=1, scaling=1.0)
    pol.observe(q, k, lengths=lengths)
    s = pol.scores(k, k, lengths=lengths)
    assert torch.allclose(s[0, 0], torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0]), atol=1e-6)
    assert s[0, 1, :3].tolist() == pytest.approx([0.0, 1.0, 0.0], abs=1e-6)
    assert torch.isinf(s[0, 1, 3:]).all() and (s[0, 1, 3:] < 0).all()
    kept = select(s, pol.protected_mask(5, lengths), 2, lengths=lengths)
    assert [x.tolist() for x in kept] == [[1, 4], [1, 2]]
    pol.reset()
    assert pol.acc is None


def test_h2o_ragged_eviction_then_new_tokens_land_at_each_heads_end():
    # 2 KV heads (1 query head each), 6 tokens, one-hot keys; every query looks at token 2
    D = 8
    k = torch.zeros(1, 2, 6, D)
    for t in range(6):
        k[0, :, t, t] = 1.0
    q = torch.zeros(1, 2, 6, D)
    q[0, :, 2:, 2] = STRONG  # queries 0, 1 cannot see token 2: they spread uniformly
    pol = H2O(recent=1, scaling=1.0)
    pol.observe(q, k)
    before = pol.scores(k, k)[0].clone()
    kept = [torch.tensor([0, 2, 5]), torch.tensor([2, 5])]  # ragged: head 0 keeps 3, head 1 keeps 2
    pol.on_evict(kept)
    # storage after eviction (padded to 3) + one new token per head at each head's own end
    lengths = torch.tensor([4, 3])
    k2 = torch.zeros(1, 2, 4, D)
    for h, idx in enumerate(kept):
        k2[0, h, : len(idx)] = k[0, h, idx]
        k2[0, h, len(idx), 6] = 1.0  # the new token's key
    dq = torch.zeros(1, 2, 1, D)
    dq[0, :, 0, 6] = STRONG  # the decode query looks at the new token
    pol.observe(dq, k2, lengths=lengths)
    s = pol.scores(k2, k2, lengths=lengths)[0]
    assert torch.allclose(s[0, :3], before[0, [0, 2, 5]], atol=1e-6) and s[0, 3] == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(s[1, :2], before[1, [2, 5]], atol=1e-6) and s[1, 2] == pytest.approx(1.0, abs=1e-6)
    assert s[1, 3] == float("-inf")
