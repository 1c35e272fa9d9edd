"""The packaged MiniLM embedder: unit vectors, order kept across length-sorted batches, bf16 close to fp32."""
import numpy as np
import pytest

from memvisor.errors import InvalidInput
from memvisor.models.embedders import MiniLMEmbedder, default_embedder, resolve_dtype, token_batches

TEXTS = ["Ana moved to Lyon in March.", "ok", "Ben hurt his knee running the Paris half marathon last spring.",
         "Where did you get that dog?", "I adopted her from the shelter near my office a year ago."]


@pytest.fixture(scope="module")
def fp32():
    return MiniLMEmbedder(dtype="float32")


def test_vectors_are_unit_and_independent_of_batching(fp32):
    together = fp32.encode(TEXTS)
    assert together.shape == (len(TEXTS), 384) and together.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)
    # Sorting by length inside encode() must not permute rows: each row equals the text encoded alone.
    alone = np.stack([fp32.encode([t])[0] for t in TEXTS])
    np.testing.assert_allclose(together, alone, atol=2e-4)
    assert fp32.encode([]).shape == (0, 384)


def test_similar_sentences_are_closer(fp32):
    a, b, c = fp32.encode(["Where does Ana live now?", "Ana moved to Lyon in March.", "The stock market fell."])
    assert a @ b > a @ c + 0.2


def test_bf16_matches_fp32(fp32):
    bf16 = MiniLMEmbedder(dtype="bfloat16")
    assert bf16.dtype == "bfloat16"
    cos = (fp32.encode(TEXTS) * bf16.encode(TEXTS)).sum(1)
    assert cos.min() > 0.99


def test_dtype_choice(monkeypatch):
    assert resolve_dtype("float32") == "float32"
    monkeypatch.setenv("MEMVISOR_EMBED_DTYPE", "float32")
    assert resolve_dtype("auto") == "float32"
    monkeypatch.setenv("MEMVISOR_EMBED_DTYPE", "float16")
    with pytest.raises(InvalidInput, match="dtype"):
        resolve_dtype("auto")
    monkeypatch.delenv("MEMVISOR_EMBED_DTYPE")
    assert default_embedder().dtype in ("float32", "bfloat16")


def test_loading_prints_no_progress_bar_and_restores_the_callers_settings(capfd):
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()
    hf_logging.set_verbosity_warning()
    MiniLMEmbedder(dtype="float32")
    err = capfd.readouterr().err
    assert "Loading weights" not in err
    assert hf_logging.is_progress_bar_enabled()
    assert hf_logging.get_verbosity() == hf_logging.WARNING


def test_token_batches_keep_each_padded_batch_within_the_budget():
    lengths = [1, 1, 2, 3, 10, 50]
    batches = token_batches(lengths, budget=6)
    assert [list(b) for b in batches] == [[0, 1, 2], [3], [4], [5]]  # 2 x 3 = 6 fits; 3 x 4 would not
    assert token_batches([], 6) == []
    lengths = sorted([3, 7, 7, 8, 12, 12, 12, 20, 31, 40] * 5)
    batches = token_batches(lengths, budget=64)
    assert [i for b in batches for i in b] == list(range(len(lengths)))  # every text once, in order
    for b in batches:
        assert len(b) == 1 or lengths[b[-1]] * len(b) <= 64
        if b.stop < len(lengths):  # a batch closes only when the next text would overflow it
            assert lengths[b.stop] * (len(b) + 1) > 64
