"""Token counting with the target model's real tokenizer (SmolLM2 by default).

The SmolLM2 tokenizer lives inside its GGUF file; transformers takes ~12 s to extract it, so it
is extracted once into the cache folder as a plain `tokenizer.json` and loaded from there with the
`tokenizers` library (milliseconds) afterwards.
"""
from __future__ import annotations

import functools
import os
import shutil
import threading
from pathlib import Path
from typing import Protocol

from tokenizers import Tokenizer

from memvisor.models.packages import cache_dir, smollm2_gguf

_lock = threading.Lock()


class TokenCounter(Protocol):
    name: str

    def count(self, text: str) -> int: ...


class HFTokenizer:
    """A `tokenizers` tokenizer; counts tokens without special tokens (as they appear mid-prompt)."""

    def __init__(self, path: Path, name: str):
        self.name = name
        self._tok = Tokenizer.from_file(str(path))

    def count(self, text: str) -> int:
        return len(self._tok.encode(text, add_special_tokens=False).ids)

    def count_many(self, texts: list[str]) -> list[int]:
        return [len(e.ids) for e in self._tok.encode_batch(texts, add_special_tokens=False)]


def _extract_smollm2_tokenizer(target: Path) -> None:
    from transformers import AutoTokenizer  # heavy import, first use only

    gguf = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # Write aside, then rename: a crash or a concurrent process never leaves a half-written folder.
    tmp = target.parent / f"{target.name}.tmp{os.getpid()}"
    tok.save_pretrained(str(tmp))
    if target.exists():
        shutil.rmtree(target)
    try:
        tmp.rename(target)
    except OSError:  # another process won the race; its copy is identical
        shutil.rmtree(tmp, ignore_errors=True)


@functools.lru_cache(maxsize=1)
def default_tokenizer() -> HFTokenizer:
    """SmolLM2-135M-Instruct's tokenizer (extracted from the packaged GGUF on first use)."""
    folder = cache_dir() / "smollm2-tokenizer"
    with _lock:
        if not (folder / "tokenizer.json").exists():
            _extract_smollm2_tokenizer(folder)
    return HFTokenizer(folder / "tokenizer.json", name="SmolLM2-135M-Instruct")


def count_tokens(text: str) -> int:
    """Tokens of `text` under the default tokenizer."""
    return default_tokenizer().count(text)
