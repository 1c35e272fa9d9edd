"""Where the cache's eager decode step spends its time on CUDA (BENCHMARKS.md kv-gpu, "The cache's decode path").

    python scripts/kv_gpu_cache_step_profile.py --tokens 32768 --bits 2 --out DIR

Builds the 32 layers of ``bench kv-gpu``'s ``time_cache_path`` (Llama-3.1-8B heads, ``--tokens`` random tokens
stored per layer, fused decode path), then, after 40 warm-up steps: milliseconds per step (wall clock, 64 steps:
two quantized groups per layer, so the flushes are in the mean) (3 times) without and with a byte observer (the compressed cache sets one on every layer: two ``nbytes()`` per layer and step); the CUDA
kernels launched per step (torch profiler); and a cProfile of 8 steps (top functions by own time), written
to DIR/profile.txt.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import time
from pathlib import Path

import torch

from memvisor.kv.layer import LayerConfig, LayerCore
from memvisor.kv.storage import QuantConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    layers, b, hq, hkv, d = 32, 1, 32, 8, 128
    gen = torch.Generator(device="cuda").manual_seed(7)
    cores = []
    for i in range(layers):
        c = LayerCore(LayerConfig(i, None, QuantConfig(args.bits, 32, 32)))
        k = torch.randn(b, hkv, args.tokens, d, device="cuda", generator=gen).bfloat16()
        v = torch.randn(b, hkv, args.tokens, d, device="cuda", generator=gen).bfloat16()
        c.init(k)
        for h, st in enumerate(c.stores):
            st.append(k[:, h], v[:, h])
        c.cum = args.tokens
        cores.append(c)
    new = [[torch.randn(b, h, 1, d, device="cuda", generator=gen).bfloat16() for h in (hkv, hkv, hq)]
           for _ in range(64)]
    it = iter(range(10 ** 9))

    def step() -> None:
        k1, v1, q1 = new[next(it) % len(new)]
        for c in cores:
            c.update(k1, v1)
            c.attend(q1, d ** -0.5)

    def timed(n: int = 64) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) * 1e3 / n

    for _ in range(40):
        step()
    res = {"tokens": args.tokens, "bits": args.bits, "ms_per_step": [round(timed(), 2) for _ in range(3)]}
    for c in cores:
        c.observer = lambda *a: None
    res["ms_per_step_observed"] = [round(timed(), 2) for _ in range(3)]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(4):
            step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    res["cuda_kernels_per_step"] = len(kernels) / 4
    names: dict = {}
    for e in kernels:
        names[e.name[:60]] = names.get(e.name[:60], 0) + 1
    res["kernels"] = {k: v / 4 for k, v in sorted(names.items(), key=lambda x: -x[1])[:15]}
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(8):
        step()
    torch.cuda.synchronize()
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(30)
    pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(30)
    (args.out / "profile.txt").write_text(s.getvalue())
    print(json.dumps(res, indent=1))
    print(s.getvalue()[:6000])
    (args.out / "cache_step.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
