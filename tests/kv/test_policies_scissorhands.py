"""Scissorhands counts, over the last `history` queries, how often each token got above-average attention."""

import torch

from memvisor.kv.policies import Scissorhands, select

STRONG = 60.0


def onehot_keys(T, D):
    k = torch.zeros(1, 1, T, D)
    for t in range(T):
        k[0, 0, t, t] = 1.0
    return k


def targeted(targets, D):
    q = torch.zeros(1, len(targets), len(targets[0]), D)
    for h, row in enumerate(targets):
        for i, t in enumerate(row):
            q[0, h, i, t] = STRONG
    return q


def test_counts_only_the_history_window_and_protect_recent():
    T = D = 10
    k = onehot_keys(T, D)
    # queries 0..5 hammer token 0 (they fall out of a 4-query history); queries 6..9 split between
    # tokens 3 and 5 via the two query heads: mean 0.5 each > 1/n_visible (1/7 .. 1/10)
    q = targeted([[0, 0, 0, 0, 0, 0, 3, 3, 3, 3], [0, 0, 0, 0, 0, 0, 5, 5, 5, 2]], D)
    pol = Scissorhands(history=4, recent=2, scaling=1.0)
    pol.observe(q, k)
    counts = pol.counts(T)[0, 0]
    assert counts.tolist() == [0, 0, 1, 4, 0, 3, 0, 0, 0, 0]
    kept = select(pol.scores(k, k), pol.protected(T), 4)
    assert kept[0].tolist() == [3, 5, 8, 9]


def test_exceeding_the_average_is_the_criterion_not_the_top():
    # three keys; query sees all; logits chosen so probs are exactly known
    D = 3
    k = torch.eye(3).view(1, 1, 3, 3)
    logit = torch.log(torch.tensor([0.5, 0.3, 0.2]))  # softmax -> 0.5, 0.3, 0.2; average 1/3
    q = logit.view(1, 1, 1, 3)
    pol = Scissorhands(history=8, recent=0, scaling=1.0)
    pol.observe(q, k)
    assert pol.counts(3)[0, 0].tolist() == [1, 0, 0]
    logit2 = torch.log(torch.tensor([0.1, 0.45, 0.45]))
    pol.observe(logit2.view(1, 1, 1, 3), k)
    assert pol.counts(3)[0, 0].tolist() == [1, 1, 1]


def test_history_slides_across_decode_steps_and_follows_eviction():
    T = D = 6
    k = onehot_keys(T, D)
    pol = Scissorhands(history=3, recent=1, scaling=1.0)
    pol.observe(targeted([[1, 1, 1, 1, 1, 1]], D), k)  # last 3 queries -> token 1 counted 3 times
    assert pol.counts(T)[0, 0].tolist() == [0, 3, 0, 0, 0, 0]
    kept = [torch.tensor([1, 2, 5])]
    pol.on_evict(kept)
    k2 = k[:, :, kept[0]]
    assert pol.counts(3)[0, 0].tolist() == [3, 0, 0]
    # two decode steps looking at old token 2 (stored position 1); keys grow by one each step
    for step in range(2):
        new = torch.zeros(1, 1, 1, D)
        new[0, 0, 0, 3 + step] = 1.0
        k2 = torch.cat([k2, new], dim=2)
        pol.observe(targeted([[2]], D), k2)
    # history 3: two of the three old token-1 hits have slid out
    assert pol.counts(5)[0, 0].tolist() == [1, 2, 0, 0, 0]
    assert select(pol.scores(k2, k2), pol.protected(5), 3)[0].tolist() == [0, 1, 4]
