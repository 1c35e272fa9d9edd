"""Storage of ONE KV head of one layer (all batch rows): the unit of ragged per-head storage.

Heads of a layer are separate :class:`HeadStore` objects, so a head that keeps fewer tokens really
stores fewer bytes. Tokens are kept oldest first; eviction keeps that order. Batch rows share the
kept token indices (policies select per head, averaged over the batch), so every tensor keeps the
batch axis ``B`` first.

Layout (``n = ns + nq + nr`` tokens, oldest first: ``ns`` sinks and ``nr`` newest in full precision,
``nq`` quantized between them):

- sinks (``QuantConfig.sinks`` = S > 0, quantized caches only): ``k_sink, v_sink [B, ns, D]`` in the model
  dtype: the first S tokens the head ever stores never leave full precision. Nearly every query puts
  much of its attention on them (the "attention sinks" of StreamingLLM), so their rounding reaches every
  output; KVQuant and IntactKV keep them exact for that reason. Evicted sinks are not replaced.
- residual: ``k_res, v_res [B, nr, D]`` in the model dtype.
- quantized (KIVI, see :mod:`memvisor.kv.quant`; keys ``bits``, values ``vbits``, equal unless
  mixed precision): ``k_codes uint8 [B, ceil(nq*bits/8), D]``,
  ``k_scale, k_zero fp16 [B, ng, D]``, ``group_sizes int16 [ng]`` (tokens per key group: G when
  fresh, fewer after eviction, because evicting never re-quantizes survivors),
  ``v_codes uint8 [B, nq, D*vbits/8]``, ``v_scale, v_zero fp16 [B, nq, D/G]``.
- ``pos int16 [n]`` (int32 once a position reaches 32768): absolute position of each token, stored
  only for sliding-window layers (the window test needs it); full-attention layers see every stored
  token, so positions are not kept.
- ThinK (key channel pruning): once ``channels int32 [Dk]`` is set, every token leaving the
  residual stores only those ``Dk`` key channels (quantized keys ``[..., Dk]``; unquantized ones
  move to ``k_old [B, no, Dk]``, ``v_old [B, no, D]``). The residual stays full width. Readers get
  keys re-expanded with zeros in the pruned channels, block by block: ``q . k`` then equals the
  projected ``q[channels] . k[channels]``.

- ``key_group_rows int32 [P]`` (CUDA heads after an eviction cut key groups short): the key-scale row of each of
  the first P quantized tokens, when the groups after them are whole (:meth:`HeadStore.group_prefix`), for the
  GPU kernels; counted whichever path attends, so a layer stores the same bytes on the kernel and torch paths.

``nbytes()`` is the sum of ``numel * element_size`` over every tensor above that exists. Indices (``keep``,
the policies' scores) and positions run over the stored order: sinks, quantized, residual.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor

from memvisor.kv import quant
from memvisor.kv.blocks import iter_blocks


# Cut key groups within the first PREFIX_LIMIT quantized tokens of a head (StreamingLLM's sinks, the oldest groups
# it evicts from) keep their rows for the GPU kernels between steps (HeadStore.group_prefix); cut groups further in
# (per-head token choices cut them all through the history) are mapped token by token at each GPU step instead:
# kept, that map would cost 4 bytes a quantized token.
PREFIX_LIMIT = 256


@dataclass(frozen=True)
class QuantConfig:
    """bits: None (full precision), 2 or 4 (keys, and values unless ``value_bits``); group: G tokens
    (keys) / G channels (values); residual: R newest tokens kept in the model dtype; value_bits:
    the values' width when it differs from the keys' (mixed precision, e.g. keys 4 / values 2);
    sinks: the first S tokens kept in the model dtype for good (quantized caches only; 0: none)."""

    bits: int | None = None
    group: int = 32
    residual: int = 32
    value_bits: int | None = None
    sinks: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.sinks, int) or self.sinks < 0:
            raise quant.QuantError(f"sinks must be an int >= 0, got {self.sinks!r}")

    @property
    def vbits(self) -> int | None:
        """Bit width of the values."""
        return self.bits if self.value_bits is None else self.value_bits


class HeadStore:
    """One KV head: ``B`` batch rows, ``D`` channels, dtype of the model for the residual."""

    def __init__(self, batch: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                 qcfg: QuantConfig, track_pos: bool) -> None:
        self.B, self.D, self.dtype, self.device, self.q = batch, head_dim, dtype, device, qcfg
        if qcfg.bits is not None:
            quant.check_bits(qcfg.bits)
            quant.check_bits(qcfg.vbits)
            if head_dim % qcfg.group:
                raise quant.QuantError(f"head dim {head_dim} is not a multiple of group {qcfg.group}")
        e = dict(device=device)
        self.k_res = torch.empty(batch, 0, head_dim, dtype=dtype, **e)
        self.v_res = torch.empty(batch, 0, head_dim, dtype=dtype, **e)
        self.nq = 0
        # Sink slots not yet filled: the first tokens ever stored fill them, evicted ones are not refilled.
        self.sink_room = qcfg.sinks if qcfg.bits is not None else 0
        if self.sink_room:
            self.k_sink = torch.empty(batch, 0, head_dim, dtype=dtype, **e)
            self.v_sink = torch.empty(batch, 0, head_dim, dtype=dtype, **e)
        if qcfg.bits is not None:
            G = qcfg.group
            self.k_codes = torch.empty(batch, 0, head_dim, dtype=torch.uint8, **e)
            self.k_scale = torch.empty(batch, 0, head_dim, dtype=torch.float16, **e)
            self.k_zero = torch.empty(batch, 0, head_dim, dtype=torch.float16, **e)
            self.group_sizes = torch.empty(0, dtype=torch.int16, **e)  # sizes <= G <= 32767
            self.v_codes = torch.empty(batch, 0, head_dim * qcfg.vbits // 8, dtype=torch.uint8, **e)
            self.v_scale = torch.empty(batch, 0, head_dim // G, dtype=torch.float16, **e)
            self.v_zero = torch.empty(batch, 0, head_dim // G, dtype=torch.float16, **e)
        self.pos = torch.empty(0, dtype=torch.int16, **e) if track_pos else None
        self.channels: Tensor | None = None  # ThinK: kept key channels (set_channels)
        # group_prefix's answer and a weak reference to the group sizes it was computed from
        self._prefix: tuple[weakref.ref, tuple[int, int, Tensor | None] | None] | None = None

    # ------------------------------------------------------------------ accounting
    @property
    def nr(self) -> int:
        return self.k_res.shape[1]

    @property
    def ns(self) -> int:
        """Sink tokens held in full precision."""
        return self.k_sink.shape[1] if self.q.sinks and self.q.bits is not None else 0

    def __len__(self) -> int:
        return self.ns + self.nq + self.nr

    def tensors(self) -> dict[str, Tensor]:
        """Every stored tensor by name (what :meth:`nbytes` counts)."""
        out = {"k_res": self.k_res, "v_res": self.v_res}
        if self.q.sinks and self.q.bits is not None:
            out["k_sink"], out["v_sink"] = self.k_sink, self.v_sink
        if self.q.bits is not None:
            for name in ("k_codes", "k_scale", "k_zero", "group_sizes", "v_codes", "v_scale", "v_zero"):
                out[name] = getattr(self, name)
            if self.device.type == "cuda" and self.nq:
                self.group_prefix()  # what the GPU kernels read, stored on that device whichever path attends
            if self.key_group_rows is not None:
                out["key_group_rows"] = self.key_group_rows
        if self.pos is not None:
            out["pos"] = self.pos
        if self.channels is not None:
            out["channels"] = self.channels
            if self.q.bits is None:
                out["k_old"], out["v_old"] = self.k_old, self.v_old
        return out

    def __setattr__(self, name: str, value) -> None:
        # Every change of a stored tensor is an assignment (nothing is resized in place), so the bytes of all
        # but the residual (which changes every decode step) are cached and dropped on any other assignment:
        # the cache calls nbytes() twice per layer and decode step.
        object.__setattr__(self, name, value)
        if name not in ("k_res", "v_res", "_nbytes_rest"):
            object.__setattr__(self, "_nbytes_rest", None)

    def nbytes(self) -> int:
        if self._nbytes_rest is None:
            self._nbytes_rest = sum(t.numel() * t.element_size() for name, t in self.tensors().items()
                                    if name not in ("k_res", "v_res"))
        return self._nbytes_rest + (self.k_res.numel() + self.v_res.numel()) * self.k_res.element_size()

    # ------------------------------------------------------------------ writing
    def append(self, k: Tensor, v: Tensor, pos: Tensor | None = None, flush: bool = True) -> None:
        """Append ``t`` new tokens: k, v [B, t, D]; pos LongTensor[t] (sliding layers).

        ``flush=False`` leaves them in full precision until :meth:`flush` (the cache attends a
        forward's own tokens unquantized, as KIVI does, and quantizes afterwards)."""
        self.k_res = torch.cat([self.k_res, k.to(self.dtype)], dim=1)
        self.v_res = torch.cat([self.v_res, v.to(self.dtype)], dim=1)
        if self.pos is not None:
            # int16 while every position fits (half the bytes of int32); widened for good past 32767
            wide = self.pos.dtype == torch.int32 or (pos.numel() and int(pos.max()) > 32767)
            dt = torch.int32 if wide else torch.int16
            self.pos = torch.cat([self.pos.to(dt), pos.to(dt)])
        if flush:
            self.flush()

    def flush(self) -> None:
        """Quantize the oldest whole groups of the residual while it holds at least R + G tokens
        (unquantized with ThinK: move every token beyond R to the pruned-key region). The first
        tokens ever stored fill the sink slots first (they stay in full precision)."""
        R = self.q.residual
        if self.sink_room and self.nr:
            t = min(self.sink_room, self.nr)
            self.k_sink = torch.cat([self.k_sink, self.k_res[:, :t]], dim=1)
            self.v_sink = torch.cat([self.v_sink, self.v_res[:, :t]], dim=1)
            self.k_res, self.v_res = self.k_res[:, t:].clone(), self.v_res[:, t:].clone()
            self.sink_room -= t
        if self.q.bits is None:
            n = self.nr - R
            if self.channels is None or n <= 0:
                return
            ch = self.channels.long()
            self.k_old = torch.cat([self.k_old, self.k_res[:, :n][..., ch]], dim=1)
            self.v_old = torch.cat([self.v_old, self.v_res[:, :n]], dim=1)
            self.nq += n
            self.k_res, self.v_res = self.k_res[:, n:].clone(), self.v_res[:, n:].clone()
            return
        G = self.q.group
        n = ((self.nr - R) // G) * G
        if n <= 0:
            return
        k, v = self.k_res[:, :n], self.v_res[:, :n]
        if self.channels is not None:
            k = k[..., self.channels.long()]
        kc, ks, kz = quant.quantize_keys(k, self.q.bits, G)
        vc, vs, vz = quant.quantize_values(v, self.q.vbits, G)
        self._append_key_codes(kc, n)
        self.k_scale = torch.cat([self.k_scale, ks], dim=1)
        self.k_zero = torch.cat([self.k_zero, kz], dim=1)
        before = self.group_sizes
        self.group_sizes = torch.cat(
            [self.group_sizes, torch.full((n // G,), G, dtype=torch.int16, device=self.device)])
        self.carry_group_prefix(before)
        self.v_codes = torch.cat([self.v_codes, vc], dim=1)
        self.v_scale = torch.cat([self.v_scale, vs], dim=1)
        self.v_zero = torch.cat([self.v_zero, vz], dim=1)
        self.nq += n
        self.k_res, self.v_res = self.k_res[:, n:].clone(), self.v_res[:, n:].clone()

    def set_residual(self, k: Tensor, v: Tensor) -> None:
        """Replace the full-precision tokens (k, v [B, n, D]; may be views of a layer's dense
        tensors): the passthrough layer's storage. Only valid with nothing quantized or pruned."""
        if self.nq:
            raise RuntimeError("set_residual on a head holding compressed tokens")
        self.k_res, self.v_res = k, v

    def set_channels(self, channels: Tensor) -> None:
        """ThinK: keep only key channels ``channels`` (sorted LongTensor[Dk]) of every token that is
        or will be compressed. Already quantized keys lose the other channels exactly (per-channel
        scales), so this can run at any time, once."""
        if self.channels is not None:
            raise RuntimeError("key channels are already pruned for this head")
        ch = channels.to(self.device, torch.long)
        self.channels = ch.to(torch.int32)
        if self.q.bits is None:
            self.k_old = torch.empty(self.B, 0, ch.numel(), dtype=self.dtype, device=self.device)
            self.v_old = torch.empty(self.B, 0, self.D, dtype=self.dtype, device=self.device)
            self.flush()
            return
        self.k_codes = self.k_codes[..., ch].contiguous()
        self.k_scale, self.k_zero = self.k_scale[..., ch].contiguous(), self.k_zero[..., ch].contiguous()

    def _append_key_codes(self, packed: Tensor, n: int) -> None:
        per = 8 // self.q.bits
        if self.nq % per == 0:
            self.k_codes = torch.cat([self.k_codes, packed], dim=1)
            return
        # Stored tail byte is partly filled (after an eviction): re-pack the codes, exactly.
        old = quant.unpack(self.k_codes, self.q.bits, dim=1, n=self.nq)
        new = quant.unpack(packed, self.q.bits, dim=1, n=n)
        self.k_codes = quant.pack(torch.cat([old, new], dim=1), self.q.bits, dim=1)

    def keep(self, idx: Tensor) -> None:
        """Evict every token not in ``idx`` (sorted LongTensor of stored indices). Survivors keep
        their codes, scales and zero points: nothing is re-quantized."""
        idx = idx.to(self.device, torch.long)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= len(self)):
            raise IndexError(f"keep indices out of range for a head holding {len(self)} tokens")
        if self.pos is not None:
            self.pos = self.pos[idx]
        ns = self.ns
        if ns:
            si = idx[idx < ns]
            # re-indexed even when every sink stays: a head must not keep a view of a layer's stacked sinks
            # (gpu/cache_path.HeadStack) that other heads replaced, which would hold their bytes uncounted
            self.k_sink, self.v_sink = self.k_sink.index_select(1, si), self.v_sink.index_select(1, si)
            idx = idx[idx >= ns] - ns
        qi, ri = idx[idx < self.nq], idx[idx >= self.nq] - self.nq
        # index_select, not advanced indexing: the same rows, faster on the CPU (scripts/kv_cpu_attention_speed.py)
        self.k_res, self.v_res = self.k_res.index_select(1, ri), self.v_res.index_select(1, ri)
        if self.q.bits is None:
            if self.channels is not None:
                self.k_old, self.v_old = self.k_old.index_select(1, qi), self.v_old.index_select(1, qi)
                self.nq = int(qi.numel())
            return
        if self.nq == 0:
            return
        b = self.q.bits
        codes = quant.unpack(self.k_codes, b, dim=1, n=self.nq).index_select(1, qi)
        gid = self.group_of_tokens(0, self.nq)[qi]
        counts = torch.bincount(gid, minlength=self.group_sizes.numel())
        live = torch.nonzero(counts).flatten()
        self.k_codes = quant.pack(codes, b, dim=1)
        self.k_scale, self.k_zero = self.k_scale.index_select(1, live), self.k_zero.index_select(1, live)
        self.group_sizes = counts[live].to(torch.int16)
        self.v_codes, self.v_scale, self.v_zero = (t.index_select(1, qi)
                                                    for t in (self.v_codes, self.v_scale, self.v_zero))
        self.nq = int(qi.numel())

    def compact(self, slack: float = 1.5) -> bool:
        """Merge runs of adjacent partly-evicted key groups into groups of at most G tokens when
        there are more than ``slack`` times the groups the tokens need: each group costs a full
        row of fp16 scale and zero, so near-empty groups would eat the savings of quantization.
        Merged tokens are re-quantized from their dequantized keys (min-max over the new group:
        one more rounding, at most half a step of the merged group's range). Values are per token
        and untouched. Returns whether anything was merged."""
        if self.q.bits is None or self.nq == 0:
            return False
        G, b = self.q.group, self.q.bits
        # the count first: reading the sizes back is a GPU sync, and most evictions leave nothing to merge
        if self.group_sizes.numel() <= slack * -(-self.nq // G):
            return False
        sizes = self.group_sizes.tolist()
        runs, cur, total = [], [], 0  # greedy: consecutive groups whose sizes sum to <= G
        for i, n in enumerate(sizes):
            if cur and total + n > G:
                runs.append(cur)
                cur, total = [], 0
            cur.append(i)
            total += n
        runs.append(cur)
        codes = quant.unpack(self.k_codes, b, dim=1, n=self.nq)
        starts = [0]
        for n in sizes:
            starts.append(starts[-1] + n)
        new_codes, new_scale, new_zero, new_sizes = [], [], [], []
        for run in runs:
            s0, s1 = starts[run[0]], starts[run[-1] + 1]
            if len(run) == 1:
                g = run[0]
                new_codes.append(codes[:, s0:s1])
                new_scale.append(self.k_scale[:, g:g + 1])
                new_zero.append(self.k_zero[:, g:g + 1])
            else:
                gid = self.group_of_tokens(s0, s1)
                k = torch.addcmul(self.k_zero[:, gid].float(), codes[:, s0:s1].float(), self.k_scale[:, gid].float())
                c, sc, z = quant.minmax_quant(k, b, reduce_dim=1)
                new_codes.append(c)
                new_scale.append(sc)
                new_zero.append(z)
            new_sizes.append(s1 - s0)
        self.k_codes = quant.pack(torch.cat(new_codes, dim=1), b, dim=1)
        self.k_scale = torch.cat(new_scale, dim=1)
        self.k_zero = torch.cat(new_zero, dim=1)
        self.group_sizes = torch.tensor(new_sizes, dtype=torch.int16, device=self.device)
        return True

    def replace(self, k: Tensor, v: Tensor, pos: Tensor | None = None, sinks_kept: int | None = None) -> None:
        """Store exactly these tokens (k, v [B, n, D]), re-quantizing them (used after merging).
        ``sinks_kept``: how many of them are sinks this head held (the first ones; None: all it held); they
        stay in full precision, and evicted sinks are not replaced (as in :meth:`keep`)."""
        fresh = HeadStore(self.B, self.D, self.dtype, self.device, self.q, self.pos is not None)
        fresh.sink_room = (self.ns if sinks_kept is None else sinks_kept) + self.sink_room
        if self.channels is not None:
            fresh.set_channels(self.channels)
        fresh.append(k, v, pos)
        self.__dict__.update(fresh.__dict__)

    def carry_group_prefix(self, before: Tensor) -> None:
        """After the group sizes ``before`` were replaced by themselves plus whole key groups (a flush) or by an
        equal copy (``HeadStack`` re-stacking them): :meth:`group_prefix` stays what it was, with no read back."""
        if self._prefix is not None and self._prefix[0]() is before:
            self._prefix = (weakref.ref(self.group_sizes), self._prefix[1])

    # ------------------------------------------------------------------ reading
    def group_prefix(self) -> tuple[int, int, Tensor | None] | None:
        """The quantized tokens' key groups as a cut prefix followed by whole groups, for the GPU kernels:
        ``(P, R0, rows)``, tokens ``[0, P)`` having the key-scale rows ``rows`` (int32 [P], on the head's device) and
        token ``t >= P`` the row ``R0 + (t - P) // G``. ``(0, 0, None)`` when every group is whole; None when cut
        groups reach past the first :data:`PREFIX_LIMIT` tokens (map every token instead: ``group_of_tokens``).

        Kept until the group sizes change (a flush carries it over) and, while kept, stored (``key_group_rows``,
        counted by :meth:`nbytes`); computing it reads one value back from the device."""
        current = self._current_prefix()
        if current is not None or (self._prefix is not None and self._prefix[0]() is self.group_sizes):
            return current
        sizes, G = self.group_sizes, self.q.group
        out: tuple[int, int, Tensor | None] | None = (0, 0, None)
        if self.nq != sizes.numel() * G:
            r0 = int(torch.nonzero(sizes != G).flatten()[-1]) + 1  # past the last cut group every group is whole
            p = self.nq - (sizes.numel() - r0) * G
            rows = torch.arange(r0, dtype=torch.int32, device=self.device)
            out = None if p > PREFIX_LIMIT else (p, r0, torch.repeat_interleave(rows, sizes[:r0].long(), output_size=p))
        self._prefix = (weakref.ref(sizes), out)
        return out

    @property
    def key_group_rows(self) -> Tensor | None:
        """The kept rows of :meth:`group_prefix` (int32 [P]), if any for the current group sizes."""
        current = self._current_prefix()
        return None if current is None else current[2]

    def _current_prefix(self) -> tuple[int, int, Tensor | None] | None:
        """group_prefix's kept answer if it is for the current group sizes, else None (and an outdated one is
        dropped: its rows would be held uncounted)."""
        if self._prefix is not None and self._prefix[0]() is not self.group_sizes:
            self._prefix = None
        return None if self._prefix is None else self._prefix[1]

    def group_of_tokens(self, start: int, end: int) -> Tensor:
        """LongTensor[end-start]: key-group row of each quantized token in [start, end)."""
        ends = torch.cumsum(self.group_sizes.long(), 0)
        t = torch.arange(start, end, device=self.device)
        return torch.searchsorted(ends, t, right=True)

    def blocks(self, block: int, dtype: torch.dtype = torch.float32
               ) -> Iterator[tuple[Tensor, Tensor, Tensor | None]]:
        """Yield (k [B, n_blk, D], v [B, n_blk, D], pos LongTensor[n_blk] | None) over all stored
        tokens, oldest first. Quantized tokens are dequantized ``block`` at a time (``block`` a
        multiple of 8, so blocks start on byte boundaries): never the whole history at once."""
        return iter_blocks(self, block, dtype)

    def dense(self, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """All tokens as (k, v) [B, n, D] (dequantized): for policies and merging, not attention."""
        dtype = dtype or self.dtype
        parts = list(self.blocks(1024, dtype))
        if not parts:
            empty = torch.empty(self.B, 0, self.D, dtype=dtype, device=self.device)
            return empty, empty.clone()
        return torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1)

    def positions(self) -> Tensor | None:
        return None if self.pos is None else self.pos.long()


class StackedHeads:
    """Read-only view of several :class:`HeadStore` of equal length and equal key-group layout,
    stacked on axis 1 (tensors ``[B, H, ...]``, positions ``[H, n]``), so one block-wise pass
    serves all heads. Built per forward: it copies the compressed codes, never dequantizes."""

    def __init__(self, stores: list[HeadStore]) -> None:
        first = stores[0]
        self.q, self.D, self.B, self.nq, self.ns = first.q, first.D, first.B, first.nq, first.ns
        self.device = first.device
        for name, t in first.tensors().items():
            if name in ("pos", "channels", "key_group_rows"):
                continue
            setattr(self, name, torch.stack([getattr(st, name) for st in stores], dim=1))
        if first.q.bits is not None:
            self.group_sizes = first.group_sizes
        self.pos = torch.stack([st.pos for st in stores]) if first.pos is not None else None
        self.channels = torch.stack([st.channels for st in stores]) if first.channels is not None else None

    @property
    def nr(self) -> int:
        return self.k_res.shape[-2]

    def __len__(self) -> int:
        return self.ns + self.nq + self.nr

    group_of_tokens = HeadStore.group_of_tokens

    @staticmethod
    def compatible(stores: list[HeadStore], groups_equal: bool = False) -> bool:
        """True when the stores can be stacked: same token counts and the same key groups. ``groups_equal``: the
        caller knows the heads' group sizes are equal (``gpu.cache_path.HeadStack`` made or checked them), so
        their values are not compared (on a GPU that read back is a sync); their shapes still are."""
        a = stores[0]
        for st in stores[1:]:
            if st.nq != a.nq or st.nr != a.nr or st.ns != a.ns or (st.channels is None) != (a.channels is None):
                return False
            if a.channels is not None and st.channels.numel() != a.channels.numel():
                return False
            if a.q.bits is not None and st.group_sizes.shape != a.group_sizes.shape:
                return False
        if a.q.bits is None or len(stores) == 1 or groups_equal:
            return True
        # one comparison of all heads' group sizes: on a GPU each reduction read back is a sync
        return bool((torch.stack([st.group_sizes for st in stores[1:]]) == a.group_sizes).all())
