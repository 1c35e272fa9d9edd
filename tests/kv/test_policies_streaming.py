"""StreamingLLM keeps sinks + the newest tokens; KeyNorm keeps the smallest-norm keys."""

import pytest
import torch

from memvisor.kv.policies import BudgetTooSmallError, KeyNorm, StreamingLLM, select


def test_streaming_keeps_sinks_and_newest():
    pol = StreamingLLM(sinks=4)
    assert not pol.needs_queries
    k = torch.randn(1, 3, 20, 8)
    kept = select(pol.scores(k, k), pol.protected(20), 10)
    for h in range(3):
        assert kept[h].tolist() == [0, 1, 2, 3, 14, 15, 16, 17, 18, 19]


def test_streaming_after_eviction_and_ragged_heads():
    pol = StreamingLLM(sinks=2, window=3)
    lengths = torch.tensor([8, 6])
    k = torch.randn(1, 2, 8, 4)
    s = pol.scores(k, k, lengths=lengths)
    kept = select(s, pol.protected_mask(8, lengths), 5, lengths=lengths)
    assert [x.tolist() for x in kept] == [[0, 1, 5, 6, 7], [0, 1, 3, 4, 5]]
    with pytest.raises(BudgetTooSmallError):
        select(s, pol.protected_mask(8, lengths), 4, lengths=lengths, strict=True)
    # non-strict: protected tokens compete by score: sinks first, then the newest
    kept = select(s, pol.protected_mask(8, lengths), 4, lengths=lengths)
    assert [x.tolist() for x in kept] == [[0, 1, 6, 7], [0, 1, 4, 5]]


def test_knorm_keeps_lowest_norm_keys():
    k = torch.ones(1, 1, 6, 4) * torch.tensor([5.0, 1.0, 3.0, 0.5, 4.0, 2.0]).view(1, 1, 6, 1)
    pol = KeyNorm()
    assert select(pol.scores(k, k), pol.protected(6), 3)[0].tolist() == [1, 3, 5]
    pol = KeyNorm(recent=1)
    assert select(pol.scores(k, k), pol.protected(6), 3)[0].tolist() == [1, 3, 5]
    assert select(pol.scores(k, k), pol.protected(6), 2)[0].tolist() == [3, 5]
