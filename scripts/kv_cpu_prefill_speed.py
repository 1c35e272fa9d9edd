"""Prefill time of the compressed KV cache on the CPU, with and without the SDPA prefill path, against
transformers' DynamicCache.

    python scripts/kv_cpu_prefill_speed.py [--tokens 4096] [--budgets 4,8] [--rounds 3] [--model smollm2]

The model in bf16, 2 torch threads (as `memvisor bench kv`), one random-token context; budgets are fractions
of the uncompressed bf16 DynamicCache's bytes after that context, as in the bench. DynamicCache is
prefilled in one forward and in 512-token blocks; the compressed cache block-wise under the planner's
recipe at each budget, once with prefill blocks through one SDPA call over the dequantized history
(`memvisor.kv.attention.DENSE_MIN_QUERIES`, the default) and once through the block-wise float32 loop
that decode steps use (the threshold raised out of reach, in this process only). Methods run in turn,
``--rounds`` times interleaved (the host's speed drifts); the best round is kept.
"""
from __future__ import annotations

import argparse
import time

import torch
from transformers import DynamicCache

import memvisor.kv.attention as kv_attention
from memvisor.bench.kv_metrics import cache_bytes
from memvisor.kv import CacheSpec, CompressedCache, load_local_model
from memvisor.kv.adapter import cache_kwarg
from memvisor.kv.prefill import forward_blocks, prefill_blockwise


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--budgets", default="4,8")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, _tok = load_local_model(args.model, dtype=torch.bfloat16)
    key = cache_kwarg(model)
    ids = torch.randint(100, 20000, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    dense_min = kv_attention.DENSE_MIN_QUERIES

    def dynamic(block: int | None):
        def run():
            cache = DynamicCache(config=model.config)
            if block:
                forward_blocks(model, ids, cache, block)
            else:
                model(input_ids=ids, use_cache=True, logits_to_keep=1, **{key: cache})
        return run

    def compressed(ratio: float, sdpa: bool):
        def run():
            kv_attention.DENSE_MIN_QUERIES = dense_min if sdpa else 1 << 30
            try:
                cache = CompressedCache(model.config, CacheSpec.plan(model.config, int(full / ratio), args.tokens))
                prefill_blockwise(model, ids, cache, block=512)
            finally:
                kv_attention.DENSE_MIN_QUERIES = dense_min
        return run

    methods = {"DynamicCache, one forward": dynamic(None), "DynamicCache, 512-blocks": dynamic(512)}
    for b in args.budgets.split(","):
        methods[f"auto {b}x, SDPA prefill"] = compressed(float(b), True)
        methods[f"auto {b}x, block loop"] = compressed(float(b), False)
    # The budgets are fractions of the bf16 DynamicCache's real bytes after this context, as in the bench
    # (Gemma 3's sliding layers hold only their window).
    warm = DynamicCache(config=model.config)
    model(input_ids=ids, use_cache=True, logits_to_keep=1, **{key: warm})  # also the warm-up
    full = cache_bytes(warm)
    del warm
    best: dict[str, float] = {}
    for r in range(args.rounds):
        for name, run in methods.items():
            t0 = time.perf_counter()
            run()
            s = time.perf_counter() - t0
            best[name] = min(best.get(name, float("inf")), s)
            print(f"round {r + 1} {name:28s} {s:6.2f} s", flush=True)
    print(f"\n{args.model} bf16, {args.tokens}-token context, {args.threads} threads, best of {args.rounds}:")
    for name, s in best.items():
        print(f"{name:28s} {s:6.2f} s  ({s / best['DynamicCache, one forward']:.2f}x DynamicCache's one forward)")


if __name__ == "__main__":
    main()
