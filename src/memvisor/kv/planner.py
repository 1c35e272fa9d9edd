"""Choose the cache recipe for a byte budget from the model's geometry: no per-task tuning.

A user sets ``budget_bytes`` and the context length ``T`` it is meant for; :func:`plan` returns
the :class:`~memvisor.kv.cache.CacheSpec` to use, picked among :data:`CANDIDATES` (most precise
first; every one evicts with StreamingLLM, sinks 4) by the same byte arithmetic the cache itself
uses (``token_cost`` and ``split_layers``), without running the model:

1. Layers share the budget in proportion to their uncompressed span (``context_tokens=T``: a
   sliding-window layer ``min(T, window - 1)`` tokens, a full-attention layer ``T``), so every
   layer keeps about the same fraction of what it would see uncompressed.
2. ``coverage(c)`` = the smallest fraction of its span that any layer can hold under candidate
   ``c`` (tokens per head / span). When a candidate with 4-bit keys keeps at least :data:`NEAR_FULL`,
   the plan takes the most precise one keeping at least :data:`FULL_COVERAGE` (nearly every token), or
   else the 4-bit-key one that keeps the most (so a budget a little under 4x does not fall back to
   evicting the oldest 29%); otherwise the 4-bit-key candidate that keeps the most when it keeps at least
   :data:`COVERAGE_GAIN` times what the most precise one keeps (and :data:`MIN_COVERAGE`); otherwise the
   first candidate with coverage of at least :data:`MIN_COVERAGE`; when none reaches that, the one that keeps
   the most (these three rules pass over :data:`FOR_COVERAGE`).

Why coverage first (session 16, BENCHMARKS.md ``kv``): StreamingLLM forgets the OLDEST tokens, so an
evicting recipe loses whatever sat in the first ``1 - coverage`` of the context, whatever its
fidelity elsewhere. SmolLM2 at 4x, 12 needle tasks (bf16): KIVI-4 with a 128-token residual
(coverage 0.71; top-1 0.955, KL 0.027, greedy agreement 0.21) kept 6 of the 9 needles the
uncompressed model finds (two needles at 23% and 29% depth evicted on every machine; the first six
tasks' needles happened to lie deeper, which is how sessions 1-14 saw 100%); 4-bit keys / 2-bit
values (coverage 0.95; top-1 0.914, KL 0.044, greedy 0.26) kept 8 of 9 (the miss: a task even a
lossless cache fails in bf16). In float32 a residual costs twice the bytes: the same recipe without a
residual window (``kivi-k4v2-stream-r0``, coverage 0.95) kept 8 of the 8 needles the float32 reference
finds on those tasks, KIVI-4 (coverage 0.59) 6 (top-1 0.911 / 0.954, KL 0.053 / 0.041; session 17).
Gemma 3 at 3x: 4-bit keys / 2-bit values keeping every token 0.995 / 0.007 against KIVI-4 (coverage
0.75) 0.980 / 0.048. Keys stay 4-bit: 2-bit keys cost more than
evicting (session 9: 0.811 / 0.239).
Why twice the tokens beat precision: SmolLM2 at 4x of a 768-token context (bf16, 12 needle tasks, session 20,
``benchmarks/kv/smollm2-s20-768``): KIVI-4 with its 128-token residual (coverage 0.34) top-1 0.848, KL 0.366,
2 of 11 needles; keys 4 / values 2 (0.75) 0.935, 0.042, 9 of 11. Gemma 3 at 4x below.
Why precision next (teacher-forced top-1 / KL): precision beats tokens while enough of the context
stays. Gemma 3 at 4x (session 7, when the cache priced its residual differently): KIVI-4 with a
128-token residual kept 0.16 of the full layers' context and fell to 0.844 / 0.463, KIVI-4 with a
32-token residual (0.47 then) reached 0.984 / 0.014, KIVI-2 keeping every token 0.930 / 0.136.
:data:`MIN_COVERAGE` = 0.3, :data:`NEAR_FULL` = 0.9 and :data:`FULL_COVERAGE` = 0.95 are set from
measurements on two models, :data:`COVERAGE_GAIN` = 2 from the two cases above (rules of thumb, not
derivations; it leaves every configuration BENCHMARKS.md records at 4k tokens as it was).
No candidate keeps full-precision sinks (``CacheSpec.sinks``):
they halve the KL where nothing is evicted, but under eviction their bytes move the eviction boundary and
cost needles (session 9: SmolLM2 at 4x, float32, needle retention 1.00 -> 0.75; Gemma 3 at 4x, bf16, 3 of 3 -> 2 of 3).

Units: bytes; ``coverage`` is a fraction (1.0: every token of every layer's span fits).
"""

from __future__ import annotations

import numbers
from typing import Any

from memvisor.kv.adapter import kv_shape, layer_windows
from memvisor.kv.budget import BudgetError, split_layers, token_cost

# (recipe name, CacheSpec fields); most precise first. cache.RECIPES is built from this list.
CANDIDATES: list[tuple[str, dict]] = [
    ("kivi4-stream", {"quant": "kivi4", "group": 32, "residual": 128}),
    ("kivi4-stream-r32", {"quant": "kivi4", "group": 32, "residual": 32}),
    ("kivi-k4v2-stream", {"quant": "kivi-k4v2", "group": 32, "residual": 32}),
    # no residual window (only a part-filled group stays in full precision), for coverage only (:data:`FOR_COVERAGE`)
    ("kivi-k4v2-stream-r0", {"quant": "kivi-k4v2", "group": 32, "residual": 0}),
    ("kivi2-stream", {"quant": "kivi2", "group": 32, "residual": 32}),
]
# Candidates taken only when they keep (nearly) every token (step 2's first rule), never by the precision-first
# rule: a float32 model's residual costs twice the bytes, and keys 4 / values 2 with 32 of them keep 0.89 of
# SmolLM2's 4k at 4x, without 0.95; Gemma 3 at 4x 0.83 and 0.91 (KIVI-4: 0.48; there top-1 0.995 / KL 0.011 /
# 4 of 4 needles against KIVI-4's 0.896 / 0.315 / 1 of 4, session 17). At tighter budgets, where it would also
# keep the most, it was not measured.
FOR_COVERAGE = {"kivi-k4v2-stream-r0"}
MIN_COVERAGE = 0.3
COVERAGE_GAIN = 2.0
NEAR_FULL = 0.9
FULL_COVERAGE = 0.95
_BITS = {"kivi4": (4, 4), "kivi-k4v2": (4, 2), "kivi2": (2, 2)}


def coverage(model_config: Any, budget_bytes: int, context_tokens: int, quant: str, group: int, residual: int,
             dtype_bytes: int = 2, batch_size: int = 1) -> float:
    """Smallest fraction of its span (``min(T, window - 1)`` or ``T`` tokens) that any layer can
    hold per KV head at ``budget_bytes``, layers split by span, full-precision residual at its
    largest (a lower bound: the cache counts the residual it really holds)."""
    n_layers, n_kv, head_dim = kv_shape(model_config)
    windows = layer_windows(model_config)[:n_layers]
    kbits, vbits = _BITS[quant]
    costs = [token_cost(batch_size, head_dim, dtype_bytes, kbits, group, residual, w is not None, None, vbits)
             for w in windows]
    per_layer = split_layers(budget_bytes, costs, n_kv, windows, None, context_tokens)
    fractions = []
    for c, b, w in zip(costs, per_layer, windows):
        span = context_tokens if w is None else min(context_tokens, w - 1)
        fractions.append(min(1.0, c.capacity(b / n_kv) / span))
    return min(fractions)


def choose(model_config: Any, budget_bytes: int, context_tokens: int, dtype_bytes: int = 2,
           batch_size: int = 1) -> tuple[str, dict, dict[str, float]]:
    """(recipe name, its CacheSpec fields, coverage of every candidate) for this budget."""
    for name, value, least in (("budget_bytes", budget_bytes, 1), ("context_tokens", context_tokens, 1),
                               ("batch_size", batch_size, 1)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < least:
            raise BudgetError(f"{name} must be an integer >= {least}, got {value!r}")
    cov = {name: coverage(model_config, budget_bytes, context_tokens, f["quant"], f["group"], f["residual"],
                          dtype_bytes, batch_size) for name, f in CANDIDATES}
    four = [(name, fields) for name, fields in CANDIDATES if _BITS[fields["quant"]][0] == 4]
    if max(cov[name] for name, _ in four) >= NEAR_FULL:  # (nearly) every token, 4-bit keys
        full = [(name, fields) for name, fields in four if cov[name] >= FULL_COVERAGE]
        name, fields = full[0] if full else max(four, key=lambda c: cov[c[0]])
        return name, dict(fields), cov
    if max(cov.values()) == 0:
        raise BudgetError(f"budget_bytes={budget_bytes} holds no token of some layer under any recipe: give more "
                          f"bytes (the cache's size uncompressed: memvisor.kv.uncompressed_bytes)")
    rest = [(name, fields) for name, fields in CANDIDATES if name not in FOR_COVERAGE]
    widest = max((c for c in four if c[0] not in FOR_COVERAGE), key=lambda c: cov[c[0]])
    if cov[widest[0]] >= max(MIN_COVERAGE, COVERAGE_GAIN * cov[CANDIDATES[0][0]]):
        return widest[0], dict(widest[1]), cov
    for name, fields in rest:
        if cov[name] >= MIN_COVERAGE:
            return name, dict(fields), cov
    name, fields = max(rest, key=lambda c: cov[c[0]])
    return name, dict(fields), cov


def plan(model_config: Any, budget_bytes: int, context_tokens: int, **overrides: Any):
    """The :class:`CacheSpec` for ``budget_bytes`` and a context of ``context_tokens`` tokens:
    the chosen candidate, StreamingLLM (sinks 4), layers split by span. ``overrides`` replace any
    field after the choice (the choice does not see them); StreamingLLM then protects at least the
    ``sinks`` an override asks to keep in full precision. The chosen name is in ``spec.recipe``."""
    from memvisor.kv.cache import CacheSpec, _dtype_bytes
    from memvisor.kv.policies import make_policy

    batch = overrides.get("batch_size", 1)
    name, fields, _ = choose(model_config, budget_bytes, context_tokens, _dtype_bytes(model_config), batch)
    budget_bytes, context_tokens = int(budget_bytes), int(context_tokens)
    # StreamingLLM never evicts a token kept in full precision (a bad value is CacheSpec.validate's to refuse)
    asked = overrides.get("sinks", 0)
    sinks = max(4, asked) if isinstance(asked, int) else 4
    kw = {"token_policy": make_policy("streaming", sinks=sinks), "context_tokens": context_tokens, **fields}
    kw.update(overrides)
    return CacheSpec(budget_bytes=budget_bytes, recipe=name, **kw)
