"""SnapKV: the observation window votes, votes are pooled along tokens, top per KV head + window."""

import pytest
import torch

from memvisor.kv.policies import PolicyError, SnapKV, select

STRONG = 60.0


def setup(T=16, Hkv=2, groups=2):
    D = T
    k = torch.zeros(1, Hkv, T, D)
    for t in range(T):
        k[0, :, t, t] = 1.0
    return k, D


def window_queries(targets_per_qhead, D, w):
    q = torch.zeros(1, len(targets_per_qhead), w, D)
    for h, t in enumerate(targets_per_qhead):
        q[0, h, :, t] = STRONG
    return q


def test_window_votes_max_pooled_top_per_kv_head():
    k, D = setup()
    # KV head 0 (query heads 0, 1) looks at token 6; KV head 1 (query heads 2, 3) at tokens 10 and 2
    q = window_queries([6, 6, 10, 2], D, w=2)
    pol = SnapKV(window=2, kernel=5, pooling="max", scaling=1.0)
    pol.observe(q, k)
    vote = pol.vote(k)
    assert vote[0, 0, 6] == pytest.approx(2.0, abs=1e-5)
    assert vote[0, 1, 10] == pytest.approx(1.0, abs=1e-5) and vote[0, 1, 2] == pytest.approx(1.0, abs=1e-5)
    s = pol.scores(k, k)
    assert torch.allclose(s[0, 0, 4:9], torch.full((5,), 2.0), atol=1e-5)  # max pool spreads to +-2
    assert s[0, 0, :4].abs().max() < 1e-5 and s[0, 0, 9:14].abs().max() < 1e-5
    kept = select(s, pol.protected(16), 7)
    assert kept[0].tolist() == [4, 5, 6, 7, 8, 14, 15]
    # head 1: pooled plateaus 0..4 and 8..12 (value 1, ties -> newer first): 12, 11, 10, 9, 8
    assert kept[1].tolist() == [8, 9, 10, 11, 12, 14, 15]


def test_avg_pooling_and_only_the_prefix_is_voted():
    k, D = setup(Hkv=1)
    q = window_queries([6, 14], D, w=2)  # query head 1 looks at the window itself: not a prefix vote
    pol = SnapKV(window=2, kernel=5, pooling="avg", scaling=1.0)
    pol.observe(q, k)
    vote = pol.vote(k)[0, 0]
    assert vote[6] == pytest.approx(1.0, abs=1e-5) and vote[14:].abs().max() < 1e-6
    s = pol.scores(k, k)[0, 0]
    assert torch.allclose(s[4:9], torch.full((5,), 0.2), atol=1e-5)
    assert select(pol.scores(k, k), pol.protected(16), 3)[0].tolist() == [8, 14, 15]


def test_causal_mask_inside_the_window():
    # the window's first query (position 14) cannot see token 15: its row is uniform over 0..14
    k, D = setup(Hkv=1)
    pol = SnapKV(window=2, kernel=1, scaling=1.0)
    pol.observe(window_queries([15, 15], D, w=2), k)
    vote = pol.vote(k)[0, 0]
    assert torch.allclose(vote[:14], torch.full((14,), 1 / 15), atol=1e-6)


def test_window_accumulates_across_decode_steps():
    k, D = setup(Hkv=1)
    pol = SnapKV(window=3, kernel=1, scaling=1.0)
    pol.observe(window_queries([1, 1], D, w=14), k[:, :, :14])  # prefill: last 3 of these are kept
    assert pol.queries.shape[2] == 3
    for t in (14, 15):  # two decode steps looking at token 9
        pol.observe(window_queries([9, 9], D, w=1), k[:, :, : t + 1])
    vote = pol.vote(k)[0, 0]
    assert vote[9] == pytest.approx(2.0, abs=1e-5) and vote[1] == pytest.approx(1.0, abs=1e-5)
    assert select(pol.scores(k, k), pol.protected(16), 5)[0].tolist() == [1, 9, 13, 14, 15]


def test_bad_knobs():
    with pytest.raises(PolicyError):
        SnapKV(kernel=4)
    with pytest.raises(PolicyError):
        SnapKV(pooling="median")


def test_heads_holding_fewer_tokens_than_the_window_vote_with_the_newest_queries():
    """After a deep eviction a head may hold fewer tokens than the window of kept queries: the vote uses
    the newest queries every head can still match instead of failing mid-generation."""
    k, D = setup(Hkv=1)
    pol = SnapKV(window=8, kernel=1, scaling=1.0)
    pol.observe(window_queries([2, 2], D, w=8), k[:, :, :12])
    assert pol.queries.shape[2] == 8
    vote = pol.vote(k[:, :, :5], lengths=torch.tensor([5]))  # 5 tokens left: 5 newest queries vote
    assert vote.shape == (1, 1, 5) and torch.isfinite(vote).all()
    assert float(vote.sum()) == pytest.approx(0.0, abs=1e-6)  # every held token is the queries' own window
