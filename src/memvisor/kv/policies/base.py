"""The policy protocol of the KV layer: what every compression policy implements.

Pure tensor code: no transformers import. The cache (``memvisor.kv``) owns storage; a policy only
*decides* (which tokens, which channels, how to merge, how many per layer / head).

Conventions shared by every policy
----------------------------------
- ``B`` batch, ``Hq`` query heads, ``Hkv`` key/value heads, ``groups = Hq // Hkv`` (GQA: query head
  ``q`` reads KV head ``q // groups``), ``T`` cached tokens of one layer, ``Tq`` queries of the current
  forward (a prefill block or 1 for a decode step), ``D`` head dim. Scores are float32, unitless.
- Keys/queries are the post-RoPE tensors the attention actually uses.
- **Token order.** Each KV head's tokens are in storage order, oldest first; eviction keeps that order
  (``select`` returns sorted indices), so index order is recency order.
- **Ragged heads.** After Ada-KV style eviction heads hold different counts. The cache then passes
  ``keys`` padded to ``T = max(lengths)`` plus ``lengths: LongTensor[Hkv]``: head ``h`` has valid tokens
  ``[0, lengths[h])``; the rest is padding and is never attended, scored or kept.
- **observe() timing.** Called after the layer appended the current forward's keys, so the ``Tq``
  queries are the newest ``Tq`` valid tokens of each head: query ``i`` (0-based within the block) of
  head ``h`` may attend key ``j`` iff ``j <= lengths[h] - Tq + i`` (causal mask inside a prefill block;
  a decode step, ``Tq == 1``, sees every valid key).
- **Batch.** ``select`` keeps the same token indices for every batch row (the cache stays rectangular
  over the batch): scores are averaged over ``B`` before the top-k. Benchmarks use ``B == 1``.
- **GQA reduction.** Attention statistics are reduced over a KV head's query group by MEAN, so the
  reduced row is still a probability distribution over keys (Scissorhands compares it to the uniform
  average). For rankings, mean and sum order tokens identically.

Protocol (agreed in the KV contract; extensions are keyword-only and optional):
- ``TokenPolicy``: ``observe``, ``scores``, ``protected``, ``on_evict`` (+ ``reset``, ``fresh``).
- ``select(scores, protected, budget)`` -> per KV head sorted kept indices (ragged allowed).
- ``HeadBudget`` (extension): ``split(scores, protected, layer_budget) -> LongTensor[Hkv]``.
- ``ChannelPolicy`` (ThinK): ``keep_channels(queries_window, keys, keep) -> LongTensor[Hkv, keep]``.
- ``MergePolicy`` (KVMerger): ``merge(keys, values, kept) -> (list[Tensor[B, n_h, D]], list[...])``.
  NOTE: the contract wrote ``Tensor[n_h, D]``; we keep the batch axis (``[B, n_h, D]``) because kept
  indices are shared over the batch. With ``B == 1`` use ``[0]``.
- ``LayerBudget``: ``split(total_tokens, n_layers) -> list[int]`` summing exactly to ``total_tokens``.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from typing import Sequence

import torch
from torch import Tensor

from memvisor.errors import InvalidInput


class PolicyError(InvalidInput):
    """Bad input to a KV policy (shapes, budgets, knobs)."""


class BudgetTooSmallError(PolicyError):
    """A budget is smaller than the tokens a policy must protect (sinks, recent window)."""


# ----------------------------------------------------------------------------------------------
# Token policies
# ----------------------------------------------------------------------------------------------


class TokenPolicy(ABC):
    """Decides which cached tokens of ONE layer to keep. One instance per layer (use ``fresh()``).

    Subclasses set ``name`` (registry key), ``needs_queries`` (False lets the cache skip
    ``observe``, which then costs nothing), ``observe_uses_keys`` (False: ``observe`` reads only
    the queries, so the cache may pass ``keys=None`` and skip dequantizing the history) and
    ``scores_use_kv`` (False: ``scores`` reads only the shapes of ``keys`` and ``values``, so the
    cache may pass ``[B, Hkv, T, 0]`` tensors instead of the dequantized history at each eviction).
    A policy whose statistics are functions of the attention probabilities alone (H2O, Scissorhands) sets
    ``observes_probs`` and implements :meth:`observe_probs` (``_attention.AttentionStatsPolicy`` does the rest):
    the cache then hands it the probabilities its own attention computed (decode steps and short appends),
    instead of calling ``observe`` to recompute them from the whole dequantized history.
    """

    name: str = "abstract"
    needs_queries: bool = True
    observe_uses_keys: bool = True
    observes_probs: bool = False
    scores_use_kv: bool = True
    state_attrs: tuple[str, ...] = ()  # attributes holding statistics (not knobs)

    def observe(
        self,
        queries: Tensor,
        keys: Tensor,
        *,
        lengths: Tensor | None = None,
        positions: Tensor | None = None,
        window: int | None = None,
    ) -> None:
        """Accumulate statistics from one forward.

        queries: [B, Hq, Tq, D] post-RoPE; keys: [B, Hkv, T, D] every key the layer holds, the newest
        Tq of each head being this forward's own; lengths: optional LongTensor[Hkv] (ragged heads).
        Sliding-window layers (extension): ``positions`` LongTensor[Hkv, T] absolute position of each
        stored key and ``window`` (tokens) so queries do not attend keys outside their window.
        Default: no statistics.
        """

    def observe_probs(self, probs: Tensor, n_visible: Tensor, *, lengths: Tensor | None = None) -> None:
        """Accumulate statistics from one forward's attention probabilities (``observes_probs`` policies).

        probs: float32 [B, Hkv, Tq, T] (any device), each query row's softmax over the layer's keys, averaged
        over the KV head's query group (GQA), zeros at masked keys and padding; n_visible: LongTensor[Hkv, Tq],
        the keys each row could see; lengths as in :meth:`observe`. What ``_attention.group_attention`` yields.
        """
        raise NotImplementedError(f"{type(self).__name__} does not take attention probabilities")

    @abstractmethod
    def scores(self, keys: Tensor, values: Tensor, *, lengths: Tensor | None = None) -> Tensor:
        """Importance of each cached token: Tensor[B, Hkv, T] float32 on the CPU (``_stats.finish_scores``),
        higher = keep; keys and values may be on a GPU. Padding positions (``>= lengths[h]``) are ``-inf``.
        """

    def nbytes(self) -> int:
        """Bytes of the statistics kept between forwards (the tensors named in ``state_attrs``): memory the
        cache holds for this policy, counted in the layer's bytes and its budget like the KV itself."""
        return sum(t.numel() * t.element_size() for t in (getattr(self, a, None) for a in self.state_attrs)
                   if isinstance(t, Tensor))

    def state_bytes(self, tokens: int) -> int:
        """Bytes the statistics would take with every head holding ``tokens`` tokens: what eviction plans with
        (a policy whose statistics are per token frees some with every token it evicts). Default: their bytes
        now, a fixed size (SnapKV's window of queries)."""
        return self.nbytes()

    def planned_state_bytes(self, batch: int, query_heads: int, head_dim: int, dtype_bytes: int) -> int:
        """The most bytes the statistics take in a layer of this shape whatever it holds, known before any forward
        (a budget below it can never be met). Default 0: statistics that grow with the tokens held, which
        eviction plans with (:meth:`state_bytes`)."""
        return 0

    def protected(self, T: int) -> Tensor:
        """BoolTensor[T]: tokens kept whatever their score (sinks, recent window), for a head holding T tokens."""
        return torch.zeros(T, dtype=torch.bool)

    def on_evict(self, kept: list[Tensor]) -> None:
        """Re-index accumulated statistics: ``kept[h]`` are the sorted old indices head h keeps."""

    def reset(self) -> None:
        """Forget all statistics (new sequence). Must assign new objects, never mutate shared ones."""

    def fresh(self) -> "TokenPolicy":
        """A new instance with the same knobs and no statistics (one per layer)."""
        new = copy.copy(self)
        new.reset()
        return new

    def protected_mask(self, T: int, lengths: Tensor | None = None, n_heads: int | None = None) -> Tensor:
        """BoolTensor[Hkv, T]: ``protected`` per head, applied to each head's own valid length."""
        if lengths is None:
            if n_heads is None:
                raise PolicyError("protected_mask needs lengths or n_heads")
            return self.protected(T).unsqueeze(0).expand(n_heads, T).clone()
        out = torch.zeros(len(lengths), T, dtype=torch.bool)
        for h, n in enumerate(lengths.tolist()):
            out[h, :n] = self.protected(int(n))
        return out


def knobs(policy: object) -> dict:
    """The policy's name and knobs as plain JSON data (for results files): every public attribute
    that is a bool, int, float, str, None or a list of those; statistics (the class's ``state_attrs``
    and any tensor) are left out."""
    plain = (bool, int, float, str, type(None))
    out: dict = {"name": getattr(policy, "name", type(policy).__name__)}
    state = set(getattr(policy, "state_attrs", ()))
    for key, val in sorted(vars(policy).items()):
        if key.startswith("_") or key in state:
            continue
        if isinstance(val, plain) or (isinstance(val, (list, tuple)) and all(isinstance(v, plain) for v in val)):
            out[key] = list(val) if isinstance(val, tuple) else val
    return out


def valid_mask(lengths: Tensor | None, T: int, n_heads: int) -> Tensor:
    """BoolTensor[Hkv, T]: True where a token is stored (not padding)."""
    if lengths is None:
        return torch.ones(n_heads, T, dtype=torch.bool)
    lengths = torch.as_tensor(lengths, dtype=torch.long)
    if lengths.shape != (n_heads,):
        raise PolicyError(f"lengths must be LongTensor[{n_heads}], got shape {tuple(lengths.shape)}")
    if int(lengths.max()) > T or int(lengths.min()) < 0:
        raise PolicyError(f"lengths {lengths.tolist()} out of range for T={T}")
    return torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)


def _as_head_protect(protected: Tensor, n_heads: int, T: int) -> Tensor:
    protected = torch.as_tensor(protected, dtype=torch.bool)
    if protected.shape == (T,):
        return protected.unsqueeze(0).expand(n_heads, T)
    if protected.shape == (n_heads, T):
        return protected
    raise PolicyError(f"protected must be BoolTensor[{T}] or [{n_heads}, {T}], got {tuple(protected.shape)}")


def select(
    scores: Tensor,
    protected: Tensor,
    budget: Tensor | int | Sequence[int],
    *,
    lengths: Tensor | None = None,
    strict: bool = False,
) -> list[Tensor]:
    """Per KV head, the sorted indices of the tokens to keep.

    scores: [B, Hkv, T] or [Hkv, T] (averaged over B); protected: BoolTensor[T] or [Hkv, T];
    budget: LongTensor[Hkv] (or one int for all heads) = tokens to keep per head, protected included;
    lengths: optional LongTensor[Hkv] of valid tokens per head (padding is never kept).
    Returns list of Hkv LongTensors (ragged: lengths may differ), each sorted ascending, holding every
    protected valid token and the highest-scoring others (ties: the newer token wins).
    A head whose budget is >= its valid length keeps everything.
    A budget below a head's protected count (e.g. a deep PyramidKV layer smaller than the recent
    window) never exceeds the budget: the protected tokens then compete among themselves by score
    (ties: newer). ``strict=True`` raises BudgetTooSmallError instead.
    A head whose scores, protected and valid tokens and budget equal head 0's gets head 0's indices (the same
    tensor) without a second selection: StreamingLLM's heads are alike, and a selection costs ~0.8 ms a head at
    32k tokens on the CPU (a decode-time eviction runs one per head and layer).
    """
    if scores.dim() == 3:  # one batch row: a view (a mean would copy the whole [Hkv, T] for nothing)
        scores = scores[0].float() if scores.shape[0] == 1 else scores.float().mean(0)
    if scores.dim() != 2:
        raise PolicyError(f"scores must be [B, Hkv, T] or [Hkv, T], got {tuple(scores.shape)}")
    n_heads, T = scores.shape
    if isinstance(budget, int):
        budget = torch.full((n_heads,), budget, dtype=torch.long)
    budget = torch.as_tensor(budget, dtype=torch.long)
    if budget.shape != (n_heads,):
        raise PolicyError(f"budget must be LongTensor[{n_heads}] or int, got shape {tuple(budget.shape)}")
    if int(budget.min()) < 0:
        raise PolicyError(f"budget must be >= 0, got {budget.tolist()}")
    valid = valid_mask(lengths, T, n_heads)
    prot = _as_head_protect(protected, n_heads, T) & valid
    newest_first = torch.arange(T - 1, -1, -1)
    kept: list[Tensor] = []
    for h in range(n_heads):
        b = int(budget[h])
        if h and b == int(budget[0]) and _same_row(h, valid, prot, scores):
            kept.append(kept[0])
            continue
        n_valid = int(valid[h].sum())
        if b >= n_valid:
            kept.append(torch.nonzero(valid[h]).flatten())
            continue
        n_prot = int(prot[h].sum())
        if b < n_prot and strict:
            raise BudgetTooSmallError(
                f"head {h}: budget {b} tokens < {n_prot} protected tokens (sinks + recent window); "
                "raise the budget or shrink the policy's window"
            )
        s = scores[h].double()
        fast = None if b < n_prot else _drop_lowest(s, valid[h] & ~prot[h], valid[h], n_valid - b)
        kept.append(fast if fast is not None else _keep_by_sort(s, valid[h], prot[h], b, newest_first))
    return kept


def _same_row(h: int, *rows: Tensor) -> bool:
    """Whether row ``h`` of each [Hkv, T] tensor equals its row 0: the same memory (a stride-0 expand) or equal
    values (a NaN makes rows unequal, so such a head is selected again)."""
    return all(r.stride(0) == 0 or torch.equal(r[h], r[0]) for r in rows)


def _keep_by_sort(s: Tensor, valid: Tensor, prot: Tensor, b: int, newest_first: Tensor) -> Tensor:
    """One head's kept indices by sorting every token (the reference order): protected first, then score,
    then newer (stable sorts, last key first)."""
    s = s.clone()
    s[~valid] = float("-inf")
    order = newest_first[torch.argsort(s[newest_first], descending=True, stable=True)]
    order = order[torch.argsort(prot[order].to(torch.int8), descending=True, stable=True)]
    order = order[valid[order]]  # padding never competes, even against -inf or NaN scores
    return torch.sort(order[:b]).values


def _drop_lowest(s: Tensor, cand: Tensor, valid: Tensor, n_drop: int) -> Tensor | None:
    """The same kept set as :func:`_keep_by_sort` when every protected token fits, without sorting: drop
    the ``n_drop`` lowest-scored candidates (ties: the older first), found through the n-th smallest score.
    A decode-time eviction drops a few dozen of tens of thousands of tokens, and three sorts of a 32k-token
    head took 1.6 ms each on the CPU, per head and eviction (scripts/kv_gpu_block_size.py --profile).
    ``torch.topk``, not ``torch.kthvalue``: kthvalue's quickselect is quadratic on sorted scores
    (StreamingLLM's): 60-68 ms for 26k tokens against 0.07 (timed ad hoc). None (use the sort) for NaN scores."""
    s_c = torch.where(cand, s, torch.full_like(s, float("inf")))
    if bool(torch.isnan(s_c).any()):
        return None
    v = torch.topk(s_c, n_drop, largest=False, sorted=True).values[-1]  # n_drop <= candidates: a candidate's
    below = cand & (s_c < v)
    tied = cand & (s_c == v)
    rest = n_drop - int(below.sum())
    drop = below | (tied & (torch.cumsum(tied.to(torch.long), 0) <= rest))  # the oldest tied ones
    return torch.nonzero(valid & ~drop).flatten()


# ----------------------------------------------------------------------------------------------
# Head budgets (extension: Ada-KV)
# ----------------------------------------------------------------------------------------------


class HeadBudget(ABC):
    """Splits one layer's token budget over its KV heads."""

    name: str = "abstract"

    @abstractmethod
    def split(
        self, scores: Tensor, protected: Tensor, layer_budget: int, *, lengths: Tensor | None = None
    ) -> Tensor:
        """LongTensor[Hkv] of per-head token counts summing to ``min(layer_budget, valid tokens)``.

        scores: [B, Hkv, T] or [Hkv, T]; protected: BoolTensor[T] or [Hkv, T]; layer_budget: tokens
        (a token of one KV head counts 1; a layer holding T tokens in all heads holds Hkv*T).
        """


# ----------------------------------------------------------------------------------------------
# Channel, merge, layer policies
# ----------------------------------------------------------------------------------------------


class ChannelPolicy(ABC):
    """Chooses the key channels to store (ThinK). The cache removes the others from storage and
    projects queries onto the kept ones."""

    name: str = "abstract"

    @abstractmethod
    def keep_channels(self, queries_window: Tensor, keys: Tensor, keep: int) -> Tensor:
        """queries_window: [B, Hq, w, D]; keys: [B, Hkv, T, D] -> LongTensor[Hkv, keep], each row sorted."""

    def keep_count(self, head_dim: int) -> int:
        """Channels to keep for a head of ``head_dim`` channels under this policy's ratio."""
        return head_dim


class MergePolicy(ABC):
    """Folds evicted tokens into kept neighbours instead of dropping them (KVMerger)."""

    name: str = "abstract"

    @abstractmethod
    def merge(
        self, keys: Tensor, values: Tensor, kept: list[Tensor], *, lengths: Tensor | None = None
    ) -> tuple[list[Tensor], list[Tensor]]:
        """keys, values: [B, Hkv, T, D]; kept: per-head sorted kept indices.

        Returns (keys, values) as lists over heads of Tensor[B, len(kept[h]), D]: row i is the
        (possibly merged) state of token ``kept[h][i]``. Same dtype as the input.
        """


class LayerBudget(ABC):
    """Splits a model-wide token budget over layers."""

    name: str = "abstract"

    @abstractmethod
    def split(self, total_tokens: int, n_layers: int) -> list[int]:
        """Per-layer token budgets, non-negative ints summing exactly to ``total_tokens``."""


def check_split_args(total_tokens: int, n_layers: int) -> None:
    if not isinstance(total_tokens, int) or total_tokens < 0:
        raise PolicyError(f"total_tokens must be an int >= 0, got {total_tokens!r}")
    if not isinstance(n_layers, int) or n_layers < 1:
        raise PolicyError(f"n_layers must be an int >= 1, got {n_layers!r}")


def largest_remainder(weights: Sequence[float], total: int) -> list[int]:
    """Integer apportionment of ``total`` proportional to non-negative ``weights`` (sums exactly)."""
    w = torch.as_tensor(list(weights), dtype=torch.float64)
    if (w < 0).any() or not torch.isfinite(w).all():
        raise PolicyError(f"weights must be finite and >= 0, got {list(weights)}")
    if float(w.sum()) == 0.0:
        w = torch.ones_like(w)
    exact = w / w.sum() * total
    base = torch.floor(exact).long()
    rest = total - int(base.sum())
    if rest > 0:
        # stable: earlier entries win ties
        frac = exact - base.double()
        order = torch.argsort(frac, descending=True, stable=True)
        base[order[:rest]] += 1
    return [int(x) for x in base]
