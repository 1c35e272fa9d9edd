"""Ragged per-head storage: nbytes is the sum of stored tensors, eviction is exact, ragged saves bytes."""

import math

import pytest
import torch

from memvisor.kv import quant
from memvisor.kv.blocks import MAX_KEY_RUNS, group_runs
from memvisor.kv.storage import HeadStore, QuantConfig, StackedHeads

B, D = 2, 64


def make(bits, n, residual=32, track_pos=False, seed=0, value_bits=None):
    g = torch.Generator().manual_seed(seed)
    st = HeadStore(B, D, torch.float32, torch.device("cpu"), QuantConfig(bits, 32, residual, value_bits), track_pos)
    k, v = torch.randn(B, n, D, generator=g), torch.randn(B, n, D, generator=g)
    st.append(k, v, torch.arange(n) if track_pos else None)
    return st, k, v


def expected_bytes(st):
    """Independent count from the layout: codes + fp16 scales/zeros + int16 group sizes + residual + int16
    positions (all positions in these tests are < 32768)."""
    nq, nr, b, vb = st.nq, st.nr, st.q.bits, st.q.vbits
    total = 2 * B * nr * D * 4  # fp32 residual k and v
    if b is not None:
        ng = st.group_sizes.numel()
        total += B * math.ceil(nq * b / 8) * D  # key codes
        total += 2 * B * ng * D * 2  # key scale + zero
        total += ng * 2  # group sizes
        total += B * nq * D * vb // 8  # value codes
        total += 2 * B * nq * (D // 32) * 2  # value scale + zero
    if st.pos is not None:
        total += (nq + nr) * 2
    return total


@pytest.mark.parametrize("bits", [None, 2, 4])
def test_nbytes_is_sum_of_stored_tensors(bits):
    st, _, _ = make(bits, 203, track_pos=True)
    assert len(st) == 203
    assert st.nbytes() == sum(t.numel() * t.element_size() for t in st.tensors().values())
    assert st.nbytes() == expected_bytes(st)
    if bits is not None:
        assert st.nq == 160 and st.nr == 43  # whole groups flushed, R <= residual < R + G
    st.keep(torch.tensor([0, 1, 5, 40, 77, 150, 170, 202]))
    assert st.nbytes() == expected_bytes(st)


def test_residual_policy_and_bits_per_element_kivi2():
    st, _, _ = make(2, 32 * 64 + 40)
    assert st.nr == 40 and st.nq == 32 * 64
    q_bytes = st.nbytes() - 2 * B * st.nr * D * 4
    bits = q_bytes * 8 / (2 * B * st.nq * D)
    assert bits <= 3.01  # 2-bit codes + fp16 scale/zero per 32 + group sizes


@pytest.mark.parametrize("bits", [2, 4])
def test_eviction_keeps_survivors_exactly(bits):
    st, _, _ = make(bits, 150, track_pos=True)
    k_all, v_all = st.dense()
    keep = torch.tensor([0, 3, 31, 32, 33, 63, 64, 100, 127, 128, 140, 149])
    st.keep(keep)
    k2, v2 = st.dense()
    assert torch.equal(k2, k_all[:, keep]) and torch.equal(v2, v_all[:, keep])
    assert torch.equal(st.positions(), keep)
    assert int(st.group_sizes.sum()) == st.nq
    # appending after an eviction (partial tail byte) re-packs the surviving codes exactly
    nq = st.nq
    assert nq % (8 // bits)  # the tail byte is partly filled: the hard case
    st.append(torch.randn(B, 70, D), torch.randn(B, 70, D), torch.arange(150, 220))
    k3, _ = st.dense()
    assert st.nq > nq and torch.equal(k3[:, :nq], k_all[:, keep[:nq]])


def test_residual_tokens_are_full_precision():
    st, k, v = make(2, 100)
    k_all, v_all = st.dense()
    assert torch.equal(k_all[:, st.nq:], k[:, st.nq:]) and torch.equal(v_all[:, st.nq:], v[:, st.nq:])
    assert not torch.equal(k_all[:, : st.nq], k[:, : st.nq])  # the old ones are quantized


def test_ragged_heads_really_save_bytes():
    a, _, _ = make(2, 300, seed=1)
    b, _, _ = make(2, 300, seed=2)
    before = a.nbytes() + b.nbytes()
    a.keep(torch.arange(0, 300, 3))  # head a keeps a third, head b everything
    assert len(a) == 100 and len(b) == 300
    assert a.nbytes() + b.nbytes() < before * 0.7
    assert not StackedHeads.compatible([a, b])


def test_blocks_never_exceed_block_size_and_cover_all():
    st, _, _ = make(4, 300)
    sizes = [k.shape[1] for k, _, _ in st.blocks(64)]
    assert max(sizes) <= 64 and sum(sizes) == 300
    with pytest.raises(ValueError):
        list(st.blocks(60))


def test_keep_out_of_range_raises():
    st, _, _ = make(None, 10)
    with pytest.raises(IndexError):
        st.keep(torch.tensor([0, 10]))


@pytest.mark.parametrize("bits", [None, 4])
def test_think_channels_removed_from_storage(bits):
    st, k, v = make(bits, 140)
    k_before, _ = st.dense()
    ch = torch.tensor([1, 4, 9, 20, 33, 63])
    full_bytes = st.nbytes()
    st.set_channels(ch)
    st.append(torch.randn(B, 40, D), torch.randn(B, 40, D))
    assert st.nbytes() == sum(t.numel() * t.element_size() for t in st.tensors().values())
    width = st.tensors()["k_codes" if bits else "k_old"].shape[-1]
    assert width == 6  # only the kept channels are stored for compressed tokens
    kd, _ = st.dense()
    n_comp = st.nq
    pruned = torch.ones(D, dtype=torch.bool)
    pruned[ch] = False
    assert (kd[:, :n_comp][..., pruned] == 0).all()  # read back as zeros: q.k == q[ch].k[ch]
    if bits:  # already-quantized keys keep their exact codes in the kept channels
        old = min(n_comp, 96)
        assert torch.equal(kd[:, :old][..., ch], k_before[:, :old][..., ch])
    else:
        assert torch.equal(kd[:, :100][..., ch], k[:, :100][..., ch])
    assert torch.equal(kd[:, n_comp:], st.k_res)  # residual stays full width
    assert st.nbytes() < full_bytes + 40 * 2 * B * D * 4
    st.keep(torch.arange(0, len(st), 2))
    assert st.nbytes() == sum(t.numel() * t.element_size() for t in st.tensors().values())


def test_compaction_merges_sparse_groups_within_error_bound():
    st, k, _ = make(2, 32 * 8 + 32)  # 8 full key groups
    k_before, _ = st.dense()
    keep = torch.cat([torch.arange(g * 32, g * 32 + 5) for g in range(8)] + [torch.arange(256, 288)])
    st.keep(keep)  # 5 tokens left in each group: 8 near-empty groups
    assert st.group_sizes.tolist() == [5] * 8
    bytes_sparse = st.nbytes()
    assert st.compact()
    assert st.group_sizes.tolist() == [30, 10] and int(st.group_sizes.sum()) == st.nq == 40
    assert st.nbytes() < bytes_sparse
    assert st.nbytes() == expected_bytes(st)
    k_after, _ = st.dense()
    kept_before = k_before[:, keep[:40]]
    # one more rounding: within half a step of the merged group's range (+ fp16 rounding)
    for g0, g1 in ((0, 30), (30, 40)):
        part = kept_before[:, g0:g1]
        step = (part.amax(1) - part.amin(1)) / 3
        err = (k_after[:, g0:g1] - part).abs().amax(1)
        assert (err <= step / 2 + 1e-2).all()
    assert not st.compact()  # nothing left to merge


@pytest.mark.parametrize("kb,vb", [(4, 2), (2, 4)])
def test_mixed_precision_keys_and_values_each_within_their_bound(kb, vb):
    from memvisor.kv import quant

    st, k, v = make(kb, 160, residual=32, value_bits=vb, seed=3)
    assert st.nq == 128 and st.v_codes.shape == (B, 128, D * vb // 8) and st.k_codes.shape == (B, 128 * kb // 8, D)
    kd, vd = st.dense(torch.float32)
    kq, vq = k[:, :128], v[:, :128]
    k_err, v_err = (kd[:, :128] - kq).abs(), (vd[:, :128] - vq).abs()
    assert (k_err <= quant.error_bound(kq, kb, 32, "keys") + 1e-6).all()
    assert (v_err <= quant.error_bound(vq, vb, 32, "values") + 1e-6).all()
    # the widths are really different: the 4-bit side is much more precise than the 2-bit side
    fine, coarse = (k_err, v_err) if kb == 4 else (v_err, k_err)
    assert fine.mean() < 0.3 * coarse.mean()
    assert torch.equal(kd[:, 128:], k[:, 128:]) and torch.equal(vd[:, 128:], v[:, 128:])  # residual exact
    assert st.nbytes() == sum(t.numel() * t.element_size() for t in st.tensors().values()) == expected_bytes(st)
    st.keep(torch.tensor([0, 7, 31, 33, 90, 127, 128, 159]))
    assert st.nbytes() == expected_bytes(st)


def test_positions_int16_until_they_need_int32():
    st, _, _ = make(2, 40, track_pos=True)
    assert st.pos.dtype == torch.int16
    st.append(torch.randn(B, 2, D), torch.randn(B, 2, D), torch.tensor([32767, 32768]))
    assert st.pos.dtype == torch.int32 and st.positions()[-2:].tolist() == [32767, 32768]
    assert st.positions()[:40].tolist() == list(range(40))  # older positions widened exactly


@pytest.mark.parametrize("bits,goal", [(2, 3.2), (4, 5.2)])
@pytest.mark.parametrize("head_dim,track_pos", [(64, False), (256, False)])
def test_bits_per_element_with_all_metadata_meet_the_goals_at_4k(bits, goal, head_dim, track_pos):
    # SmolLM2's (64) and Gemma 3's full-attention (256) head shapes, bf16, 4093 tokens appended in
    # 512-token blocks as the block-wise prefill does: codes, scales, zeros, group sizes, positions
    # and the bf16 residual all count.
    st = HeadStore(1, head_dim, torch.bfloat16, torch.device("cpu"), QuantConfig(bits, 32, 32), track_pos)
    T = 4093
    for s in range(0, T, 512):
        n = min(512, T - s)
        st.append(torch.randn(1, n, head_dim), torch.randn(1, n, head_dim), torch.arange(s, s + n))
    bits_per_elem = 8 * st.nbytes() / (2 * T * head_dim)
    assert bits + 32 / 32 < bits_per_elem <= goal


def test_group_runs_cover_each_token_with_its_own_group():
    g = torch.Generator().manual_seed(3)
    for _ in range(300):
        sizes = [int(x) for x in torch.randint(1, 33, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g)]
        sizes = [32 if s > 20 else s for s in sizes]  # whole groups mixed with partial ones
        n = sum(sizes)
        start = int(torch.randint(0, n, (1,), generator=g))
        end = int(torch.randint(start + 1, n + 1, (1,), generator=g))
        want = [grp for grp, size in enumerate(sizes) for _ in range(size)][start:end]
        got, t = [], 0
        for g0, m, size, t0 in group_runs(sizes, start, end):
            assert t0 == t and m >= 1 and 1 <= size <= 32
            got += [g0 + j for j in range(m) for _ in range(size)]
            t += m * size
        assert got == want
    assert group_runs([32] * 40, 0, 1024) == [(0, 32, 32, 0)]  # a fresh cache: one run, scales broadcast
    assert group_runs([4, 13, 32, 32], 8, 70) == [(1, 1, 9, 0), (2, 1, 32, 9), (3, 1, 21, 41)]


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("kept", ["streaming", "scattered"])
def test_blocks_after_eviction_equal_the_per_token_scales(bits, kept):
    """Blocks read after eviction (runs of equal-size groups, or the gather when the groups are
    scattered) equal dequantization with each token's own group row, whatever the block size."""
    st, _, _ = make(bits, 700, residual=32)
    n = len(st)
    idx = (torch.cat([torch.arange(4), torch.arange(203, n)]) if kept == "streaming"
           else torch.sort(torch.randperm(n, generator=torch.Generator().manual_seed(1))[:450]).values)
    st.keep(idx)
    runs = group_runs(st.group_sizes.tolist(), 0, st.nq)
    assert (len(runs) <= MAX_KEY_RUNS) == (kept == "streaming")
    want = quant.dequantize_keys(st.k_codes, st.k_scale, st.k_zero, bits, st.nq, st.group_of_tokens(0, st.nq))
    for block in (8, 24, 64, 1024):
        keys = torch.cat([k for k, _, _ in st.blocks(block)], dim=1)[:, :st.nq]
        assert torch.equal(keys, want), block


@pytest.mark.parametrize("bits", [2, 4])
def test_sinks_stay_exact_and_are_counted(bits):
    """The first S tokens ever stored read back bit-exact; the rest is quantized as without sinks, shifted by S;
    nbytes counts the sinks at full precision; keep() indexes sinks, quantized and residual in stored order."""
    g = torch.Generator().manual_seed(3)
    k, v = torch.randn(B, 203, D, generator=g), torch.randn(B, 203, D, generator=g)
    k[:, 0] *= 40  # an outlier first token, as attention sinks are
    st = HeadStore(B, D, torch.float32, torch.device("cpu"), QuantConfig(bits, 32, 32, sinks=4), True)
    plain = HeadStore(B, D, torch.float32, torch.device("cpu"), QuantConfig(bits, 32, 32), True)
    for s in range(0, 203, 50):  # several forwards, as prefill blocks and decode steps arrive
        st.append(k[:, s:s + 50], v[:, s:s + 50], torch.arange(s, min(s + 50, 203)))
    plain.append(k[:, 4:], v[:, 4:], torch.arange(4, 203))  # key groups start at token 4 in both
    assert (st.ns, len(st)) == (4, 203) and st.nq == plain.nq
    ks, vs = st.dense()
    assert torch.equal(ks[:, :4], k[:, :4]) and torch.equal(vs[:, :4], v[:, :4])
    kp, vp = plain.dense()  # tokens 4.. are stored exactly as a sink-free cache of tokens 4.. stores them
    assert torch.equal(ks[:, 4:], kp) and torch.equal(vs[:, 4:], vp)
    assert torch.equal(st.positions(), torch.arange(203))
    assert st.nbytes() == sum(t.numel() * t.element_size() for t in st.tensors().values())
    assert st.nbytes() == plain.nbytes() + 2 * B * 4 * D * 4 + 4 * 2  # fp32 sink k, v and their int16 positions
    keep = torch.tensor([0, 2, 3, 10, 40, 41, 120, 190, 202])
    st.keep(keep)
    k2, v2 = st.dense()
    assert st.ns == 3 and torch.equal(k2, ks[:, keep]) and torch.equal(v2, vs[:, keep])
    assert torch.equal(st.positions(), keep)
    st.append(k[:, :8], v[:, :8], torch.arange(203, 211))  # evicted sinks are not refilled
    assert st.ns == 3


def test_stacked_heads_read_the_sinks_first():
    stores = []
    for seed in range(3):
        st = HeadStore(B, D, torch.float32, torch.device("cpu"), QuantConfig(4, 32, 32, sinks=2), False)
        st.append(*(torch.randn(B, 100, D, generator=torch.Generator().manual_seed(seed)) for _ in range(2)))
        stores.append(st)
    assert StackedHeads.compatible(stores)
    stacked = StackedHeads(stores)
    assert len(stacked) == 100 and stacked.ns == 2
    from memvisor.kv.blocks import iter_blocks

    k = torch.cat([b[0] for b in iter_blocks(stacked, 32)], -2)
    for h, st in enumerate(stores):
        assert torch.equal(k[:, h], st.dense()[0])


def test_negative_sinks_are_refused():
    with pytest.raises(quant.QuantError, match="sinks"):
        QuantConfig(4, 32, 32, sinks=-2)


def test_replace_does_not_refill_evicted_sinks():
    """After a merge drops sink 0, the kept sinks stay sinks and no other token takes the freed slot (as keep())."""
    g = torch.Generator().manual_seed(5)
    k, v = torch.randn(B, 120, D, generator=g), torch.randn(B, 120, D, generator=g)
    st = HeadStore(B, D, torch.float32, torch.device("cpu"), QuantConfig(4, 32, 32, sinks=4), True)
    st.append(k, v, torch.arange(120))
    idx = torch.tensor([1, 2, 3, 10, 50, 119])
    kk, vv = st.dense()
    st.replace(kk[:, idx], vv[:, idx], torch.arange(120)[idx], sinks_kept=int((idx < st.ns).sum()))
    assert st.ns == 3 and torch.equal(st.positions()[:3], torch.tensor([1, 2, 3]))
    assert torch.equal(st.k_sink, k[:, 1:4])


def _head(T: int, seed: int = 0, G: int = 32) -> HeadStore:
    g = torch.Generator().manual_seed(seed)
    st = HeadStore(1, 32, torch.float32, torch.device("cpu"), QuantConfig(4, G, 32, 2), False)
    st.append(torch.randn(1, T, 32, generator=g), torch.randn(1, T, 32, generator=g))
    return st


def _rows(st: HeadStore) -> torch.Tensor:
    """Each quantized token's key-scale row as the GPU kernels read ``group_prefix``."""
    p, r0, rows = st.group_prefix()
    t = torch.arange(st.nq)
    out = r0 + (t - p).clamp(min=0) // st.q.group
    if p:
        out[:p] = rows.long()
    return out


def test_group_prefix_maps_streaming_llms_cut_groups_and_counts_their_bytes():
    """StreamingLLM keeps 4 sinks of the first key group and evicts from the oldest groups after them: the groups
    are cut only in a short prefix, whose rows the head keeps (and counts) while the rest are read as whole groups.
    A flush carries the prefix over without computing it again; an eviction computes it anew."""
    st = _head(700)
    assert st.group_prefix() == (0, 0, None) and "key_group_rows" not in st.tensors()
    before = st.nbytes()
    st.keep(torch.cat([torch.arange(4), torch.arange(100, len(st))]))  # sinks 4 | groups cut at token 100
    answer = st.group_prefix()
    p, r0, rows = answer
    assert (p, r0) == (4 + 28, 2) and rows.tolist() == [0] * 4 + [1] * 28  # emptied groups are dropped
    assert torch.equal(_rows(st), st.group_of_tokens(0, st.nq))
    assert st.tensors()["key_group_rows"] is rows
    assert st.nbytes() == sum(t.numel() * t.element_size() for t in st.tensors().values())
    assert st.nbytes() < before  # the 96 evicted tokens outweigh the 32 rows kept
    g = torch.Generator().manual_seed(1)
    st.append(torch.randn(1, 64, 32, generator=g), torch.randn(1, 64, 32, generator=g))  # flushes 2 whole groups
    assert st.group_prefix() is answer and torch.equal(_rows(st), st.group_of_tokens(0, st.nq))
    st.keep(torch.cat([torch.arange(4), torch.arange(40, len(st))]))  # evicts the rest of the cut group and more
    assert st.group_prefix() is not answer and torch.equal(_rows(st), st.group_of_tokens(0, st.nq))


def test_group_prefix_is_none_when_cut_groups_reach_far():
    """Per-head token choices cut groups all through the history: nothing is kept (it would cost 4 bytes a
    token); the GPU step maps every token instead."""
    from memvisor.kv.storage import PREFIX_LIMIT

    st = _head(900)
    st.keep(torch.arange(0, len(st), 3))
    assert st.nq > PREFIX_LIMIT and st.group_prefix() is None and "key_group_rows" not in st.tensors()
    assert st.group_prefix() is None  # remembered until the groups change


@pytest.mark.parametrize("evict", ["stacked", "per head"])
def test_head_stack_flush_carries_the_group_prefix(evict):
    """The stacked heads' flush (all heads in one op) appends whole groups: each head's prefix stays, not
    recomputed (a read back from the GPU each time otherwise), also when the heads were evicted one by one and
    the flush first stacks their group sizes again (equal copies)."""
    from memvisor.kv.gpu.cache_path import HeadStack

    stores = [_head(300, seed=s) for s in range(2)]
    keep = torch.cat([torch.arange(4), torch.arange(50, len(stores[0]))])
    stack = HeadStack()
    if evict == "stacked":
        assert stack.keep(stores, [keep, keep])
    else:
        for st in stores:
            st.keep(keep)
    answers = [st.group_prefix() for st in stores]
    assert answers[0][0] == 4 + 14
    g = torch.Generator().manual_seed(2)
    stack.append(stores, torch.randn(1, 2, 40, 32, generator=g), torch.randn(1, 2, 40, 32, generator=g))
    assert stack.flush(stores)
    for st, answer in zip(stores, answers):
        assert st.group_prefix() is answer and torch.equal(_rows(st), st.group_of_tokens(0, st.nq))
