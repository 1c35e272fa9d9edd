"""Time of one decode step's attention over one layer on the CPU path (``layer_attention``).

    python scripts/kv_cpu_attention_speed.py [--rounds 7] [--reps 30]

SmolLM2's layer shape (3 KV heads, 3 query heads each, head dim 64, batch 1), bf16 residual of 128
tokens, KIVI-4 and KIVI-2 at group 32, over a 2,048-token history either fresh (every key group
whole) or after StreamingLLM's eviction (4 sinks + the newest 1,448: partly evicted key groups, the
state of the planner's recipes). Prints the median over ``--rounds`` of the mean over ``--reps``
calls, in µs, for the block-wise torch path and (numba installed) the CPU decode kernel
(``memvisor.kv.cpu``), alternating within each round. Then the time of one StreamingLLM eviction of one
head in that evicted state (``HeadStore.keep`` of the sinks and all but the 1-3 oldest other tokens, which
re-packs the key codes). For an A/B, run it alternately with ``PYTHONPATH=OTHER_TREE/src``.
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

from memvisor.kv import cpu
from memvisor.kv.attention import layer_attention
from memvisor.kv.storage import HeadStore, QuantConfig


def layer_state(bits: int, evicted: bool, n: int = 2048) -> list[HeadStore]:
    g = torch.Generator().manual_seed(0)
    stores = []
    for _ in range(3):
        st = HeadStore(1, 64, torch.bfloat16, torch.device("cpu"), QuantConfig(bits, 32, 128), False)
        st.append(torch.randn(1, n, 64, generator=g), torch.randn(1, n, 64, generator=g))
        if evicted:
            st.keep(torch.cat([torch.arange(4), torch.arange(n * 600 // 2048, len(st))]))
        stores.append(st)
    return stores


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=2048, help="history per head before the eviction")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    q = torch.randn(1, 9, 1, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float32).to(torch.bfloat16)
    pos = torch.tensor([5000])
    paths = {"torch path": lambda stores: layer_attention(q, stores, pos, 0.125)}
    if cpu.available():
        paths["numba kernel"] = lambda stores: cpu.decode(q, stores, 0.125, int(pos))
    for bits in (4, 2):
        for evicted in (False, True):
            stores = layer_state(bits, evicted, args.tokens)
            times: dict[str, list[float]] = {name: [] for name in paths}
            for _ in range(args.rounds):  # the paths alternate within each round (the host drifts)
                for name, run in paths.items():
                    run(stores)
                    t0 = time.perf_counter()
                    for _ in range(args.reps):
                        run(stores)
                    times[name].append((time.perf_counter() - t0) / args.reps * 1e6)
            state = "evicted (4 sinks + newest)" if evicted else "fresh"
            cols = "  ".join(f"{name} {sorted(t)[len(t) // 2]:7.0f} us" for name, t in times.items())
            print(f"KIVI-{bits} {state:27s} {len(stores[0])} tokens/head: {cols}")
    for bits in (4, 2):
        st = layer_state(bits, True)[0]
        times = []
        for _ in range(args.rounds):
            t = 0.0
            for i in range(args.reps):
                head = copy.copy(st)  # keep() replaces tensors, never changes them in place
                idx = torch.cat([torch.arange(4), torch.arange(5 + i % 3, len(st))])
                t0 = time.perf_counter()
                head.keep(idx)
                t += time.perf_counter() - t0
            times.append(t / args.reps * 1e6)
        median = sorted(times)[len(times) // 2]
        print(f"KIVI-{bits} eviction of 1-3 tokens (keep), one head of {len(st)}: {median:7.0f} us")


if __name__ == "__main__":
    main()
