"""The numba CPU decode kernel (memvisor.kv.cpu) against the block-wise torch path it replaces for decode steps."""

import pytest
import torch

from memvisor.kv.attention import layer_attention
from memvisor.kv.cpu import applies, available, decode
from memvisor.kv.layer import LayerConfig, LayerCore
from memvisor.kv.policies.streaming import StreamingLLM
from memvisor.kv.storage import HeadStore, QuantConfig

pytestmark = pytest.mark.skipif(not available(), reason="numba is not installed (the kv extra)")


def _heads(Hkv=2, B=1, D=64, n=300, bits=4, vbits=None, group=32, residual=32, sinks=0, window=False,
           dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    stores = []
    for _ in range(Hkv):
        st = HeadStore(B, D, dtype, torch.device("cpu"), QuantConfig(bits, group, residual, vbits, sinks), window)
        k = torch.randn(B, n, D, generator=g) * (1 + 3 * torch.rand(D, generator=g))  # outlier channels
        st.append(k, torch.randn(B, n, D, generator=g), torch.arange(n) if window else None)
        stores.append(st)
    return stores


def _query(stores, g=3, seed=1, dtype=torch.float32):
    B, D = stores[0].B, stores[0].D
    return torch.randn(B, g * len(stores), 1, D, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 2


def _check(stores, q, q_pos=None, window=None, softcap=None, scaling=0.125, tol=2e-5):
    """decode() equals layer_attention() (the torch path) on these stores, to float32 rounding."""
    q_pos = len(stores[0]) - 1 if q_pos is None else q_pos
    assert applies(stores, q)
    ref = layer_attention(q, stores, torch.tensor([q_pos]), scaling, window, softcap)
    out = decode(q, stores, scaling, q_pos, window, softcap)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("bits,vbits", [(4, None), (2, None), (4, 2), (2, 4)])
@pytest.mark.parametrize("group", [8, 32, 64])
def test_fresh_heads_match_the_torch_path(bits, vbits, group):
    stores = _heads(bits=bits, vbits=vbits, group=group, D=128 if group == 64 else 64)
    assert stores[0].nq > 0 and stores[0].nr > 0
    _check(stores, _query(stores))


@pytest.mark.parametrize("bits", [2, 4])
def test_partly_evicted_key_groups_and_ragged_heads(bits):
    """StreamingLLM cuts the oldest group short; a scattered eviction leaves groups of every size, and heads
    of different lengths (what H2O/SnapKV leave) run one by one."""
    stores = _heads(Hkv=3, bits=bits, n=400, sinks=4)
    stores[0].keep(torch.cat([torch.arange(4), torch.arange(37, len(stores[0]))]))
    g = torch.Generator().manual_seed(5)
    scattered = torch.sort(torch.randperm(len(stores[1]), generator=g)[:250]).values
    stores[1].keep(scattered)
    sizes = stores[1].group_sizes.tolist()
    assert len(set(sizes)) > 3 and len({len(st) for st in stores}) == 3
    _check(stores, _query(stores), q_pos=500)


def test_batch_rows_sinks_and_mixed_widths():
    stores = _heads(Hkv=2, B=2, bits=4, vbits=2, sinks=4, n=333)
    assert stores[0].ns == 4
    _check(stores, _query(stores, g=4))


def test_only_residual_tokens():
    stores = _heads(n=20, residual=32)
    assert stores[0].nq == 0
    _check(stores, _query(stores))


def test_pruned_key_channels():
    """ThinK: quantized keys store only the kept channels; the query is projected onto them."""
    stores = _heads(n=64, residual=16)
    g = torch.Generator().manual_seed(3)
    for st in stores:
        st.set_channels(torch.sort(torch.randperm(64, generator=g)[:40]).values)
        st.append(*(torch.randn(1, 100, 64, generator=g) for _ in range(2)))
    assert stores[0].k_codes.shape[-1] == 40
    _check(stores, _query(stores))


def test_sliding_window_and_softcap():
    stores = _heads(n=300, window=True)
    q = _query(stores)
    # A small logit scale flattens the softmax, so one token more or less in the window moves the output.
    for window in (127, 128, 129):  # about half the stored tokens are out of the window
        _check(stores, q, window=window, scaling=0.01)
    _check(stores, q, softcap=5.0)
    last = len(stores[0]) - 1
    out = [decode(q, stores, 0.01, last, w) for w in (128, 129, None)]
    assert (out[0] - out[1]).abs().max() > 1e-3 and (out[0] - out[2]).abs().max() > 1e-2


def test_bf16_heads():
    stores = _heads(dtype=torch.bfloat16, sinks=2)
    _check(stores, _query(stores, dtype=torch.bfloat16), tol=1e-2)


def _core(fused, policy=None, budget=None):
    return LayerCore(LayerConfig(layer_idx=0, window=None, qcfg=QuantConfig(4, 32, 32, sinks=2), policy=policy,
                                 budget_bytes=budget, fused_decode=fused))


@pytest.mark.parametrize("policy", [None, "streaming"])
def test_layer_decode_steps_match_the_torch_path(policy):
    """A layer under a byte budget, decoding: prefill, then 60 steps with flushes and evictions; the kernel's
    outputs match the torch path's at every step, and both keep the same bytes."""
    make = (lambda: StreamingLLM(sinks=4)) if policy else (lambda: None)
    budget = 40_000 if policy else None
    cores = [_core(True, make(), budget), _core(False, make(), budget)]
    g = torch.Generator().manual_seed(0)
    for i, n in enumerate([200] + [1] * 60):
        k, v = torch.randn(1, 2, n, 64, generator=g), torch.randn(1, 2, n, 64, generator=g)
        q = torch.randn(1, 6, n, 64, generator=g)
        outs = []
        for c in cores:
            assert c.update(k, v) is None
            outs.append(c.attend(q, 0.125))
        torch.testing.assert_close(outs[0], outs[1], atol=2e-5, rtol=2e-5)
    assert cores[0].nbytes() == cores[1].nbytes()
    if policy:
        assert cores[0].evictions > 0


@pytest.mark.parametrize("window", [None, 100])
def test_probabilities_for_policies_that_take_them(window):
    """H2O/Scissorhands take the decode step's softmax rows (LayerCore._hands_probs): the kernel gives what the
    torch path gives, ragged heads zero-padded, masked tokens zero."""
    stores = _heads(Hkv=3, n=300, window=window is not None)
    stores[1].keep(torch.arange(0, 300, 2))
    q = _query(stores)
    ref = layer_attention(q, stores, torch.tensor([299]), 0.01, window, with_probs=True)
    got = decode(q, stores, 0.01, 299, window, with_probs=True)
    torch.testing.assert_close(got[0], ref[0], atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(got[1], ref[1], atol=1e-7, rtol=1e-5)
    assert torch.equal(got[2], ref[2])
    assert got[1][0, 1, 0, 150:].abs().max() == 0  # past the shorter head's length


# the small budget is below these policies' default recent windows: what it tests, not what it warns about
@pytest.mark.filterwarnings("ignore::memvisor.kv.budget.BudgetWarning")
@pytest.mark.parametrize("policy", ["h2o", "scissorhands"])
def test_layer_with_a_policy_that_observes_probabilities(policy):
    """A layer under H2O/Scissorhands decodes through the kernel and evicts the same tokens as the torch path."""
    from memvisor.kv.policies import make_policy

    cores = [_core(fused, make_policy(policy), 40_000) for fused in (True, False)]
    g = torch.Generator().manual_seed(0)
    for n in [200] + [1] * 60:
        k, v = torch.randn(1, 2, n, 64, generator=g), torch.randn(1, 2, n, 64, generator=g)
        q = torch.randn(1, 6, n, 64, generator=g)
        outs = []
        for c in cores:
            assert c.update(k, v) is None
            outs.append(c.attend(q, 64 ** -0.5))
        torch.testing.assert_close(outs[0], outs[1], atol=2e-5, rtol=2e-5)
    assert cores[0].evictions > 0 and cores[0].lengths() == cores[1].lengths()
    assert cores[0].nbytes() == cores[1].nbytes()


def test_does_not_apply_to_prefill_or_unquantized_layers():
    stores = _heads()
    assert not applies(stores, torch.zeros(1, 6, 2, 64))
    plain = _heads(bits=None)
    assert not applies(plain, torch.zeros(1, 6, 1, 64))
    narrow = _heads(bits=2, group=2, n=40)  # a value group of 2 channels shares a byte with another group
    assert not applies(narrow, torch.zeros(1, 6, 1, 64))
    smallest = _heads(bits=2, group=4, n=60, residual=8)  # one byte per value group: the kernel's smallest
    _check(smallest, _query(smallest))


def test_without_numba_the_torch_path_runs_and_says_so(monkeypatch):
    import memvisor.kv.cpu.cache_path as cache_path

    monkeypatch.setattr(cache_path, "available", lambda: False)
    cache_path._warn_unavailable.cache_clear()
    stores = _heads()
    with pytest.warns(UserWarning, match=r"memvisor\[kv\]"):
        assert not applies(stores, _query(stores))
    cache_path._warn_unavailable.cache_clear()


def test_four_bit_values_in_groups_of_two_channels():
    """The narrowest groups the kernel takes: one code byte per value group (4-bit values, G = 2)."""
    stores = _heads(bits=4, group=2, n=50, residual=4)
    _check(stores, _query(stores))


def test_pruned_channels_sinks_window_batch_and_merged_groups_together():
    """ThinK channels, full-precision sinks, a sliding window, two batch rows, then a scattered eviction whose
    partly emptied key groups compact() merges (re-quantized groups of other sizes)."""
    g = torch.Generator().manual_seed(11)
    stores = _heads(Hkv=2, B=2, n=40, residual=16, sinks=3, window=True)
    for st in stores:
        st.set_channels(torch.sort(torch.randperm(64, generator=g)[:48]).values)
        st.append(*(torch.randn(2, 300, 64, generator=g) for _ in range(2)), torch.arange(40, 340))
    keep = torch.sort(torch.randperm(len(stores[0]), generator=g)[:200]).values
    for st in stores:
        st.keep(keep)
    merged = stores[0].compact()
    stores[1].compact()
    assert merged and stores[0].ns > 0 and stores[0].k_codes.shape[-1] == 48
    q = _query(stores, g=2)
    _check(stores, q, q_pos=339, window=200, scaling=0.02)
    got = decode(q, stores, 0.02, 339, 200, with_probs=True)
    ref = layer_attention(q, stores, torch.tensor([339]), 0.02, 200, with_probs=True)
    torch.testing.assert_close(got[1], ref[1], atol=1e-7, rtol=1e-5)
    assert torch.equal(got[2], ref[2])


def test_decode_refuses_what_it_does_not_serve():
    stores = _heads(bits=2, group=2, n=40)
    with pytest.raises(ValueError, match="whole code bytes"):
        decode(_query(stores), stores, 0.125, 39)
    plain_positions = _heads(n=40)
    with pytest.raises(ValueError, match="positions"):
        decode(_query(plain_positions), plain_positions, 0.125, 39, window=16)
    with pytest.raises(ValueError, match="softcap"):
        decode(_query(plain_positions), plain_positions, 0.125, 39, softcap=0.0)
