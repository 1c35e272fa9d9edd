"""KVMerger merges exactly the similar adjacent evicted tokens into their kept pivot, Gaussian-weighted."""

import math

import pytest
import torch

from memvisor.kv.policies import KVMerger, PolicyError


def build():
    # 8 tokens, D = 4. Runs by adjacent cosine > 0.9: {0,1,2}, {3}, {4,5}, {6}, {7}
    k = torch.tensor(
        [
            [1.0, 0.0, 0.0, 0.0],
            [1.0, 0.1, 0.0, 0.0],
            [1.0, 0.2, 0.0, 0.0],
            [0.0, 1.0, 0.0, 0.0],
            [0.0, 0.0, 1.0, 0.0],
            [0.0, 0.0, 1.0, 0.3],
            [0.0, 0.0, 0.0, 1.0],
            [1.0, 0.0, 0.0, 1.0],
        ]
    )
    v = torch.arange(32, dtype=torch.float32).view(8, 4)
    return k.view(1, 1, 8, 4), v.view(1, 1, 8, 4)


def test_merges_only_similar_neighbours_with_gaussian_weights():
    k, v = build()
    kept = [torch.tensor([1, 3, 4, 7])]
    sigma = 0.5
    nk, nv = KVMerger(threshold=0.9, sigma=sigma).merge(k, v, kept)
    assert nk[0].shape == (1, 4, 4) and nv[0].shape == (1, 4, 4)
    K, V = k[0, 0], v[0, 0]

    def w(i, p):
        return math.exp(-float((K[i] - K[p]).pow(2).sum()) / (2 * sigma**2))

    # pivot 1 absorbs 0 and 2
    ws = torch.tensor([w(0, 1), 1.0, w(2, 1)])
    assert torch.allclose(nk[0][0, 0], (ws[:, None] * K[0:3]).sum(0) / ws.sum(), atol=1e-6)
    assert torch.allclose(nv[0][0, 0], (ws[:, None] * V[0:3]).sum(0) / ws.sum(), atol=1e-5)
    # token 3 alone in its run: unchanged
    assert torch.equal(nk[0][0, 1], K[3]) and torch.equal(nv[0][0, 1], V[3])
    # pivot 4 absorbs 5; token 6 (dissimilar) is dropped, so 7 is unchanged
    ws = torch.tensor([1.0, w(5, 4)])
    assert torch.allclose(nv[0][0, 2], (ws[:, None] * V[4:6]).sum(0) / ws.sum(), atol=1e-5)
    assert torch.equal(nv[0][0, 3], V[7])


def test_assignment_goes_to_nearest_kept_in_run_ties_older():
    k = torch.ones(1, 5, 3)  # one run of 5 identical keys
    m = KVMerger(threshold=0.9)
    assert m.assign(k, torch.tensor([0, 4])).tolist() == [0, 0, 0, 4, 4]
    assert m.assign(k, torch.tensor([2])).tolist() == [2, 2, 2, 2, 2]
    k2 = torch.tensor([[[1.0, 0], [1.0, 0], [0, 1.0], [0, 1.0]]])
    assert m.assign(k2, torch.tensor([0])).tolist() == [0, 0, -1, -1]


def test_identical_keys_average_values_and_ragged_heads():
    k = torch.ones(1, 2, 4, 2)
    v = torch.arange(16, dtype=torch.float32).view(1, 2, 4, 2)
    nk, nv = KVMerger(threshold=0.5).merge(k, v, [torch.tensor([0]), torch.tensor([1])], lengths=torch.tensor([4, 2]))
    assert torch.allclose(nv[0][0, 0], v[0, 0].mean(0))  # distance 0 -> equal weights
    assert torch.allclose(nv[1][0, 0], v[0, 1, :2].mean(0))  # padding never merged
    assert torch.allclose(nk[0][0, 0], torch.ones(2))


def test_bad_inputs():
    k, v = build()
    with pytest.raises(PolicyError):
        KVMerger().merge(k, v, [torch.tensor([3, 1])])
    with pytest.raises(PolicyError):
        KVMerger().merge(k, v, [torch.tensor([9])])
    with pytest.raises(PolicyError):
        KVMerger(sigma=0.0)
