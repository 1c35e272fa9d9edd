"""How long `policies.select` takes for one layer's eviction on the CPU: heads alike (StreamingLLM's: one
selection, reused) against heads whose scores differ (one selection a head, as every eviction took before
session 19). BENCHMARKS kv-gpu "Session 19".

    python scripts/kv_select_speed.py --heads 8 --tokens 32768
"""
import argparse
import time

import torch

from memvisor.kv.policies.base import select
from memvisor.kv.policies.streaming import StreamingLLM


def best_ms(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--drop", type=int, default=40, help="tokens each head evicts")
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    H, T = a.heads, a.tokens
    pol = StreamingLLM(4)
    empty = torch.empty(1, H, T, 0)
    alike = pol.scores(empty, empty)  # [1, H, T], the same row for every head
    apart = alike.clone()
    apart[0, :, -1] += torch.arange(H, dtype=torch.float32) * 1e-3  # rows differ: no reuse, the same kept sets
    prot = pol.protected_mask(T, None, H)
    budget = torch.full((H,), T - a.drop)
    for name, scores in (("heads alike (reused)", alike), ("heads apart (one selection a head)", apart)):
        print(f"{name}: {best_ms(lambda: select(scores, prot, budget), a.reps):.2f} ms a layer")


if __name__ == "__main__":
    main()
