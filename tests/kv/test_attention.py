"""Block-wise attention over (quantized, ragged) storage equals plain softmax attention over the
same stored keys and values, with causal and sliding-window masks."""

import pytest
import torch

from memvisor.kv.attention import DENSE_MIN_QUERIES, layer_attention
from memvisor.kv.storage import HeadStore, QuantConfig, StackedHeads

B, D = 1, 64


def reference(query, stores, q_pos, scaling, window):
    """Dense softmax attention per KV head over st.dense(), masks from storage index and positions."""
    Bq, Hq, Tq, _ = query.shape
    g = Hq // len(stores)
    out = torch.zeros(Bq, Hq, Tq, D)
    for h, st in enumerate(stores):
        k, v = st.dense(torch.float32)
        n = k.shape[1]
        q = query[:, h * g:(h + 1) * g].float()
        s = torch.einsum("bgtd,bnd->bgtn", q, k) * scaling
        j = torch.arange(n)
        allowed = j.unsqueeze(0) <= (n - Tq + torch.arange(Tq)).unsqueeze(1)
        if window is not None:
            allowed &= st.positions().unsqueeze(0) > (q_pos.unsqueeze(1) - window)
        s = s.masked_fill(~allowed, float("-inf"))
        out[:, h * g:(h + 1) * g] = torch.einsum("bgtn,bnd->bgtd", s.softmax(-1), v)
    return out.transpose(1, 2)


def build(bits, lengths, track_pos, seed=0):
    g = torch.Generator().manual_seed(seed)
    stores = []
    for n in lengths:
        st = HeadStore(B, D, torch.float32, torch.device("cpu"), QuantConfig(bits, 32, 32), track_pos)
        st.append(torch.randn(B, n, D, generator=g), torch.randn(B, n, D, generator=g), torch.arange(n))
        stores.append(st)
    return stores


@pytest.mark.parametrize("bits", [None, 2, 4])
@pytest.mark.parametrize("Tq", [1, 7])
def test_blockwise_equals_dense_equal_heads(bits, Tq):
    stores = build(bits, [300, 300, 300], track_pos=False)
    q = torch.randn(B, 9, Tq, D)
    q_pos = torch.arange(300 - Tq, 300)
    got = layer_attention(q, stores, q_pos, 0.125, block=64)
    torch.testing.assert_close(got, reference(q, stores, q_pos, 0.125, None), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("bits", [None, 2])
def test_blockwise_ragged_heads_after_eviction(bits):
    stores = build(bits, [260, 260, 260], track_pos=True)
    g = torch.Generator().manual_seed(5)
    for st in stores[:2]:
        keep = torch.sort(torch.randperm(260, generator=g)[:130]).values
        st.keep(torch.unique(torch.cat([keep, torch.arange(250, 260)])))
    assert len({len(st) for st in stores}) > 1
    q = torch.randn(B, 9, 4, D)
    q_pos = torch.arange(256, 260)
    got = layer_attention(q, stores, q_pos, 0.125, block=32)
    torch.testing.assert_close(got, reference(q, stores, q_pos, 0.125, None), atol=2e-5, rtol=1e-4)


def test_sliding_window_mask_uses_absolute_positions():
    stores = build(4, [200], track_pos=True)
    stores[0].keep(torch.arange(20, 200, 2))  # positions no longer equal storage indices
    q = torch.randn(B, 2, 5, D)
    # the 5 newest stored tokens are the queries' own: positions 190..198 step 2
    q_pos = stores[0].positions()[-5:]
    got = layer_attention(q, stores, q_pos, 0.125, window=50, block=16)
    want = reference(q, stores, q_pos, 0.125, 50)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    # and the window matters: without it the result differs
    assert not torch.allclose(got, layer_attention(q, stores, q_pos, 0.125, window=None, block=16), atol=1e-3)


def test_block_size_does_not_change_result():
    stores = build(2, [500, 500], track_pos=False)
    q = torch.randn(B, 4, 1, D)
    a = layer_attention(q, stores, torch.tensor([499]), 0.125, block=32)
    b = layer_attention(q, stores, torch.tensor([499]), 0.125, block=1024)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_think_pruned_heads_attend_like_projected_queries():
    stores = build(2, [200, 200], track_pos=False)
    g = torch.Generator().manual_seed(9)
    for st in stores:
        st.set_channels(torch.sort(torch.randperm(D, generator=g)[:40]).values)
    q = torch.randn(B, 4, 3, D)
    got = layer_attention(q, stores, torch.arange(197, 200), 0.125, block=64)
    torch.testing.assert_close(got, reference(q, stores, torch.arange(197, 200), 0.125, None), atol=2e-5, rtol=1e-4)


# A prefill block (>= DENSE_MIN_QUERIES queries) reads the history once through SDPA: the same masks and
# the same result as the block-wise path, for every storage layout.
TQ_DENSE = DENSE_MIN_QUERIES + 16


def _evict_ragged(stores, n, seed=5):
    g = torch.Generator().manual_seed(seed)
    for st in stores[:2]:
        keep = torch.sort(torch.randperm(n - TQ_DENSE, generator=g)[:(n - TQ_DENSE) // 2]).values
        st.keep(torch.cat([keep, torch.arange(n - TQ_DENSE, n)]))


@pytest.mark.parametrize("bits", [None, 2, 4])
@pytest.mark.parametrize("ragged", [False, True])
def test_prefill_block_equals_reference(bits, ragged):
    n = 400
    stores = build(bits, [n] * 3, track_pos=True)
    if ragged:
        _evict_ragged(stores, n)
        assert len({len(st) for st in stores}) > 1
    q = torch.randn(B, 9, TQ_DENSE, D)
    q_pos = torch.arange(n - TQ_DENSE, n)
    got = layer_attention(q, stores, q_pos, 0.125, block=64)
    torch.testing.assert_close(got, reference(q, stores, q_pos, 0.125, None), atol=2e-5, rtol=1e-4)


def test_prefill_block_sliding_window_and_single_head():
    stores = build(4, [600], track_pos=True)
    stores[0].keep(torch.cat([torch.arange(0, 400, 2), torch.arange(400, 600)]))  # positions != indices
    q = torch.randn(B, 4, TQ_DENSE, D)
    q_pos = stores[0].positions()[-TQ_DENSE:]
    got = layer_attention(q, stores, q_pos, 0.125, window=150, block=64)
    torch.testing.assert_close(got, reference(q, stores, q_pos, 0.125, 150), atol=2e-5, rtol=1e-4)
    assert not torch.allclose(got, layer_attention(q, stores, q_pos, 0.125, block=64), atol=1e-3)


def test_prefill_block_with_sinks_and_pruned_channels():
    g = torch.Generator().manual_seed(3)
    stores = []
    for _ in range(2):
        st = HeadStore(B, D, torch.float32, torch.device("cpu"), QuantConfig(2, 32, 32, sinks=8), False)
        st.append(torch.randn(B, 300, D, generator=g), torch.randn(B, 300, D, generator=g))
        st.set_channels(torch.sort(torch.randperm(D, generator=g)[:40]).values)
        stores.append(st)
    assert stores[0].ns == 8
    q = torch.randn(B, 4, TQ_DENSE, D)
    got = layer_attention(q, stores, torch.arange(300 - TQ_DENSE, 300), 0.125, block=64)
    torch.testing.assert_close(got, reference(q, stores, None, 0.125, None), atol=2e-5, rtol=1e-4)


def test_prefill_block_in_bf16_matches_the_float32_path():
    """A bf16 model's prefill: history dequantized to bf16, scores accumulated in float32 by SDPA; the
    difference to the float32 block loop is the bf16 rounding of the output and of the dequantized
    values, far below the 4-bit quantization error itself."""
    stores = build(4, [500] * 3, track_pos=False)
    q = torch.randn(B, 9, TQ_DENSE, D)
    q_pos = torch.arange(500 - TQ_DENSE, 500)
    fp32 = reference(q, stores, q_pos, 0.125, None)
    got = layer_attention(q.bfloat16(), stores, q_pos, 0.125, block=64)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), fp32, atol=2e-2, rtol=2e-2)


def test_prefill_block_window_per_head_positions():
    """Stacked heads (full precision, equal counts) that kept different tokens: each query head must
    use its own KV head's positions under the window (query heads grouped h*g .. h*g+g-1)."""
    stores = build(None, [600] * 3, track_pos=True)
    g = torch.Generator().manual_seed(11)
    for st in stores:
        keep = torch.sort(torch.randperm(600 - TQ_DENSE, generator=g)[:300]).values
        st.keep(torch.cat([keep, torch.arange(600 - TQ_DENSE, 600)]))
    assert StackedHeads.compatible(stores)
    assert not torch.equal(stores[0].positions(), stores[1].positions())
    q = torch.randn(B, 6, TQ_DENSE, D)
    q_pos = torch.arange(600 - TQ_DENSE, 600)
    got = layer_attention(q, stores, q_pos, 0.125, window=200, block=64)
    torch.testing.assert_close(got, reference(q, stores, q_pos, 0.125, 200), atol=2e-5, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bits", [2, 4])
def test_prefill_block_on_cuda_matches_the_float32_reference(bits):
    """The SDPA prefill path on CUDA (bf16 queries, ragged heads and a window) against the float32 reference."""
    g = torch.Generator().manual_seed(bits)
    stores = []
    for h in range(3):
        st = HeadStore(B, D, torch.bfloat16, torch.device("cuda"), QuantConfig(bits, 32, 32), True)
        st.append(torch.randn(B, 500, D, generator=g).to("cuda", torch.bfloat16),
                  torch.randn(B, 500, D, generator=g).to("cuda", torch.bfloat16), torch.arange(500, device="cuda"))
        if h:
            st.keep(torch.cat([torch.arange(0, 500 - TQ_DENSE, h + 1), torch.arange(500 - TQ_DENSE, 500)]).cuda())
        stores.append(st)
    q = torch.randn(B, 6, TQ_DENSE, D, generator=g).to("cuda", torch.bfloat16)
    q_pos = torch.arange(500 - TQ_DENSE, 500, device="cuda")
    got = layer_attention(q, stores, q_pos, 0.125, window=300, block=64)
    want = reference(q.float().cpu(), [_dense_copy(st) for st in stores], q_pos.cpu(), 0.125, 300)
    torch.testing.assert_close(got.float().cpu(), want, atol=2e-2, rtol=2e-2)


def _dense_copy(st, row=None):
    """A full-precision CPU store holding ``st``'s dequantized tokens and positions (batch row ``row`` only,
    when given): the reference's input for stores on another device or with several rows."""
    k, v = (x.cpu() for x in st.dense(torch.float32))
    if row is not None:
        k, v = k[row:row + 1], v[row:row + 1]
    copy = HeadStore(k.shape[0], D, torch.float32, torch.device("cpu"), QuantConfig(None), True)
    copy.append(k, v, st.positions().cpu())
    return copy


def test_prefill_block_ragged_heads_window_batch_and_scaling():
    """Ragged heads under a window, two batch rows and a scaling that is not SDPA's default 1/sqrt(D)."""
    n = 500
    g = torch.Generator().manual_seed(21)
    stores = []
    for h in range(3):
        st = HeadStore(2, D, torch.float32, torch.device("cpu"), QuantConfig(4, 32, 32), True)
        st.append(torch.randn(2, n, D, generator=g), torch.randn(2, n, D, generator=g), torch.arange(n))
        if h:
            st.keep(torch.cat([torch.arange(0, n - TQ_DENSE, h + 1), torch.arange(n - TQ_DENSE, n)]))
        stores.append(st)
    assert len({len(st) for st in stores}) == 3
    q = torch.randn(2, 6, TQ_DENSE, D, generator=g)
    q_pos = torch.arange(n - TQ_DENSE, n)
    got = layer_attention(q, stores, q_pos, 0.3, window=220, block=64)
    want = torch.cat([reference(q[b:b + 1], [_dense_copy(st, b) for st in stores], q_pos, 0.3, 220) for b in range(2)])
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def _group_probs(query, stores, q_pos, window):
    """What a statistics policy computes for itself: ``group_attention`` over the padded dense history."""
    from memvisor.kv.policies._attention import group_attention

    dense = [st.dense(torch.float32) for st in stores]
    T = max(k.shape[1] for k, _ in dense)
    keys = torch.stack([torch.nn.functional.pad(k, (0, 0, 0, T - k.shape[1])) for k, _ in dense], 1)
    lengths = torch.tensor([k.shape[1] for k, _ in dense])
    positions = None
    if window is not None:
        positions = torch.stack([torch.nn.functional.pad(st.positions(), (0, T - len(st)), value=-(1 << 40))
                                 for st in stores])
    (_, probs, n_visible), = group_attention(query, keys, lengths=lengths, scaling=0.125, chunk=4096,
                                             positions=positions, window=window)
    return probs, n_visible


@pytest.mark.parametrize("case", ["equal", "ragged", "window", "causal-block", "sinks"])
def test_the_block_loop_hands_out_the_softmax_rows_a_policy_would_compute(case):
    """``with_probs``: the block loop's exponentials, rescaled to the final maximum and averaged over each
    query group, are ``group_attention``'s probabilities (the ones H2O and Scissorhands accumulate),
    for stacked heads, ragged heads (zero-padded), a sliding window, several queries (causal inside the
    forward) and full-precision sinks; the output itself is unchanged. Blocks of 32 split every history."""
    Tq = 5 if case == "causal-block" else 1
    if case == "sinks":
        g = torch.Generator().manual_seed(3)
        stores = []
        for _ in range(2):
            st = HeadStore(B, D, torch.float32, torch.device("cpu"), QuantConfig(4, 32, 32, sinks=8), False)
            st.append(torch.randn(B, 300, D, generator=g), torch.randn(B, 300, D, generator=g))
            stores.append(st)
    else:
        stores = build(4, [300, 300, 300], track_pos=True)
    if case == "ragged":
        for h, st in enumerate(stores[:2]):
            st.keep(torch.cat([torch.arange(0, 290, h + 2), torch.arange(290, 300)]))
    window = 120 if case == "window" else None
    q = torch.randn(B, 3 * len(stores), Tq, D)
    n = max(len(st) for st in stores)
    q_pos = torch.arange(300 - Tq, 300)
    out, probs, n_visible = layer_attention(q, stores, q_pos, 0.125, window=window, block=32, with_probs=True)
    assert torch.equal(out, layer_attention(q, stores, q_pos, 0.125, window=window, block=32))
    want, want_visible = _group_probs(q, stores, q_pos, window)
    assert probs.shape == (B, len(stores), Tq, n)
    torch.testing.assert_close(probs, want, atol=1e-6, rtol=1e-4)
    assert torch.equal(n_visible, want_visible)
    torch.testing.assert_close(probs.sum(-1), torch.ones(B, len(stores), Tq))
    if case == "window":
        assert int(n_visible.max()) == 120 < n  # the window hid the older tokens
