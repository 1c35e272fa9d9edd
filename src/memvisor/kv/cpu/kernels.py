"""Numba kernels of the CPU decode step: one KV head's attention for one new token, read straight from
the KIVI codes (layout: :mod:`memvisor.kv.quant` and :mod:`memvisor.kv.storage`), never dequantizing
more than one token's key or value row at a time.

Why numba: the block-wise torch path spends a decode step on ~25 small torch ops per block (unpacking,
scaling, float32 products), 1.4-2.2 ms a layer at SmolLM2's shape (``scripts/kv_cpu_attention_speed.py``);
a loop compiled once reads each code byte once. The loops are written so LLVM vectorizes the inner one:
contiguous channel loops, bit shifts fixed per loop, no integer division in the inner loop (values are
unpacked into field-major lanes, see :func:`_value_lanes`). ``fastmath`` lets it reorder float32 sums: the
result equals the torch path to float32 rounding, not bit for bit (the tests bound the difference).
"""

from __future__ import annotations

import numpy as np
from numba import njit

# fastmath without "ninf"/"nnan": masked scores are -inf and must stay so. "reassoc" is what lets LLVM vectorize
# the float32 sums.
FAST = {"reassoc", "contract", "nsz", "arcp", "afn"}


@njit(cache=True, fastmath=FAST, nogil=True, boundscheck=False)
def _dense_scores(q, k, s, t0):
    """s[r, t0 + t] = q[r] . k[t] for the dense tokens k [n, D]; q [R, D]."""
    R, D = q.shape
    for t in range(k.shape[0]):
        kt = k[t]
        for r in range(R):
            qr = q[r]
            a = np.float32(0.0)
            for d in range(D):
                a += qr[d] * kt[d]
            s[r, t0 + t] = a


@njit(cache=True, fastmath=FAST, nogil=True, boundscheck=False)
def _dense_values(p, v, t0, acc):
    """acc[r] += sum_t p[r, t0 + t] v[t] over the dense tokens v [n, D]."""
    R, D = acc.shape
    for t in range(v.shape[0]):
        vt = v[t]
        for r in range(R):
            w = p[r, t0 + t]
            ar = acc[r]
            for d in range(D):
                ar[d] += w * vt[d]


@njit(cache=True, fastmath=FAST, nogil=True, boundscheck=False)
def _key_scores(qk, codes, scale, zero, group_sizes, bits, nq, s, t0):
    """s[r, t0 + t] = qk[r] . key[t] for the nq quantized keys: codes uint8 [ceil(nq*bits/8), Dk] packed
    along tokens, scale / zero float32 [ng, Dk] (one row per key group), group_sizes [ng] tokens per group."""
    R, Dk = qk.shape
    per = 8 // bits
    mask = (1 << bits) - 1
    kbuf = np.empty(Dk, np.float32)
    g, left = 0, np.int64(group_sizes[0]) if nq else 0
    for t in range(nq):
        while left == 0:  # the next group with tokens (keep() drops emptied groups; this skips any left)
            g += 1
            left = np.int64(group_sizes[g])
        left -= 1
        row = codes[t // per]
        sh = (t % per) * bits
        sc, ze = scale[g], zero[g]
        for d in range(Dk):
            kbuf[d] = np.float32((np.int32(row[d]) >> sh) & mask) * sc[d] + ze[d]
        for r in range(R):
            qr = qk[r]
            a = np.float32(0.0)
            for d in range(Dk):
                a += qr[d] * kbuf[d]
            s[r, t0 + t] = a


@njit(cache=True, fastmath=FAST, nogil=True, boundscheck=False)
def _value_lanes(p, codes, scale, zero, bits, t0, acc):
    """acc[r] += sum_t p[r, t0 + t] value[t] for the quantized values: codes uint8 [nq, D*bits/8] packed
    along channels, scale / zero float32 [nq, D/G].

    Channel ``d`` sits in byte ``d // per`` at bit ``(d % per) * bits``. Unpacking in channel order needs a
    division per element, which stops vectorization (10x slower); here field ``i`` of byte ``j`` goes to lane
    ``i * nbytes + j`` (field-major), each field a contiguous loop, and the lanes are put back in channel order
    once at the end. A group of G channels spans G / per consecutive bytes, so a byte's scale is ``j // (G/per)``."""
    R, D = acc.shape
    per = 8 // bits
    mask = (1 << bits) - 1
    nbytes = codes.shape[1]
    ng = scale.shape[1]
    span = nbytes // ng  # bytes per channel group
    lanes = np.zeros((R, D), np.float32)
    vbuf = np.empty(D, np.float32)
    row = np.empty(nbytes, np.int32)
    for t in range(codes.shape[0]):
        src = codes[t]
        for j in range(nbytes):
            row[j] = src[j]
        for i in range(per):
            sh = i * bits
            for gg in range(ng):
                sc, ze = scale[t, gg], zero[t, gg]
                for jj in range(span):
                    j = gg * span + jj
                    vbuf[i * nbytes + j] = np.float32((row[j] >> sh) & mask) * sc + ze
        for r in range(R):
            w = p[r, t0 + t]
            lr = lanes[r]
            for d in range(D):
                lr[d] += w * vbuf[d]
    for r in range(R):
        for i in range(per):
            for j in range(nbytes):
                acc[r, j * per + i] += lanes[r, i * nbytes + j]


@njit(cache=True, fastmath=FAST, nogil=True, boundscheck=False)
def decode_head(q, qk, k_sink, v_sink, k_codes, k_scale, k_zero, group_sizes, v_codes, v_scale, v_zero,
                k_res, v_res, bits, vbits, nq, pos, min_pos, softcap, out, probs):
    """One KV head's attention for one new token, all batch rows.

    q: float32 [B, R, D], the R query heads sharing this KV head, already multiplied by the logit scale;
    qk: the same queries on the stored key channels, [B, R, Dk] (ThinK; ``q`` itself when none are pruned).
    Stored tokens, oldest first: sinks ``k_sink, v_sink`` float32 [B, ns, D]; ``nq`` KIVI tokens
    (``k_codes`` uint8 [B, ceil(nq*bits/8), Dk], ``k_scale, k_zero`` float32 [B, ng, Dk], ``group_sizes``
    [ng]; ``v_codes`` uint8 [B, nq, D*vbits/8], ``v_scale, v_zero`` float32 [B, nq, D/G]); the residual
    ``k_res, v_res`` float32 [B, nr, D]. pos: int64 [ns + nq + nr] absolute positions, or empty when every
    token is visible; a token with ``pos < min_pos`` is outside the sliding window. softcap: 0 for none.
    Writes ``out`` float32 [B, R, D], and the softmax rows averaged over the R query heads into ``probs``
    float32 [B, n] unless it is empty (H2O and Scissorhands take them). Scores take R x n float32 (n = stored
    tokens), a few KB."""
    B, R, D = q.shape
    ns, nr = k_sink.shape[1], k_res.shape[1]
    n = ns + nq + nr
    s = np.empty((R, n), np.float32)
    acc = np.empty((R, D), np.float32)
    for b in range(B):
        _dense_scores(q[b], k_sink[b], s, 0)
        if nq:
            _key_scores(qk[b], k_codes[b], k_scale[b], k_zero[b], group_sizes, bits, nq, s, ns)
        _dense_scores(q[b], k_res[b], s, ns + nq)
        for r in range(R):
            m = np.float32(-np.inf)
            for t in range(n):
                x = s[r, t]
                if softcap > 0:
                    x = np.float32(np.tanh(x / softcap) * softcap)
                if pos.shape[0] and pos[t] < min_pos:
                    x = np.float32(-np.inf)
                s[r, t] = x
                m = max(m, x)
            total = np.float32(0.0)
            for t in range(n):
                e = np.float32(np.exp(s[r, t] - m)) if s[r, t] > -np.inf else np.float32(0.0)
                s[r, t] = e
                total += e
            inv = np.float32(1.0) / total if total > 0 else np.float32(0.0)  # no visible token: zeros
            for t in range(n):
                s[r, t] *= inv
        if probs.shape[0]:
            for t in range(n):
                a = np.float32(0.0)
                for r in range(R):
                    a += s[r, t]
                probs[b, t] = a / R
        acc[:] = 0.0
        _dense_values(s, v_sink[b], 0, acc)
        if nq:
            _value_lanes(s, v_codes[b], v_scale[b], v_zero[b], vbits, ns, acc)
        _dense_values(s, v_res[b], ns + nq, acc)
        out[b] = acc
