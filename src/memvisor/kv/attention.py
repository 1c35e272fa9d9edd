"""Attention over ragged, possibly quantized per-head storage (the torch path, CPU and GPU).

For decode steps the history of each KV head is read ``block`` tokens at a time (dequantized per block
for KIVI storage) with an online softmax (running max ``m``, normaliser ``l``, accumulator ``acc``, as
in FlashAttention), so a decode step never materialises the whole history in floating point.

Masking is computed here from storage indices, not from transformers' mask: heads and layers may
hold different token counts after eviction, which one shared mask cannot describe. Rules, for the
``Tq`` newest stored tokens being this forward's own (query ``i`` at absolute position ``q_pos[i]``):
- causal: query ``i`` sees stored index ``j`` iff ``j <= n - Tq + i``;
- sliding window ``w``: additionally ``pos[j] > q_pos[i] - w`` (the token's absolute position).
Padding of a batch (left-padded prompts) is not supported on this path: use batch rows of equal
length.

A forward of many queries (a prefill block: ``Tq >= DENSE_MIN_QUERIES``, no softcap) instead reads the
history once, dequantized in the query's dtype, and runs ``scaled_dot_product_attention`` with the same
masks (:func:`sdpa_attention`; one call for heads of equal layout, one per KV head when they are ragged):
the block loop's float32 products cost ~8x a bf16 SDPA on the CPU (`scripts/kv_sdpa_probe.py`), and its per-query saving (never holding
the history in floating point) does not matter when hundreds of queries share one read. The price is
transient: one layer's dequantized history (twice for a moment, while the blocks are joined) and a
boolean mask, freed before the next layer runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from memvisor.kv.blocks import iter_blocks
from memvisor.kv.storage import HeadStore, StackedHeads


def default_block(device: torch.device) -> int:
    """Tokens per block of the decode loop when the cache does not say. Each block costs ~25 torch ops: on
    the CPU they are cheap and a small block bounds the float32 copy a step holds; on a GPU each op is a
    kernel launch, so 32k tokens in 1,024-token blocks spent most of a step launching (Llama-3.1-8B shape,
    H200, 32 layers, KIVI-4: 619 ms a step at 1,024, 84 ms at 16,384, 85 ms at 65,536;
    ``scripts/kv_gpu_block_size.py``). 16,384 tokens of 8 heads of 128 are 64 MiB of float32 keys, and as
    much for values, per layer, for one step."""
    return 16384 if device.type == "cuda" else 1024


# From this many queries per forward, attention reads the dequantized history once (see the module
# docstring). Decode steps (1 query) and short appends stay block-wise.
DENSE_MIN_QUERIES = 64


def head_attention(q: Tensor, store: HeadStore | StackedHeads, q_pos: Tensor, scaling: float,
                   window: int | None = None, softcap: float | None = None, block: int = 1024,
                   with_probs: bool = False) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """Attention of query groups over what ``store`` holds.

    q: [B, H, g, Tq, D] (H KV heads, g query heads each; H == 1 for a single :class:`HeadStore`),
    q_pos: LongTensor[Tq] absolute positions, scaling: multiplier of q.k (1/sqrt(D) usually).
    Returns float32 [B, H, g, Tq, D]; ``with_probs``: also the softmax rows averaged over each query
    group, float32 [B, H, Tq, n] (n stored tokens; zeros where masked), and the keys each row could see,
    LongTensor[H, Tq] (what ``policies._attention.group_attention`` yields, for ``observe_probs``). They
    come from the blocks' exponentials rescaled to the final maximum: B x H x g x Tq x n floats more, kept
    until the end of the call (about twice that for a moment, while the blocks are joined).
    """
    B, H, g, Tq, D = q.shape
    single = isinstance(store, HeadStore)
    qf = q.float().reshape(B, H, g * Tq, D) * scaling  # scale once, not every block of scores
    n = len(store)
    first_new = n - Tq  # storage index of query 0's own token
    m = torch.full((B, H, g * Tq), float("-inf"), device=q.device)
    l = torch.zeros(B, H, g * Tq, device=q.device)
    acc = torch.zeros(B, H, g * Tq, store.D, device=q.device)
    qi = torch.arange(Tq, device=q.device)
    start = 0
    blocks: list[tuple[Tensor, Tensor]] = []  # with_probs: each block's exponentials and the max they used
    seen = torch.zeros(H, g * Tq, dtype=torch.long, device=q.device) if with_probs else None
    for k, v, pos in store.blocks(block) if single else iter_blocks(store, block):
        if single:
            k, v = k.unsqueeze(1), v.unsqueeze(1)
            pos = None if pos is None else pos.unsqueeze(0)
        nb = k.shape[-2]
        s = torch.matmul(qf, k.transpose(-1, -2))  # [B, H, g*Tq, nb], already scaled
        if softcap is not None:
            s = torch.tanh(s / softcap) * softcap
        allowed = None  # broadcastable to [H, Tq, nb]
        if start + nb > first_new + 1 and Tq > 1:  # block reaches this forward's own tokens
            j = torch.arange(start, start + nb, device=q.device)
            allowed = (j.unsqueeze(0) <= (first_new + qi).unsqueeze(1)).unsqueeze(0)
        if window is not None:
            if pos is None:
                raise ValueError("a sliding-window head must store token positions")
            w_ok = pos.unsqueeze(1) > (q_pos.view(1, Tq, 1) - window)  # [H, Tq, nb]
            allowed = w_ok if allowed is None else allowed & w_ok
        if allowed is not None:
            allowed = allowed.expand(H, Tq, nb).repeat(1, g, 1)  # rows ordered (group, query)
            s.masked_fill_(~allowed.unsqueeze(0), float("-inf"))
        if with_probs:
            seen += nb if allowed is None else allowed.sum(-1)
        m_new = torch.maximum(m, s.amax(-1))
        # Rows with nothing visible yet keep m = -inf: shift by 0 there to avoid inf - inf.
        shift = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        p = s.sub_(shift.unsqueeze(-1)).exp_()
        if with_probs:
            blocks.append((p, m_new))
        corr = torch.exp(m - shift)
        l = l * corr + p.sum(-1)
        acc = acc * corr.unsqueeze(-1) + torch.matmul(p, v)
        m = m_new
        start += nb
    out = acc / l.clamp_min(1e-30).unsqueeze(-1)
    out = out.reshape(B, H, g, Tq, store.D)
    if not with_probs:
        return out
    norm = l.clamp_min(1e-30)
    # A block's row that saw nothing (its max -inf) holds zeros: scale it by 0, not by exp(inf).
    probs = torch.cat([p * torch.where(torch.isinf(mb), torch.zeros_like(mb), torch.exp(mb - m) / norm).unsqueeze(-1)
                       for p, mb in blocks], -1) if blocks else torch.zeros(B, H, g * Tq, 0, device=q.device)
    return out, probs.view(B, H, g, Tq, -1).mean(2), seen.view(H, g, Tq)[:, 0]


def sdpa_attention(query: Tensor, store: HeadStore | StackedHeads, q_pos: Tensor, scaling: float,
                   window: int | None = None, block: int = 1024) -> Tensor:
    """Attention of many queries over what ``store`` holds, in one SDPA call (no softcap).

    query: [B, Hq, Tq, D] in the model's dtype, Hq a multiple of the store's KV heads (1 for a single
    :class:`HeadStore`); q_pos: LongTensor[Tq]. The history is dequantized ``block`` tokens at a time
    into one [B, Hkv, n, D] tensor of the query's dtype; masks follow the module docstring's rules.
    Returns [B, Hq, Tq, D] in the query's dtype (scores accumulate in float32 inside SDPA)."""
    B, Hq, Tq, D = query.shape
    single = isinstance(store, HeadStore)
    ks, vs, ps = [], [], []
    for k, v, pos in store.blocks(block, query.dtype) if single else iter_blocks(store, block, query.dtype):
        ks.append(k.unsqueeze(1) if single else k)
        vs.append(v.unsqueeze(1) if single else v)
        if pos is not None:
            ps.append(pos.unsqueeze(0) if single else pos)
    k, v = torch.cat(ks, -2), torch.cat(vs, -2)  # [B, Hkv, n, D]
    n, Hkv = k.shape[-2], k.shape[1]
    j = torch.arange(n, device=query.device)
    allowed = j.unsqueeze(0) <= (n - Tq + torch.arange(Tq, device=query.device)).unsqueeze(1)  # [Tq, n]
    if window is not None:
        if not ps:
            raise ValueError("a sliding-window head must store token positions")
        pos = torch.cat(ps, -1)  # [Hkv, n]
        in_window = pos.unsqueeze(1) > (q_pos.view(1, Tq, 1) - window)  # [Hkv, Tq, n]
        # [1, Hq, Tq, n]: the CPU's fused kernel takes 2-D or 4-D masks only (a 3-D one falls back to the
        # math kernel, ~5x slower on a Gemma 3 sliding layer's prefill block: `scripts/kv_sdpa_probe.py`).
        allowed = (allowed.unsqueeze(0) & in_window).repeat_interleave(Hq // Hkv, 0).unsqueeze(0)
    return F.scaled_dot_product_attention(query, k, v, attn_mask=allowed, scale=scaling, enable_gqa=Hq != Hkv)


def layer_attention(query: Tensor, stores: list[HeadStore], q_pos: Tensor, scaling: float,
                    window: int | None = None, softcap: float | None = None, block: int = 1024,
                    with_probs: bool = False) -> Tensor | tuple[Tensor, Tensor | None, Tensor | None]:
    """query: [B, Hq, Tq, D]; stores: one per KV head (Hkv = len(stores), Hq % Hkv == 0).

    Heads of equal length and key-group layout are processed together (one pass); ragged heads
    one by one. ``Tq >= DENSE_MIN_QUERIES`` without softcap goes through :func:`sdpa_attention`.
    Returns attn_output [B, Tq, Hq, D] in the query dtype (the layout transformers'
    attention functions return); ``with_probs``: ``(out, probs, n_visible)`` as :func:`head_attention`
    gives them, probs float32 [B, Hkv, Tq, T] zero-padded to the longest head, or ``(out, None, None)``
    where SDPA ran (it does not return its probabilities)."""
    B, Hq, Tq, D = query.shape
    Hkv = len(stores)
    if Hq % Hkv:
        raise ValueError(f"{Hq} query heads are not a multiple of {Hkv} KV heads")
    g = Hq // Hkv
    stacked = Hkv > 1 and StackedHeads.compatible(stores)
    if Tq >= DENSE_MIN_QUERIES and softcap is None:
        if stacked or Hkv == 1:
            out = sdpa_attention(query, StackedHeads(stores) if stacked else stores[0], q_pos, scaling, window, block)
        else:
            out = torch.cat([sdpa_attention(query[:, h * g:(h + 1) * g], st, q_pos, scaling, window, block)
                             for h, st in enumerate(stores)], dim=1)
        out = out.transpose(1, 2).contiguous()
        return (out, None, None) if with_probs else out
    q5 = query.reshape(B, Hkv, g, Tq, D)
    if stacked:
        res = [head_attention(q5, StackedHeads(stores), q_pos, scaling, window, softcap, block, with_probs)]
    else:
        res = [head_attention(q5[:, h:h + 1], st, q_pos, scaling, window, softcap, block, with_probs)
               for h, st in enumerate(stores)]
    parts = [r[0] for r in res] if with_probs else res
    out = torch.cat(parts, dim=1).reshape(B, Hq, Tq, D).transpose(1, 2).to(query.dtype).contiguous()
    if not with_probs:
        return out
    T = max(r[1].shape[-1] for r in res)
    probs = torch.cat([F.pad(r[1], (0, T - r[1].shape[-1])) for r in res], dim=1)
    return out, probs, torch.cat([r[2] for r in res], dim=0)
