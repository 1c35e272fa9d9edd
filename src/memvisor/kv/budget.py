"""From a byte budget to token budgets: what one stored token costs and how many fit.

Units: bytes; a "head-token" is one token of one KV head (for all batch rows). A layer holding
``T`` tokens in each of ``Hkv`` heads holds ``Hkv * T`` head-tokens (the unit of the policies'
``LayerBudget`` and ``HeadBudget``).
"""

from __future__ import annotations

from dataclasses import dataclass

from memvisor.errors import InvalidInput
from memvisor.kv.policies.base import LayerBudget, largest_remainder


class BudgetError(InvalidInput):
    """A byte budget that cannot be met (too small for the fixed parts of the cache)."""


class BudgetWarning(UserWarning):
    """A byte budget that is met by giving up something the spec asked for (a policy's protected tokens)."""


@dataclass(frozen=True)
class TokenCost:
    """Bytes of one head-token, for ``batch`` rows of ``head_dim`` channels.

    fp: a full-precision token (model dtype) = 2 * B * D * dtype_bytes (+ 2 with int16 positions);
    q: a KIVI-quantized token in a full group = B * D * (bits + vbits)/8 codes + B * D * 4 / G (key
    scale+zero per group) + B * (D/G) * 4 (value scale+zero) + 2/G (int16 group size) (+ 2 positions);
    residual_max: most tokens held in full precision (``residual`` + G - 1: the residual R, plus the
    sinks where the cache keeps any; 0 unquantized).
    """

    fp: float
    q: float
    residual_max: int

    def capacity(self, nbytes: float, residual: int | None = None) -> int:
        """Most head-tokens one head can hold in ``nbytes`` with ``residual`` of them in full
        precision (None: the residual at its largest, the planning bound). Eviction never grows
        the residual, so the layer passes the residual it holds now: planning for ``R + G - 1``
        full-precision tokens when it holds ``R`` left the cache up to (G-1)(fp-q) bytes per head
        under its budget (15% of a Gemma 3 layer at 8x)."""
        if nbytes <= 0:
            return 0
        if self.residual_max == 0:
            return int(nbytes // self.fp)
        r = self.residual_max if residual is None else min(residual, self.residual_max)
        fp_part = r * self.fp
        if nbytes <= fp_part:
            return int(nbytes // self.fp)
        return r + int((nbytes - fp_part) // self.q)


def token_cost(batch: int, head_dim: int, dtype_bytes: int, bits: int | None, group: int,
               residual: int, track_pos: bool, key_dim: int | None = None,
               value_bits: int | None = None) -> TokenCost:
    """Cost of one head-token; ``residual``: tokens kept in full precision besides a part-filled
    group (R plus any sinks); ``key_dim``: key channels kept by ThinK (None: all); ``bits`` the
    keys' width, ``value_bits`` the values' (None: ``bits``)."""
    vbits = bits if value_bits is None else value_bits
    pos = 2.0 if track_pos else 0.0  # int16 positions (int32 past 32767: the cache re-checks real bytes)
    fp = 2.0 * batch * head_dim * dtype_bytes + pos
    if bits is None:
        if key_dim is None:
            return TokenCost(fp=fp, q=fp, residual_max=0)
        old = batch * (key_dim + head_dim) * dtype_bytes + pos
        return TokenCost(fp=fp, q=old, residual_max=residual)
    dk = head_dim if key_dim is None else key_dim
    q = (batch * (dk * bits + head_dim * vbits) / 8 + batch * dk * 4.0 / group
         + batch * (head_dim / group) * 4.0 + 2.0 / group + pos)
    return TokenCost(fp=fp, q=q, residual_max=residual + group - 1)


def split_layers(budget_bytes: int, costs: list[TokenCost], n_heads: int, windows: list[int | None],
                 layer_budget: LayerBudget | None, context_tokens: int | None = None) -> list[int]:
    """Per-layer byte budgets summing to at most ``budget_bytes``.

    With ``context_tokens`` T (and no ``layer_budget``) see :func:`split_by_span`. Otherwise the
    budget is first split in head-tokens by ``layer_budget`` (uniform when None) at the quantized
    token cost; a sliding-window layer never needs more than ``window - 1`` tokens per head, and
    what it cannot use goes to the other layers in proportion to their share.
    """
    n = len(costs)
    if budget_bytes < 0:
        raise BudgetError(f"budget_bytes must be >= 0, got {budget_bytes}")
    if context_tokens is not None and context_tokens < 1:
        raise BudgetError(f"context_tokens must be >= 1, got {context_tokens}")
    if layer_budget is None and context_tokens is not None:
        return split_by_span(budget_bytes, costs, n_heads, windows, context_tokens)
    unit = max(c.q for c in costs)
    total_tokens = int(budget_bytes // unit)
    shares = (layer_budget.split(total_tokens, n) if layer_budget is not None
              else largest_remainder([1.0] * n, total_tokens))
    per_layer = [float(s) * unit for s in shares]
    # Cap sliding layers at what their window can use; hand the surplus to the others.
    for _ in range(n):
        surplus, open_layers = 0.0, []
        for i, (c, w) in enumerate(zip(costs, windows)):
            if w is None:
                open_layers.append(i)
                continue
            need = _bytes_for(c, w - 1) * n_heads
            if per_layer[i] > need:
                surplus += per_layer[i] - need
                per_layer[i] = need
            elif per_layer[i] < need:
                open_layers.append(i)
        if surplus <= 0 or not open_layers:
            break
        weight = sum(per_layer[i] for i in open_layers) or float(len(open_layers))
        for i in open_layers:
            share = per_layer[i] / weight if weight else 1.0 / len(open_layers)
            per_layer[i] += surplus * share
    return [int(b) for b in per_layer]


def _bytes_for(cost: TokenCost, tokens: int) -> float:
    """Bytes one head needs to hold ``tokens`` tokens (upper estimate, residual at its largest)."""
    r = min(tokens, cost.residual_max)
    return r * cost.fp + (tokens - r) * cost.q


def split_by_span(budget_bytes: int, costs: list[TokenCost], n_heads: int, windows: list[int | None],
                  context_tokens: int) -> list[int]:
    """Per-layer byte budgets under which every layer keeps the same fraction ``f`` of its span
    (``min(T, window - 1)`` tokens per head for a sliding layer, ``T`` for a full one), the
    full-precision residual priced in: ``f`` is the largest fraction whose bytes fit (bisection).
    An equal split gives Gemma 3's 15 sliding layers (512-token windows) as many tokens as its 3
    full layers, which see 8x more at 4k. When every span fits (``f`` = 1), the rest goes to the
    full-attention layers (a longer context than planned still has room there)."""
    spans = [context_tokens if w is None else min(context_tokens, w - 1) for w in windows]

    def need(frac: float) -> list[float]:
        return [_bytes_for(c, frac * s) * n_heads for c, s in zip(costs, spans)]

    full = need(1.0)
    if sum(full) <= budget_bytes:
        open_layers = [i for i, w in enumerate(windows) if w is None] or list(range(len(costs)))
        extra = (budget_bytes - sum(full)) / len(open_layers)
        return [int(b + (extra if i in open_layers else 0.0)) for i, b in enumerate(full)]
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if sum(need(mid)) <= budget_bytes:
            lo = mid
        else:
            hi = mid
    return [int(b) for b in need(lo)]
