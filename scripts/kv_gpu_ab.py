"""A/B of decode-attention kernel variants on one warm CUDA card (the runs behind BENCHMARKS.md kv-gpu).

    python scripts/kv_gpu_ab.py --lengths 1024,8192,32768,65536 --out DIR

Llama-3.1-8B-shaped attention as in ``memvisor bench kv-gpu`` (32 layers, one random cache per layer,
one step of all layers captured in a CUDA graph, median of replays with the L2 flushed). Each variant is
timed ``--reps`` times, interleaved with the others, so drift of the card shows as spread; the bf16
baselines (SDPA, the Triton split kernel) are timed beside them. Also: each variant's relative error
against the torch reference on fresh data, the combine launch alone (32 layers) at each length, and the
default planes and swap settings over ONE layer's cache 32 times (``/l2``: after the first pass that layer,
25 MB for KIVI-2 at 32k, sits in the 50 MB L2, so the first tiles arrive without waiting on DRAM).
Prints a table and writes ``ab.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from memvisor.bench.kv_gpu import GpuBenchConfig, _bench, _kivi_attend, _kivi_layers, _step, copy_bandwidth
from memvisor.kv.gpu import decode_attention_reference, quantize_layer, to_planes

# the resident plan (no pipelining) with each placement of the split / combine launch's trigger that lets the
# next launch start ("s" start, "m" middle, "x" exit: PDL_TRIGGERS in triton_decode.py), e.g. "swap-pdl-sx"
_TRIGGER_LETTER = {"start": "s", "middle": "m", "exit": "x"}
_PDL_TRIGGER_VARIANTS = {
    f"swap-pdl-{_TRIGGER_LETTER[split]}{_TRIGGER_LETTER[combine]}": dict(
        variant="swap", pipeline=False, pdl_split_trigger=split, pdl_combine_trigger=combine)
    for split, combine in [("start", "exit"), ("middle", "exit"), ("start", "middle"), ("middle", "middle"),
                           ("middle", "start"), ("exit", "exit")]
}

# The pipelined plan with the next unit's copy after the current one lands; its combine launch with 16
# channels per program (256 programs) or 64 channels on 2 warps (both widths).
_PIPE_VARIANTS = {
    "swap-pipe-late": dict(variant="swap", late_copy=True),
    "swap-pipe-cdb16": dict(variant="swap", combine_db=16),
    "swap-pipe-cw2db64": dict(variant="swap", combine_db=64, combine_warps=2),
    "swap-pipe-cdb32": dict(variant="swap", combine_db=32),
    "swap-pipe-cdb16bs256": dict(variant="swap", combine_db=16, combine_block_s=256),
}

# the Gluon operand-swap kernel (gluon_kivi_swap.py, "swap-wWxV": W warps per program, V programs per SM)
# against the planes kernel
VARIANTS = {
    2: {
        "planes": dict(variant="planes"),
        "swap": dict(variant="swap"),
        "swap-w1x7": dict(variant="swap", num_warps=1, waves=7.0),
        "swap-reg-w1x8": dict(variant="swap", num_warps=1, waves=8.0, staged=False),
        # session 6: programs of 2 or 4 warps with the same 4 units per warp (half / a quarter of the partials
        # for the combine); the next unit's copy started before waiting for the current one (the default until
        # session 6)
        "swap-w2x2": dict(variant="swap", num_warps=2, waves=2.0),
        "swap-w4x1": dict(variant="swap", num_warps=4, waves=1.0),
        "swap-early": dict(variant="swap", late_copy=False),
        # session 7: programmatic dependent launches (pdl.py; "swap" uses them where available, with the pipelined
        # plan of swap_plan.py): off; without the pipelined plan; without it, where the split / combine launch
        # lets the next one start ("s" start, "m" middle, "x" exit: PDL_TRIGGERS in triton_decode.py)
        "swap-nopdl": dict(variant="swap", pdl=False),
        "swap-nopipe": dict(variant="swap", pipeline=False),
        **_PDL_TRIGGER_VARIANTS,
        "swap-late": dict(variant="swap", pipeline=False, late_copy=True),
        # waves=7: 688 programs of 3 units at 32k (5.2 per SM), with the trigger placements above and without PDL
        "swap-w1x7-sm": dict(variant="swap", num_warps=1, waves=7.0),
        "swap-w1x7-sx": dict(variant="swap", num_warps=1, waves=7.0, pdl_combine_trigger="exit"),
        "swap-w1x7-mx": dict(variant="swap", num_warps=1, waves=7.0, pdl_split_trigger="middle",
                             pdl_combine_trigger="exit"),
        "swap-w1x7-mm": dict(variant="swap", num_warps=1, waves=7.0, pdl_split_trigger="middle"),
        "swap-w1x7-xx": dict(variant="swap", num_warps=1, waves=7.0, pdl_split_trigger="exit",
                             pdl_combine_trigger="exit"),
        "swap-w1x7-nopdl": dict(variant="swap", num_warps=1, waves=7.0, pdl=False),
        "swap-w1x7-ss": dict(variant="swap", num_warps=1, waves=7.0, pdl_combine_trigger="start"),
        "swap-w1x7-ms": dict(variant="swap", num_warps=1, waves=7.0, pdl_split_trigger="middle",
                             pdl_combine_trigger="start"),
        # both launches let the next start at their start (the next layer's programs land as this layer's end):
        # 1024 programs of 2 units, 2048 of 1
        "swap-w1x8-ss": dict(variant="swap", num_warps=1, waves=8.0, pdl_combine_trigger="start"),
        "swap-w1x16-ss": dict(variant="swap", num_warps=1, waves=16.0, pdl_combine_trigger="start"),
        **_PIPE_VARIANTS,
        # session 8: one online-softmax step per 4 groups of a unit (the default before: 2 steps per 2-bit unit)
        "swap-smg4": dict(variant="swap", softmax_groups=4),
        # session 8: the zero-point product first in each group's score chain (the default before; now last)
        "swap-zfirst": dict(variant="swap", split_consts={"ZLAST": False}),
        # session 8: pipelined plans with the units spread evenly over about V programs per SM ("swap-evenV")
        "swap-even4.6": dict(variant="swap", even_waves=4.6),
        "swap-even5": dict(variant="swap", even_waves=5.0),
        "swap-even5.5": dict(variant="swap", even_waves=5.5),
        "swap-even6": dict(variant="swap", even_waves=6.0),
        "swap-even6.5": dict(variant="swap", even_waves=6.5),
        "swap-even6.9": dict(variant="swap", even_waves=6.9),
        "swap-pipe7": dict(variant="swap", even_waves=0.0),  # the session-7 pipelined plan (688 programs of 3 units)
    },
    4: {
        "planes": dict(variant="planes"),
        "swap": dict(variant="swap"),
        "swap-w1x7": dict(variant="swap", num_warps=1, waves=7.0),
        "swap-w4x1": dict(variant="swap", num_warps=4, waves=1.0),
        "swap-x8": dict(variant="swap", waves=8.0),  # 1024 programs of 4 units at 32k (8 per SM)
        "swap-early": dict(variant="swap", late_copy=False),
        "swap-nopdl": dict(variant="swap", pdl=False),
        "swap-nopipe": dict(variant="swap", pipeline=False),
        **_PDL_TRIGGER_VARIANTS,
        # 1024 programs of 4 units at 32k (7.8 per SM, of 9 that fit), with the trigger placements above
        "swap-x8-sm": dict(variant="swap", waves=8.0, pdl_combine_trigger="middle"),
        "swap-x8-ss": dict(variant="swap", waves=8.0, pdl_combine_trigger="start"),
        "swap-x12-ss": dict(variant="swap", waves=12.0, pdl_combine_trigger="start"),  # 1368 programs of 3 units
        "swap-x16-ss": dict(variant="swap", waves=16.0, pdl_combine_trigger="start"),  # 2048 programs of 2 units
        **_PIPE_VARIANTS,
        # session 8: the even pipelined plan (swap_plan.even_plan) at about V programs per SM
        "swap-even8.5": dict(variant="swap", even_waves=8.5),
        "swap-even8.9": dict(variant="swap", even_waves=8.9),
        # session 8: an explicit register ceiling of 255 (without one ptxas stops the builds below at 168 and
        # spills), the one-warp copy addresses and the zero-point product last (2-bit defaults), then even plans
        "swap-mr255": dict(variant="swap", maxnreg=255),
        "swap-k2paths": dict(variant="swap", maxnreg=255, split_consts={"FASTCOPY": True, "ZLAST": True}),
        "swap-k2paths-even8": dict(variant="swap", maxnreg=255, split_consts={"FASTCOPY": True, "ZLAST": True},
                                   even_waves=8.0),
        "swap-k2paths-even8.9": dict(variant="swap", maxnreg=255, split_consts={"FASTCOPY": True, "ZLAST": True},
                                     even_waves=8.9),
    },
}
PLANES = ("planes", "swap")  # variants that read the planes layout


def errors(cfg: GpuBenchConfig, tokens: int = 4096 + 45) -> dict:
    out = {}
    k = torch.randn(1, cfg.kv_heads, tokens, cfg.head_dim, device="cuda").bfloat16()
    v = torch.randn(1, cfg.kv_heads, tokens, cfg.head_dim, device="cuda").bfloat16() * 3
    q = torch.randn(1, cfg.q_heads, cfg.head_dim, device="cuda").bfloat16()
    for bits, variants in VARIANTS.items():
        layer = quantize_layer(k.float(), v.float(), bits, cfg.group, cfg.residual)
        layer.k_res, layer.v_res = layer.k_res.bfloat16().contiguous(), layer.v_res.bfloat16().contiguous()
        ref = decode_attention_reference(q, layer).double()
        planes = to_planes(layer)
        for name, kw in variants.items():
            try:  # a variant that fails to compile is reported, not fatal
                got = _kivi_attend(q, planes if kw["variant"] in PLANES else layer, kw).double()
                out[f"kivi{bits}/{name}"] = float((got - ref).norm() / ref.norm())
            except Exception as exc:  # noqa: BLE001
                out[f"kivi{bits}/{name}"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    return out


def combine_only(cfg: GpuBenchConfig, tokens: int) -> dict:
    """The combine launch alone, 32 layers, with the partial counts the 2-bit planes kernel makes."""
    from memvisor.kv.gpu.triton_decode import _combine, _sm_count, _split_plan

    n_split, _ = _split_plan(cfg.kv_heads, tokens, 256, _sm_count(torch.device("cuda")), 4.0)
    n_rows = n_split + 1
    res = {}
    qs = [torch.randn(1, cfg.q_heads, cfg.head_dim, device="cuda").bfloat16() for _ in range(cfg.layers)]
    ops = [torch.randn(cfg.q_heads, n_rows, cfg.head_dim, device="cuda") for _ in range(cfg.layers)]
    lps = [torch.randn(cfg.q_heads, n_rows, device="cuda") for _ in range(cfg.layers)]
    for bs, db, w in ((64, 128, 4), (None, None, 4), (None, 16, 4), (None, None, 1), (None, 16, 1),
                      (None, None, 2), (None, 64, 2)):
        def run(bs=bs, db=db, w=w):
            for q, op, lp in zip(qs, ops, lps):
                _combine(op, lp, q, n_rows, bs, db, w)
        res[f"block_s={bs} db={db} warps={w}"] = _bench(run) * 1e3
    return res


def breakdown(cfg: GpuBenchConfig, q_layers: list, tokens: int, bits: int, kw: dict) -> dict:
    """µs per step (32 layers) of the swap kernel's step, its split launches alone (the combine replaced by a
    no-op) and its combine launches alone, over 32 caches (L2 flushed), so the combine's share is measured."""
    from memvisor.kv.gpu import triton_decode as td

    planes = [to_planes(x) for x in _kivi_layers(cfg, tokens, bits)]
    out = {"step": _bench(_step(q_layers, planes, lambda q, c: _kivi_attend(q, c, kw))) * 1e3}
    saved, seen = td._combine, {}

    def no_combine(op, lp, q, n_rows, *a, **k):
        seen["n_rows"] = n_rows
        return q

    td._combine = no_combine
    try:
        out["split_only"] = _bench(_step(q_layers, planes, lambda q, c: _kivi_attend(q, c, kw))) * 1e3
    finally:
        td._combine = saved
    n_rows = seen["n_rows"]
    ops = [torch.randn(cfg.q_heads, n_rows, cfg.head_dim, device="cuda") for _ in range(cfg.layers)]
    lps = [torch.randn(cfg.q_heads, n_rows, device="cuda") for _ in range(cfg.layers)]

    def comb():
        for q, op, lp in zip(q_layers, ops, lps):
            saved(op, lp, q, n_rows)
    out["combine_only"] = _bench(comb) * 1e3
    out["n_rows"] = n_rows
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="1024,8192,32768,65536")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--only", default="", help="comma-separated variant names to run (default: all)")
    ap.add_argument("--breakdown", action="store_true", help="also time the swap step's split and combine apart")
    args = ap.parse_args()
    if args.only:
        keep = set(args.only.split(","))
        for variants in VARIANTS.values():
            for name in [n for n in variants if n not in keep]:
                del variants[name]
    cfg = GpuBenchConfig()
    args.out.mkdir(parents=True, exist_ok=True)
    props = torch.cuda.get_device_properties(0)
    import triton

    res: dict = {"card": props.name, "torch": torch.__version__, "triton": triton.__version__,
                 "date": time.strftime("%Y-%m-%d"), "copy_GBps": copy_bandwidth() / 1e9, "rows": {}}
    print(f"{props.name} torch {torch.__version__} triton {triton.__version__} copy {res['copy_GBps']:.0f} GB/s",
          flush=True)
    res["errors"] = errors(cfg)
    print("errors", json.dumps(res["errors"]), flush=True)
    torch.manual_seed(0)
    b, hq, hkv, d = cfg.batch, cfg.q_heads, cfg.kv_heads, cfg.head_dim
    q_layers = [torch.randn(b, hq, d, device="cuda").bfloat16() for _ in range(cfg.layers)]
    from memvisor.kv.gpu.triton_decode import dense_decode_attention_triton

    for tokens in (int(x) for x in args.lengths.split(",")):
        row: dict = {}
        kv = [(torch.randn(b, hkv, tokens, d, device="cuda").bfloat16(),
               torch.randn(b, hkv, tokens, d, device="cuda").bfloat16()) for _ in range(cfg.layers)]
        sdpa = lambda q, c: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
            q.unsqueeze(2), c[0], c[1], enable_gqa=True)
        tri = lambda q, c: dense_decode_attention_triton(  # noqa: E731
            q, c[0], c[1], block_n=64, num_warps=4, waves=2.0)
        row["bf16_sdpa"] = [_bench(_step(q_layers, kv, sdpa)) * 1e3 for _ in range(args.reps)]
        row["bf16_triton"] = [_bench(_step(q_layers, kv, tri)) * 1e3 for _ in range(args.reps)]
        del kv
        torch.cuda.empty_cache()
        for bits, variants in VARIANTS.items():
            layers = _kivi_layers(cfg, tokens, bits)
            planes = [to_planes(x) for x in layers]
            for _ in range(args.reps):
                for name, kw in variants.items():
                    caches = planes if kw["variant"] in PLANES else layers
                    if isinstance(res["errors"].get(f"kivi{bits}/{name}"), str):
                        continue  # it did not run
                    fn = _step(q_layers, caches, lambda q, c, kw=kw: _kivi_attend(q, c, kw))
                    row.setdefault(f"kivi{bits}/{name}", []).append(_bench(fn) * 1e3)
                    if name in ("planes", "swap"):
                        one = _step(q_layers, [caches[0]] * len(caches), lambda q, c, kw=kw: _kivi_attend(q, c, kw))
                        row.setdefault(f"kivi{bits}/{name}/l2", []).append(_bench(one) * 1e3)
            row[f"kivi{bits}/bytes"] = sum(x.nbytes() for x in planes)
            del layers, planes
            torch.cuda.empty_cache()
        row["combine_only"] = combine_only(cfg, tokens)
        if args.breakdown:
            for bits, variants in VARIANTS.items():
                for name in [n for n in variants if n.startswith("swap")]:
                    key = f"breakdown_kivi{bits}/{name}"
                    row[key] = breakdown(cfg, q_layers, tokens, bits, variants[name])
                    print(f"{tokens:>6} kivi{bits} {name} breakdown (us/step): {row[key]}", flush=True)
        res["rows"][tokens] = row
        best = min(min(row["bf16_sdpa"]), min(row["bf16_triton"]))
        print(f"--- {tokens} tokens: bf16 sdpa {row['bf16_sdpa']} triton {row['bf16_triton']}", flush=True)
        for key, val in row.items():
            if key.startswith("kivi") and not key.endswith("bytes"):
                bits = int(key[4])
                gbps = row[f"kivi{bits}/bytes"] / (min(val) * 1e-6) / 1e9
                print(f"{tokens:>6} {key:<22} {' '.join(f'{x:7.1f}' for x in val)} us  x{best / min(val):.2f} "
                      f"{gbps:6.0f} GB/s ({100 * gbps / res['copy_GBps']:.0f}%)", flush=True)
        print(f"{tokens:>6} combine only (32 layers, us): {row['combine_only']}", flush=True)
        (args.out / "ab.json").write_text(json.dumps(res, indent=1))  # after each length: a timeout keeps the rest


if __name__ == "__main__":
    main()
