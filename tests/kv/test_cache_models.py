"""The compressed cache on the real tiny models: bit-exact without compression, Gemma's sliding
layers correct, KIVI close to the plain cache, generate() works."""

import pytest
import torch
from transformers import DynamicCache

from memvisor.kv import ATTN_NAME, CacheSpec, CacheSpecError, CompressedCache, cache_kwarg

pytestmark = pytest.mark.slow

DECODE = 4


def chunks_for(T, split):
    return [(0, split), (split, T - DECODE)] + [(t, t + 1) for t in range(T - DECODE, T)]


def plain_reference(run_chunks, model, ids, chunks):
    model.set_attn_implementation("sdpa")
    try:
        return run_chunks(model, DynamicCache(config=model.config), ids, chunks)
    finally:
        model.set_attn_implementation(ATTN_NAME)


@pytest.mark.parametrize("which", ["smollm2", "gemma3"])
def test_no_compression_is_bit_identical_to_dynamic_cache(which, request, text_ids, run_chunks):
    model, tok = request.getfixturevalue(which)
    if which == "gemma3":  # longer than the 512-token sliding window, so the window really slides
        ids = torch.randint(10, 20000, (1, 560), generator=torch.Generator().manual_seed(0))
        chunks = chunks_for(560, 500)
    else:
        ids = text_ids[:, :160]
        chunks = chunks_for(160, 100)
    ref = plain_reference(run_chunks, model, ids, chunks)
    cache = CompressedCache(model.config, CacheSpec())
    got = run_chunks(model, cache, ids, chunks)
    for a, b in zip(ref, got):
        assert torch.equal(a, b)
    stored = cache.stored_tokens()
    if which == "gemma3":
        windows = [c.cfg.window for c in cache.cores]
        assert any(w is None for w in windows) and any(w is not None for w in windows)
        for lens, w in zip(stored, windows):
            assert lens[0] == (w - 1 if w else 560)  # sliding layers keep window-1 like DynamicSlidingWindowLayer
    assert cache.nbytes() == sum(
        t.numel() * t.element_size() for c in cache.cores for st in c.stores for t in st.tensors().values())


def test_generate_with_compressed_cache(smollm2, text_ids):
    model, tok = smollm2
    ids = text_ids[:, :60]
    key = cache_kwarg(model)
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=4, do_sample=False, **{key: DynamicCache(config=model.config)})
        same = model.generate(ids, max_new_tokens=4, do_sample=False,
                              **{key: CompressedCache(model.config, CacheSpec())})
        kivi = CompressedCache(model.config, CacheSpec(quant="kivi4"))
        q = model.generate(ids, max_new_tokens=4, do_sample=False, **{key: kivi})
    assert torch.equal(ref, same)
    assert q.shape == ref.shape and kivi.get_seq_length() == ref.shape[1] - 1


def test_own_attention_path_matches_plain_on_gemma_sliding_layers(gemma3, run_chunks):
    """Full precision through the block-wise attention (budget set, nothing evicted): the sliding
    mask computed from stored positions must match transformers' sliding-window mask."""
    model, _ = gemma3
    ids = torch.randint(10, 20000, (1, 560), generator=torch.Generator().manual_seed(1))
    chunks = chunks_for(560, 500)
    ref = plain_reference(run_chunks, model, ids, chunks)
    cache = CompressedCache(model.config, CacheSpec(budget_bytes=10**9, block=128))
    got = run_chunks(model, cache, ids, chunks)
    for a, b in zip(ref, got):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=1e-3)
    for lens, c in zip(cache.stored_tokens(), cache.cores):
        if c.cfg.window is not None:
            assert lens == [c.cfg.window - 1]
            # exactly the last window-1 positions survive
            assert torch.equal(c.stores[0].positions(), torch.arange(560 - c.cfg.window + 1, 560))


@pytest.mark.parametrize("which", ["smollm2", "gemma3"])
def test_kivi4_close_to_plain_cache(which, request, text_ids, run_chunks):
    model, _ = request.getfixturevalue(which)
    ids = text_ids[:, :200] if which == "smollm2" else torch.randint(
        10, 20000, (1, 560), generator=torch.Generator().manual_seed(2))
    T = ids.shape[1]
    chunks = chunks_for(T, T - 60)
    ref = plain_reference(run_chunks, model, ids, chunks)
    cache = CompressedCache(model.config, CacheSpec(quant="kivi4"))
    got = run_chunks(model, cache, ids, chunks)
    torch.testing.assert_close(got[0], ref[0], atol=2e-3, rtol=1e-3)  # first chunk attends unquantized
    for a, b in zip(ref[1:], got[1:]):
        p, q = a[:, -1].log_softmax(-1), b[:, -1].log_softmax(-1)
        kl = torch.nn.functional.kl_div(q, p, log_target=True, reduction="sum").item()
        assert kl < 0.1
    # really quantized: most tokens live in codes, far fewer bytes than a full-precision cache
    full = CompressedCache(model.config, CacheSpec())
    run_chunks(model, full, ids, chunks)
    assert cache.nbytes() < 0.45 * full.nbytes()


def test_think_prunes_key_channels_on_the_model(smollm2, text_ids, run_chunks):
    from memvisor.kv.policies import ThinK

    model, _ = smollm2
    ids = text_ids[:, :200]
    chunks = chunks_for(200, 150)
    ref = plain_reference(run_chunks, model, ids, chunks)
    cache = CompressedCache(model.config, CacheSpec(quant="kivi4", channel_policy=ThinK(0.4)))
    got = run_chunks(model, cache, ids, chunks)
    for st in cache.cores[5].stores:
        assert st.k_codes.shape[-1] == 39 and st.channels.numel() == 39
    kl = [torch.nn.functional.kl_div(b[:, -1].log_softmax(-1), a[:, -1].log_softmax(-1), log_target=True,
                                     reduction="sum").item() for a, b in zip(ref[1:], got[1:])]
    assert max(kl) < 0.3


def test_padded_batch_is_refused_by_the_compressed_cache(smollm2, text_ids):
    """The compressed path masks from its own storage, so left padding would be attended as text: refused."""
    from memvisor.kv.adapter import PaddedBatchError

    model, _ = smollm2
    ids = text_ids[:, :24].repeat(2, 1)
    key = cache_kwarg(model)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True,
              **{key: CompressedCache(model.config, CacheSpec(quant="kivi4"))})  # equal rows: fine
        padded = torch.ones_like(ids)
        padded[1, :10] = 0
        with pytest.raises(PaddedBatchError, match="padded batches"):
            model(input_ids=ids, attention_mask=padded, use_cache=True,
                  **{key: CompressedCache(model.config, CacheSpec(quant="kivi4"))})


def test_a_model_not_on_memvisor_attention_is_refused_not_silently_wrong(smollm2, text_ids):
    """On another attention function a compressed layer's update hands back only the forward's own tokens,
    so the next forward would attend to itself alone (and nothing would be compressed): it raises."""
    from memvisor.kv import CacheStateError

    model, _ = smollm2
    key = cache_kwarg(model)
    cache = CompressedCache(model.config, CacheSpec(quant="kivi4"))
    model.set_attn_implementation("sdpa")
    try:
        with torch.no_grad():
            model(input_ids=text_ids[:, :24], use_cache=True, **{key: cache})
            with pytest.raises(CacheStateError, match="use_kv_attention"):
                model(input_ids=text_ids[:, 24:25], use_cache=True, **{key: cache})
    finally:
        model.set_attn_implementation(ATTN_NAME)
    cache.reset()  # what the message says: then the cache works again
    with torch.no_grad():
        model(input_ids=text_ids[:, :24], use_cache=True, **{key: cache})
        model(input_ids=text_ids[:, 24:25], use_cache=True, **{key: cache})
    assert cache.get_seq_length() == 25


def test_a_forward_that_failed_midway_leaves_a_cache_that_says_so(smollm2, text_ids):
    """A padded batch is refused at layer 0's attention: layer 0 then holds a forward more than the others,
    and the next forward is refused with what to do instead of failing on mismatched tensors."""
    from memvisor.kv import CacheStateError, PaddedBatchError

    model, _ = smollm2
    key = cache_kwarg(model)
    ids = text_ids[:, :24].repeat(2, 1)
    padded = torch.ones_like(ids)
    padded[1, :10] = 0
    cache = CompressedCache(model.config, CacheSpec(quant="kivi4"))
    with torch.no_grad():
        with pytest.raises(PaddedBatchError):
            model(input_ids=ids, attention_mask=padded, use_cache=True, **{key: cache})
        with pytest.raises(CacheStateError, match="reset"):
            model(input_ids=ids, use_cache=True, **{key: cache})
    cache.reset()
    with torch.no_grad():
        model(input_ids=ids, use_cache=True, **{key: cache})
        with pytest.raises(CacheStateError, match="batch of 2 row"):  # another request's batch, without reset()
            model(input_ids=ids[:1, :5], use_cache=True, **{key: cache})


def test_a_budget_planned_for_another_batch_is_refused(smollm2, text_ids):
    model, _ = smollm2
    ids = text_ids[:, :24].repeat(2, 1)
    spec = CacheSpec.plan(model.config, budget_bytes=2_000_000, context_tokens=24)
    with torch.no_grad(), pytest.raises(CacheSpecError, match="batch_size=2"):
        model(input_ids=ids, use_cache=True, **{cache_kwarg(model): CompressedCache(model.config, spec)})
    spec = CacheSpec.plan(model.config, budget_bytes=2_000_000, context_tokens=24, batch_size=2)
    cache = CompressedCache(model.config, spec)
    with torch.no_grad():
        model(input_ids=ids, use_cache=True, **{cache_kwarg(model): cache})
    assert cache.nbytes() <= 2_000_000


@pytest.mark.parametrize("which", ["smollm2", "gemma3"])
def test_uncompressed_bytes_is_what_a_plain_cache_holds(which, request):
    """The unit of a budget: equal to an uncompressed cache's bytes after a forward, sliding layers included."""
    from memvisor.kv import uncompressed_bytes

    model, _ = request.getfixturevalue(which)
    ids = torch.randint(10, 20000, (2, 600), generator=torch.Generator().manual_seed(0))  # past Gemma's window
    cache = CompressedCache(model.config, CacheSpec(batch_size=2))
    with torch.no_grad():
        model(input_ids=ids, use_cache=True, logits_to_keep=1, **{cache_kwarg(model): cache})
    assert cache.nbytes() == uncompressed_bytes(model.config, 600, batch_size=2)


def test_block_wise_prefill_then_generate_gives_generate_s_tokens(smollm2, text_ids):
    """The README's recipe: prefill all but the last prompt token, then generate from the whole prompt (generate
    feeds only what the cache has not seen)."""
    from memvisor.kv import prefill_blockwise

    model, _ = smollm2
    ids = text_ids[:, :120]
    cache = CompressedCache(model.config, CacheSpec())
    prefill_blockwise(model, ids[:, :-1], cache, block=32)
    got = model.generate(ids, max_new_tokens=6, do_sample=False, **{cache_kwarg(model): cache})
    want = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want) and cache.get_seq_length() == 120 + 5


def test_a_cache_built_for_another_model_is_refused(smollm2, gemma3, text_ids):
    model, _ = smollm2
    cache = CompressedCache(gemma3[0].config, CacheSpec())
    with torch.no_grad(), pytest.raises(CacheSpecError, match="this model's config"):
        model(input_ids=text_ids[:, :8], use_cache=True, **{cache_kwarg(model): cache})


def test_sliding_passthrough_layers_hold_only_their_window_after_a_long_prefill(gemma3):
    """What nbytes() counts is what is held: the window is copied out of a longer prefill, not a view of it."""
    model, _ = gemma3
    ids = torch.randint(10, 20000, (1, 700), generator=torch.Generator().manual_seed(0))
    cache = CompressedCache(model.config, CacheSpec())
    with torch.no_grad():
        model(input_ids=ids, use_cache=True, logits_to_keep=1, **{cache_kwarg(model): cache})
    sliding = [c for c in cache.cores if c.cfg.window is not None]
    assert sliding
    for core in sliding:
        held = sum({id(st.k_res.untyped_storage()): st.k_res.untyped_storage().nbytes() +
                    st.v_res.untyped_storage().nbytes() for st in core.stores}.values())
        full = 700 * 2 * model.config.head_dim * core.stores[0].k_res.element_size() * len(core.stores)
        assert held == core.nbytes() < full
