"""The compressed cache's decode step through the fused CUDA kernels.

Three paths. Append-only layers (below) read a stacked planes-layout mirror through the fastest kernel. Layers
that evict (a byte budget, StreamingLLM, SnapKV...) cannot hold a mirror's second copy under their budget:
while their heads stay alike (equal token counts and key groups), :func:`stacked_decode` runs the cache-layout
"dequant" kernel over the heads' own tensors, which :class:`HeadStack` keeps as views of stacked ones (no copy
per step), reading each token's key scale row from the group sizes eviction left (``KiviLayer.key_groups``).
Heads made ragged by per-head budgets or per-head token choices (SnapKV, Knorm, Ada-KV budgets) run the same tiles
in one launch over every head, each reached through a per-head table of pointers and lengths (:func:`ragged_decode`,
triton_ragged.py). H2O and Scissorhands take the torch path where its loop hands them
each step's attention probabilities (their logit scale is the model's); otherwise they decode through a kernel
and recompute the probabilities themselves. The stacked and ragged paths read values of another width than the
keys (keys 4 / values 2 bits); the mirror's planes kernels do not.
On that path the layer also quantizes full residual groups (:meth:`HeadStack.flush`) and evicts tokens every
head drops (:meth:`HeadStack.keep`) in one op per tensor over the stacked heads, not head by head, and the stack
knows the heads' group sizes are equal without reading them back: outside evictions this path reads no GPU
value back (the policy's own work aside).

The mirror path: a layer qualifies when it only ever appends (KIVI quantization with nothing else: no token
policy, byte budget, merging, channel pruning, full-precision sinks or sliding window, so its heads stay equal in
length and every key group whole) and the step is a single new token on CUDA with Triton, in fp16/bf16, without
a logit softcap, with head_dim and group powers of two >= 16 (the group dividing head_dim), and keys and values
of one bit width. What no path takes (prefill blocks, sliding layers, pruned key channels, probability-taking
policies, the CPU) runs the block-by-block torch path of :mod:`memvisor.kv.attention`.

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

import itertools
import weakref

import torch
from torch import Tensor

from memvisor.kv import quant
from memvisor.kv.gpu.layout import KeyGroupMaps, KiviLayer
from memvisor.kv.gpu.planes import SLOTS, PlanesLayer, to_planes
from memvisor.kv.storage import HeadStore, QuantConfig, StackedHeads


def _pow2(n: int) -> bool:
    return n >= 16 and n & (n - 1) == 0


def _kernel_step(stores: list[HeadStore], query: Tensor, window: int | None, softcap: float | None) -> bool:
    """What every fused path needs of a decode step: one new token on CUDA with Triton, no sliding window,
    softcap or pruned key channels, head_dim a power of two >= 16, and fp16/bf16 queries in the cache's
    dtype. query: [B, Hq, Tq, D]."""
    from memvisor.kv.gpu import triton_available

    st = stores[0]
    return (query.shape[2] == 1 and query.is_cuda and window is None and softcap is None
            and _pow2(st.D) and query.dtype in (torch.float16, torch.bfloat16) and st.dtype == query.dtype
            and all(s.channels is None for s in stores) and triton_available())


def kernel_applies(stores: list[HeadStore], query: Tensor, window: int | None, softcap: float | None) -> bool:
    """Whether this decode step of an append-only KIVI layer can run the fused kernel (module docstring):
    :func:`_kernel_step`, quantized, keys and values of one width, no sinks, a power-of-two group dividing
    head_dim. query: [B, Hq, Tq, D]."""
    q, D = stores[0].q, stores[0].D
    return (_kernel_step(stores, query, window, softcap) and q.bits is not None and q.vbits == q.bits
            and q.sinks == 0 and _pow2(q.group) and D % q.group == 0)


def stacked_kernel_applies(stores: list[HeadStore], query: Tensor, window: int | None, softcap: float | None,
                           stack: HeadStack | None = None) -> bool:
    """Whether this decode step of a layer that evicts can run :func:`stacked_decode`: :func:`_kernel_step`
    (quantized or not), and heads that stack (equal counts and key groups; through ``stack``'s knowledge of their
    group sizes where given, with no read back of them). query: [B, Hq, Tq, D]."""
    if not _kernel_step(stores, query, window, softcap):
        return False
    return stack.compatible(stores) if stack is not None else StackedHeads.compatible(stores)


def ragged_kernel_applies(stores: list[HeadStore], query: Tensor, window: int | None, softcap: float | None) -> bool:
    """Whether this decode step of a layer whose heads do not stack can run :func:`ragged_decode`: what
    :func:`_kernel_step` asks of the step, the heads' own counts and key groups whatever they are."""
    return _kernel_step(stores, query, window, softcap)


def _stack_axis(name: str) -> int:
    """The axis a head tensor is stacked on: after the batch axis, except the group sizes ([ng] -> [H, ng])."""
    return 0 if name == "group_sizes" else 1


class HeadStack:
    """A layer's heads' tensors held as views of one stacked tensor per name (``[B, H, ...]``; group sizes
    ``[H, ng]``), so a decode step reads them stacked without copying them, appends its token to every head's
    residual in one copy, and quantizes (:meth:`flush`) or evicts (:meth:`keep`) all heads in one op each.

    A name is stacked once (one copy), then each head's tensor IS ``base[:, h]``: no byte is held twice, and
    ``nbytes()`` of the heads still counts every byte. A head that replaces its tensor elsewhere (a per-head
    flush or eviction) breaks the identity check, and the next read stacks that name again. Only weak references
    are kept: a stacked tensor the heads no longer use is freed at once, not at the next read.

    The stack also knows when the heads' group sizes are equal without reading them back from the GPU (a sync
    per layer and step otherwise): it made them (flush, keep) or compared them once since they last changed."""

    def __init__(self) -> None:
        # name -> (weak references to the heads' views, the stacked shape and strides)
        self.held: dict[str, tuple[list[weakref.ref], torch.Size, tuple[int, ...]]] = {}
        # weak references to the heads' group-size tensors known to hold equal values (None: none known)
        self.equal_groups: list[weakref.ref] | None = None
        # ... and to ones found to differ: heads of equal counts whose groups differ (Knorm's per-head choices under
        # equal head budgets) would otherwise be compared, a GPU read back, at every step
        self.unequal_groups: list[weakref.ref] | None = None

    def stacked(self, stores: list[HeadStore], name: str) -> Tensor:
        """The heads' tensor ``name`` stacked (``[B, H, ...]``; ``[H, ng]`` for group sizes): a view of what
        they hold."""
        held = self.held.get(name)
        if held is not None:
            refs, shape, stride = held
            first = getattr(stores[0], name)
            if len(refs) == len(stores) and all(getattr(st, name) is r() for st, r in zip(stores, refs)):
                # the heads' views are alive, so their stacked storage is: view it whole again
                return first.as_strided(shape, stride, first.storage_offset())
        base = torch.stack([getattr(st, name) for st in stores], _stack_axis(name))
        before = [st.group_sizes for st in stores] if name == "group_sizes" else []
        self._adopt(stores, name, base)
        for st, sizes in zip(stores, before):  # equal copies: each head's kept key-group prefix still holds
            st.carry_group_prefix(sizes)
        return base

    def append(self, stores: list[HeadStore], k: Tensor, v: Tensor) -> None:
        """One decode step's token, k, v ``[B, H, 1, D]``, into every head's residual (what
        ``HeadStore.append(..., flush=False)`` does per head): one concatenation per tensor, not one per head.
        The heads' residuals must be of one length."""
        for name, x in (("k_res", k), ("v_res", v)):
            self._adopt(stores, name, torch.cat([self.stacked(stores, name), x.to(stores[0].dtype)], 2))

    def compatible(self, stores: list[HeadStore]) -> bool:
        """``StackedHeads.compatible(stores)``, comparing the heads' group sizes (a GPU read back) only when
        they changed since the stack last made or compared them: once per flush or eviction done elsewhere."""
        if not StackedHeads.compatible(stores, groups_equal=True):  # counts and shapes: no read back
            return False
        if self._groups_known(stores):
            return True
        if _same(self.unequal_groups, stores):
            return False
        ok = StackedHeads.compatible(stores)
        if ok:
            self._know_groups(stores)
        elif stores[0].q.bits is not None:
            self.unequal_groups = [weakref.ref(st.group_sizes) for st in stores]
        return ok

    def flush(self, stores: list[HeadStore]) -> bool:
        """What ``HeadStore.flush`` does to each head, on all heads at once (one quantization and one
        concatenation per tensor, not one per head, and no re-stacking at the next read); the same bytes.
        Only for alike heads (:meth:`compatible`) of a quantized layer without positions, pruned channels or
        sink slots still to fill; returns False, doing nothing, otherwise (the caller flushes head by head)."""
        st0, q = stores[0], stores[0].q
        if (q.bits is None or st0.pos is not None or st0.channels is not None or any(st.sink_room for st in stores)
                or not self.compatible(stores)):
            return False
        G, per, nq = q.group, 8 // q.bits, st0.nq
        n = (st0.nr - q.residual) // G * G  # the oldest whole groups beyond the residual's R tokens
        if n <= 0:
            return True
        k_res, v_res = self.stacked(stores, "k_res"), self.stacked(stores, "v_res")
        kc, ks, kz = quant.quantize_keys(k_res[:, :, :n], q.bits, G)
        vc, vs, vz = quant.quantize_values(v_res[:, :, :n], q.vbits, G)
        k_codes = self.stacked(stores, "k_codes")
        if nq % per == 0:
            k_codes = torch.cat([k_codes, kc], 2)
        else:  # the stored tail byte is partly filled (after an eviction): re-pack, as HeadStore._append_key_codes
            old, fresh = quant.unpack(k_codes, q.bits, dim=2, n=nq), quant.unpack(kc, q.bits, dim=2, n=n)
            k_codes = quant.pack(torch.cat([old, fresh], 2), q.bits, dim=2)
        sizes = torch.full((len(stores), n // G), G, dtype=torch.int16, device=st0.device)
        new = {"k_codes": k_codes, "group_sizes": torch.cat([self.stacked(stores, "group_sizes"), sizes], 1)}
        for name, x in (("k_scale", ks), ("k_zero", kz), ("v_codes", vc), ("v_scale", vs), ("v_zero", vz)):
            new[name] = torch.cat([self.stacked(stores, name), x], 2)
        new["k_res"] = k_res[:, :, n:].clone(memory_format=torch.contiguous_format)
        new["v_res"] = v_res[:, :, n:].clone(memory_format=torch.contiguous_format)
        before = [st.group_sizes for st in stores]
        self._adopt_all(stores, new)
        for st, sizes in zip(stores, before):
            st.nq = nq + n
            st.carry_group_prefix(sizes)
        return True

    def keep(self, stores: list[HeadStore], kept: list[Tensor]) -> bool:
        """What ``HeadStore.keep(idx)`` does to each head, on all heads at once, when every head keeps the same
        sorted indices ``kept[h]`` (StreamingLLM, a budget without a policy): one gather per tensor, and the
        range checks and index splits on ``kept``'s own device (the CPU for those policies: no GPU read back).
        Only for alike heads (:meth:`compatible`) without positions or pruned channels; returns False, doing
        nothing, otherwise (the caller evicts head by head)."""
        st0, q = stores[0], stores[0].q
        idx = kept[0]
        if (st0.pos is not None or st0.channels is not None or not all(torch.equal(idx, k) for k in kept[1:])
                or not self.compatible(stores)):
            return False
        idx = idx.long()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= len(st0)):
            raise IndexError(f"keep indices out of range for heads holding {len(st0)} tokens")
        ns, nq, dev = st0.ns, st0.nq, st0.device
        si, idx = idx[idx < ns], idx[idx >= ns] - ns
        qi, ri = idx[idx < nq], idx[idx >= nq] - nq
        si, qi, ri = si.to(dev), qi.to(dev), ri.to(dev)
        new = {"k_res": self.stacked(stores, "k_res").index_select(2, ri),
               "v_res": self.stacked(stores, "v_res").index_select(2, ri)}
        if ns:  # re-indexed even when every sink stays, as HeadStore.keep does
            new["k_sink"] = self.stacked(stores, "k_sink").index_select(2, si)
            new["v_sink"] = self.stacked(stores, "v_sink").index_select(2, si)
        quantized = q.bits is not None and nq > 0
        if quantized:
            codes = quant.unpack(self.stacked(stores, "k_codes"), q.bits, dim=2, n=nq).index_select(2, qi)
            # the heads' key groups are equal: head 0's tell every head's surviving groups and their sizes
            counts = torch.bincount(st0.group_of_tokens(0, nq)[qi], minlength=st0.group_sizes.numel())
            live = torch.nonzero(counts).flatten()
            new["k_codes"] = quant.pack(codes, q.bits, dim=2)
            new["k_scale"] = self.stacked(stores, "k_scale").index_select(2, live)
            new["k_zero"] = self.stacked(stores, "k_zero").index_select(2, live)
            new["group_sizes"] = counts[live].to(torch.int16).expand(len(stores), -1).contiguous()
            for name in ("v_codes", "v_scale", "v_zero"):
                new[name] = self.stacked(stores, name).index_select(2, qi)
        self._adopt_all(stores, new)
        if quantized:
            for st in stores:
                st.nq = int(qi.numel())
        return True

    def _adopt(self, stores: list[HeadStore], name: str, base: Tensor) -> None:
        views = base.unbind(_stack_axis(name))
        for st, view in zip(stores, views):
            setattr(st, name, view)
        self.held[name] = ([weakref.ref(v) for v in views], base.shape, base.stride())

    def _adopt_all(self, stores: list[HeadStore], new: dict[str, Tensor]) -> None:
        """Give the heads views of these stacked tensors (the group sizes, if among them, equal in every row)."""
        for name, base in new.items():
            self._adopt(stores, name, base)
        if "group_sizes" in new:
            self._know_groups(stores)

    def _groups_known(self, stores: list[HeadStore]) -> bool:
        return _same(self.equal_groups, stores)

    def _know_groups(self, stores: list[HeadStore]) -> None:
        if stores[0].q.bits is not None:
            self.equal_groups = [weakref.ref(st.group_sizes) for st in stores]


def _same(refs: list[weakref.ref] | None, stores: list[HeadStore]) -> bool:
    """Whether ``refs`` are weak references to the heads' group-size tensors, in order."""
    return (refs is not None and len(refs) == len(stores)
            and all(st.group_sizes is r() for st, r in zip(stores, refs)))


def stacked_decode(query: Tensor, stores: list[HeadStore], scaling: float, stack: HeadStack) -> Tensor:
    """query [B, Hq, 1, D] -> attention output [B, 1, Hq, D] in the query dtype, through one kernel launch
    (and its combine) over heads that :func:`stacked_kernel_applies` accepted, read through ``stack``.

    Full-precision sinks join the residual: a decode query sees every stored token, so their order does not
    matter. Unquantized heads run the bf16 flash-decoding kernel."""
    return _launch(query[:, :, 0].contiguous(), stores[0], lambda name: stack.stacked(stores, name),
                   scaling).unsqueeze(1)


def ragged_decode(query: Tensor, stores: list[HeadStore], scaling: float) -> Tensor:
    """query [B, Hq, 1, D] -> attention output [B, 1, Hq, D]: heads that do not stack (per-head token choices
    or budgets: SnapKV, Knorm, Ada-KV) in one launch (and its combine) that reaches each head's own tensors
    through a per-head table (triton_ragged.py): no copy, whatever the batch. The caller checked
    :func:`_kernel_step`; its group's queries are the head's ``Hq / Hkv`` consecutive query heads."""
    from memvisor.kv.gpu.triton_ragged import dense_ragged_attention, kivi_ragged_attention

    q1, q = query[:, :, 0].contiguous(), stores[0].q
    heads = [_head_tensors(st) for st in stores]
    if q.bits is None:
        return dense_ragged_attention(q1, heads, scaling).unsqueeze(1)
    return kivi_ragged_attention(q1, heads, q.bits, q.vbits, q.group, scaling,
                                 key_groups=_key_group_maps(stores)).unsqueeze(1)


def _head_tensors(st: HeadStore) -> dict[str, Tensor]:
    """A head's tensors by the ragged kernel's names: its quantized ones as stored (if any), its full-precision tokens
    (sinks, then the residual: a decode query sees every stored token, so their order does not matter)."""
    out = {} if st.q.bits is None else {
        name: getattr(st, name) for name in ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero")}
    out["k_full"], out["v_full"] = (torch.cat([st.k_sink, st.k_res], 1), torch.cat([st.v_sink, st.v_res], 1)
                                    ) if st.ns else (st.k_res, st.v_res)
    return out


def _key_group_maps(stores: list[HeadStore]) -> KeyGroupMaps | None:
    """The ragged kernel's key-group maps (None when every head's groups are whole). A head whose cut groups are a
    short prefix gives its kept one (``HeadStore.group_prefix``); the others' maps of every quantized token are
    built for this step and dropped (kept, they would be 4 stored bytes a token), all in three ops (a
    cumulative-sum search per head cost ~75 us a head in session 16's profile), numbering their groups through
    those heads (head h's first group is row ``base[h]`` of that numbering)."""
    prefixes = [st.group_prefix() for st in stores]
    if all(p is not None and p[2] is None for p in prefixes):
        return None
    maps = KeyGroupMaps(rows=[None if p is None else p[2] for p in prefixes], base=[0] * len(stores),
                        prefix=[st.nq if p is None else p[0] for st, p in zip(stores, prefixes)],
                        rest=[0 if p is None else p[1] for p in prefixes])
    full = [h for h, p in enumerate(prefixes) if p is None]
    if full:
        ngs = [stores[h].group_sizes.numel() for h in full]
        nqs = [stores[h].nq for h in full]
        sizes = torch.cat([stores[h].group_sizes for h in full])
        rows = torch.arange(sum(ngs), device=sizes.device, dtype=torch.int32)
        flat = torch.repeat_interleave(rows, sizes.long(), output_size=sum(nqs))
        for h, m, base in zip(full, flat.split(nqs), itertools.accumulate([0, *ngs[:-1]])):
            maps.rows[h], maps.base[h] = m, base
    return maps


def _launch(q1: Tensor, st0: HeadStore, stacked, scaling: float) -> Tensor:
    """q1 [B, Hq, D] over the heads whose stacked tensors ``stacked(name)`` gives (``[B, H, ...]``, alike heads:
    ``st0`` speaks for all) -> [B, Hq, D]: the "dequant" kernel, or the bf16 flash-decoding one unquantized."""
    from memvisor.kv.gpu.triton_decode import dense_decode_attention_triton, kivi_decode_attention

    q = st0.q
    k_full, v_full = stacked("k_res"), stacked("v_res")
    if st0.ns:
        k_full = torch.cat([stacked("k_sink"), k_full], 2)
        v_full = torch.cat([stacked("v_sink"), v_full], 2)
    if q.bits is None:
        return dense_decode_attention_triton(q1, k_full.contiguous(), v_full.contiguous(), scaling)
    names = ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero")
    k_codes, k_scale, k_zero, v_codes, v_scale, v_zero = (stacked(n) for n in names)
    # every group whole unless eviction cut some: then the rows of the cut prefix (kept between steps), or of
    # every token (built for this step) where cut groups reach further
    prefix = st0.group_prefix()
    rows, rest = (st0.group_of_tokens(0, st0.nq).to(torch.int32), 0) if prefix is None else (prefix[2], prefix[1])
    layer = KiviLayer(q.bits, q.group, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_full, v_full, rows,
                      vbits=q.vbits, key_group_rest=rest)
    return kivi_decode_attention(q1, layer, scaling, variant="dequant")


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
