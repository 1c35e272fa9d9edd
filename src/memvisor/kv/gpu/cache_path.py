"""The compressed cache's decode step through the fused CUDA kernels.

Two paths. Append-only layers (below) read a stacked planes-layout mirror through the fastest kernel. Layers
that evict (a byte budget, StreamingLLM, SnapKV...) cannot hold a mirror's second copy under their budget:
while their heads stay alike (equal token counts and key groups), :func:`stacked_decode` runs the cache-layout
"dequant" kernel over the heads' own tensors, which :class:`HeadStack` keeps as views of stacked ones (no copy
per step), reading each token's key scale row from the group sizes eviction left (``KiviLayer.key_groups``).
Heads made ragged by per-head budgets or per-head token choices (SnapKV, Ada-KV budgets) take the torch path,
and so do H2O and Scissorhands, which take each step's attention probabilities from its loop.

The mirror path: a layer qualifies when it only ever appends (KIVI quantization with nothing else: no token
policy, byte budget, merging, channel pruning, full-precision sinks or sliding window, so its heads stay equal in
length and every key group whole) and the step is a single new token on CUDA with Triton, in fp16/bf16, without
a logit softcap, with head_dim and group powers of two >= 16 (the group dividing head_dim), and keys and values
of one bit width. What neither path takes (prefill blocks, ragged heads, sliding layers, the CPU) runs the
block-by-block torch path of :mod:`memvisor.kv.attention`.

The kernel reads a layer's heads stacked (``[B, Hkv, ...]``), which the per-head
:class:`~memvisor.kv.storage.HeadStore` objects are not. :class:`DecodeMirror` keeps that stacked copy
in step with the heads, in the layout the kernel reads: the planes layout (planes.py), for 2- and 4-bit
caches. It is updated when groups are quantized, by the new groups only (plus the rest of a part-filled
tile), never the history.
It is an extra copy: the HeadStores stay the cache's storage (every other path reads them), and the
layer counts the mirror's bytes in ``nbytes()``.

Decode steps append their token through :meth:`DecodeMirror.append`: the heads' full-precision residuals
are views of one stacked buffer ``[B, H, cap, D]``, so a step costs one copy per tensor instead of a
concatenation per head, and the kernel reads the buffer without stacking the heads (32 Llama layers: 576
of a step's 672 CUDA kernels were those concatenations and stacks; 128 kernels now). A flush gives the heads
fresh residual tensors; the next append stacks them into the buffer again.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

from memvisor.kv.gpu.layout import KiviLayer
from memvisor.kv.gpu.planes import SLOTS, PlanesLayer, to_planes
from memvisor.kv.storage import HeadStore, QuantConfig, StackedHeads


def _pow2(n: int) -> bool:
    return n >= 16 and n & (n - 1) == 0


def _kernel_step(stores: list[HeadStore], query: Tensor, window: int | None, softcap: float | None) -> bool:
    """What both fused paths need of a decode step: one new token on CUDA with Triton, no sliding window,
    softcap or pruned key channels, keys and values of one width, head_dim a power of two >= 16, and
    fp16/bf16 queries in the cache's dtype. query: [B, Hq, Tq, D]."""
    from memvisor.kv.gpu import triton_available

    q, st = stores[0].q, stores[0]
    return (query.shape[2] == 1 and query.is_cuda and window is None and softcap is None and q.vbits == q.bits
            and _pow2(st.D) and query.dtype in (torch.float16, torch.bfloat16) and st.dtype == query.dtype
            and all(s.channels is None for s in stores) and triton_available())


def kernel_applies(stores: list[HeadStore], query: Tensor, window: int | None, softcap: float | None) -> bool:
    """Whether this decode step of an append-only KIVI layer can run the fused kernel (module docstring):
    :func:`_kernel_step`, quantized, no sinks, a power-of-two group dividing head_dim. query: [B, Hq, Tq, D]."""
    q, D = stores[0].q, stores[0].D
    return (_kernel_step(stores, query, window, softcap) and q.bits is not None and q.sinks == 0
            and _pow2(q.group) and D % q.group == 0)


def stacked_kernel_applies(stores: list[HeadStore], query: Tensor, window: int | None, softcap: float | None) -> bool:
    """Whether this decode step of a layer that evicts can run :func:`stacked_decode`: :func:`_kernel_step`
    (quantized or not), and heads that stack (equal counts and key groups). query: [B, Hq, Tq, D]."""
    return _kernel_step(stores, query, window, softcap) and StackedHeads.compatible(stores)


class HeadStack:
    """A layer's heads' tensors held as views of one stacked tensor per name (``[B, H, ...]``), so a decode step
    reads them stacked without copying them, and appends its token to every head's residual in one copy.

    A name is stacked once (one copy), then each head's tensor IS ``base[:, h]``: no byte is held twice, and
    ``nbytes()`` of the heads still counts every byte. A head that replaces its tensor (a flush, an eviction)
    breaks the identity check, and the next read stacks that name again (every ~10-100 decode steps). Only weak
    references are kept: a stacked tensor the heads no longer use is freed at once, not at the next read."""

    def __init__(self) -> None:
        # name -> (weak references to the heads' views, the stacked shape and strides)
        self.held: dict[str, tuple[list[weakref.ref], torch.Size, tuple[int, ...]]] = {}

    def stacked(self, stores: list[HeadStore], name: str) -> Tensor:
        """``[B, H, ...]``: the heads' tensor ``name`` stacked on axis 1 (a view of what they hold)."""
        held = self.held.get(name)
        if held is not None:
            refs, shape, stride = held
            first = getattr(stores[0], name)
            if len(refs) == len(stores) and all(getattr(st, name) is r() for st, r in zip(stores, refs)):
                # the heads' views are alive, so their stacked storage is: view it whole again
                return first.as_strided(shape, stride, first.storage_offset())
        base = torch.stack([getattr(st, name) for st in stores], 1)
        self._adopt(stores, name, base)
        return base

    def append(self, stores: list[HeadStore], k: Tensor, v: Tensor) -> None:
        """One decode step's token, k, v ``[B, H, 1, D]``, into every head's residual (what
        ``HeadStore.append(..., flush=False)`` does per head): one concatenation per tensor, not one per head.
        The heads' residuals must be of one length."""
        for name, x in (("k_res", k), ("v_res", v)):
            self._adopt(stores, name, torch.cat([self.stacked(stores, name), x.to(stores[0].dtype)], 2))

    def _adopt(self, stores: list[HeadStore], name: str, base: Tensor) -> None:
        views = base.unbind(1)
        for st, view in zip(stores, views):
            setattr(st, name, view)
        self.held[name] = ([weakref.ref(v) for v in views], base.shape, base.stride())


def stacked_decode(query: Tensor, stores: list[HeadStore], scaling: float, stack: HeadStack) -> Tensor:
    """query [B, Hq, 1, D] -> attention output [B, 1, Hq, D] in the query dtype, through one kernel launch
    (and its combine) over heads that :func:`stacked_kernel_applies` accepted, read through ``stack``.

    Full-precision sinks join the residual: a decode query sees every stored token, so their order does not
    matter. Unquantized heads run the bf16 flash-decoding kernel."""
    from memvisor.kv.gpu.triton_decode import dense_decode_attention_triton, kivi_decode_attention

    q, st0 = stores[0].q, stores[0]
    k_full, v_full = stack.stacked(stores, "k_res"), stack.stacked(stores, "v_res")
    if st0.ns:
        k_full = torch.cat([stack.stacked(stores, "k_sink"), k_full], 2)
        v_full = torch.cat([stack.stacked(stores, "v_sink"), v_full], 2)
    q1 = query[:, :, 0].contiguous()
    if q.bits is None:
        return dense_decode_attention_triton(q1, k_full.contiguous(), v_full.contiguous(), scaling).unsqueeze(1)
    names = ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero")
    k_codes, k_scale, k_zero, v_codes, v_scale, v_zero = (stack.stacked(stores, n) for n in names)
    # every group whole (k_scale holds nq / G rows) unless eviction cut some: then each token's row, int32
    whole = k_scale.shape[2] * q.group == st0.nq
    groups = None if whole else st0.group_of_tokens(0, st0.nq).to(torch.int32)
    layer = KiviLayer(q.bits, q.group, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_full, v_full, groups)
    return kivi_decode_attention(q1, layer, scaling, variant="dequant").unsqueeze(1)


class DecodeMirror:
    """Stacked planes-layout copy of one append-only layer's quantized tokens (all heads).

    Buffers hold ``cap`` tiles of ``S G`` tokens (``S = 16 // bits``; grown by a quarter when full, the old
    content copied once), zero-filled past the quantized tokens. Per buffer: name -> (tensor, token axis,
    entries per tile): ``kw, vw int16 [B, H, cap*G, D]``, ``ks, kz fp16 [B, H, cap*S, D]``,
    ``vsz fp16 [B, H, D/G, cap*S*G, 2]`` (planes.py; the kernel reads the first ``t`` tokens).
    Residual: ``rk, rv [B, H, cap_r, D]`` in the model dtype, whose first ``nr`` token slots are the heads'
    ``k_res`` / ``v_res`` between flushes (:meth:`append`).
    """

    def __init__(self, q: QuantConfig) -> None:
        self.q = q
        self.slots = SLOTS[q.bits]
        self.tile = self.slots * q.group
        self.t = 0  # quantized tokens mirrored
        self.cap = 0
        self.bufs: dict[str, tuple[Tensor, int, int]] = {}
        self.rk: Tensor | None = None  # stacked residual [B, H, cap, D]: the heads' k_res / v_res are views
        self.rv: Tensor | None = None
        self.views: list[tuple[Tensor, Tensor]] = []  # the (k_res, v_res) views handed to each head

    def nbytes(self, stores: list[HeadStore]) -> int:
        """The planes buffers, plus the residual buffer's slots that the heads' views do not cover."""
        n = sum(t.numel() * t.element_size() for t, _, _ in self.bufs.values())
        if self.rk is not None:
            spare = self.rk.shape[2] - (stores[0].nr if self._ours(stores) else 0)
            n += 2 * spare * self.rk[:, :, :1].numel() * self.rk.element_size()
        return n

    def _ours(self, stores: list[HeadStore]) -> bool:
        """Whether every head's residual is still the view this mirror handed it (a flush replaces it)."""
        return len(self.views) == len(stores) and all(
            st.k_res is k and st.v_res is v for st, (k, v) in zip(stores, self.views))

    def append(self, stores: list[HeadStore], k: Tensor, v: Tensor) -> None:
        """One decode step's token, k, v ``[B, H, 1, D]``, into every head's residual (what
        ``HeadStore.append(..., flush=False)`` does per head), as one copy per tensor."""
        n = stores[0].nr
        ours = self.rk is not None and self._ours(stores)
        if self.rk is None or n >= self.rk.shape[2]:
            st0 = stores[0]
            cap = n + 1 + self.q.group + self.q.residual  # a flush every G steps re-stacks before this fills
            shape = (st0.B, len(stores), cap, st0.D)
            self.rk = torch.empty(shape, dtype=st0.dtype, device=st0.device)
            self.rv = torch.empty(shape, dtype=st0.dtype, device=st0.device)
            ours = False
        if not ours and n:  # the heads hold their own residual tensors (a flush, or the first step)
            self.rk[:, :, :n].copy_(torch.stack([st.k_res for st in stores], 1))
            self.rv[:, :, :n].copy_(torch.stack([st.v_res for st in stores], 1))
        self.rk[:, :, n:n + 1].copy_(k)
        self.rv[:, :, n:n + 1].copy_(v)
        # one narrow and one unbind per tensor (per-head slicing cost ~5 us a call on the H200's host)
        self.views = list(zip(self.rk.narrow(2, 0, n + 1).unbind(1), self.rv.narrow(2, 0, n + 1).unbind(1)))
        for st, (kr, vr) in zip(stores, self.views):
            st.k_res, st.v_res = kr, vr

    def sync(self, stores: list[HeadStore]) -> bool:
        """Copy in the groups quantized since the last call (from each head's cache-layout tensors); whether
        anything was copied (then the copies may still be in flight when the kernel starts)."""
        n = stores[0].nq
        if any(st.nq != n for st in stores):
            raise RuntimeError("heads of an append-only layer differ in quantized tokens")
        if n < self.t:  # the layer was emptied and refilled: start over
            self.t = 0
        if n == self.t and self.bufs:
            return False
        G, per = self.q.group, 8 // self.q.bits
        t0 = self.t // self.tile * self.tile  # rewrite a part-filled tile
        ranges = (("k_codes", t0 // per, n // per), ("k_scale", t0 // G, n // G), ("k_zero", t0 // G, n // G),
                  ("v_codes", t0, n), ("v_scale", t0, n), ("v_zero", t0, n))
        new = [torch.stack([getattr(st, name).narrow(1, a, b - a) for st in stores], 1) for name, a, b in ranges]
        empty = torch.stack([st.k_res[:, :0] for st in stores], 1)  # no residual in a chunk
        p = to_planes(KiviLayer(self.q.bits, G, *new, empty, empty))
        parts = {"kw": p.kw, "ks": p.ks, "kz": p.kz, "vw": p.vw, "vsz": p.vsz}
        self._grow(-(-n // self.tile), parts)
        for name, x in parts.items():
            buf, axis, per_tile = self.bufs[name]
            buf.narrow(axis, t0 * per_tile // self.tile, x.shape[axis]).copy_(x)
        self.t = n
        return True

    def _grow(self, tiles: int, like: dict[str, Tensor]) -> None:
        if tiles <= self.cap and self.bufs:
            return
        cap = max(tiles, self.cap + max(4, self.cap // 4), 1)
        G = self.q.group
        per_tile = {"kw": G, "vw": G, "ks": self.slots, "kz": self.slots, "vsz": self.tile}
        new = {}
        for name, x in like.items():
            axis = 3 if name == "vsz" else 2
            shape = list(x.shape)
            shape[axis] = cap * per_tile[name]
            t = torch.zeros(shape, dtype=x.dtype, device=x.device)
            if name in self.bufs:
                old, _, _ = self.bufs[name]
                t.narrow(axis, 0, old.shape[axis]).copy_(old)
            new[name] = (t, axis, per_tile[name])
        self.bufs, self.cap = new, cap

    def layer(self, stores: list[HeadStore]) -> PlanesLayer:
        """What the kernel reads now: the mirrored groups plus the heads' residual, stacked."""
        if self.rk is not None and self._ours(stores):  # views of the stacked residual: no copy
            n = stores[0].nr
            k_res, v_res = self.rk[:, :, :n], self.rv[:, :, :n]
        else:
            k_res = torch.stack([st.k_res for st in stores], 1)
            v_res = torch.stack([st.v_res for st in stores], 1)
        b = {name: t for name, (t, _, _) in self.bufs.items()}
        return PlanesLayer(self.q.bits, self.q.group, self.t, b["kw"], b["ks"], b["kz"], b["vw"], b["vsz"],
                           k_res, v_res)

    def attend(self, query: Tensor, stores: list[HeadStore], scaling: float) -> Tensor:
        """query [B, Hq, 1, D] -> attention output [B, 1, Hq, D] in the query dtype, through the kernel."""
        from memvisor.kv.gpu import decode_attention

        wrote = self.sync(stores)
        # the kernel copies its first planes before the kernels just before it end (a programmatic dependent
        # launch, pdl.py): not in a step whose copies above wrote them
        out = decode_attention(query[:, :, 0].contiguous(), self.layer(stores), sm_scale=scaling, use_triton=True,
                               pdl=False if wrote else None)
        return out.unsqueeze(1)
