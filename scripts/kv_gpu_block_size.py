"""How long a decode step of the compressed cache takes on the GPU's block-wise torch path, by block size.

Layers that evict or prune (a byte budget, a token policy) never take the fused kernel (kv/gpu/cache_path.py):
their decode steps run `attention.head_attention`'s loop over ``block``-token blocks, ~25 torch ops a block.
On a GPU each op is a kernel launch, so a 32k-token history in 1,024-token blocks is ~800 launches per layer
per step. This times ``LayerCore.update`` + ``attend`` of every layer (eager, as a model runs them) for a
Llama-3.1-8B-shaped cache (32 layers, 8 KV heads of 128, 32 query heads, random bf16 keys and values) and
each block size, and checks that the block size does not change the output (same maths, other summation order).

    python scripts/kv_gpu_block_size.py --tokens 8192,32768 --blocks 1024,4096,16384,65536,default --out DIR

("default": the cache's own choice, ``attention.default_block``.)
"""
from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import time
from pathlib import Path

import torch

from memvisor.kv.layer import LayerConfig, LayerCore
from memvisor.kv.policies.h2o import H2O
from memvisor.kv.policies.head_adakv import AdaKVHeadBudget
from memvisor.kv.policies.knorm import KeyNorm
from memvisor.kv.policies.streaming import StreamingLLM
from memvisor.kv.storage import QuantConfig

LAYERS, HQ, HKV, D = 32, 32, 8, 128
DEV = "cuda"  # --device cpu: a smoke run of this script (tiny sizes)


def build(kind: str, tokens: int, block: int | None, gen: torch.Generator) -> list[LayerCore]:
    """kind: a recipe below; a "-torch" suffix keeps its decode steps off the fused kernels (the torch path)."""
    bf16_per_layer = tokens * HKV * D * 2 * 2
    fused = not kind.endswith("-torch")
    recipe = kind.removesuffix("-torch")
    cores = []
    for i in range(LAYERS):
        q = QuantConfig(4, 32, 128)
        if recipe == "kivi4":  # append-only, the kernel's case, here on the torch path for reference
            cfg = LayerConfig(i, None, q, block=block, fused_decode=False)
        elif recipe == "kivi4-stream-4x":  # `auto` at 4x until session 16: KIVI-4 + StreamingLLM under a byte budget
            cfg = LayerConfig(i, None, q, policy=StreamingLLM(4), budget_bytes=bf16_per_layer // 4, block=block,
                              fused_decode=fused)
        elif recipe == "kivi-k4v2-stream-4x":  # `auto` at 4x since session 16: keys 4 / values 2 bits, residual 32
            cfg = LayerConfig(i, None, QuantConfig(4, 32, 32, value_bits=2), policy=StreamingLLM(4),
                              budget_bytes=bf16_per_layer // 4, block=block, fused_decode=fused)
        elif recipe == "kivi4-h2o-4x":  # takes each step's probabilities: the torch path, one head at a time
            cfg = LayerConfig(i, None, q, policy=H2O(recent=32, sinks=4), budget_bytes=bf16_per_layer // 4,
                              block=block, fused_decode=fused)
        elif recipe in ("kivi4-knorm-4x", "kivi4-knorm-adakv-4x"):  # per-head token choices: ragged heads
            cfg = LayerConfig(i, None, q, policy=KeyNorm(sinks=4, recent=32), budget_bytes=bf16_per_layer // 4,
                              head_budget=AdaKVHeadBudget() if "adakv" in recipe else None, block=block,
                              fused_decode=fused)
        elif recipe == "bf16-knorm-4x":  # per-head token choices, nothing quantized: ragged full-precision heads
            cfg = LayerConfig(i, None, QuantConfig(), policy=KeyNorm(sinks=4, recent=32),
                              budget_bytes=bf16_per_layer // 4, block=block, fused_decode=fused)
        else:
            raise ValueError(kind)
        c = LayerCore(cfg)
        k = torch.randn(1, HKV, tokens, D, device=DEV, generator=gen).bfloat16()
        v = torch.randn(1, HKV, tokens, D, device=DEV, generator=gen).bfloat16()
        c.init(k)
        for h, st in enumerate(c.stores):  # a prefill's storage without its attention
            st.append(k[:, h], v[:, h])
        c.cum = tokens
        c.compress(force=True)
        cores.append(c)
    return cores


def _sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def _compiled_kernels() -> set[tuple[str, str]]:
    """(cache entry, kernel name) of every kernel in Triton's on-disk cache: an entry appears when a variant is
    compiled (run with a fresh ``TRITON_CACHE_DIR`` to see every compilation)."""
    root = Path(os.environ.get("TRITON_CACHE_DIR", Path.home() / ".triton" / "cache"))
    if not root.is_dir():
        return set()
    return {(d.name, f.stem) for d in root.iterdir() if d.is_dir()
            for f in d.glob("*.json") if not f.name.startswith("__grp__")}


def time_steps(cores: list[LayerCore], steps: int, gen: torch.Generator,
               profile: str | None = None) -> tuple[float, torch.Tensor]:
    new = [[torch.randn(1, h, 1, D, device=DEV, generator=gen).bfloat16() for h in (HKV, HKV, HQ)]
           for _ in range(steps + 2)]
    outs = []

    def step(i: int) -> None:
        k1, v1, q1 = new[i]
        for c in cores:
            c.update(k1, v1)
            outs.append(c.attend(q1, D ** -0.5))

    step(0), step(1)
    _sync()
    t0 = time.perf_counter()
    if profile == "torch":  # where a step's time goes: the top torch ops by their own CPU time (launches included)
        from torch.profiler import profile as prof
        with prof() as p:
            for i in range(2, steps + 2):
                step(i)
            _sync()
        table = p.key_averages()
        print(table.table(sort_by="self_cpu_time_total", row_limit=30), flush=True)
        print(table.table(sort_by="self_device_time_total", row_limit=15), flush=True)
    elif profile == "python":  # the cache's own functions by cumulative time (the host side of an eager step)
        pr = cProfile.Profile()
        pr.enable()
        for i in range(2, steps + 2):
            step(i)
        _sync()
        pr.disable()
        pstats.Stats(pr).sort_stats("cumulative").print_stats("memvisor", 30)
        pstats.Stats(pr).sort_stats("tottime").print_stats(30)  # own time: torch ops, syncs, Triton's launcher
    elif profile in ("steps", "steps-python"):  # each step's own time (a sync after each): flushes, evictions
        each, compiled, profiles = [], {}, []
        seen = _compiled_kernels()
        for i in range(2, steps + 2):
            if profile == "steps-python":  # and the slowest steps' own time by function, below
                profiles.append(cProfile.Profile())
                profiles[-1].enable()
            start = time.perf_counter()  # after the cache scan: a full ~/.triton/cache takes tens of ms to list
            step(i)
            _sync()
            each.append((time.perf_counter() - start) * 1e3)
            if profiles:
                profiles[-1].disable()
            now = _compiled_kernels()
            if now - seen:  # a kernel variant compiled during this step (a new specialization of its arguments)
                compiled[i - 2] = sorted(name for _, name in now - seen)
            seen = now
        print(json.dumps({"step_ms": [round(x, 2) for x in each], "compiled_at_step": compiled}), flush=True)
        for worst in sorted(range(len(profiles)), key=each.__getitem__)[-3:]:  # the three slowest steps
            print(f"step {worst}: {each[worst]:.1f} ms", flush=True)
            pstats.Stats(profiles[worst]).sort_stats("tottime").print_stats(20)
            pstats.Stats(profiles[worst]).sort_stats("cumulative").print_stats("memvisor", 25)
    else:
        for i in range(2, steps + 2):
            step(i)
    _sync()
    ms = sum(each) / steps if profile in ("steps", "steps-python") else (time.perf_counter() - t0) * 1e3 / steps
    return ms, torch.stack([o.float() for o in outs[:LAYERS]])  # the first step's outputs, every layer


def main() -> None:
    global DEV, LAYERS
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="8192,32768")
    ap.add_argument("--blocks", default="1024,4096,16384,65536")
    ap.add_argument("--kinds", default="kivi4,kivi4-stream-4x,kivi4-h2o-4x")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--layers", type=int, default=LAYERS)
    ap.add_argument("--profile", choices=("torch", "python", "steps", "steps-python"),
                    help="print a profile of each timed run: torch ops, the cache's Python functions (cProfile), "
                         "each step's milliseconds (a sync after each step) and the steps that compiled a kernel, "
                         "or those and the three slowest steps' cProfiles")
    a = ap.parse_args()
    DEV, LAYERS = a.device, a.layers
    a.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for kind in a.kinds.split(","):
        for tokens in map(int, a.tokens.split(",")):
            ref = None
            for block in (None if b == "default" else int(b) for b in a.blocks.split(",")):
                gen = torch.Generator(device=DEV).manual_seed(7)
                cores = build(kind, tokens, block, gen)
                stored = sum(sum(c.lengths()) for c in cores) // (LAYERS * HKV)
                ms, out = time_steps(cores, a.steps, gen, a.profile)
                diff = 0.0 if ref is None else float((out - ref).abs().max())
                ref = out if ref is None else ref
                peak = torch.cuda.max_memory_allocated() / 2**20 if DEV == "cuda" else 0.0
                row = dict(kind=kind, tokens=tokens, block=block, ms_per_step=round(ms, 2),
                           tokens_per_head=stored, max_abs_diff_vs_first_block=diff, peak_mib=round(peak, 1))
                print(json.dumps(row), flush=True)
                rows.append(row)
                del cores
                if DEV == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
    (a.out / "block_size.json").write_text(json.dumps(
        {"card": torch.cuda.get_device_name(0) if DEV == "cuda" else "cpu", "torch": torch.__version__,
         "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
