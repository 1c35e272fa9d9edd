"""The cache's decode path: the fused kernel on CUDA (device tests), the block-wise torch path elsewhere,
and the kernel-layout mirror of a layer's groups (checked on the CPU against a from-scratch repack)."""

import pytest
import torch

from memvisor.kv.gpu import triton_available
from memvisor.kv.gpu.cache_path import DecodeMirror, HeadStack, kernel_applies
from memvisor.kv.gpu.layout import KiviLayer
from memvisor.kv.gpu.planes import to_planes
from memvisor.kv.layer import LayerConfig, LayerCore
from memvisor.kv.storage import HeadStore, QuantConfig

cuda = pytest.mark.skipif(not triton_available(), reason="needs CUDA and Triton")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _stacked(stores: list[HeadStore]) -> KiviLayer:
    """The heads' whole quantized history stacked: what the mirror must equal."""
    names = ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero", "k_res", "v_res")
    s = {n: torch.stack([getattr(st, n) for st in stores], 1) for n in names}
    return KiviLayer(stores[0].q.bits, stores[0].q.group, *(s[n] for n in names))


@pytest.mark.parametrize("bits", [2, 4])
def test_mirror_follows_the_heads_group_by_group(bits):
    g = torch.Generator().manual_seed(bits)
    B, H, D = 2, 3, 64
    q = QuantConfig(bits=bits, group=32, residual=32)
    stores = [HeadStore(B, D, torch.bfloat16, torch.device("cpu"), q, False) for _ in range(H)]
    mirror = DecodeMirror(q)
    steps = [300] + [1] * 290 + [700, 40, 7]  # a prefill, then one token at a time across many group and tile edges
    for n in steps:
        k = torch.randn(B, H, n, D, generator=g).bfloat16()
        v = torch.randn(B, H, n, D, generator=g).bfloat16()
        for h, st in enumerate(stores):
            st.append(k[:, h], v[:, h])
        mirror.sync(stores)
        assert mirror.t == stores[0].nq
    full = _stacked(stores)
    got = mirror.layer(stores)
    assert mirror.cap * (16 // bits) * 32 >= full.t_quant
    want = to_planes(full)  # bit for bit the planes repack of the whole history, zeros past it
    assert got.bits == bits and got.t_quant == full.t_quant
    for name in ("kw", "ks", "kz", "vw"):
        w, m = getattr(want, name), getattr(got, name)
        assert torch.equal(m[:, :, : w.shape[2]], w) and not m[:, :, w.shape[2]:].any(), name
    w = want.vsz  # [B, H, D/G, tokens, 2]
    assert torch.equal(got.vsz[:, :, :, : w.shape[3]], w) and not got.vsz[:, :, :, w.shape[3]:].any()
    assert torch.equal(got.k_res, full.k_res) and torch.equal(got.v_res, full.v_res)
    assert mirror.nbytes(stores) == sum(t.numel() * t.element_size() for t, _, _ in mirror.bufs.values())


@pytest.mark.parametrize("bits", [2, 4])
def test_mirror_append_matches_per_head_appends(bits):
    """Decode steps through ``DecodeMirror.append`` (the heads' residuals as views of one stacked buffer)
    leave every head exactly as per-head appends do, across flushes; the kernel's residual is that buffer."""
    g = torch.Generator().manual_seed(10 + bits)
    B, H, D = 2, 3, 64
    q = QuantConfig(bits=bits, group=32, residual=32)
    mk = lambda: [HeadStore(B, D, torch.bfloat16, torch.device("cpu"), q, False) for _ in range(H)]  # noqa: E731
    fast, ref = mk(), mk()
    mirror = DecodeMirror(q)
    k = torch.randn(B, H, 301, D, generator=g).bfloat16()
    v = torch.randn(B, H, 301, D, generator=g).bfloat16()
    for stores in (fast, ref):
        for h, st in enumerate(stores):
            st.append(k[:, h], v[:, h])
    for step in range(150):  # several flushes (every 32 tokens) and buffer rebuilds
        k = torch.randn(B, H, 1, D, generator=g)  # float32: stored in the model dtype, as HeadStore.append does
        v = torch.randn(B, H, 1, D, generator=g)
        mirror.append(fast, k, v)
        for h, st in enumerate(ref):
            st.append(k[:, h], v[:, h], flush=False)
        mirror.sync(fast)
        layer = mirror.layer(fast)
        assert torch.equal(layer.k_res, torch.stack([st.k_res for st in ref], 1))
        assert torch.equal(layer.v_res, torch.stack([st.v_res for st in ref], 1))
        if step % 7 == 0:  # the views are the buffer: the kernel's residual is read without a copy
            assert layer.k_res.data_ptr() == mirror.rk.data_ptr()
        for stores in (fast, ref):
            for st in stores:
                st.flush()
        for a, b in zip(fast, ref):
            assert a.nq == b.nq and a.nr == b.nr and a.nbytes() == b.nbytes()
            for name in ("k_res", "v_res", "k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero"):
                assert torch.equal(getattr(a, name), getattr(b, name)), (step, name)
        spare = mirror.rk.shape[2] - (fast[0].nr if mirror._ours(fast) else 0)
        planes = sum(t.numel() * t.element_size() for t, _, _ in mirror.bufs.values())
        assert mirror.nbytes(fast) == planes + 2 * spare * B * H * D * 2  # bf16 slots the heads do not count
    assert ref[0].nq > 301


@pytest.mark.parametrize("bits", [2, 4, None])
def test_head_stack_keeps_the_heads_as_they_would_be_and_holds_no_second_copy(bits):
    """``HeadStack`` (the stacked path of layers that evict): appends through it, flushes and evictions leave
    every head exactly as per-head appends do; what it reads stacked is the heads' own bytes (views)."""
    g = torch.Generator().manual_seed(20 + (bits or 0))
    B, H, D = 2, 3, 64
    q = QuantConfig(bits=bits, group=32, residual=32) if bits else QuantConfig()
    mk = lambda: [HeadStore(B, D, torch.bfloat16, torch.device("cpu"), q, False) for _ in range(H)]  # noqa: E731
    fast, ref = mk(), mk()
    stack = HeadStack()
    k = torch.randn(B, H, 301, D, generator=g).bfloat16()
    for stores in (fast, ref):
        for h, st in enumerate(stores):
            st.append(k[:, h], k[:, h])
    names = list(ref[0].tensors())
    for step in range(120):
        k, v = torch.randn(B, H, 1, D, generator=g), torch.randn(B, H, 1, D, generator=g)
        stack.append(fast, k, v)
        for h, st in enumerate(ref):
            st.append(k[:, h], v[:, h], flush=False)
        for name in names:
            base = stack.stacked(fast, name)
            axis = 0 if name == "group_sizes" else 1  # group sizes [ng] stack to [H, ng], the rest after the batch
            assert torch.equal(base, torch.stack([getattr(st, name) for st in ref], axis)), (step, name)
            for h, st in enumerate(fast):  # each head's tensor is its slice of the stacked one
                assert getattr(st, name).data_ptr() == base.select(axis, h).data_ptr()
        if step % 25 == 24:  # the same eviction in both
            keep = torch.sort(torch.randperm(len(ref[0]), generator=g)[: len(ref[0]) * 3 // 4]).values
            for stores in (fast, ref):
                for st in stores:
                    st.keep(keep)
            # the heads replaced their views: the stack holds nothing that keeps the old stacked tensors alive
            assert all(r() is None for name in names for r in stack.held[name][0])
        for stores in (fast, ref):
            for st in stores:
                st.flush()
        for a, b in zip(fast, ref):
            assert a.nbytes() == b.nbytes() and a.nq == b.nq and a.nr == b.nr
            for name, t in b.tensors().items():
                assert torch.equal(getattr(a, name), t), (step, name)


def test_head_stack_frees_stacked_sinks_when_heads_evict_different_sinks():
    """One head keeps every sink, another loses one: both replace their sink tensors, so no head keeps the old
    stacked sinks alive (with the other head's slice in them, which no head counts)."""
    g = torch.Generator().manual_seed(5)
    B, H, D = 1, 2, 64
    stores = [HeadStore(B, D, torch.bfloat16, torch.device("cpu"), QuantConfig(4, 32, 32, sinks=4), False)
              for _ in range(H)]
    k = torch.randn(B, H, 200, D, generator=g).bfloat16()
    for h, st in enumerate(stores):
        st.append(k[:, h], k[:, h])
    stack = HeadStack()
    assert stack.stacked(stores, "k_sink").shape == (B, H, 4, D)
    n = len(stores[0])
    stores[0].keep(torch.arange(n))  # keeps every token, its sinks included
    stores[1].keep(torch.arange(1, n))  # loses sink 0
    assert all(r() is None for r in stack.held["k_sink"][0])
    assert stores[0].ns == 4 and stores[1].ns == 3


@pytest.mark.parametrize("bits,sinks", [(2, 0), (4, 0), (4, 4), (None, 0)])
def test_head_stack_flushes_and_evicts_all_heads_as_each_head_would(bits, sinks):
    """``HeadStack.flush`` / ``keep`` (one op over the stacked heads) leave every head with the bytes that
    ``HeadStore.flush`` / ``keep`` give it, through group edges, scattered evictions (key groups cut short, a
    code byte split) and odd counts of quantized tokens; the heads hold views of the stack's tensors, and the
    stack knows their group sizes are equal without comparing them."""
    g = torch.Generator().manual_seed(40 + (bits or 0) + sinks)
    B, H, D = 2, 3, 64
    q = QuantConfig(bits=bits, group=32, residual=32, sinks=sinks) if bits else QuantConfig()
    mk = lambda: [HeadStore(B, D, torch.bfloat16, torch.device("cpu"), q, False) for _ in range(H)]  # noqa: E731
    fast, ref = mk(), mk()
    k = torch.randn(B, H, 301, D, generator=g).bfloat16()
    for stores in (fast, ref):
        for h, st in enumerate(stores):
            st.append(k[:, h], k[:, h])
    stack, cut, odd = HeadStack(), False, False
    for step in range(160):
        k, v = torch.randn(B, H, 1, D, generator=g), torch.randn(B, H, 1, D, generator=g)
        stack.append(fast, k, v)
        for h, st in enumerate(ref):
            st.append(k[:, h], v[:, h], flush=False)
        assert stack.flush(fast) == (bits is not None)
        if step % 23 == 22:  # scattered survivors, then (step 45, 91...) only the newest: both paths alike
            n = len(ref[0])
            keep = (torch.sort(torch.randperm(n, generator=g)[: n * 3 // 4]).values if step % 2 else
                    torch.arange(n // 5, n))
            assert stack.keep(fast, [keep.clone() for _ in fast])
            for st in ref:
                st.keep(keep)
            for stores in (fast, ref):
                for st in stores:
                    st.compact()
        for st in ref:
            st.flush()
        for a, b in zip(fast, ref):
            assert a.nbytes() == b.nbytes() and a.nq == b.nq and a.nr == b.nr and a.ns == b.ns, step
            for name, t in b.tensors().items():
                assert torch.equal(getattr(a, name), t), (step, name)
        if bits:
            assert stack.compatible(fast) and stack.equal_groups is not None
            assert all(st.group_sizes is r() for st, r in zip(fast, stack.equal_groups))
            for name in ("k_codes", "k_scale", "group_sizes", "v_codes", "k_res"):  # views of one tensor each
                base = stack.stacked(fast, name)
                assert all(getattr(st, name).data_ptr() == base.select(0 if name == "group_sizes" else 1, h).data_ptr()
                           for h, st in enumerate(fast)), name
        if bits:
            cut |= bool((fast[0].group_sizes < 32).any())
            odd |= fast[0].nq % (8 // bits) != 0
    assert bits is None or (cut and odd), "no eviction cut a key group or split a code byte"


def test_head_stack_leaves_heads_that_differ_to_the_per_head_path():
    """Heads that keep different tokens, or whose group sizes differ, are not evicted or flushed stacked."""
    g = torch.Generator().manual_seed(9)
    B, H, D = 1, 2, 64
    stores = [HeadStore(B, D, torch.bfloat16, torch.device("cpu"), QuantConfig(4, 32, 32), False) for _ in range(H)]
    k = torch.randn(B, H, 200, D, generator=g).bfloat16()
    for h, st in enumerate(stores):
        st.append(k[:, h], k[:, h])
    stack = HeadStack()
    n = len(stores[0])
    assert not stack.keep(stores, [torch.arange(n), torch.arange(1, n)])
    stores[1].keep(torch.cat([torch.arange(0, 40), torch.arange(41, n)]))  # head 1 alone loses a token
    stores[0].keep(torch.arange(1, n))  # the same count, other key groups
    assert stores[0].group_sizes.shape == stores[1].group_sizes.shape
    assert not stack.compatible(stores) and not stack.flush(stores)


def test_head_stack_rechecks_groups_a_head_changed_alone():
    """Once the stack knows its heads' key groups are equal (it made them), a per-head eviction that changes one
    head's groups (same group count) makes it compare them again, not trust what it knew."""
    g = torch.Generator().manual_seed(4)
    B, H, D = 1, 2, 64
    stores = [HeadStore(B, D, torch.bfloat16, torch.device("cpu"), QuantConfig(4, 32, 32), False) for _ in range(H)]
    k = torch.randn(B, H, 200, D, generator=g).bfloat16()
    for h, st in enumerate(stores):
        st.append(k[:, h], k[:, h], flush=False)
    stack = HeadStack()
    assert stack.flush(stores) and stack.compatible(stores)  # made by the stack: known equal
    n = len(stores[0])
    assert stack.keep(stores, [torch.arange(1, n)] * H) and stack.compatible(stores)
    stores[1].keep(torch.cat([torch.arange(0, 40), torch.arange(41, n - 1)]))  # head 1 alone: other groups
    stores[0].keep(torch.arange(1, n - 1))
    assert stores[0].group_sizes.shape == stores[1].group_sizes.shape and len(stores[0]) == len(stores[1])
    assert not stack.compatible(stores) and not stack.flush(stores)


def _core(bits: int, fused: bool, **kw) -> LayerCore:
    return LayerCore(LayerConfig(layer_idx=0, window=None, qcfg=QuantConfig(bits=bits, group=32, residual=32),
                                 fused_decode=fused, **kw))


def _decode(cores, B, Hq, Hkv, D, prefill, steps, device, dtype, seed=0):
    """Feed the same random keys, values and queries to every core; per step, each core's output."""
    g = torch.Generator(device=device).manual_seed(seed)
    outs = []
    for i, n in enumerate([prefill] + [1] * steps):
        k = torch.randn(B, Hkv, n, D, generator=g, device=device).to(dtype) * (3 if i % 2 else 1)
        v = torch.randn(B, Hkv, n, D, generator=g, device=device).to(dtype)
        qy = torch.randn(B, Hq, n, D, generator=g, device=device).to(dtype) * 2
        step = []
        for c in cores:
            assert c.update(k, v) is None
            step.append(c.attend(qy, D ** -0.5))
        outs.append(step)
    return outs


@pytest.mark.parametrize("bits,sinks", [(2, 0), (4, 4), (None, 0)])
def test_layer_flushes_and_evicts_through_its_head_stack_as_head_by_head(bits, sinks):
    """A layer on the stacked kernel path (here a CPU layer given the ``HeadStack`` a CUDA layer takes) quantizes
    and evicts through the stack under StreamingLLM and a byte budget: the same tokens, bytes and outputs as a
    layer that does it head by head."""
    from memvisor.kv.policies.streaming import StreamingLLM

    B, Hq, Hkv, D = 1, 8, 4, 64
    q = QuantConfig(bits=bits, group=32, residual=32, sinks=sinks) if bits else QuantConfig()
    budget = (B * Hkv * 1000 * D * 2 * 2) // (8 if bits else 4)
    stacked, plain = (LayerCore(LayerConfig(0, None, q, policy=StreamingLLM(4), budget_bytes=budget))
                      for _ in range(2))
    stacked.stack = HeadStack()
    outs = _decode([stacked, plain], B, Hq, Hkv, D, 700, 200, "cpu", torch.bfloat16, seed=3)
    for i, (a, b) in enumerate(outs):
        assert torch.equal(a, b), i
    assert stacked.evictions == plain.evictions > 5
    assert stacked.lengths() == plain.lengths() and stacked.nbytes() == plain.nbytes() <= budget
    for a, b in zip(stacked.stores, plain.stores):
        for name, t in b.tensors().items():
            assert torch.equal(getattr(a, name), t), name
    assert stacked.stack.held["k_res"][0][0]() is stacked.stores[0].k_res  # the heads hold the stack's views


@pytest.mark.parametrize("bits", [2, 4])
def test_cpu_decode_takes_no_triton_path(bits):
    """On the CPU the numba kernel (tests/kv/test_cpu_decode.py) serves decode, never the CUDA mirror or stack."""
    fused, plain = _core(bits, True), _core(bits, False)
    outs = _decode([fused, plain], 1, 8, 2, 64, 100, 40, "cpu", torch.bfloat16)
    for a, b in outs:  # the same maths summed in another order: one bf16 rounding apart at most
        torch.testing.assert_close(a.float(), b.float(), atol=1e-2, rtol=1e-2)
    assert fused.mirror is None and fused.nbytes() == plain.nbytes()
    q = torch.zeros(1, 8, 1, 64, dtype=torch.bfloat16)
    assert not kernel_applies(fused.stores, q, None, None)


@cuda
@pytest.mark.parametrize("bits", [2, 4])
def test_cuda_decode_runs_the_kernel_and_matches_the_torch_path(bits):
    B, Hq, Hkv, D = 2, 16, 4, 128
    fused, plain = _core(bits, True), _core(bits, False)
    outs = _decode([fused, plain], B, Hq, Hkv, D, 700, 300, "cuda", torch.bfloat16, seed=bits)
    for i, (a, b) in enumerate(outs[1:]):
        assert a.shape == (B, 1, Hq, D) and a.dtype == torch.bfloat16
        assert _rel(a, b) < 1e-2, (i, _rel(a, b))
    assert fused.mirror is not None and plain.mirror is None
    assert fused.mirror.t == fused.stores[0].nq >= 960
    assert fused.nbytes() == plain.nbytes() + fused.mirror.nbytes(fused.stores)


def _count(monkeypatch, name: str) -> list:
    """Spy on the layer's calls of a kernel path, ``stacked_decode`` or ``ragged_decode`` (the real one runs)."""
    import memvisor.kv.layer as layer_mod

    calls, real = [], getattr(layer_mod, name)
    monkeypatch.setattr(layer_mod, name, lambda *a: calls.append(1) or real(*a))
    return calls


@cuda
@pytest.mark.parametrize("bits,sinks,vbits", [(2, 0, None), (4, 0, None), (4, 4, None), (None, 0, None), (4, 0, 2)])
def test_cuda_layers_that_evict_run_the_stacked_kernel_and_match_the_torch_path(bits, sinks, vbits, monkeypatch):
    """StreamingLLM under a byte budget (``auto``'s recipes, keys 4 / values 2 bits among them): every decode step
    runs the kernel over the heads' own tensors, across evictions that cut key groups short, and gives the torch
    path's output; both keep the same tokens and bytes."""
    from memvisor.kv.policies.streaming import StreamingLLM

    calls = _count(monkeypatch, "stacked_decode")
    B, Hq, Hkv, D = 2, 16, 4, 128
    q = QuantConfig(bits=bits, group=32, residual=32, sinks=sinks, value_bits=vbits) if bits else QuantConfig()
    # an eighth (a quarter unquantized) of 1,000 bf16 tokens
    budget = (B * Hkv * 1000 * D * 2 * 2) // (8 if bits else 4)
    fused, plain = (LayerCore(LayerConfig(0, None, q, policy=StreamingLLM(4), budget_bytes=budget, fused_decode=f))
                    for f in (True, False))
    outs = _decode([fused, plain], B, Hq, Hkv, D, 700, 300, "cuda", torch.bfloat16, seed=3)
    for i, (a, b) in enumerate(outs[1:]):
        assert _rel(a, b) < 1e-2, (i, _rel(a, b))
    assert len(calls) == 300 and fused.mirror is None
    assert fused.evictions == plain.evictions > 5
    assert fused.lengths() == plain.lengths() and fused.nbytes() == plain.nbytes() <= budget
    for a, b in zip(fused.stores, plain.stores):  # the same bytes stored, through the stacked appends
        for name, t in b.tensors().items():
            assert torch.equal(getattr(a, name), t), name
    if bits:
        sizes = fused.stores[0].group_sizes
        assert bool((sizes < 32).any()), "eviction left every group whole: the group map went untested"


@cuda
@pytest.mark.parametrize("bits,cut", [(2, "scattered"), (4, "scattered"), (4, "streaming")])
def test_cuda_stacked_kernel_reads_scattered_key_groups(bits, cut):
    """Heads that keep the same scattered tokens (groups of 0-32 survivors, a code byte split across
    groups: every token mapped), or StreamingLLM's 4 sinks and newest tokens (two cut groups in front: their rows
    kept, whole groups after): the kernel's key-group rows against the block-wise torch path."""
    from memvisor.kv.attention import layer_attention
    from memvisor.kv.gpu.cache_path import stacked_decode, stacked_kernel_applies

    g = torch.Generator(device="cuda").manual_seed(bits)
    B, Hq, Hkv, D, T = 1, 8, 2, 64, 3000
    stores = [HeadStore(B, D, torch.bfloat16, torch.device("cuda"), QuantConfig(bits, 32, 32), False)
              for _ in range(Hkv)]
    k = torch.randn(B, Hkv, T, D, device="cuda", generator=g).bfloat16()
    v = torch.randn(B, Hkv, T, D, device="cuda", generator=g).bfloat16()
    for h, st in enumerate(stores):
        st.append(k[:, h], v[:, h])
    keep = torch.sort(torch.randperm(T, device="cuda", generator=g)[: T // 3]).values
    if cut == "streaming":
        keep = torch.cat([torch.arange(4, device="cuda"), torch.arange(110, T, device="cuda")])
    for st in stores:
        st.keep(keep)
    assert stores[0].group_sizes.min() < 8
    assert (stores[0].group_prefix() is None) == (cut == "scattered")
    query = torch.randn(B, Hq, 1, D, device="cuda", generator=g).bfloat16() * 3
    assert stacked_kernel_applies(stores, query, None, None)
    want = layer_attention(query, stores, torch.tensor([T], device="cuda"), D ** -0.5)
    got = stacked_decode(query, stores, D ** -0.5, HeadStack())
    assert got.shape == want.shape and _rel(got, want) < 1e-2, _rel(got, want)


@cuda
def test_cuda_dequant_kernel_matches_the_reference_across_residual_lengths():
    """The cache-layout kernel and its combine with residuals of 0, 1, 15, 16 and 17 tokens (Triton compiles other
    variants of the kernel for them: a length of 1 as a constant, multiples of 16 as such), each launched twice."""
    from memvisor.kv.gpu import decode_attention_reference, quantize_layer
    from memvisor.kv.gpu.triton_decode import kivi_decode_attention

    g = torch.Generator(device="cuda").manual_seed(3)
    for t in (1000 + 32, 1000 + 33, 1000 + 47, 1000 + 48, 1000 + 49, 1000 + 32, 1000 + 33):
        k = torch.randn(1, 4, t, 128, device="cuda", generator=g).bfloat16().float()
        layer = quantize_layer(k, k * 0.5, 4, 32, 32)
        layer.k_res, layer.v_res = layer.k_res.bfloat16().contiguous(), layer.v_res.bfloat16().contiguous()
        q = torch.randn(1, 16, 128, device="cuda", generator=g).bfloat16()
        want = decode_attention_reference(q, layer)
        for _ in range(2):
            got = kivi_decode_attention(q, layer, variant="dequant")
            assert _rel(got, want) < 1e-2, (t, _rel(got, want))


@cuda
def test_cuda_sliding_or_probability_taking_layers_keep_the_torch_path(monkeypatch):
    """H2O takes this step's probabilities from the torch loop; a sliding window is not what the kernels read."""
    from memvisor.kv.policies.h2o import H2O

    stacked, ragged = _count(monkeypatch, "stacked_decode"), _count(monkeypatch, "ragged_decode")
    h2o = _core(2, True, budget_bytes=200_000, policy=H2O(recent=16, sinks=4))
    sliding = LayerCore(LayerConfig(layer_idx=0, window=64, qcfg=QuantConfig(bits=2, group=32, residual=32)))
    _decode([h2o, sliding], 1, 8, 2, 64, 300, 5, "cuda", torch.bfloat16)
    assert h2o.mirror is None and sliding.mirror is None and not stacked and not ragged


@cuda
@pytest.mark.parametrize("bits,sinks,B", [(4, 0, 1), (2, 4, 2), (None, 0, 1)])
def test_cuda_ragged_heads_run_the_ragged_kernel_and_match_the_torch_path(bits, sinks, B, monkeypatch):
    """SnapKV with Ada-KV head budgets leaves heads of different lengths and key groups: every decode step runs
    the ragged kernel (one launch over every head), never the stacked launch, and gives the torch path's output
    over the same tokens."""
    from memvisor.kv.policies.head_adakv import AdaKVHeadBudget
    from memvisor.kv.policies.snapkv import SnapKV

    stacked, ragged = _count(monkeypatch, "stacked_decode"), _count(monkeypatch, "ragged_decode")
    q = QuantConfig(bits=bits, group=32, residual=32, sinks=sinks) if bits else QuantConfig()
    budget = (B * 4 * 1000 * 128 * 2 * 2) // (8 if bits else 4)
    fused, plain = (LayerCore(LayerConfig(0, None, q, policy=SnapKV(window=16), head_budget=AdaKVHeadBudget(),
                                          budget_bytes=budget, fused_decode=f)) for f in (True, False))
    outs = _decode([fused, plain], B, 16, 4, 128, 900, 120, "cuda", torch.bfloat16, seed=5)
    assert len(set(fused.lengths())) > 1, "the heads stayed alike: the ragged path went untested"
    for i, (a, b) in enumerate(outs[1:]):
        assert a.shape == (B, 1, 16, 128) and _rel(a, b) < 1e-2, (i, _rel(a, b))
    assert len(ragged) == 120 and not stacked and fused.mirror is None and fused.stack is None
    assert fused.lengths() == plain.lengths() and fused.nbytes() == plain.nbytes() <= budget


@cuda
@pytest.mark.parametrize("B", [1, 2])
def test_cuda_heads_stacked_until_a_per_head_eviction_then_ragged(B, monkeypatch):
    """Knorm under a byte budget: the prefill fits, so decode starts on the stacked path (the heads' tensors become
    views of stacked ones); the first eviction keeps different tokens per head and the layer moves to the ragged
    path (the heads' tensors still views of the stacked ones, read through the ragged kernel's per-head table at
    any batch), every step matching the torch path."""
    from memvisor.kv.policies.knorm import KeyNorm

    stacked, ragged = _count(monkeypatch, "stacked_decode"), _count(monkeypatch, "ragged_decode")
    q = QuantConfig(bits=4, group=32, residual=32)
    budget = (B * 4 * 1000 * 128 * 2 * 2) // 8
    fused, plain = (LayerCore(LayerConfig(0, None, q, policy=KeyNorm(sinks=4, recent=16), budget_bytes=budget,
                                          fused_decode=f)) for f in (True, False))
    outs = _decode([fused, plain], B, 16, 4, 128, 300, 200, "cuda", torch.bfloat16, seed=7)
    for i, (a, b) in enumerate(outs[1:]):
        assert _rel(a, b) < 1e-2, (i, _rel(a, b))
    assert stacked and ragged and len(stacked) + len(ragged) == 200 and fused.stack is not None
    assert fused.evictions == plain.evictions >= 1
    assert fused.lengths() == plain.lengths() and fused.nbytes() == plain.nbytes() <= budget


@cuda
@pytest.mark.parametrize("bits,vbits", [(2, None), (4, None), (4, 2)])
def test_cuda_ragged_kernel_reads_each_heads_own_scattered_groups(bits, vbits):
    """Heads keeping different scattered tokens (different counts, group sizes and sinks per head; one with no
    full-precision token, one with no quantized one), batch of 2: the ragged kernel against the block-wise torch
    path."""
    from memvisor.kv.attention import layer_attention
    from memvisor.kv.gpu.cache_path import ragged_decode, ragged_kernel_applies, stacked_kernel_applies

    g = torch.Generator(device="cuda").manual_seed(bits)
    B, Hq, Hkv, D, T = 2, 10, 5, 64, 2000
    stores = [HeadStore(B, D, torch.bfloat16, torch.device("cuda"), QuantConfig(bits, 32, 32, vbits, sinks=4), False)
              for _ in range(Hkv)]
    k = torch.randn(B, Hkv, T, D, device="cuda", generator=g).bfloat16()
    v = torch.randn(B, Hkv, T, D, device="cuda", generator=g).bfloat16()
    keep = [torch.sort(torch.randperm(T, device="cuda", generator=g)[: T // (2 + h)]).values for h in range(2)]
    # head 2: only the 4 sinks and 16 quantized tokens (no residual); head 3: only the newest 20 (nothing quantized)
    keep += [torch.arange(20, device="cuda"), torch.arange(T - 20, T, device="cuda")]
    # head 4: the sinks and the newest tokens from 110 on (StreamingLLM): one cut group in front, whole ones after
    keep += [torch.cat([torch.arange(4, device="cuda"), torch.arange(110, T, device="cuda")])]
    for h, st in enumerate(stores):
        st.append(k[:, h], v[:, h])
        st.keep(keep[h])
    assert len(stores[0]) != len(stores[1]) and stores[1].group_sizes.min() < 8
    assert stores[0].group_prefix() is None and stores[4].group_prefix()[:2] == (22, 1)
    assert stores[2].nr == 0 < stores[2].nq and stores[3].nq == 0 < stores[3].nr
    query = torch.randn(B, Hq, 1, D, device="cuda", generator=g).bfloat16() * 3
    assert ragged_kernel_applies(stores, query, None, None) and not stacked_kernel_applies(stores, query, None, None)
    want = layer_attention(query, stores, torch.tensor([T], device="cuda"), D ** -0.5)
    got = ragged_decode(query, stores, D ** -0.5)
    assert got.shape == want.shape and _rel(got, want) < 1e-2, _rel(got, want)


@cuda
@pytest.mark.parametrize("quant", ["kivi2", "kivi4"])
def test_llama_decodes_through_the_kernel(quant):
    """A random-weights Llama on CUDA: the quantized cache's decode steps through the kernel give the
    logits of the same cache on the block-wise torch path."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from memvisor.kv import CacheSpec, CompressedCache, cache_kwarg, use_kv_attention

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=128, max_position_embeddings=2048,
                      initializer_range=0.08)
    model = use_kv_attention(LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval())
    ids = torch.randint(0, 512, (2, 700), device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    key = cache_kwarg(model)
    caches = [CompressedCache(model.config, CacheSpec(quant=quant)) for _ in range(2)]
    for c in caches[1].cores:
        c.cfg.fused_decode = False
    logits = []
    with torch.no_grad():
        for cache in caches:
            out = [model(input_ids=ids[:, :600], use_cache=True, **{key: cache}).logits[:, -1]]
            for t in range(600, 700):  # teacher-forced decode steps across group and tile edges
                out.append(model(input_ids=ids[:, t:t + 1], use_cache=True, **{key: cache}).logits[:, -1])
            logits.append(torch.stack(out[1:]))
    assert all(c.mirror is not None and c.mirror.t == c.stores[0].nq for c in caches[0].cores)
    assert all(c.mirror is None for c in caches[1].cores)
    assert _rel(logits[0], logits[1]) < 2e-2, _rel(logits[0], logits[1])


def test_pdl_only_where_the_card_and_triton_have_it():
    """Programmatic dependent launch (pdl.py): sm_90+ with Triton's launch_pdl option, never in the interpreter;
    on the CPU it is unavailable and an explicit request fails loudly instead of falling back silently."""
    from memvisor.kv.gpu.pdl import pdl_supported, resolve_pdl

    opts = {"num_warps", "launch_pdl"}
    assert pdl_supported((9, 0), opts) and pdl_supported((10, 0), opts)
    assert not pdl_supported((8, 9), opts)
    assert not pdl_supported((9, 0), {"num_warps"})
    assert not pdl_supported((9, 0), opts, interpreting=True)
    cpu = torch.device("cpu")
    assert resolve_pdl(None, cpu) is False and resolve_pdl(False, cpu) is False
    with pytest.raises(RuntimeError):
        resolve_pdl(True, cpu)


def test_swap_split_plans():
    """The swap kernel's split plans (swap_plan.py) for Llama-3.1-8B heads on a 132-SM card: the resident plan
    (every program at once, evenly spread) and the pipelined plan (about 7 programs per SM for 2-bit codes, 8
    for 4-bit ones, at least 3 units each) where it exists."""
    from memvisor.kv.gpu.swap_plan import PIPELINE_WAVES, pipeline_plan, swap_plan

    w2, w4 = PIPELINE_WAVES[(2, 128, 1)], PIPELINE_WAVES[(4, 128, 1)]
    units_2bit_32k = 2 * 32768 // 256  # units of 16 slots of 256-token tiles, per kv head
    assert swap_plan(8, units_2bit_32k, 132, 7) == (64, 4)  # 512 programs of 4 units
    assert pipeline_plan(8, units_2bit_32k, 132, w2) == (86, 3)  # 688 programs
    assert pipeline_plan(8, 2 * 65536 // 256, 132, w2) == (103, 5)  # 824 programs
    assert pipeline_plan(8, 2 * 32768 // 128, 132, w4) == (128, 4)  # 4-bit: 1024 programs
    assert pipeline_plan(8, 2 * 65536 // 128, 132, w4) == (128, 8)
    assert pipeline_plan(8, 2 * 16384 // 256, 132, w2) is None  # 2-unit programs
    assert pipeline_plan(8, 2 * 8192 // 128, 132, w4) is None  # 1-unit programs
    assert pipeline_plan(8, 0, 132, w2) is None
    for units in (1, 7, 100, 513, 4096):
        for resident in (3, 7, 9):
            n_split, ups = swap_plan(8, units, 132, resident)
            assert n_split * ups >= units and (n_split - 1) * ups < units
            piped = pipeline_plan(8, units, 132, float(resident))
            if piped is not None:
                n_split, ups = piped
                assert ups >= 3 and n_split * ups >= units and (n_split - 1) * ups < units


def test_swap_even_plan():
    """The even pipelined plan (swap_plan.even_plan) for 2-bit codes, Llama-3.1-8B heads, 132 SMs: 792 programs of
    2-3 units at 32k tokens (6 per SM keep the busiest at 3 units), 912 of 4-5 at 64k (6 per SM would give 6), the
    resident plan where the busiest program would take fewer than 3 units; every split takes at least one unit and
    the programs fit the 7 per SM that are resident."""
    from memvisor.kv.gpu.swap_plan import EVEN_WAVES, even_plan

    waves = EVEN_WAVES[(2, 128, 1)]
    assert even_plan(8, 2 * 32768 // 256, 132, *waves) == 99
    assert even_plan(8, 2 * 65536 // 256, 132, *waves) == 114
    assert even_plan(8, 2 * 16384 // 256, 132, *waves) is None
    assert even_plan(8, 0, 132, *waves) is None
    for units in (1, 7, 100, 300, 513, 4096):
        n = even_plan(8, units, 132, *waves)
        if n is not None:
            assert n <= units and 8 * n <= 7 * 132 and -(-units // n) >= 3


def test_key_group_maps_give_each_heads_own_rows():
    """The ragged kernel's key-group maps: a head whose cut groups are a short prefix (StreamingLLM's eviction) gives
    its kept prefix rows; heads cut all through get maps of every token built at once (rows numbered through those
    heads, from each one's base); a whole head gives none. Each head's rows, read as the kernel reads them, equal its
    cumulative-sum search (``HeadStore.group_of_tokens``); None while every head's groups are whole."""
    from memvisor.kv.gpu.cache_path import _key_group_maps

    g = torch.Generator().manual_seed(3)
    B, D, T, G = 1, 32, 700, 32
    stores = [HeadStore(B, D, torch.float32, torch.device("cpu"), QuantConfig(4, G, 32, 2), False) for _ in range(4)]
    for st in stores:
        st.append(torch.randn(B, T, D, generator=g), torch.randn(B, T, D, generator=g))
    assert _key_group_maps(stores) is None
    stores[0].keep(torch.sort(torch.randperm(T, generator=g)[:300]).values)  # cut all through: a full map
    stores[2].keep(torch.arange(45, T))  # the first group cut: a prefix of 19 tokens
    stores[3].keep(torch.sort(torch.randperm(T, generator=g)[:400]).values)
    maps = _key_group_maps(stores)
    assert maps.prefix == [stores[0].nq, 0, 19, stores[3].nq] and maps.rest[2] == 1 and maps.rows[1] is None
    assert maps.base == [0, 0, 0, stores[0].group_sizes.numel()]
    for h, st in enumerate(stores):
        t = torch.arange(st.nq)
        p = maps.prefix[h]
        rows = maps.rest[h] + (t - p).clamp(min=0) // G
        if p:
            assert maps.rows[h].dtype == torch.int32 and maps.rows[h].numel() == p
            rows[:p] = maps.rows[h].long() - maps.base[h]
        assert torch.equal(rows, st.group_of_tokens(0, st.nq)), h


def test_head_stack_remembers_unequal_groups_until_a_head_replaces_them(monkeypatch):
    """Heads of equal counts whose key groups differ (Knorm's per-head choices under equal budgets): the stack's
    verdict holds while the heads keep those group-size tensors (no comparison, a GPU read back, every step), and
    is asked again once a head's groups change."""
    g = torch.Generator().manual_seed(7)
    B, D, T = 1, 32, 200
    stores = [HeadStore(B, D, torch.float32, torch.device("cpu"), QuantConfig(4, 32, 32), False) for _ in range(2)]
    for st in stores:
        st.append(torch.randn(B, T, D, generator=g), torch.randn(B, T, D, generator=g))
    stores[0].keep(torch.cat([torch.arange(0, 20), torch.arange(40, T)]))  # key groups of 20, 24, 32 ...
    stores[1].keep(torch.cat([torch.arange(0, 10), torch.arange(30, T)]))  # key groups of 12, 32, 32 ...
    assert len(stores[0]) == len(stores[1]) and stores[0].group_sizes.shape == stores[1].group_sizes.shape
    assert not torch.equal(stores[0].group_sizes, stores[1].group_sizes)
    from memvisor.kv.storage import StackedHeads

    compared, real = [], StackedHeads.compatible

    def spy(st, groups_equal=False):
        compared.append(not groups_equal)  # True: the group sizes' values are compared (a read back on a GPU)
        return real(st, groups_equal)

    monkeypatch.setattr(StackedHeads, "compatible", staticmethod(spy))
    stack = HeadStack()
    assert not stack.compatible(stores) and stack.unequal_groups is not None and sum(compared) == 1
    assert not stack.compatible(stores) and sum(compared) == 1  # remembered: the values are not compared again
    stores[1].group_sizes = stores[0].group_sizes.clone()  # a new tensor (as a flush or eviction makes) of equal sizes
    assert stack.compatible(stores) and stack._groups_known(stores) and sum(compared) == 2


@cuda
def test_cuda_ragged_kernel_refuses_an_empty_head_and_copies_rows_it_cannot_address():
    """A head holding no token is refused (no silent NaN); a head tensor whose rows are not contiguous (a channel
    slice) is copied for the launch and gives what its contiguous copy gives."""
    from memvisor.kv.gpu.errors import KVLayoutError
    from memvisor.kv.gpu.triton_ragged import dense_ragged_attention

    g = torch.Generator(device="cuda").manual_seed(11)
    B, Hq, D = 2, 8, 64
    q = torch.randn(B, Hq, D, device="cuda", generator=g).bfloat16()
    wide = torch.randn(B, 300, 2 * D, device="cuda", generator=g).bfloat16()
    k, v = wide[..., :D], wide[..., D:]  # rows D apart in a 2D-wide tensor: not contiguous rows
    other = torch.randn(B, 90, D, device="cuda", generator=g).bfloat16()
    got = dense_ragged_attention(q, [{"k_full": k, "v_full": v}, {"k_full": other, "v_full": other}])
    want = dense_ragged_attention(q, [{"k_full": k.contiguous(), "v_full": v.contiguous()},
                                      {"k_full": other, "v_full": other}])
    assert torch.equal(got, want)
    empty = other[:, :0]
    with pytest.raises(KVLayoutError, match="no token"):
        dense_ragged_attention(q, [{"k_full": other, "v_full": other}, {"k_full": empty, "v_full": empty}])
