"""`memvisor bench kv-gpu`: decode-attention time of the KIVI cache vs the bf16 cache on a CUDA card.

A Llama-3.1-8B-shaped attention (32 layers, 32 query heads, 8 kv heads, head_dim 128, bf16,
random data: speed does not depend on the weights). For each context length it builds one cache
per layer (so the timed step streams every layer's cache from memory, as a real decode step does,
instead of re-reading one layer out of L2), captures one decode step over all layers in a CUDA
graph, and times its replays (median, L2 flushed between runs). Bandwidth is the least number
of bytes the step must read (the cache's real bytes + queries + outputs) over its time, set against
the card's measured device-to-device copy bandwidth (bytes read + written).
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from memvisor.kv.gpu import decode_attention_reference, quantize_layer, random_layer, to_planes


@dataclass
class GpuBenchConfig:
    """Shapes (tokens, heads, channels) and timing knobs of the GPU benchmark."""

    lengths: tuple[int, ...] = (8192, 16384, 32768, 65536)
    bits: tuple[int, ...] = (2, 4)
    batch: int = 1
    layers: int = 32
    q_heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    group: int = 32
    residual: int = 32
    tune_length: int = 32768
    # kernel settings tried at tune_length (the fastest is used at every length)
    configs: list[dict] = field(default_factory=lambda: [
        *(dict(variant="tile", block_n=bn, num_warps=w, waves=wv, num_stages=2, v_reshape=True)
          for bn, w, wv in ((64, 4, 4.0), (128, 4, 4.0), (128, 8, 2.0))),
    ])
    # the planes kernel (planes.py, triton_kivi_planes.py), 2- and 4-bit. 2 warps and 2 stages (4 warps,
    # 1 stage and register caps of 128-168 measured slower, BENCHMARKS.md kv-gpu); the combine launch
    # with its defaults, with fewer warps or channels per program, and as it was before this session
    # (64 partials per step, one program per query row); 5 programs per SM under a 200-register cap (the
    # 4-bit kernel fits 5 in shared memory, the 2-bit one does not); 3 stages (fewer programs per SM)
    planes_configs: list[dict] = field(default_factory=lambda: [
        dict(variant="planes", num_warps=2, num_stages=st, waves=wv, **kw)
        for st, wv, kw in ((2, 4.0, {}), (2, 4.0, dict(combine_db=16, combine_warps=2)),
                           (2, 4.0, dict(combine_warps=2)), (2, 4.0, dict(combine_block_s=64, combine_db=128)),
                           (2, 5.0, dict(maxnreg=200)), (3, 3.0, {}))
    ] + [dict(variant="swap")])  # the Gluon operand-swap kernel (gluon_kivi_swap.py), its own split plan
    dense_configs: list[dict] = field(default_factory=lambda: [
        dict(block_n=bn, num_warps=w, waves=wv, num_stages=2) for bn, w in ((64, 4), (128, 8)) for wv in (2.0, 4.0)
    ])


def _bench(fn: Callable[[], object], rep: int = 200) -> float:
    """Median milliseconds of ``fn`` replayed from a CUDA graph, L2 flushed before each run."""
    import triton.testing

    fn()  # compile and warm up outside the graph
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        graph.capture_begin()
        fn()
        graph.capture_end()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    return float(triton.testing.do_bench(graph.replay, warmup=25, rep=rep, return_mode="median"))


def copy_bandwidth(n_bytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    import triton.testing

    src = torch.empty(n_bytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = float(triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median"))
    return 2 * n_bytes / (ms * 1e-3)


def check_kernel(cfg: GpuBenchConfig, kivi_kw: dict, dense_kw: dict, tokens: int = 4096 + 45) -> dict:
    """Relative errors of the kernels (tuned settings) against the torch reference, on fresh random data."""
    from memvisor.kv.gpu.reference import dense_decode_attention
    from memvisor.kv.gpu.triton_decode import dense_decode_attention_triton

    out = {}
    b, hq, hkv, d = cfg.batch, cfg.q_heads, cfg.kv_heads, cfg.head_dim
    k = torch.randn(b, hkv, tokens, d, device="cuda").bfloat16()
    v = torch.randn(b, hkv, tokens, d, device="cuda").bfloat16()
    q = torch.randn(b, hq, d, device="cuda").bfloat16()
    for bits in cfg.bits:
        layer = quantize_layer(k.float(), v.float(), bits, cfg.group, cfg.residual)
        layer.k_res, layer.v_res = layer.k_res.bfloat16().contiguous(), layer.v_res.bfloat16().contiguous()
        ref = decode_attention_reference(q, layer).double()
        got = _kivi_attend(q, to_planes(layer) if kivi_kw[bits].get("variant") in ("planes", "swap") else layer,
                           kivi_kw[bits]).double()
        out[f"kivi{bits}_vs_reference"] = float((got - ref).norm() / ref.norm())
    ref = dense_decode_attention(q, k, v)
    got = dense_decode_attention_triton(q, k, v, **dense_kw).double()
    out["bf16_triton_vs_float64"] = float((got - ref).norm() / ref.norm())
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q.unsqueeze(2), k, v, enable_gqa=True).squeeze(2).double()
    out["bf16_sdpa_vs_float64"] = float((sdpa - ref).norm() / ref.norm())
    return out


def _kivi_layers(cfg: GpuBenchConfig, tokens: int, bits: int, planes: bool = False) -> list:
    """One random cache per layer: ``KiviLayer`` (cache layout) or, with ``planes``, its planes repack."""
    gen = torch.Generator(device="cuda").manual_seed(bits)
    out = []
    for _ in range(cfg.layers):
        layer = random_layer(cfg.batch, cfg.kv_heads, tokens - cfg.residual, cfg.head_dim, bits, cfg.group,
                             cfg.residual, torch.bfloat16, "cuda", gen)
        out.append(to_planes(layer) if planes else layer)
    return out


def _kivi_attend(q: torch.Tensor, layer, kw: dict) -> torch.Tensor:
    """The KIVI kernel that ``kw["variant"]`` names, with the rest of ``kw`` as its settings."""
    from memvisor.kv.gpu.triton_decode import kivi_decode_attention, planes_decode_attention, swap_decode_attention

    if kw.get("variant") == "swap":
        return swap_decode_attention(q, layer, **{k: v for k, v in kw.items() if k != "variant"})
    if kw.get("variant") == "planes":
        return planes_decode_attention(q, layer, **{k: v for k, v in kw.items() if k != "variant"})
    return kivi_decode_attention(q, layer, **kw)


def _step(queries: list[torch.Tensor], caches: list, attend: Callable) -> Callable[[], None]:
    def run() -> None:
        for q, c in zip(queries, caches):
            attend(q, c)
    return run


def _tune(fn_for: Callable[[dict], Callable[[], None]], configs: list[dict]) -> tuple[dict, float, list[dict]]:
    trials = []
    for kw in configs:
        try:
            ms = _bench(fn_for(kw), rep=60)
        except Exception as exc:  # a config the compiler rejects (e.g. out of shared memory) is skipped
            trials.append({**kw, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
            continue
        trials.append({**kw, "ms": ms})
    ok = [t for t in trials if "ms" in t]
    if not ok:
        raise RuntimeError(f"no kernel configuration ran: {trials[:3]}")
    best = min(ok, key=lambda t: t["ms"])
    return {k: v for k, v in best.items() if k != "ms"}, best["ms"], trials


def _tune_kivi(cfg: GpuBenchConfig, q_layers: list, tokens: int, bits: int) -> tuple[dict, float, list[dict]]:
    """Best KIVI kernel settings at ``tokens``: the cache-layout kernels and the planes kernel."""
    families = [(False, cfg.configs)] + ([(True, cfg.planes_configs)] if cfg.planes_configs else [])
    best, trials = None, []
    for planes, configs in families:
        layers = _kivi_layers(cfg, tokens, bits, planes)
        kw, ms, tr = _tune(lambda kw: _step(q_layers, layers, lambda q, c: _kivi_attend(q, c, kw)), configs)
        trials += tr
        if best is None or ms < best[1]:
            best = (kw, ms)
        del layers
        torch.cuda.empty_cache()
    return best[0], best[1], trials


def time_cache_path(cfg: GpuBenchConfig, tokens: int, bits: int, steps: int = 16) -> dict:
    """Milliseconds per decode step of the compressed cache itself (``LayerCore.update`` + ``attend`` of
    every layer: storing the token, the attention, quantizing a finished group), eager as a model runs
    it (no graph: the cache's Python logic runs each step): fused kernel path against the block-wise
    torch path, ``tokens`` random tokens already stored per layer."""
    import time

    from memvisor.kv.layer import LayerConfig, LayerCore
    from memvisor.kv.storage import QuantConfig

    b, hq, hkv, d = cfg.batch, cfg.q_heads, cfg.kv_heads, cfg.head_dim
    gen = torch.Generator(device="cuda").manual_seed(7)
    res = {}
    for fused in (True, False):
        cores = []
        for i in range(cfg.layers):
            c = LayerCore(LayerConfig(i, None, QuantConfig(bits, cfg.group, cfg.residual), fused_decode=fused))
            k = torch.randn(b, hkv, tokens, d, device="cuda", generator=gen).bfloat16()
            v = torch.randn(b, hkv, tokens, d, device="cuda", generator=gen).bfloat16()
            c.init(k)
            for h, st in enumerate(c.stores):  # a prefill's storage without its (quadratic) attention
                st.append(k[:, h], v[:, h])
            c.cum = tokens
            cores.append(c)
        new = [[torch.randn(b, h, 1, d, device="cuda", generator=gen).bfloat16() for h in (hkv, hkv, hq)]
               for _ in range(steps + 2)]

        def step(i: int) -> None:
            k1, v1, q1 = new[i]
            for c in cores:
                c.update(k1, v1)
                c.attend(q1, d ** -0.5)

        step(0), step(1)  # warm-up: compiles, and the fused path's first mirror of the history
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(2, steps + 2):
            step(i)
        torch.cuda.synchronize()
        res["fused_ms" if fused else "torch_path_ms"] = (time.perf_counter() - t0) * 1e3 / steps
        if fused:
            res["mirror_bytes"] = sum(c.mirror.nbytes(c.stores) for c in cores)
            res["store_bytes"] = sum(c.nbytes() for c in cores) - res["mirror_bytes"]
        del cores, new
        torch.cuda.empty_cache()
    return res


def run_gpu_bench(cfg: GpuBenchConfig, log: Callable[[str], None] = print) -> dict:
    """Measure and return the results dict (written by the CLI as results.json)."""
    import triton

    from memvisor.kv.gpu.triton_decode import dense_decode_attention_triton

    if not torch.cuda.is_available():
        raise RuntimeError("memvisor bench kv-gpu needs a CUDA device")
    props = torch.cuda.get_device_properties(0)
    res: dict = {
        "card": props.name, "sm_count": props.multi_processor_count,
        "date": _dt.date.today().isoformat(), "torch": torch.__version__, "triton": triton.__version__,
        "shape": {"layers": cfg.layers, "batch": cfg.batch, "q_heads": cfg.q_heads, "kv_heads": cfg.kv_heads,
                  "head_dim": cfg.head_dim, "dtype": "bfloat16", "group": cfg.group, "residual": cfg.residual},
    }
    bw = copy_bandwidth()
    res["copy_bandwidth_GBps"] = bw / 1e9
    log(f"card {props.name}; copy bandwidth {bw / 1e9:.0f} GB/s (read + write)")
    b, hq, hkv, d = cfg.batch, cfg.q_heads, cfg.kv_heads, cfg.head_dim
    q_layers = [torch.randn(b, hq, d, device="cuda").bfloat16() for _ in range(cfg.layers)]

    # tune at one length, then use the winners everywhere
    t = cfg.tune_length
    tuned: dict = {}
    for bits in cfg.bits:
        kw, ms, trials = _tune_kivi(cfg, q_layers, t, bits)
        tuned[bits] = kw
        res[f"tuning_kivi{bits}"] = trials
        log(f"kivi{bits} best at {t}: {kw} {ms * 1e3:.0f} us/step")
    kv = [(torch.randn(b, hkv, t, d, device="cuda").bfloat16(), torch.randn(b, hkv, t, d, device="cuda").bfloat16())
          for _ in range(cfg.layers)]
    dense_kw, ms, trials = _tune(
        lambda kw: _step(q_layers, kv, lambda q, c: dense_decode_attention_triton(q, c[0], c[1], **kw)),
        cfg.dense_configs)
    res["tuning_bf16_triton"] = trials
    log(f"bf16 triton best at {t}: {dense_kw} {ms * 1e3:.0f} us/step")
    del kv
    torch.cuda.empty_cache()
    res["kernel_config"] = {"bf16_triton": dense_kw, **{f"kivi{bits}": tuned[bits] for bits in cfg.bits}}
    res["errors"] = check_kernel(cfg, tuned, dense_kw)
    log(f"errors vs reference: {res['errors']}")
    res["cache_path"] = {f"kivi{bits}": time_cache_path(cfg, t, bits) for bits in cfg.bits}
    log(f"the cache's own decode step at {t} tokens (eager, ms/step): {res['cache_path']}")

    rows = []
    io_bytes = 2 * sum(q.numel() * q.element_size() for q in q_layers)  # queries read + outputs written
    for tokens in cfg.lengths:
        kv = [(torch.randn(b, hkv, tokens, d, device="cuda").bfloat16(),
               torch.randn(b, hkv, tokens, d, device="cuda").bfloat16()) for _ in range(cfg.layers)]
        bf16_bytes = sum(k.numel() * k.element_size() * 2 for k, _ in kv) + io_bytes
        entry = {"tokens": tokens}
        sdpa = lambda q, c: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
            q.unsqueeze(2), c[0], c[1], enable_gqa=True)
        for name, fn in (("bf16_sdpa", sdpa),
                         ("bf16_triton", lambda q, c: dense_decode_attention_triton(q, c[0], c[1], **dense_kw))):
            ms = _bench(_step(q_layers, kv, fn))
            entry[name] = {"us_per_step": ms * 1e3, "us_per_layer": ms * 1e3 / cfg.layers,
                           "bytes_per_step": bf16_bytes, "GBps": bf16_bytes / (ms * 1e-3) / 1e9}
        del kv
        torch.cuda.empty_cache()
        fp16_best = min(entry["bf16_sdpa"]["us_per_step"], entry["bf16_triton"]["us_per_step"])
        for bits in cfg.bits:
            layers = _kivi_layers(cfg, tokens, bits, tuned[bits].get("variant") in ("planes", "swap"))
            nbytes = sum(layer.nbytes() for layer in layers) + io_bytes
            ms = _bench(_step(q_layers, layers, lambda q, c: _kivi_attend(q, c, tuned[bits])))
            entry[f"kivi{bits}"] = {
                "us_per_step": ms * 1e3, "us_per_layer": ms * 1e3 / cfg.layers, "bytes_per_step": nbytes,
                "GBps": nbytes / (ms * 1e-3) / 1e9, "speedup_vs_best_bf16": fp16_best / (ms * 1e3),
                "speedup_vs_sdpa": entry["bf16_sdpa"]["us_per_step"] / (ms * 1e3),
                "bits_per_element": 8 * sum(layer.nbytes() for layer in layers) / (
                    2 * cfg.layers * b * hkv * tokens * d),
            }
            del layers
            torch.cuda.empty_cache()
        for name in ("bf16_sdpa", "bf16_triton", *(f"kivi{bits}" for bits in cfg.bits)):
            entry[name]["frac_copy_bw"] = entry[name]["GBps"] * 1e9 / bw
        rows.append(entry)
        log(format_row(entry, cfg.bits))
    res["rows"] = rows
    return res


def format_row(entry: dict, bits: tuple[int, ...]) -> str:
    parts = [f"{entry['tokens']:>6}"]
    for name in ("bf16_sdpa", "bf16_triton", *(f"kivi{b}" for b in bits)):
        e = entry[name]
        parts.append(f"{name} {e['us_per_step']:.0f}us {e['GBps']:.0f}GB/s")
    return " | ".join(parts)


def table(res: dict) -> str:
    """Markdown table of the results dict."""
    bits = [k[4:] for k in res["rows"][0] if k.startswith("kivi")]
    head = ("| tokens | bf16 SDPA µs/step | bf16 Triton µs/step | "
            + " | ".join(f"KIVI-{b} µs/step | KIVI-{b} speedup vs best bf16 | KIVI-{b} GB/s (% of copy)" for b in bits)
            + " | bf16 Triton GB/s (% of copy) |")
    sep = "|" + "---|" * (head.count("|") - 1)
    lines = [head, sep]
    for r in res["rows"]:
        cells = [str(r["tokens"]), f"{r['bf16_sdpa']['us_per_step']:.0f}", f"{r['bf16_triton']['us_per_step']:.0f}"]
        for b in bits:
            e = r[f"kivi{b}"]
            cells += [f"{e['us_per_step']:.0f}", f"{e['speedup_vs_best_bf16']:.2f}x",
                      f"{e['GBps']:.0f} ({100 * e['frac_copy_bw']:.0f}%)"]
        e = r["bf16_triton"]
        cells.append(f"{e['GBps']:.0f} ({100 * e['frac_copy_bw']:.0f}%)")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(res: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    shape = res["shape"]
    head = (f"Card: {res['card']} ({res['sm_count']} SMs), {res['date']}, torch {res['torch']}, triton {res['triton']}. "
            f"Copy bandwidth {res['copy_bandwidth_GBps']:.0f} GB/s (read + write). "
            f"{shape['layers']} layers x {shape['q_heads']} q / {shape['kv_heads']} kv heads x {shape['head_dim']}, "
            f"batch {shape['batch']}, KIVI group {shape['group']}, residual {shape['residual']}.\n\n")
    (out / "table.md").write_text(head + table(res) + "\n")


def parse_lengths(text: str) -> tuple[int, ...]:
    vals = tuple(int(x) for x in text.split(",") if x.strip())
    if not vals or any(v <= 0 for v in vals):
        raise ValueError(f"lengths must be positive integers, got {text!r}")
    return vals

