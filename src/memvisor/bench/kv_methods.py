"""memvisor's own methods for the KV benchmark, named like ``kivi2``, ``snapkv``, ``kivi4+snapkv``.

A name is ``+``-joined parts: at most one quantizer (``kivi2``, ``kivi4``, mixed ``kivi-k4v2`` keys
4-bit / values 2-bit, ``kivi-k2v4``), optionally ``g<G>`` (group size, default 32), ``r<R>``
(residual window, default 32) and ``s<S>`` (full-precision sinks, default 0), and at most one token
policy from :data:`memvisor.kv.policies.POLICIES` (``snapkv``, ``streaming``, ``h2o``, ``knorm``,
``scissorhands``), optionally ``adakv`` (ragged head budgets) and ``pyramid`` (PyramidKV layer
budgets) or ``span`` (layers share the budget in proportion to their uncompressed span at the
context length: ``CacheSpec.context_tokens``). A name of :data:`memvisor.kv.cache.RECIPES` (``kivi4-stream``) runs that recipe, as
``CacheSpec.from_recipe`` builds it; ``auto`` runs what ``CacheSpec.plan`` chooses for the model,
the budget and the benchmark's context length (the chosen recipe is recorded as ``recipe``). ``none`` is the uncompressed CompressedCache (block-wise prefill's own noise floor).
Every method gets ``budget_bytes`` and is prefilled block-wise (bounded peak): the budget is the
only knob; a quantizer alone meets a budget tighter than its own ratio by keeping the most recent
tokens (the cache's default when no token policy is given).
"""

from __future__ import annotations

import re
from typing import Any

import torch

from memvisor.bench.kv_peers import Method

DEFAULT_METHODS = ["auto", "kivi4-stream", "kivi2+streaming", "kivi2", "kivi4", "snapkv", "streaming", "kivi4+snapkv", "kivi2+snapkv"]
_QUANT = {"kivi2", "kivi4", "kivi-k4v2", "kivi-k2v4"}
_TOKEN = {"snapkv", "streaming", "h2o", "knorm", "scissorhands"}


def parse_method(name: str) -> dict:
    """``kivi4+snapkv`` -> {"quant": "kivi4", "token": "snapkv", "head": None, "layer": None}."""
    parts = [p.strip() for p in name.split("+") if p.strip()]
    spec: dict = {"quant": "none", "token": None, "head": None, "layer": None, "group": 32, "residual": 32,
                  "sinks": 0, "span": False}
    if parts == ["none"]:
        return spec
    seen: set[str] = set()
    for p in parts:
        knob = re.fullmatch(r"([grs])(\d+)", p)
        if knob and knob.group(1) not in seen:  # g64: KIVI group size; r64: residual window; s16: sinks
            seen.add(knob.group(1))
            spec[{"g": "group", "r": "residual", "s": "sinks"}[knob.group(1)]] = int(knob.group(2))
        elif p in _QUANT and spec["quant"] == "none":
            spec["quant"] = p
        elif p in _TOKEN and spec["token"] is None:
            spec["token"] = p
        elif p == "adakv" and spec["head"] is None:
            spec["head"] = p
        elif p == "pyramid" and spec["layer"] is None:
            spec["layer"] = p
        elif p == "span" and not spec["span"]:
            spec["span"] = True
        else:
            raise ValueError(f"bad method {name!r}: part {p!r} unknown or repeated; use + joined parts of "
                             f"{sorted(_QUANT)}, {sorted(_TOKEN)}, adakv, pyramid, span, g<group>, r<residual>, s<sinks>, "
                             f"or 'none'")
    if not parts:
        raise ValueError("empty method name")
    return spec


def memvisor_method(name: str, model_config: Any, budget_bytes: int | None, block: int = 512,
                    context_tokens: int | None = None) -> Method:
    """A :class:`Method` building a fresh ``CompressedCache`` per run and prefilling block-wise;
    ``context_tokens``: the context length the benchmark plans for (``span`` and ``auto`` use it)."""
    from memvisor.kv import CacheSpec, CompressedCache, prefill_blockwise
    from memvisor.kv.cache import RECIPES
    from memvisor.kv.policies import make_policy

    def prefill(model: Any, ids: torch.Tensor, cache: Any, key: str) -> Any:
        res = prefill_blockwise(model, ids, cache, block=block)
        return res.logits

    if name == "auto":  # the planner's choice for this model, budget and context length
        if context_tokens is None:
            raise ValueError("method 'auto' needs the context length (context_tokens)")
        chosen = CacheSpec.plan(model_config, budget_bytes, context_tokens).recipe
        return Method(name, lambda: CompressedCache(model_config, CacheSpec.plan(model_config, budget_bytes,
                                                                                 context_tokens)),
                      prefill, {"budget_bytes": budget_bytes, "block": block, "recipe": chosen,
                                "context_tokens": context_tokens}, blockwise=True)
    if name in RECIPES:  # a named recipe: exactly what CacheSpec.from_recipe builds for API users
        return Method(name, lambda: CompressedCache(model_config, CacheSpec.from_recipe(name, budget_bytes)), prefill,
                      {"budget_bytes": budget_bytes, "block": block, "recipe": name}, blockwise=True)
    spec = parse_method(name)

    def new_cache() -> Any:
        kw: dict = {}
        if spec["token"] == "streaming":
            kw["token_policy"] = make_policy("streaming", sinks=max(4, spec["sinks"]))  # never evict a kept sink
        elif spec["token"] is not None:
            kw["token_policy"] = make_policy(spec["token"])
        if spec["head"] == "adakv":
            kw["head_budget"] = make_policy("adakv")
        if spec["layer"] == "pyramid":
            kw["layer_budget"] = make_policy("pyramid")
        if spec["span"]:
            if context_tokens is None:
                raise ValueError(f"method {name!r} needs the context length (context_tokens)")
            kw["context_tokens"] = context_tokens
        return CompressedCache(model_config, CacheSpec(budget_bytes=budget_bytes, quant=spec["quant"],
                                                       group=spec["group"], residual=spec["residual"],
                                                       sinks=spec["sinks"], **kw))

    return Method(name, new_cache, prefill, {"budget_bytes": budget_bytes, "block": block, **spec}, blockwise=True)
