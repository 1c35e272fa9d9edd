"""Layer budgets sum to the total and follow their shapes; Ada-KV head budgets are ragged and sum to the layer budget."""

import pytest
import torch

from memvisor.kv.policies import (
    AdaKVHeadBudget,
    BudgetTooSmallError,
    PolicyError,
    PyramidLayerBudget,
    SensitivityLayerBudget,
    UniformHeadBudget,
    UniformLayerBudget,
    measure_sensitivity,
    select,
)


@pytest.mark.parametrize("total,n", [(0, 3), (7, 3), (30000, 30), (12345, 18), (5, 1)])
def test_uniform_layer_budget(total, n):
    out = UniformLayerBudget().split(total, n)
    assert sum(out) == total and len(out) == n and max(out) - min(out) <= 1


@pytest.mark.parametrize("total,n,beta", [(30 * 512, 30, 20.0), (12345, 18, 20.0), (1000, 7, 5.0), (50, 30, 20.0)])
def test_pyramid_layer_budget_linear_decrease(total, n, beta):
    pol = PyramidLayerBudget(beta=beta)
    out = pol.split(total, n)
    assert sum(out) == total and len(out) == n
    assert all(a >= b for a, b in zip(out, out[1:]))  # non-increasing with depth
    avg = total / n
    assert abs(out[0] - (2 * avg - avg / beta)) <= 1 and abs(out[-1] - avg / beta) <= 1
    diffs = [a - b for a, b in zip(out, out[1:])]
    step = (2 * avg - 2 * avg / beta) / (n - 1)
    assert all(abs(d - step) <= 1.0 + 1e-9 for d in diffs)  # straight line up to rounding


def test_pyramid_beta_one_is_uniform():
    assert PyramidLayerBudget(beta=1.0).split(90, 3) == [30, 30, 30]


def test_sensitivity_layer_budget_is_proportional():
    pol = SensitivityLayerBudget([1.0, 3.0, 0.0, 4.0], alpha=1.0, floor=0.0)
    assert pol.split(800, 4) == [100, 300, 0, 400]
    pol = SensitivityLayerBudget([1.0, 3.0, 0.0, 4.0], alpha=2.0, floor=0.2)
    out = pol.split(1000, 4)
    want = [1000 * (0.05 + 0.8 * s / 26.0) for s in (1.0, 9.0, 0.0, 16.0)]
    assert sum(out) == 1000 and all(abs(a - b) <= 1 for a, b in zip(out, want))
    with pytest.raises(PolicyError):
        pol.split(1000, 5)
    with pytest.raises(PolicyError):
        SensitivityLayerBudget([1.0, -1.0])


def test_measure_sensitivity():
    torch.manual_seed(0)
    a = [torch.randn(10, 8), torch.randn(10, 8)]
    b = [a[0].clone(), -a[1]]
    s = measure_sensitivity(a, b)
    assert s[0] == pytest.approx(0.0, abs=1e-6) and s[1] == pytest.approx(2.0, abs=1e-6)


def test_adakv_one_topk_over_heads_gives_ragged_counts():
    scores = torch.tensor(
        [
            [9.0, 8.0, 7.0, 6.0, 0.0, 0.0],  # head 0: many strong tokens
            [0.5, 0.1, 5.0, 0.2, 0.3, 0.4],  # head 1: one strong token
            [1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
        ]
    ).unsqueeze(0)
    prot = torch.tensor([False] * 5 + [True])  # newest token protected in every head
    counts = AdaKVHeadBudget().split(scores, prot, 8)
    assert counts.tolist() == [5, 2, 1] and int(counts.sum()) == 8
    kept = select(scores, prot, counts)
    assert [x.tolist() for x in kept] == [[0, 1, 2, 3, 5], [2, 5], [5]]
    # the kept set equals the global top-8 of (protected first, then score)
    flat = [(h, t) for h in range(3) for t in kept[h].tolist()]
    assert len(flat) == 8


def test_adakv_floor_and_ragged_lengths_and_errors():
    scores = torch.tensor([[9.0, 9.0, 9.0, 9.0], [0.0, 0.0, 0.0, 0.0]])
    none = torch.zeros(4, dtype=torch.bool)
    assert AdaKVHeadBudget().split(scores, none, 4).tolist() == [4, 0]
    assert AdaKVHeadBudget(floor=1.0).split(scores, none, 4).tolist() == [2, 2]
    lengths = torch.tensor([4, 2])
    assert AdaKVHeadBudget().split(scores, none, 10, lengths=lengths).tolist() == [4, 2]
    prot = torch.tensor([[True, True, False, False], [True, True, False, False]])
    with pytest.raises(BudgetTooSmallError):
        AdaKVHeadBudget(strict=True).split(scores, prot, 3)
    assert AdaKVHeadBudget().split(scores, prot, 3).tolist() == [2, 1]  # reserves shrink, budget holds
    with pytest.raises(BudgetTooSmallError):
        UniformHeadBudget(strict=True).split(scores, prot, 2)


@pytest.mark.parametrize("budget", [0, 5, 9, 12, 100])
def test_head_budgets_sum_to_layer_budget(budget):
    torch.manual_seed(budget)
    scores = torch.rand(2, 4, 10)
    lengths = torch.tensor([10, 7, 3, 10])
    prot = torch.zeros(10, dtype=torch.bool)
    valid = int(lengths.sum())
    for hb in (AdaKVHeadBudget(), AdaKVHeadBudget(floor=0.5), UniformHeadBudget()):
        c = hb.split(scores, prot, budget, lengths=lengths)
        assert int(c.sum()) == min(budget, valid)
        assert bool((c <= lengths).all())
    u = UniformHeadBudget().split(scores, prot, 12, lengths=lengths)
    assert u.tolist() == [3, 3, 3, 3]
    assert UniformHeadBudget().split(scores, prot, 20, lengths=lengths).tolist() == [6, 6, 3, 5]


def test_attention_mass_lost_counts_attention_outside_the_kept_tokens():
    from memvisor.kv.policies import attention_mass_lost

    T = D = 6
    k = torch.eye(T).view(1, 1, T, D)
    # one window query (the newest token, sees all 6 keys) with probabilities 0.5, 0.2, 0.1, 0.1, 0.05, 0.05
    p = torch.tensor([0.5, 0.2, 0.1, 0.1, 0.05, 0.05])
    q = p.log().view(1, 1, 1, D)
    assert attention_mass_lost(q, k, 2, scaling=1.0) == pytest.approx(0.3, abs=1e-6)
    assert attention_mass_lost(q, k, 6, scaling=1.0) == 0.0
    assert attention_mass_lost(q, k, 0, scaling=1.0) == pytest.approx(1.0, abs=1e-6)
