"""The compressed KV cache: one byte budget, KIVI quantization, token policies, ragged heads.

Usage::

    model, tok = load_local_model("smollm2")            # already switched to ATTN_NAME
    cache = CompressedCache(model.config, CacheSpec(budget_bytes=2_000_000, quant="kivi2",
                                                     token_policy=SomePolicy()))
    out = model(input_ids, **{cache_kwarg(model): cache}, use_cache=True)
    cache.nbytes()                                      # bytes of every stored tensor

A model must use the memvisor attention function (:func:`memvisor.kv.use_kv_attention`; done by
``load_local_model``) for any compressed layer; with ``CacheSpec()`` (no compression) the cache
reproduces transformers' ``DynamicCache`` bit for bit under any attention implementation.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, replace
from typing import Any

from torch import Tensor

from memvisor.errors import InvalidInput
from memvisor.kv.adapter import HFCache, kv_shape, layer_windows, text_config
from memvisor.kv.budget import BudgetError, split_layers, token_cost
from memvisor.kv.layer import LayerConfig, LayerCore
from memvisor.kv.planner import CANDIDATES
from memvisor.kv.policies.base import ChannelPolicy, HeadBudget, LayerBudget, MergePolicy, TokenPolicy
from memvisor.kv.storage import QuantConfig, StackedHeads

QUANT_BITS = {"none": None, "kivi2": 2, "kivi4": 4, "kivi-k4v2": 4, "kivi-k2v4": 2}  # key bits
# Mixed precision (KIVI finds keys the more sensitive): the values' width where it differs.
VALUE_BITS = {"kivi-k4v2": 2, "kivi-k2v4": 4}


class CacheSpecError(InvalidInput):
    """An invalid cache specification."""


@dataclass
class CacheSpec:
    """What to store and how much.

    budget_bytes: cap on the bytes of every stored tensor of the cache between forwards (None: no
      cap). During one forward the cache may hold one forward's tokens more (a prefill block).
    quant: "none" | "kivi2" | "kivi4" | "kivi-k4v2" (keys 4-bit, values 2-bit) | "kivi-k2v4";
      group: G; residual: R (tokens kept in the model dtype).
    sinks: the first S tokens of every head of the full-attention layers stay in the model dtype for
      good (quantized caches; the attention sinks that most queries read, whose rounding would reach
      every output). Sliding-window layers keep none: their window drops the first tokens anyway.
      Measured (session 9, float32 teacher-forced KL): where little or nothing is evicted they cut the
      error in half or more (SmolLM2 KIVI-4 at 3x: 0.0067 -> 0.0031 with 4, 0.0019 with 32; Gemma 3 at
      2x: 0.0026 -> 0.0013 with 4); under eviction their bytes cost kept tokens, and needles.
    token_policy: which tokens to evict when over budget (one fresh copy per layer); None keeps
      the most recent tokens.
    head_budget: splits a layer's budget over its KV heads (ragged, Ada-KV); None: equal shares.
    layer_budget: splits the model budget over layers (PyramidKV, EpiCache); None: uniform.
    merge_policy: folds evicted tokens into kept ones instead of dropping them (KVMerger).
    channel_policy: prunes key channels from storage (ThinK): chosen once per layer at its first
      forward from that forward's newest 32 queries; the residual keeps full width.
    slack: head-tokens evicted below the cap each time it is hit (amortises eviction in decode), or 1/64 of
      the cap where that is more (past 64 x slack tokens a head, 2,048 at the default: an eviction re-packs
      the history, and a fixed share keeps its cost per step flat); 0: evict whenever the cap is exceeded.
    block: tokens per block of the attention loop (a multiple of 8); None: by the cache's device
      (``attention.default_block``: 1,024 on the CPU, 16,384 on a GPU).
    batch_size: rows the budget is planned for (the byte cost of a token scales with it).
    context_tokens: the context length the budget is planned for (None: unknown). Given, and with
      no ``layer_budget``, layers share the budget in proportion to the tokens each would hold
      uncompressed (a sliding layer ``min(T, window - 1)``, a full one T) instead of equally.
    fused_decode: decode steps of quantized layers run a fused kernel where one applies (numba on the CPU,
      Triton on CUDA); False: always the block-wise torch path (the reference; slower).
    """

    budget_bytes: int | None = None
    quant: str = "none"
    group: int = 32
    residual: int = 32
    sinks: int = 0
    token_policy: TokenPolicy | None = None
    head_budget: HeadBudget | None = None
    layer_budget: LayerBudget | None = None
    merge_policy: MergePolicy | None = None
    channel_policy: ChannelPolicy | None = None
    slack: int = 32
    block: int | None = None
    batch_size: int = 1
    context_tokens: int | None = None
    fused_decode: bool = True
    recipe: str | None = None  # the recipe that built this spec (from_recipe, plan), for reports

    @classmethod
    def from_recipe(cls, name: str, budget_bytes: int | None, **overrides: Any) -> "CacheSpec":
        """A named, measured combination (see :data:`RECIPES`) under ``budget_bytes``; ``overrides``
        replace any field. Each call builds fresh policy objects."""
        from memvisor.kv.policies import make_policy

        if name not in RECIPES:
            raise CacheSpecError(f"unknown recipe {name!r}; known: {', '.join(sorted(RECIPES))}")
        kw = dict(RECIPES[name])
        policy = kw.pop("token_policy", None)
        if policy is not None:
            kw["token_policy"] = make_policy(policy[0], **policy[1])
        kw.update(overrides)
        return cls(budget_bytes=budget_bytes, recipe=name, **kw)

    @classmethod
    def plan(cls, model_config: Any, budget_bytes: int, context_tokens: int, **overrides: Any) -> "CacheSpec":
        """The recipe :mod:`memvisor.kv.planner` chooses for this model, budget and context length
        (nearly every token with 4-bit keys where that fits; else twice the tokens over precision; else precision
        while at least 30% of every layer's span fits; else the most tokens)."""
        from memvisor.kv.planner import plan

        return plan(model_config, budget_bytes, context_tokens, **overrides)

    def validate(self) -> None:
        if self.quant not in QUANT_BITS:
            raise CacheSpecError(f"quant must be one of {sorted(QUANT_BITS)}, got {self.quant!r}")
        # numpy integers are integers; a bool is not a byte count
        for name in ("budget_bytes", "context_tokens"):
            v = getattr(self, name)
            if isinstance(v, numbers.Integral) and not isinstance(v, bool):
                setattr(self, name, int(v))
        if self.budget_bytes is not None and (not _is_int(self.budget_bytes) or self.budget_bytes < 0):
            raise CacheSpecError(f"budget_bytes must be an int >= 0 or None, got {self.budget_bytes!r}")
        if self.context_tokens is not None and (not _is_int(self.context_tokens) or self.context_tokens < 1):
            raise CacheSpecError(f"context_tokens must be an int >= 1 or None, got {self.context_tokens!r}")
        for name in ("group", "residual", "sinks", "slack", "block", "batch_size"):
            v = getattr(self, name)
            if name == "block" and v is None:
                continue
            if not _is_int(v) or v < (0 if name in ("residual", "sinks", "slack") else 1):
                raise CacheSpecError(f"{name} must be a positive int, got {v!r}")
        if not isinstance(self.fused_decode, bool):
            raise CacheSpecError(f"fused_decode must be True or False, got {self.fused_decode!r}")
        for name, kind in (("token_policy", TokenPolicy), ("head_budget", HeadBudget), ("layer_budget", LayerBudget),
                           ("merge_policy", MergePolicy), ("channel_policy", ChannelPolicy)):
            v = getattr(self, name)
            if v is not None and not isinstance(v, kind):
                hint = f" (e.g. memvisor.kv.policies.make_policy({v!r}))" if isinstance(v, str) else ""
                raise CacheSpecError(f"{name} must be a {kind.__name__} object or None, got {type(v).__name__}{hint}")
        if self.block is not None and self.block % 8:
            raise CacheSpecError(f"block must be a multiple of 8, got {self.block}")
        if self.quant != "none" and self.group % 8:
            raise CacheSpecError(f"group must be a multiple of 8 for KIVI, got {self.group}")
        if self.quant == "none" and self.sinks:
            raise CacheSpecError(f"sinks={self.sinks} keeps tokens out of quantization, but quant='none' "
                                 "quantizes nothing: set sinks=0 or choose a KIVI quant")


# Named recipes (BENCHMARKS.md, kv). kivi4-stream: the best combination measured on SmolLM2-135M at
# 4k tokens (2-bit values cost the most there); its 128-token residual keeps the question and the
# answer being written in full precision. The others trade precision for tokens, for budgets where
# that residual would fill most of a layer (Gemma 3's single KV head of 256 channels):
# CacheSpec.plan picks among them by the model's geometry. StreamingLLM's sinks and recency meet
# the byte budget by evicting the oldest middle tokens. Full-precision sinks (``sinks``) are left out:
# under eviction they cost needles (planner.py says what was measured).
# The recipes are the planner's candidates (one list: what it may choose is what a user may name).
_STREAM = ("streaming", {"sinks": 4})
RECIPES: dict[str, dict] = {name: {**fields, "token_policy": _STREAM} for name, fields in CANDIDATES}


class CompressedCache(HFCache):
    """A transformers ``Cache`` whose layers store KIVI-quantized, policy-evicted, ragged KV.

    model_config: the model's config (layers, KV heads, head dim, sliding windows, dtype);
    spec: :class:`CacheSpec`.
    """

    def __init__(self, model_config: Any, spec: CacheSpec | None = None) -> None:
        spec = CacheSpec() if spec is None else spec
        if not isinstance(spec, CacheSpec):
            raise CacheSpecError(f"spec must be a CacheSpec (or None), got {type(spec).__name__}")
        spec.validate()
        self.spec = spec
        n_layers, n_kv, head_dim = _model_shape(model_config)
        if spec.quant != "none" and head_dim % spec.group:  # values are grouped along the head's channels
            raise CacheSpecError(f"group={spec.group} must divide the model's head_dim ({head_dim}) for KIVI values")
        windows = layer_windows(model_config)[:n_layers]
        bits = QUANT_BITS[spec.quant]
        vbits = VALUE_BITS.get(spec.quant, bits)
        qcfg = QuantConfig(bits=bits, group=spec.group, residual=spec.residual,
                           value_bits=None if vbits == bits else vbits, sinks=spec.sinks)
        # Sliding-window layers get no sinks: their window drops the first tokens anyway, and pricing sinks
        # there would take bytes from the full layers (Gemma 3 at 4x: 54 fewer tokens per full layer).
        qcfgs = [qcfg if w is None else replace(qcfg, sinks=0) for w in windows]
        layer_bytes: list[int | None] = [None] * n_layers
        if spec.budget_bytes is not None:
            dtype_bytes = _dtype_bytes(model_config)
            key_dim = spec.channel_policy.keep_count(head_dim) if spec.channel_policy is not None else None
            costs = [token_cost(spec.batch_size, head_dim, dtype_bytes, bits, spec.group, q.residual + q.sinks,
                                w is not None, key_dim, vbits) for q, w in zip(qcfgs, windows)]
            layer_bytes = split_layers(spec.budget_bytes, costs, n_kv, windows, spec.layer_budget,
                                       spec.context_tokens)
            smallest = min(c.fp for c in costs) * n_kv
            if spec.token_policy is not None:  # statistics of a fixed size (SnapKV's queries): known now
                q_heads = text_config(model_config).num_attention_heads
                fixed = spec.token_policy.planned_state_bytes(spec.batch_size, q_heads, head_dim, dtype_bytes)
                if fixed and fixed >= min(layer_bytes):
                    raise BudgetError(f"budget_bytes={spec.budget_bytes} leaves a layer {min(layer_bytes)} B, but the "
                                      f"{spec.token_policy.name} policy keeps {fixed} B of statistics a layer: raise "
                                      "budget_bytes or choose a policy that keeps less (StreamingLLM keeps none)")
            if min(layer_bytes) < smallest:
                raise BudgetError(
                    f"budget_bytes={spec.budget_bytes} leaves a layer {min(layer_bytes)} B, less than "
                    f"one token ({smallest:.0f} B per layer in full precision)")
        cores = [
            LayerCore(LayerConfig(
                layer_idx=i, window=windows[i], qcfg=qcfgs[i],
                policy=spec.token_policy.fresh() if spec.token_policy is not None else None,
                head_budget=spec.head_budget, merge=spec.merge_policy, channel=spec.channel_policy,
                budget_bytes=layer_bytes[i],
                slack=spec.slack, block=spec.block, fused_decode=spec.fused_decode))
            for i in range(n_layers)
        ]
        super().__init__(cores)
        self._kv_shape = (n_kv, head_dim)
        self.layer_budget_bytes = layer_bytes
        self.peak_bytes = 0
        self._layer_bytes = [0] * n_layers
        for c in cores:
            c.observer = self._observe_bytes

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args: Any, **kwargs: Any
               ) -> tuple[Tensor, Tensor]:
        rows = key_states.shape[0]
        if layer_idx >= len(self.cores) or tuple(key_states.shape[1::2]) != self._kv_shape:
            raise CacheSpecError(f"this cache was built for a model of {len(self.cores)} layers of "
                                 f"{self._kv_shape[0]} KV heads x {self._kv_shape[1]} channels; layer {layer_idx} "
                                 f"gives {key_states.shape[1]} x {key_states.shape[-1]}: build it from this model's "
                                 f"config")
        if layer_idx == 0 and self.spec.budget_bytes is not None and rows != self.spec.batch_size:
            # a token's bytes scale with the rows: the plan (layer split, recipe) was made for another batch
            raise CacheSpecError(f"the budget was planned for batch_size={self.spec.batch_size}, the forward gives "
                                 f"{rows} rows: set CacheSpec(batch_size={rows}) (or CacheSpec.plan(..., "
                                 f"batch_size={rows}))")
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def _observe_bytes(self, layer_idx: int, before: int, after: int) -> None:
        # High-water mark: this layer before its compression, every other layer as it stands.
        others = sum(self._layer_bytes) - self._layer_bytes[layer_idx]
        self.peak_bytes = max(self.peak_bytes, others + before)
        self._layer_bytes[layer_idx] = after

    def nbytes(self) -> int:
        """Bytes of every stored tensor: codes, scales, zero points, group sizes, positions, residuals, and
        the token policies' statistics kept between forwards (SnapKV's window of queries, H2O's sums)."""
        return sum(c.nbytes() for c in self.cores)

    def stored_tokens(self) -> list[list[int]]:
        """Per layer, per KV head: tokens stored."""
        return [c.lengths() for c in self.cores]

    def track_peak(self) -> int:
        """``peak_bytes``: the most bytes the cache held at any point of any forward so far (each
        layer counted just before it compressed itself)."""
        self.peak_bytes = max(self.peak_bytes, self.nbytes())
        return self.peak_bytes

    def reset_peak(self) -> None:
        self.peak_bytes = self.nbytes()

    def dense_layer(self, layer_idx: int) -> dict[str, Tensor]:
        """One layer's storage stacked over KV heads in the agreed dense KIVI layout (what the GPU
        kernel reads): ``k_codes [B, Hkv, T*b/8, D]``, ``k_scale/k_zero [B, Hkv, T/G, D]``,
        ``v_codes [B, Hkv, T, D*b/8]``, ``v_scale/v_zero [B, Hkv, T, D/G]``, ``k_res/v_res
        [B, Hkv, R, D]`` (residual). Needs equal head lengths and whole key groups (no eviction
        inside quantized groups, no ThinK); raises CacheSpecError otherwise."""
        core = self.cores[layer_idx]
        if not core.initialized:
            raise CacheSpecError(f"layer {layer_idx} holds nothing yet")
        stores = core.stores
        if not StackedHeads.compatible(stores) or stores[0].channels is not None:
            raise CacheSpecError(f"layer {layer_idx}: heads are ragged or pruned; no dense layout")
        st = stores[0]
        if st.q.vbits != st.q.bits:
            raise CacheSpecError(f"layer {layer_idx}: mixed key/value bit widths; no dense layout")
        if st.q.bits is not None and st.group_sizes.numel() * st.q.group != st.nq:
            raise CacheSpecError(f"layer {layer_idx}: partial key groups after eviction; no dense layout")
        if st.ns:
            raise CacheSpecError(f"layer {layer_idx}: full-precision sinks (sinks={st.q.sinks}); no dense layout")
        stacked = StackedHeads(stores)
        names = ["k_res", "v_res"] + (["k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero"]
                                      if st.q.bits is not None else [])
        return {n: getattr(stacked, n) for n in names}

    def compress(self) -> None:
        """Evict every layer down to its budget now (ignoring the slack hysteresis)."""
        for c in self.cores:
            if c.initialized:
                c.compress(force=True)
                for st in c.stores:
                    st.flush()


def uncompressed_bytes(model_config: Any, tokens: int, batch_size: int = 1, dtype: Any = None) -> int:
    """Bytes a plain (uncompressed) cache of this model holds after ``tokens`` tokens: what a budget is a
    fraction of (``budget_bytes=uncompressed_bytes(config, T) // 4`` is 4x). Keys and values of every KV head
    of every layer, a sliding-window layer holding ``min(tokens, window - 1)`` (as transformers' own cache),
    ``batch_size`` rows, in ``dtype`` (default: the model's; ``torch.bfloat16`` gives the benchmarks' unit)."""
    import torch

    for name, value in (("tokens", tokens), ("batch_size", batch_size)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 0:
            raise CacheSpecError(f"{name} must be an integer >= 0, got {value!r}")
    n_layers, n_kv, head_dim = _model_shape(model_config)
    width = _dtype_bytes(model_config) if dtype is None else torch.empty(0, dtype=dtype).element_size()
    spans = [tokens if w is None else min(tokens, w - 1) for w in layer_windows(model_config)[:n_layers]]
    return int(sum(spans)) * n_kv * head_dim * 2 * width * int(batch_size)


def _model_shape(model_config: Any) -> tuple[int, int, int]:
    """:func:`kv_shape`, with a typed error for something that is not a model's config."""
    try:
        return kv_shape(model_config)
    except AttributeError:
        raise CacheSpecError(f"model_config must be a transformers model config (model.config), got "
                             f"{type(model_config).__name__}") from None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _dtype_bytes(config: Any) -> int:
    import torch

    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return torch.empty(0, dtype=dtype).element_size()
