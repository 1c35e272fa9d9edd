"""ThinK keeps the key channels with the largest |Q_win[:, j]|^2 * |K[:, j]|^2."""

import pytest
import torch

from memvisor.kv.policies import PolicyError, ThinK


def test_keeps_largest_score_product_not_either_factor():
    D = 6
    # per-channel squared column norms: q2 = [1, 9, 4, 1, 16, 0.25], k2 = [16, 1, 4, 9, 0.25, 100]
    # products:                                 [16, 9, 16, 9, 4, 25] -> top 3: channels 5, 0, 2
    qcol = torch.tensor([1.0, 3.0, 2.0, 1.0, 4.0, 0.5])
    kcol = torch.tensor([4.0, 1.0, 2.0, 3.0, 0.5, 10.0])
    q = torch.zeros(1, 1, 1, D)
    q[0, 0, 0] = qcol
    k = torch.zeros(1, 1, 1, D)
    k[0, 0, 0] = kcol
    pol = ThinK(ratio=0.5)
    assert pol.keep_count(D) == 3
    assert pol.keep_channels(q, k, 3).tolist() == [[0, 2, 5]]
    assert torch.allclose(pol.channel_scores(q, k)[0], torch.tensor([16.0, 9, 16, 9, 4, 25]))


def test_gqa_sums_query_energy_over_the_group_and_per_kv_head():
    torch.manual_seed(0)
    B, Hkv, G, w, T, D = 2, 2, 3, 4, 7, 8
    q = torch.randn(B, Hkv * G, w, D)
    k = torch.randn(B, Hkv, T, D)
    pol = ThinK(ratio=0.4)
    keep = pol.keep_count(D)  # 8 - floor(3.2) = 5
    assert keep == 5
    got = pol.keep_channels(q, k, keep)
    for h in range(Hkv):
        qs = q[:, h * G : (h + 1) * G]
        score = (qs**2).sum(dim=(0, 1, 2)) * (k[:, h] ** 2).sum(dim=(0, 1))
        want = sorted(torch.argsort(score, descending=True)[:keep].tolist())
        assert got[h].tolist() == want


def test_keep_count_rounding_and_errors():
    assert ThinK(ratio=0.4, multiple_of=8).keep_count(64) == 40  # 64 - 25 = 39 -> 40
    assert ThinK(ratio=0.0).keep_count(64) == 64
    with pytest.raises(PolicyError):
        ThinK(ratio=1.0)
    with pytest.raises(PolicyError):
        ThinK().keep_channels(torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 2, 4), 5)


def test_gather_helpers_give_the_pruned_logits():
    torch.manual_seed(2)
    B, Hkv, G, T, D = 1, 3, 3, 5, 8
    q = torch.randn(B, Hkv * G, 2, D)
    k = torch.randn(B, Hkv, T, D)
    pol = ThinK(ratio=0.5)
    ch = pol.keep_channels(q, k, pol.keep_count(D))
    kk, qq = ThinK.gather_keys(k, ch), ThinK.gather_queries(q, ch)
    assert kk.shape == (B, Hkv, T, 4) and qq.shape == (B, Hkv * G, 2, 4)
    for i in range(Hkv * G):
        h = i // G
        mask = torch.zeros(D)
        mask[ch[h]] = 1.0
        want = (q[0, i] * mask) @ k[0, h].T  # logits with the pruned channels zeroed
        assert torch.allclose(qq[0, i] @ kk[0, h].T, want, atol=1e-5)
