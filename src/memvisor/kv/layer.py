"""One layer of the compressed cache, free of transformers: storage, eviction, attention.

A forward through one attention layer calls, in order (the adapter wires these to transformers):
1. :meth:`LayerCore.update` with the forward's new keys/values ``[B, Hkv, Tq, D]`` (post-RoPE);
2. :meth:`LayerCore.attend` with the queries ``[B, Hq, Tq, D]``: attention over the stored tokens
   (block-wise for decode steps, SDPA for prefill blocks: ``kv/attention.py``), then the
   policy observes the queries, tokens that left a sliding window are dropped, the layer is
   compressed to its budget, and full groups of the residual are quantized.

"Passthrough" layers (no quantization, no budget, no policy) store full precision tensors and
``update`` returns the whole history like transformers' DynamicLayer / DynamicSlidingWindowLayer,
so the model's own attention runs on bit-identical inputs.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from memvisor.kv import cpu as cpu_decode
from memvisor.kv.attention import default_block, layer_attention
from memvisor.kv.budget import BudgetError, BudgetWarning, TokenCost, token_cost
from memvisor.kv.gpu.cache_path import (DecodeMirror, HeadStack, kernel_applies, ragged_decode, ragged_kernel_applies,
                                        stacked_decode, stacked_kernel_applies)
from memvisor.kv.policies.base import ChannelPolicy, HeadBudget, MergePolicy, TokenPolicy, select
from memvisor.kv.storage import HeadStore, QuantConfig


# Decode evicts at least this share of a head's token capacity below the cap each time it evicts (``compress``).
SLACK_SHARE = 64


@dataclass
class LayerConfig:
    """Everything one layer needs. window: sliding window (tokens) or None for full attention;
    budget_bytes: byte cap of the layer between forwards (None = unbounded); slack: head-tokens
    evicted below the cap each time the cap is hit, so eviction runs every ``slack`` decode steps
    rather than every step (at least 1/:data:`SLACK_SHARE` of the cap unless 0: see ``compress``);
    block: tokens per block of the attention loop (and of the dequantization before a prefill block's
    SDPA call), None: ``attention.default_block`` of the cache's device; fused_decode: decode steps
    run a fused kernel where the layer qualifies: numba on the CPU (kv.cpu), Triton on CUDA (kv.gpu.cache_path)."""

    layer_idx: int
    window: int | None
    qcfg: QuantConfig
    policy: TokenPolicy | None = None
    head_budget: HeadBudget | None = None
    merge: MergePolicy | None = None
    channel: ChannelPolicy | None = None
    budget_bytes: int | None = None
    slack: int = 32
    block: int | None = None
    fused_decode: bool = True


class LayerCore:
    def __init__(self, cfg: LayerConfig) -> None:
        self.cfg = cfg
        self.stores: list[HeadStore] | None = None
        self._dense: tuple[Tensor, Tensor] | None = None  # passthrough: the layer's [B, Hkv, T, D] k, v
        self.cum = 0  # tokens seen so far = absolute position of the next token
        self.passthrough = (cfg.qcfg.bits is None and cfg.budget_bytes is None and cfg.policy is None
                            and cfg.merge is None and cfg.channel is None)
        self.cost: TokenCost | None = None
        self._pending: tuple[int, int] | None = None  # (Tq, first position) of the current forward
        self._warned_protected = False  # BudgetWarning given once a layer (a budget below the protected tokens)
        self.evictions = 0
        # Stacked kernel-layout copy of the quantized groups, made at the first fused decode step.
        self.mirror: DecodeMirror | None = None
        # Layers that evict, on the stacked kernel path: the heads' tensors as views of stacked ones (no copy).
        self.stack: HeadStack | None = None
        # The stack that asks whether the heads stack (adopted as ``stack`` when they do): kept between steps, so it
        # remembers which key groups it compared.
        self.probe = HeadStack()
        # Called as observer(layer_idx, bytes_before_compression, bytes_after) after each forward.
        self.observer = None

    # ------------------------------------------------------------------ state
    def init(self, key_states: Tensor) -> None:
        B, Hkv, _, D = key_states.shape
        track = self.cfg.window is not None and not self.passthrough
        self.stores = [HeadStore(B, D, key_states.dtype, key_states.device, self.cfg.qcfg, track)
                       for _ in range(Hkv)]
        q = self.cfg.qcfg
        key_dim = self.cfg.channel.keep_count(D) if self.cfg.channel is not None else None
        self.cost = token_cost(B, D, key_states.element_size(), q.bits, q.group, q.residual + q.sinks, track,
                               key_dim, q.value_bits)

    @property
    def initialized(self) -> bool:
        return self.stores is not None

    def reset(self) -> None:
        self.stores, self.cum, self._pending, self._dense, self.mirror, self.stack = None, 0, None, None, None, None
        self.probe = HeadStack()
        if self.cfg.policy is not None:
            self.cfg.policy.reset()

    def nbytes(self) -> int:
        """Every stored tensor of the heads, the GPU mirror's copy, and the token policy's statistics."""
        if self.stores is None:
            return 0
        return (sum(s.nbytes() for s in self.stores) + (self.mirror.nbytes(self.stores) if self.mirror is not None else 0)
                + self.policy_bytes())

    def policy_bytes(self) -> int:
        return self.cfg.policy.nbytes() if self.cfg.policy is not None else 0

    def lengths(self) -> list[int]:
        return [] if self.stores is None else [len(s) for s in self.stores]

    def seq_length(self) -> int:
        """Tokens seen (not stored): what transformers uses to place the next token."""
        return self.cum

    def mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, kv_offset) for transformers' mask (used on the passthrough path only; the
        compressed path masks by itself, but the sizes stay consistent with what is stored)."""
        stored = max(self.lengths(), default=0)
        if self.cfg.window is not None and self.passthrough:
            w = self.cfg.window
            offset = max(self.cum - w + 1, 0)
            kv = (w - 1 if self.cum >= w else self.cum) + query_length
            return kv, offset
        return stored + query_length, self.cum - stored

    @property
    def batch_size(self) -> int | None:
        """Rows of the batch this layer holds (None before its first forward)."""
        return None if self.stores is None else self.stores[0].B

    @property
    def awaiting_attention(self) -> bool:
        """Whether a forward's tokens were stored and its :meth:`attend` has not run yet."""
        return self._pending is not None

    # ------------------------------------------------------------------ forward
    def update(self, key_states: Tensor, value_states: Tensor) -> tuple[Tensor, Tensor] | None:
        """Store a forward's new tokens ([B, Hkv, Tq, D]). Passthrough: returns the full (k, v)
        [B, Hkv, T, D] to attend. Compressed: returns None; :meth:`attend` must follow."""
        if self.stores is None:
            self.init(key_states)
        Tq = key_states.shape[2]
        first = self.cum
        self.cum += Tq
        if self.passthrough:
            return self._update_passthrough(key_states, value_states)
        self._pending = (Tq, first)
        if self.mirror is not None and Tq == 1:  # fused decode: one copy into the heads' stacked residual
            self.mirror.append(self.stores, key_states, value_states)
            return None
        if self.stack is not None and Tq == 1 and len({st.nr for st in self.stores}) == 1:
            self.stack.append(self.stores, key_states, value_states)
            return None
        pos = torch.arange(first, first + Tq, device=key_states.device) if self.stores[0].pos is not None else None
        for h, st in enumerate(self.stores):
            st.append(key_states[:, h], value_states[:, h], pos, flush=False)
        return None

    def _update_passthrough(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        # Same arithmetic as DynamicLayer / DynamicSlidingWindowLayer (so attention inputs are
        # bit-identical); each head's store holds a view of the layer's dense tensors.
        before = self.nbytes()
        old = self.stores[0]
        if len(old) == 0:
            full_k, full_v = k, v
        else:
            full_k = torch.cat([self._dense[0], k], dim=-2)
            full_v = torch.cat([self._dense[1], v], dim=-2)
        w = self.cfg.window
        kept_k, kept_v = (full_k, full_v) if w is None else (full_k[:, :, -w + 1:], full_v[:, :, -w + 1:])
        if w is not None and k.shape[-2] > 1 and full_k.shape[-2] > w - 1:
            # A view would keep the whole forward's tensor alive (4,000 prefilled tokens for a 512-token
            # window) while nbytes() counts the window: copy it. A decode step's view over-holds one token.
            kept_k, kept_v = kept_k.clone(), kept_v.clone()
        self._dense = (kept_k, kept_v)
        for h, st in enumerate(self.stores):
            st.set_residual(kept_k[:, h], kept_v[:, h])
        if self.observer is not None:
            self.observer(self.cfg.layer_idx, before + k.numel() * k.element_size() * 2, self.nbytes())
        return full_k, full_v

    def attend(self, query: Tensor, scaling: float, softcap: float | None = None) -> Tensor:
        """Attention of the pending forward's queries [B, Hq, Tq, D] -> [B, Tq, Hq, D]; then
        observe, drop out-of-window tokens, compress to budget, quantize full groups."""
        if self._pending is None:
            raise RuntimeError(f"layer {self.cfg.layer_idx}: attend() without a preceding update()")
        Tq, first = self._pending
        self._pending = None
        out, seen = None, None  # seen: (probs, n_visible) of this forward's attention, for a policy that takes them
        if Tq == 1 and self.cfg.fused_decode and cpu_decode.applies(self.stores, query):
            out, seen = self._cpu_decode(query, scaling, softcap, first)
        elif Tq == 1 and self.cfg.fused_decode:
            out = self._fused_decode(query, scaling, softcap)
        if out is None:
            q_pos = torch.arange(first, first + Tq, device=query.device)
            block = self.cfg.block or default_block(query.device)
            if self._hands_probs(scaling, softcap):
                out, probs, n_visible = layer_attention(query, self.stores, q_pos, scaling, self.cfg.window, softcap,
                                                        block, with_probs=True)
                seen = None if probs is None else (probs, n_visible)
            else:
                out = layer_attention(query, self.stores, q_pos, scaling, self.cfg.window, softcap, block)
        self._after_forward(query, seen)
        return out

    def _hands_probs(self, scaling: float, softcap: float | None) -> bool:
        """Whether the attention's own probabilities are the ones the policy would compute: it takes them,
        there is no softcap, and its logit scale (default 1/sqrt(D)) is the model's; otherwise ``observe``
        recomputes them (a model with another scale, e.g. a Gemma whose query_pre_attn_scalar is not D)."""
        pol = self.cfg.policy
        if pol is None or not pol.needs_queries or not pol.observes_probs or softcap is not None:
            return False
        own = getattr(pol, "scaling", None)
        return math.isclose(own if own is not None else self.stores[0].D ** -0.5, scaling, rel_tol=1e-6)

    def _cpu_decode(self, query: Tensor, scaling: float, softcap: float | None, q_pos: int
                    ) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """A quantized layer's decode step on the CPU through the numba kernel (kv/cpu/cache_path.py), every
        head (ragged or not); with the step's probabilities for a policy that takes them (H2O, Scissorhands)."""
        if not self._hands_probs(scaling, softcap):
            return cpu_decode.decode(query, self.stores, scaling, q_pos, self.cfg.window, softcap), None
        out, probs, n_visible = cpu_decode.decode(query, self.stores, scaling, q_pos, self.cfg.window, softcap,
                                                  with_probs=True)
        return out, (probs, n_visible)

    def _fused_decode(self, query: Tensor, scaling: float, softcap: float | None) -> Tensor | None:
        """One decode step through a fused CUDA kernel, or None where none applies (kv/gpu/cache_path.py):
        layers that never evict or prune read their stacked mirror; layers that evict, while their heads
        stack, read the heads' own tensors in one launch, and ragged heads in one launch too; policies that
        take this step's attention probabilities (H2O, Scissorhands) take the block-wise torch path."""
        c = self.cfg
        if self.mirror is not None:
            return self.mirror.attend(query, self.stores, scaling)
        append_only = c.policy is None and c.budget_bytes is None and c.merge is None and c.channel is None
        if append_only and kernel_applies(self.stores, query, c.window, softcap):
            self.mirror = DecodeMirror(c.qcfg)
            return self.mirror.attend(query, self.stores, scaling)
        if self._hands_probs(scaling, softcap):
            return None
        stack = self.stack or self.probe
        if stacked_kernel_applies(self.stores, query, c.window, softcap, stack):
            self.stack = stack  # kept once the layer takes the kernel (it also routes appends)
            return stacked_decode(query, self.stores, scaling, stack)
        if ragged_kernel_applies(self.stores, query, c.window, softcap):
            return ragged_decode(query, self.stores, scaling)
        return None

    # ------------------------------------------------------------------ compression
    def padded(self, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, Tensor]:
        """(keys, values) [B, Hkv, Tmax, D] dequantized and zero-padded, lengths LongTensor[Hkv]."""
        dense = [st.dense(dtype) for st in self.stores]
        lengths = torch.tensor([k.shape[1] for k, _ in dense], dtype=torch.long)
        T = int(lengths.max()) if len(lengths) else 0
        B, D = self.stores[0].B, self.stores[0].D

        def pad(x: Tensor) -> Tensor:
            return torch.nn.functional.pad(x, (0, 0, 0, T - x.shape[1]))

        keys = torch.stack([pad(k) for k, _ in dense], 1) if dense else torch.empty(B, 0, 0, D)
        values = torch.stack([pad(v) for _, v in dense], 1) if dense else torch.empty(B, 0, 0, D)
        return keys, values, lengths

    def shapes(self) -> tuple[Tensor, Tensor, Tensor]:
        """What :meth:`padded` returns, with no channels: keys and values [B, Hkv, Tmax, 0], lengths."""
        lengths = torch.tensor(self.lengths(), dtype=torch.long)
        T = int(lengths.max()) if len(lengths) else 0
        empty = torch.empty(self.stores[0].B, len(self.stores), T, 0)
        return empty, empty, lengths

    def _after_forward(self, query: Tensor, seen: tuple[Tensor, Tensor] | None = None) -> None:
        pol = self.cfg.policy
        if seen is not None:  # the attention's own probabilities: no second pass over the history
            pol.observe_probs(*seen, lengths=self._ragged_lengths())
        elif pol is not None and pol.needs_queries:
            self._observe(pol, query)
        before = self.nbytes() if self.observer is not None else 0
        if self.cfg.window is not None:
            self._drop_out_of_window()
        if self.cfg.channel is not None and self.stores[0].channels is None:
            self._choose_channels(query)
        # Quantize first: the budget is judged on what the layer will keep storing, not on a
        # prefill block still waiting in full precision.
        self._flush()
        if self.cfg.budget_bytes is not None:
            self.compress(added=query.shape[2])
            self._flush()
        if self.observer is not None:
            self.observer(self.cfg.layer_idx, before, self.nbytes())

    def _flush(self) -> None:
        """Quantize the heads' full residual groups (``HeadStore.flush``): on the stacked kernel path in one op
        over all heads (``HeadStack.flush``), else head by head."""
        if self.stack is None or not self.stack.flush(self.stores):
            for st in self.stores:
                st.flush()

    def _ragged_lengths(self) -> Tensor | None:
        """LongTensor[Hkv] of the heads' token counts when they differ (what policies take as ``lengths``)."""
        lengths = torch.tensor(self.lengths(), dtype=torch.long)
        return lengths if bool((lengths != lengths[0]).any()) else None

    def _observe(self, pol: TokenPolicy, query: Tensor) -> None:
        lengths = self._ragged_lengths()
        extra = {}
        if self.cfg.window is not None:
            T = max(self.lengths())
            pad = [torch.nn.functional.pad(st.positions(), (0, T - len(st)), value=-(1 << 40)) for st in self.stores]
            extra = {"positions": torch.stack(pad), "window": self.cfg.window}
        # Policies that read only the queries (SnapKV) get keys=None: no dequantized history.
        keys = self.padded()[0] if getattr(pol, "observe_uses_keys", True) else None
        pol.observe(query.float(), keys, lengths=lengths, **extra)

    def _choose_channels(self, query: Tensor, window: int = 32) -> None:
        """ThinK, once per layer (at its first forward): the newest ``window`` queries vote for the
        key channels every compressed token will keep; the residual stays full width."""
        keys, _, lengths = self.padded()
        if bool((lengths != lengths[0]).any()):
            keys = keys[:, :, : int(lengths.min())]  # score on the tokens every head holds
        D = self.stores[0].D
        ch = self.cfg.channel.keep_channels(query[:, :, -window:].float(), keys, self.cfg.channel.keep_count(D))
        for st, c in zip(self.stores, ch):
            st.set_channels(c)

    def _drop_out_of_window(self) -> None:
        # Future queries sit at positions >= cum, so a token at p <= cum - window is never seen again.
        limit = self.cum - self.cfg.window
        kept = [torch.nonzero(st.positions() > limit).flatten() for st in self.stores]
        if all(len(k) == len(st) for k, st in zip(kept, self.stores)):
            return
        self._apply_keep(kept, merge=False)

    def head_caps(self, after_eviction: bool = True) -> int:
        """Head-tokens per head that fit ``budget_bytes`` (uniform split over heads), counting the
        full-precision residual and sinks the heads hold now (eviction never grows them) and the policy's
        statistics as they will be once the heads hold that many (per-token ones shrink with eviction: counted
        as they were before, Scissorhands' 32 query rows of hits left a third of its budget unused).
        ``after_eviction=False``: the statistics as they are now, one step instead of a search (a lower bound,
        enough to tell that nothing needs evicting)."""
        H, residual = len(self.stores), max(st.nr + st.ns for st in self.stores)

        def fits(n: int | None) -> int:  # tokens a head can hold with the statistics of n tokens a head (None: now)
            pol = self.cfg.policy
            state = 0 if pol is None else pol.nbytes() if n is None else pol.state_bytes(n)
            return self.cost.capacity(max(self.cfg.budget_bytes - state, 0) / H, residual=residual)

        if not after_eviction:
            return fits(None)
        lo, hi = 0, fits(0)  # largest n with fits(n) >= n; fits only falls as n grows
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(mid) >= mid else (lo, mid - 1)
        return lo

    def compress(self, force: bool = False, added: int | None = None) -> None:
        """Evict down to the byte budget when it is exceeded (``force``: evict whenever any token
        is over the cap, ignoring the slack hysteresis; ``added``: tokens the forward just stored)."""
        if self.cfg.budget_bytes is None or self.stores is None:
            return
        state = self.cfg.policy.state_bytes(0) if self.cfg.policy is not None else 0  # what no eviction frees
        if state >= self.cfg.budget_bytes:
            raise BudgetError(f"layer {self.cfg.layer_idx}: the {self.cfg.policy.name} policy keeps {state:,} bytes of "
                              f"statistics, more than the layer's budget of {self.cfg.budget_bytes:,}: raise "
                              "budget_bytes or choose a policy that keeps less (StreamingLLM keeps none)")
        Hkv = len(self.stores)
        total = sum(self.lengths())
        if total <= self.head_caps(after_eviction=False) * Hkv and self.nbytes() <= self.cfg.budget_bytes:
            return
        cap = self.head_caps()
        # Hysteresis: evict a little below the cap so decode does not evict every step; never
        # more than a quarter of the cap (small budgets would otherwise lose most of their tokens).
        # A forward of more than ``slack`` tokens (a prefill block) evicts at every forward anyway:
        # no slack there, so a prefilled cache sits at its budget instead of ``slack`` below it.
        # An eviction re-packs the whole history (O(n)), so the slack grows with the cap: evicting a fixed share
        # keeps eviction's cost per decode step flat as the history grows (Llama-3.1-8B shape on an H200, 32k tokens
        # at 4x: 32 head-tokens meant one 18 ms eviction every 8 layer-steps, most of a step). It costs at most
        # 1/SLACK_SHARE of the kept tokens just after an eviction; below SLACK_SHARE x slack tokens a head (2,048 at
        # the default 32) the fixed slack rules.
        bulk = added is not None and added > self.cfg.slack
        share = max(self.cfg.slack, cap // SLACK_SHARE) if self.cfg.slack else 0
        slack = 0 if force or bulk else min(share, cap // 4)
        target = max(cap - slack, 0) * Hkv
        for _ in range(8):  # partial key groups after eviction can cost more than estimated: re-check
            self._evict_to(target)
            excess = self.nbytes() - self.cfg.budget_bytes
            if excess <= 0 or target == 0:
                break
            target = max(target - Hkv * (int(excess // self.cost.q) + 1), 0)

    def _evict_to(self, target: int) -> None:
        """Keep ``target`` head-tokens in all (policy scores; newest first when no policy)."""
        pol = self.cfg.policy
        if self.cfg.merge is not None or (pol is not None and pol.scores_use_kv):
            keys, values, lengths = self.padded()
        else:  # the scores read only shapes: no dequantized copy of the history (StreamingLLM, H2O)
            keys, values, lengths = self.shapes()
        T = keys.shape[2]
        Hkv = len(self.stores)
        ragged = bool((lengths != lengths[0]).any())
        lens = lengths if ragged else None
        if pol is not None:
            scores = pol.scores(keys, values, lengths=lens)
            protected = pol.protected_mask(T, lens, Hkv)  # alike heads: one mask, not one per head
        else:  # no policy: keep the most recent tokens of each head
            scores = torch.arange(T, dtype=torch.float32).expand(keys.shape[0], Hkv, T).clone()
            scores[:, torch.arange(T).unsqueeze(0) >= lengths.unsqueeze(1)] = float("-inf")
            protected = torch.zeros(Hkv, T, dtype=torch.bool)
        if self.cfg.head_budget is not None:
            budget = self.cfg.head_budget.split(scores, protected, target, lengths=lens)
        else:
            budget = torch.full((Hkv,), target // Hkv, dtype=torch.long)
        if pol is not None and not self._warned_protected and bool((budget < protected.sum(-1)).any()):
            self._warned_protected = True  # one message for every layer (the warnings filter shows it once)
            warnings.warn(f"the byte budget leaves a head fewer tokens than the {pol.name} policy protects (its sinks "
                          "and recent window): the lowest-scored protected tokens are evicted too; raise budget_bytes "
                          "or protect fewer", BudgetWarning, stacklevel=2)
        kept = select(scores, protected, budget, lengths=lens)
        self._apply_keep(kept, merge=True, dense=(keys, values, lens))
        self.evictions += 1

    def _apply_keep(self, kept: list[Tensor], merge: bool, dense=None) -> None:
        if merge and self.cfg.merge is not None:
            keys, values, lens = dense
            mk, mv = self.cfg.merge.merge(keys, values, kept, lengths=lens)
            for st, idx, k, v in zip(self.stores, kept, mk, mv):
                pos = None if st.pos is None else st.pos[idx.to(st.pos.device)]
                st.replace(k, v, pos, sinks_kept=int((idx < st.ns).sum()))
        else:
            # on the stacked kernel path heads that keep the same tokens evict in one op (HeadStack.keep)
            if self.stack is None or not self.stack.keep(self.stores, kept):
                for st, idx in zip(self.stores, kept):
                    st.keep(idx)
            for st in self.stores:
                st.compact()
        if self.cfg.policy is not None:
            self.cfg.policy.on_evict(kept)
