"""Real local models, loaded once per test session (converted once to safetensors under
$MEMVISOR_CACHE/models, default ~/.cache/memvisor/models; the first conversion takes minutes)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny tensors and busy shared cores: 2 intra-op threads slowed these tests ~10x here."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _load(name):
    from transformers.utils import logging as hf_logging

    from memvisor.kv.models import ModelNotFoundError, load_local_model

    hf_logging.disable_progress_bar()
    try:
        return load_local_model(name)
    except ModelNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def smollm2():
    return _load("smollm2")


@pytest.fixture(scope="session")
def gemma3():
    return _load("gemma3")


@pytest.fixture(scope="session")
def text_ids(smollm2):
    """A real English prompt of ~420 SmolLM2 tokens with a needle in the middle."""
    _, tok = smollm2
    text = ("The lighthouse keepers of the northern coast kept a logbook of the weather, the ships that "
            "passed and every repair to the lamp. ") * 6
    text += "In 1887 the keeper Margaret Olsen wrote that the secret code word is BLUEBERRY. "
    text += ("Supplies came by boat every second week: oil, flour, letters and newspapers from the "
             "mainland. ") * 8
    text += "Question: what is the secret code word? Answer: the secret code word is"
    return tok(text, return_tensors="pt").input_ids


@pytest.fixture(scope="session")
def run_chunks():
    return _run_chunks


def _run_chunks(model, cache, ids, chunks):
    """Feed ``ids`` [1, T] in the given (start, end) chunks; return the logits of every chunk."""
    from memvisor.kv import cache_kwarg

    key = cache_kwarg(model)
    out = []
    with torch.no_grad():
        for s, e in chunks:
            pos = torch.arange(s, e).unsqueeze(0)
            # logits of the last position only: full logits cost vocab x tokens x 4 B (0.5 GB for Gemma)
            out.append(model(input_ids=ids[:, s:e], position_ids=pos, use_cache=True, logits_to_keep=1,
                             **{key: cache}).logits)
    return out
