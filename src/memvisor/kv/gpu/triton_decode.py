"""Fused Triton decode attention over a KIVI-quantized layer (and the same design over bf16/fp16).

Flash-decoding in two launches:

1. ``_kivi_split_kernel``: grid ``(B*Hkv, n_split + 1)``. Program ``(bh, s)`` takes ALL query
   heads of kv head ``bh`` (GQA: the cache is read once per group, not once per query head) and
   tokens ``[s*tps, (s+1)*tps)`` of the quantized history; the last program of each row takes the
   full-precision residual. Each ``BLOCK_N``-token tile is loaded as packed codes + fp16
   scale/zero, unpacked and dequantized in registers (never written back), and folded into an
   online softmax (base 2). It writes a partial output ``[GP, D]`` and its log2-sum-exp.
2. ``_combine_kernel``: one program per query row merges the ``n_split + 1`` partials.

Bytes read per step = the quantized cache's real bytes (codes + scales + zeros + residual) + q,
which is what makes it faster than the bf16 cache: decode attention is memory-bound.

Split kernels: ``swap_decode_attention`` (the planes layout through the Gluon kernel of gluon_kivi_swap.py,
tokens on the matrix product's M side: the fastest, for group 32 and up to 4 query heads per kv head),
``planes_decode_attention`` (2- and 4-bit caches repacked as planes.py says; triton_kivi_planes.py), ``kivi_decode_attention`` over the cache layout (2 and 4 bit; "tile" and
"factored" in triton_kivi_rep.py, "dequant" here), and ``dense_decode_attention_triton`` over a
plain bf16/fp16 cache (the baseline); triton_ragged.py runs the "dequant" tiles over heads of different lengths in
one launch. Importing this module needs Triton; :mod:`memvisor.kv.gpu` imports it lazily.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

from memvisor.kv.gpu.errors import KVLayoutError
from memvisor.kv.gpu.layout import KiviLayer
from memvisor.kv.gpu.triton_common import (STEP_VARYING, _combine_kernel, _dense_tiles, _dequant_tiles, _query_rows,
                                            _residual_and_store)
from memvisor.kv.gpu.planes import SLOTS, PlanesLayer
from memvisor.kv.gpu.swap_plan import EVEN_WAVES, PIPELINE_WAVES, SWAP_RESIDENT, even_plan, pipeline_plan, swap_plan
from memvisor.kv.gpu.triton_kivi_planes import _planes_split_kernel
from memvisor.kv.gpu.triton_kivi_rep import _kivi_split_kernel_rep, _kivi_split_kernel_tile

_LOG2E = 1.4426950408889634


@triton.jit(do_not_specialize=["KG_P", "KG_R0", *STEP_VARYING])
def _kivi_split_kernel(Q, KC, KS, KZ, VC, VS, VZ, KR, VR, OP, LP, KGI, KG_P, KG_R0, sm_scale_log2,
                       T_q, T_r, tps, skc_bh, sks_bh, svc_bh, svs_bh, skr_bh, svr_bh,
                       GROUPS: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr,
                       G: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_MAP: tl.constexpr = False,
                       VBITS: tl.constexpr = 0):
    """The "dequant" split: each token addressed on its own, so a split may start anywhere. ``GROUP_MAP``:
    token t's key scale row is ``KGI[t]`` for t < ``KG_P`` and ``KG_R0 + (t - KG_P) // G`` after (int32, shared by
    the heads: key groups cut by eviction, ``KiviLayer.key_groups``), not t // G.
    ``VBITS``: the values' bit width where it differs from the keys' ``BITS`` (0: the same)."""
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_rows = tl.num_programs(1)
    q, m_i, l_i, acc = _query_rows(Q, pid_bh, GROUPS, GP, D)
    is_res = pid_s == n_rows - 1
    VB: tl.constexpr = BITS if VBITS == 0 else VBITS
    if pid_s < n_rows - 1:
        start = pid_s * tps
        m_i, l_i, acc = _dequant_tiles(q, KC + pid_bh * skc_bh, KS + pid_bh * sks_bh, KZ + pid_bh * sks_bh,
                                       VC + pid_bh * svc_bh, VS + pid_bh * svs_bh, VZ + pid_bh * svs_bh, KGI,
                                       KG_P, KG_R0, start, tl.minimum(start + tps, T_q), m_i, l_i, acc,
                                       sm_scale_log2, D, BITS, VB, G, BLOCK_N, GROUP_MAP)
    _residual_and_store(q, KR, VR, OP, LP, pid_bh, pid_s, n_rows, T_r, skr_bh, svr_bh, sm_scale_log2,
                        m_i, l_i, acc, is_res, GROUPS, GP, D, BLOCK_N)


@triton.jit(do_not_specialize=["T", "tps"])
def _dense_split_kernel(Q, K, V, OP, LP, sm_scale_log2, T, tps, sk_bh,
                        GROUPS: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr):
    """The same flash-decoding split over a plain [B, Hkv, T, D] cache (the bf16/fp16 baseline)."""
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_rows = tl.num_programs(1)
    q, m_i, l_i, acc = _query_rows(Q, pid_bh, GROUPS, GP, D)
    start = pid_s * tps
    m_i, l_i, acc = _dense_tiles(q, K + pid_bh * sk_bh, V + pid_bh * sk_bh, start, tl.minimum(start + tps, T),
                                 m_i, l_i, acc, sm_scale_log2, D, BLOCK_N)
    _residual_and_store(q, K, V, OP, LP, pid_bh, pid_s, n_rows, 0, sk_bh, sk_bh, sm_scale_log2,
                        m_i, l_i, acc, False, GROUPS, GP, D, BLOCK_N)


def _split_plan(bh: int, tokens: int, block_n: int, sm_count: int, waves: float) -> tuple[int, int]:
    """(number of token splits, tokens per split): about ``waves`` programs per SM, whole tiles per split."""
    if tokens <= 0:
        return 0, block_n
    want = max(1, math.ceil(waves * sm_count / max(bh, 1)))
    tps = max(block_n, math.ceil(tokens / want / block_n) * block_n)
    return math.ceil(tokens / tps), tps


def _interpreting() -> bool:
    """Triton's CPU interpreter (TRITON_INTERPRET=1) runs the kernels on CPU tensors, for debugging."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return 4 if _interpreting() else torch.cuda.get_device_properties(device).multi_processor_count


def _check(q: torch.Tensor, hkv: int, d: int, b: int) -> int:
    if not q.is_cuda and not _interpreting():
        raise KVLayoutError("the Triton kernel needs CUDA tensors; use decode_attention_reference on the CPU")
    if q.dim() != 3 or q.shape[0] != b or q.shape[2] != d or q.shape[1] % hkv:
        raise KVLayoutError(f"query {tuple(q.shape)} does not fit a cache of B={b}, Hkv={hkv}, D={d}")
    if d & (d - 1) or d < 16:
        raise KVLayoutError(f"head_dim must be a power of two >= 16, got {d}")
    return q.shape[1] // hkv


def _rows_contiguous(t: torch.Tensor) -> bool:
    """Rows of ``C`` contiguous entries ``C`` apart (``[..., n, C]``), whatever the strides of the axes before:
    what the kernels' addressing within one head (row x C + column) assumes. (``is_contiguous`` first: one call
    answers for most tensors, and the ragged kernel asks this of ~8 tensors a head every step.)"""
    return (t.is_contiguous() or t.numel() == 0
            or (t.stride(-1) == 1 and (t.shape[-2] == 1 or t.stride(-2) == t.shape[-1])))


def _rows_ok(t: torch.Tensor) -> bool:
    """Rows contiguous and heads evenly spaced: a contiguous [B, H, n, C] tensor or a token-range view
    of one (the cache's mirror, cache_path.py), which is what the kernels' addressing
    (head x head stride + row x C + column) assumes."""
    return _rows_contiguous(t) and (t.numel() == 0 or t.shape[0] == 1 or t.stride(0) == t.shape[1] * t.stride(1))


def _combine(op: torch.Tensor, lp: torch.Tensor, q: torch.Tensor, n_rows: int, block_s: int | None = None,
             db: int | None = None, num_warps: int = 4, pdl: bool = False, pdl_trigger: str = "exit") -> torch.Tensor:
    """Merge the partials ``op [B*Hq, n_rows, D]`` (log2-sum-exp ``lp``) into ``[B, Hq, D]``: one program per
    query row and ``db`` channels (default 32: four times the programs of one per row, so each one's
    loads are short), ``block_s`` partials per loop step (default all, up to 128: one load round).
    H100, 32 layers at 32k tokens (65 partials per row): 236 us per step with 64 partials per step and
    one program per row, 106 with these defaults (scripts/kv_gpu_ab.py). ``pdl``: a programmatic dependent
    launch (pdl.py; the caller checks it is available), ``pdl_trigger``: when the next launch may start
    (:data:`PDL_TRIGGERS`)."""
    b, hq, d = q.shape
    out = torch.empty_like(q)
    block_s = block_s or max(16, min(128, triton.next_power_of_2(n_rows)))
    db = min(db or 32, d)
    _combine_kernel[(b * hq, d // db)](op, lp, out, n_rows, D=d, BLOCK_S=block_s, DB=db, num_warps=num_warps,
                                       **_pdl_args(pdl, pdl_trigger))
    return out


# where a launch lets the next one in the stream start (griddepcontrol.launch_dependents, pdl.py): at its programs'
# start, in their middle (the swap split kernel: the end of their loop; the combine: once the split launch has
# ended) or at their exit (no instruction)
PDL_TRIGGERS = {"start": 0, "middle": 1, "exit": 2}


def _pdl_args(pdl: bool, trigger: str) -> dict:
    """Launch keywords of a kernel with ``PDL`` / ``PDL_TRIGGER`` constexprs: those and Triton's ``launch_pdl``
    option where ``pdl`` (only then: a Triton without the option rejects the keyword), else none (the defaults)."""
    if trigger not in PDL_TRIGGERS:
        raise KVLayoutError(f"PDL trigger must be one of {sorted(PDL_TRIGGERS)}, got {trigger!r}")
    return {"PDL": True, "PDL_TRIGGER": PDL_TRIGGERS[trigger], "launch_pdl": True} if pdl else {}


def kivi_decode_attention(q: torch.Tensor, layer: KiviLayer, sm_scale: float | None = None, *, block_n: int = 64,
                          num_warps: int = 4, num_stages: int = 2, waves: float = 4.0,
                          variant: str = "tile", k_reshape: bool = False,
                          v_reshape: bool = True) -> torch.Tensor:
    """See :func:`_kivi_launch`; retries with smaller tiles when a shape (e.g. head_dim 256) runs out of
    shared memory or registers at the given settings."""
    kw = dict(num_warps=num_warps, waves=waves, variant=variant, k_reshape=k_reshape, v_reshape=v_reshape)
    return with_smaller_tiles(lambda bn, ns: _kivi_launch(q, layer, sm_scale, block_n=bn, num_stages=ns, **kw),
                              block_n, num_stages, max(16, layer.group if variant == "tile" else 16))


def with_smaller_tiles(launch, block_n: int, num_stages: int, min_block: int = 16):
    """``launch(block_n, num_stages)``, retried with one pipeline stage, then halved tiles down to ``min_block``
    tokens, while the shape (e.g. head_dim 256) runs out of shared memory or registers."""
    while True:
        try:
            return launch(block_n, num_stages)
        except triton.runtime.errors.OutOfResources:
            if num_stages == 1 and block_n <= min_block:
                raise
            block_n, num_stages = (block_n, 1) if num_stages > 1 else (block_n // 2, 1)


def _kivi_launch(q: torch.Tensor, layer: KiviLayer, sm_scale: float | None, *, block_n: int, num_warps: int,
                 num_stages: int, waves: float, variant: str, k_reshape: bool, v_reshape: bool) -> torch.Tensor:
    """Fused decode attention: q ``[B, Hq, D]`` (bf16/fp16, CUDA) over ``layer`` -> ``[B, Hq, D]`` in q's dtype.

    ``variant``: "tile" (default: ``block_n``-token tiles, keys dequantized in fp16, value
    scales folded into the probabilities: triton_kivi_rep.py), "factored" (codes fed to the matrix units as fp16 integers, scales folded into
    the query and the probabilities, tiles of one key group: triton_kivi_rep.py) or "dequant"
    (each tile dequantized in registers; ``block_n`` tokens per tile, a power of two >= 16).
    ``k_reshape``/``v_reshape``: unpack codes by loading each byte once and reshaping, instead of
    loading it once per code (the tile kernel always does so for keys). ``block_n`` is also the residual tile. ``waves``: programs per SM
    to aim for. Tensors must be contiguous (the cache stores them so).
    """
    if variant not in ("tile", "factored", "dequant"):
        raise KVLayoutError(f"variant must be 'tile', 'factored' or 'dequant', got {variant!r}")
    b, hkv, t_r, d = layer.k_res.shape
    groups = _check(q, hkv, d, b)
    if layer.t_total == 0:
        raise KVLayoutError("cannot attend over an empty cache")
    tensors = (layer.k_codes, layer.k_scale, layer.k_zero, layer.v_codes, layer.v_scale, layer.v_zero,
               layer.k_res, layer.v_res)
    if not all(_rows_ok(t) for t in tensors) or not q.is_contiguous():
        raise KVLayoutError("the Triton kernel needs contiguous query and cache tensors (or token-range views)")
    if layer.k_res.dtype != q.dtype:
        raise KVLayoutError(f"residual dtype {layer.k_res.dtype} != query dtype {q.dtype}")
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)
    sm_count = _sm_count(q.device)
    g = layer.group
    if variant != "dequant" and (g & (g - 1) or g < 16 or d % g):
        raise KVLayoutError(f"the {variant} kernel needs a power-of-two group >= 16 dividing head_dim, got {g}")
    if variant == "tile" and block_n % g:
        raise KVLayoutError(f"the tile kernel needs block_n a multiple of the group ({g}), got {block_n}")
    if layer.key_groups is not None and variant != "dequant":
        raise KVLayoutError("key groups cut by eviction (key_groups) are read by the 'dequant' kernel only")
    if layer.value_bits != layer.bits and variant != "dequant":
        raise KVLayoutError("values of another bit width than the keys are read by the 'dequant' kernel only")
    tile = g if variant == "factored" else block_n
    n_split, tps = _split_plan(b * hkv, layer.t_quant, tile, sm_count, waves)
    if variant == "dequant" and tps % g and n_split > 1:
        tps = math.ceil(tps / g) * g  # splits start on whole groups (and whole code bytes)
        n_split = math.ceil(layer.t_quant / tps)
    n_rows = n_split + 1
    op = torch.empty((b * q.shape[1], n_rows, d), device=q.device, dtype=torch.float32)
    lp = torch.empty((b * q.shape[1], n_rows), device=q.device, dtype=torch.float32)
    gp = max(16, triton.next_power_of_2(groups))
    strides = (layer.k_codes.stride(1), layer.k_scale.stride(1), layer.v_codes.stride(1), layer.v_scale.stride(1),
               layer.k_res.stride(1), layer.v_res.stride(1))
    rows = max(16, triton.next_power_of_2(groups * (d // g)))
    launch = dict(num_warps=num_warps, num_stages=num_stages)
    if variant == "tile":
        _kivi_split_kernel_tile[(b * hkv, n_rows)](
            q, *tensors, op, lp, scale * _LOG2E, layer.t_quant, t_r, tps, *strides,
            GROUPS=groups, GP=gp, ROWS=rows, D=d, BITS=layer.bits, G=g, BLOCK_N=block_n, BLOCK_R=min(block_n, 64),
            V_RESHAPE=v_reshape, **launch)
    elif variant == "factored":
        _kivi_split_kernel_rep[(b * hkv, n_rows)](
            q, *tensors, op, lp, scale * _LOG2E, layer.t_quant, t_r, tps, *strides,
            GROUPS=groups, GP=gp, ROWS=rows, D=d, BITS=layer.bits, G=g, BLOCK_R=block_n,
            K_RESHAPE=k_reshape, V_RESHAPE=v_reshape, num_warps=num_warps, num_stages=num_stages)
    else:
        kgi = layer.key_groups
        _kivi_split_kernel[(b * hkv, n_rows)](
            q, *tensors, op, lp, q if kgi is None else kgi, 0 if kgi is None else kgi.numel(), layer.key_group_rest,
            scale * _LOG2E, layer.t_quant, t_r, tps, *strides,
            GROUPS=groups, GP=gp, D=d, BITS=layer.bits, G=g, BLOCK_N=block_n, GROUP_MAP=kgi is not None,
            VBITS=0 if layer.value_bits == layer.bits else layer.value_bits, num_warps=num_warps, num_stages=num_stages)
    return _combine(op, lp, q, n_rows)


def planes_decode_attention(q: torch.Tensor, layer: PlanesLayer, sm_scale: float | None = None, *,
                            num_warps: int = 2, num_stages: int = 2, waves: float = 4.0,
                            block_r: int = 64, maxnreg: int | None = None, combine_block_s: int | None = None,
                            combine_db: int | None = None, combine_warps: int = 4) -> torch.Tensor:
    """Fused decode attention over a 2- or 4-bit cache in the planes layout (planes.py, triton_kivi_planes.py).

    q ``[B, Hq, D]`` (bf16/fp16, CUDA) -> ``[B, Hq, D]`` in q's dtype. Splits start on whole tiles
    of ``16 // bits * G`` tokens; the last program of each kv head takes the full-precision residual.
    ``combine_*``: the merge launch's partials per loop step, channels and warps per program (``_combine``).
    """
    b, hkv, t_r, d = layer.k_res.shape
    groups = _check(q, hkv, d, b)
    g = layer.group
    if g & (g - 1) or g < 16 or d % g:
        raise KVLayoutError(f"the planes kernel needs a power-of-two group >= 16 dividing head_dim, got {g}")
    if layer.t_total == 0:
        raise KVLayoutError("cannot attend over an empty cache")
    tensors = (layer.kw, layer.ks, layer.kz, layer.vw, layer.vsz, layer.k_res, layer.v_res)
    # the residual may be a token-range view of the cache's stacked residual buffer (cache_path.py)
    if not (all(t.is_contiguous() for t in tensors[:5]) and _rows_ok(layer.k_res) and _rows_ok(layer.v_res)
            and q.is_contiguous()):
        raise KVLayoutError("the Triton kernel needs contiguous query and cache tensors")
    if layer.k_res.dtype != q.dtype:
        raise KVLayoutError(f"residual dtype {layer.k_res.dtype} != query dtype {q.dtype}")
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)
    n_split, tps = _split_plan(b * hkv, layer.t_quant, SLOTS[layer.bits] * g, _sm_count(q.device), waves)
    n_rows = n_split + 1
    op = torch.empty((b * q.shape[1], n_rows, d), device=q.device, dtype=torch.float32)
    lp = torch.empty((b * q.shape[1], n_rows), device=q.device, dtype=torch.float32)
    rows = max(16, triton.next_power_of_2(groups * (d // g)))
    _planes_split_kernel[(b * hkv, n_rows)](
        q, *tensors, op, lp, scale * _LOG2E, layer.t_quant, t_r, tps,
        layer.kw.stride(1), layer.ks.stride(1), layer.vsz.stride(1), layer.vsz.shape[-2],
        layer.k_res.stride(1), layer.v_res.stride(1),
        GROUPS=groups, GP=max(16, triton.next_power_of_2(groups)), ROWS=rows, D=d, G=g, BLOCK_R=block_r,
        BITS=layer.bits, num_warps=num_warps, num_stages=num_stages,
        **({"maxnreg": maxnreg} if maxnreg else {}))
    return _combine(op, lp, q, n_rows, combine_block_s, combine_db, combine_warps)


# warps per program of the swap kernel's combine launch (H100, 32 layers at 32k tokens, 65 partials per row:
# 94 us per step with 1 warp, 100 with 4; scripts/kv_gpu_ab.py)
_SWAP_COMBINE_WARPS = 1


def swap_supported(q: torch.Tensor, layer: PlanesLayer) -> bool:
    """Whether the Gluon operand-swap kernel (gluon_kivi_swap.py) takes this layer: group 32, at most 4 query
    heads per kv head, head_dim 64, 128 or 256, on a card with mma.sync m16n8k16 and cp.async (sm_80 or newer)
    and a Triton that ships Gluon (3.6 is the tested release); elsewhere the planes kernel runs."""
    return (layer.group == 32 and q.shape[1] // layer.k_res.shape[1] <= 4 and layer.k_res.shape[3] in (64, 128, 256)
            and torch.cuda.get_device_capability(q.device) >= (8, 0) and _gluon_available())


@functools.lru_cache(maxsize=1)
def _gluon_available() -> bool:
    try:
        import triton.experimental.gluon  # noqa: F401
    except ImportError:
        return False
    return True


def swap_decode_attention(q: torch.Tensor, layer: PlanesLayer, sm_scale: float | None = None, *,
                          num_warps: int = 1, waves: float | None = None, staged: bool = True,
                          maxnreg: int | None = None, late_copy: bool | None = None, pdl: bool | None = None,
                          pdl_split_trigger: str = "start", pdl_combine_trigger: str | None = None,
                          pipeline: bool | None = None, combine_db: int | None = None,
                          combine_warps: int = _SWAP_COMBINE_WARPS, combine_block_s: int | None = None,
                          softmax_groups: int | None = None, split_consts: dict | None = None,
                          even_waves: float | None = None) -> torch.Tensor:
    """:func:`planes_decode_attention` through the Gluon kernel with tokens on the matrix product's M side
    (gluon_kivi_swap.py): same inputs and result. ``waves``: programs of ``num_warps`` warps per SM (None: the
    plans of swap_plan.py: ``pipeline`` where it applies, else every program resident, evenly spread);
    ``staged``: each warp copies its next unit (code words, scales, zero points) into shared memory while it
    computes the current one; else it loads a unit's words into registers and its scales group by group;
    ``late_copy``: a warp starts the next unit's copy once the current unit has landed, not before waiting for
    it (at the start of a launch every warp then waits for 1 unit's bytes, not 2). None: for 2-bit codes without
    programmatic dependent launch only (H100, 32k tokens, µs per step: KIVI-2 561.5 late against 567.5, KIVI-4
    728.5 against 716.9, BENCHMARKS.md kv-gpu, session 6; with PDL the first unit copies in before the wait, and
    KIVI-2 ran 483.6 early against 488.5 late, session 7);
    ``pdl``: both launches as programmatic dependent launches (pdl.py; None = on sm_90+ with a Triton that has
    the option). The split kernel copies its first unit before it waits for the kernels before it, so the
    quantized planes must not be written by kernels still in flight: pass False right after writing them (the
    cache's mirror does). ``pdl_split_trigger`` / ``pdl_combine_trigger``: where the split / combine launch lets
    the next launch start (:data:`PDL_TRIGGERS`; combine None: "start" under ``pipeline``, else "middle" for
    2-bit codes and "exit" for 4-bit). ``pipeline``: with PDL, both launches let the next start at once and the
    split plan aims at about 7 (2-bit) or 8 (4-bit) programs per SM, so the next layer's programs land in the
    slots this layer leaves free (``pipeline_plan``; None: with PDL and no ``waves`` where that plan exists for a
    measured shape; True where it does not raises). ``combine_db`` / ``combine_warps`` / ``combine_block_s``: channels
    and warps per program of the combine launch and partials per loop step (``_combine``; db None: below).
    ``softmax_groups``: key groups per online-softmax step (None: 8 for 2-bit codes, one step per unit; 4 for 4-bit;
    gluon_kivi_swap.py); ``split_consts``: other constexprs of the split kernel (``ZLAST``, ``FASTCOPY``; A/B runs);
    ``even_waves``: the pipelined plan with the units spread evenly over about that many programs per SM (0: the
    session-7 pipelined plan; None: ``even_plan`` where swap_plan.py's ``EVEN_WAVES`` has the shape).
    H100, 32k tokens, µs per step, KIVI-2 / KIVI-4: without PDL 532.3 / 692.4; PDL with the resident plan
    483.7 / 662.8 (split-combine triggers s-m / s-x; others slower: m-x 516.2 / 668.4, x-x 526.5 / 679.1, m-s
    625.0 / 745.8, m-m 627.0 / 751.4: with the resident plan's 3 free slots per SM, a combine that lets the next
    split start before this split has ended lands the next layer's programs unevenly on the SMs); pipelined
    452.7 / 610.6 (BENCHMARKS.md kv-gpu, session 7); with one softmax step per 2-bit unit, one-warp copy addresses
    and the zero-point product last, KIVI-2 438.0 against 456.3 for the tree before; with the even plan (792
    programs of 2-3 units) 429.8 (session 8)."""
    from memvisor.kv.gpu.gluon_kivi_swap import _swap_split_kernel
    from memvisor.kv.gpu.pdl import resolve_pdl

    b, hkv, t_r, d = layer.k_res.shape
    groups = _check(q, hkv, d, b)
    if not swap_supported(q, layer):
        raise KVLayoutError("the swap kernel needs group 32, <= 4 query heads per kv head, head_dim 64/128/256")
    if layer.t_total == 0:
        raise KVLayoutError("cannot attend over an empty cache")
    tensors = (layer.kw, layer.ks, layer.kz, layer.vw, layer.vsz, layer.k_res, layer.v_res)
    if not (all(t.is_contiguous() for t in tensors[:5]) and _rows_ok(layer.k_res) and _rows_ok(layer.v_res)
            and q.is_contiguous()):
        raise KVLayoutError("the kernel needs contiguous query and cache tensors")
    if layer.k_res.dtype != q.dtype:
        raise KVLayoutError(f"residual dtype {layer.k_res.dtype} != query dtype {q.dtype}")
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)
    pdl = resolve_pdl(pdl, q.device)
    if softmax_groups not in (None, 4, 8) or (softmax_groups or 4) > 16 // layer.bits:
        raise KVLayoutError(f"softmax_groups must be 4 or at most the tile's {16 // layer.bits} groups")
    n_units = 2 * -(-layer.t_quant // (SLOTS[layer.bits] * 32))  # two units of 16 slots per tile
    shape, sms = (layer.bits, d, num_warps), _sm_count(q.device)
    piped, even = None, False
    if pdl and shape in EVEN_WAVES and even_waves is None:
        n = even_plan(b * hkv, n_units, sms, *EVEN_WAVES[shape])
        piped, even = (None, False) if n is None else ((n, -(-n_units // n)), True)
    if even_waves:  # about even_waves programs per SM, the units spread evenly (A/B runs)
        n = min(n_units, -(-int(even_waves * sms) // (b * hkv)))
        piped, even = (n, -(-n_units // n)), True
    if piped is None and pdl and shape in PIPELINE_WAVES:
        piped = pipeline_plan(b * hkv, n_units, sms, PIPELINE_WAVES[shape])
    if pipeline and (piped is None or waves is not None or not pdl):
        raise KVLayoutError("the pipelined plan needs PDL, a measured shape and a split that fits (swap_plan.py)")
    pipeline = piped is not None and pipeline is not False and waves is None
    consts = {"SMG": softmax_groups or (8 if layer.bits == 2 else 4), "ZLAST": layer.bits == 2,
              "EVEN": pipeline and even, "FASTCOPY": layer.bits == 2}
    if pdl_combine_trigger is None:
        pdl_combine_trigger = "start" if pipeline else "middle" if layer.bits == 2 else "exit"
    if pipeline:
        n_split, ups = piped
    elif waves is None:
        n_split, ups = swap_plan(b * hkv, n_units, sms, SWAP_RESIDENT.get(shape, 4))
    else:
        n_split, ups = _split_plan(b * hkv, n_units, 1, sms, waves)
    n_rows = n_split + 1
    op = torch.empty((b * q.shape[1], n_rows, d), device=q.device, dtype=torch.float32)
    lp = torch.empty((b * q.shape[1], n_rows), device=q.device, dtype=torch.float32)
    # no quantized tokens: the strides of empty tensors may be odd, and no program reads them
    strides = (layer.kw.stride(1), layer.ks.stride(1), layer.vsz.stride(1)) if layer.t_quant else (0, 0, 0)
    _swap_split_kernel[(b * hkv, n_rows)](
        q, *tensors, op, lp, scale * _LOG2E, layer.t_quant, t_r, ups, *strides, layer.vsz.shape[-2],
        layer.k_res.stride(1), layer.v_res.stride(1),
        GROUPS=groups, D=d, BITS=layer.bits, STAGED=staged, LATE=layer.bits == 2 and not pdl if late_copy is None else late_copy,
        **{**consts, **(split_consts or {})},
        num_warps=num_warps, **({"maxnreg": maxnreg} if maxnreg else {}), **_pdl_args(pdl, pdl_split_trigger))
    # 16 channels per combine program where the partials take two loop steps (over 128): H100, KIVI-4 at 32k (129
    # partials per row) 610.3 us per step against 649.8 with 32; KIVI-2 (87) 469.4 against 459.0
    db = combine_db or (16 if n_rows > 128 else 32)
    return _combine(op, lp, q, n_rows, block_s=combine_block_s, db=db, num_warps=combine_warps, pdl=pdl,
                    pdl_trigger=pdl_combine_trigger)


def dense_decode_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float | None = None,
                                  *, block_n: int = 64, num_warps: int = 4, num_stages: int = 2,
                                  waves: float = 2.0) -> torch.Tensor:
    """The same split-K decode over a plain cache: q ``[B, Hq, D]``, k/v ``[B, Hkv, T, D]`` (q's dtype)."""
    b, hkv, t, d = k.shape
    groups = _check(q, hkv, d, b)
    if v.shape != k.shape or not (k.is_contiguous() and v.is_contiguous() and q.is_contiguous()):
        raise KVLayoutError("keys and values must be contiguous and of one shape")
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)
    sm_count = _sm_count(q.device)
    n_split, tps = _split_plan(b * hkv, t, block_n, sm_count, waves)
    op = torch.empty((b * q.shape[1], n_split, d), device=q.device, dtype=torch.float32)
    lp = torch.empty((b * q.shape[1], n_split), device=q.device, dtype=torch.float32)
    gp = max(16, triton.next_power_of_2(groups))
    _dense_split_kernel[(b * hkv, n_split)](
        q, k, v, op, lp, scale * _LOG2E, t, tps, k.stride(1),
        GROUPS=groups, GP=gp, D=d, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages)
    return _combine(op, lp, q, n_split)
