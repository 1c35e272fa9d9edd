"""Decode speed of the compressed KV cache on the CPU against transformers' DynamicCache.

    python scripts/kv_cpu_decode_speed.py [--tokens 2048] [--steps 32] [--budgets 4,8] [--policies h2o] [--profile]

SmolLM2 in bf16, 2 torch threads (as `memvisor bench kv`): each cache is prefilled with the same
random-token context (the compressed ones block-wise, 512 tokens a block, under the planner's recipe
at each budget, and the same recipe with each of ``--policies`` as its token policy), then decodes
``--steps`` greedy tokens; the figure is tokens/s of those steps.
After a warm-up, methods run in turn, ``--rounds`` times interleaved (the host's speed drifts), best
round kept.
``--torch-path`` adds each compressed method on the block-wise torch path (``CacheSpec.fused_decode=False``:
no CPU kernel).
``--profile`` prints a cProfile of the first compressed method's decode steps instead (after two
unprofiled steps), and what the CPU kernel's wrapper calls.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

from memvisor.kv import CacheSpec, CompressedCache, load_local_model
from memvisor.kv.adapter import cache_kwarg
from memvisor.kv.prefill import prefill_blockwise


def decode(model, key, cache, first: int, start: int, steps: int) -> float:
    tok = first
    t0 = time.perf_counter()
    for i in range(steps):
        pos = torch.tensor([[start + i]])
        logits = model(input_ids=torch.tensor([[tok]]), position_ids=pos, use_cache=True, **{key: cache}).logits
        tok = int(logits[0, -1].argmax())
    return steps / (time.perf_counter() - t0)


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--budgets", default="4,8")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--policies", default="", help="token policies to time in the planner's recipe, e.g. h2o")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--sort", default="cumulative", help="the profile's order (pstats: cumulative, tottime)")
    ap.add_argument("--torch-path", action="store_true",
                    help="also time each compressed method with fused_decode=False")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, _tok = load_local_model("smollm2", dtype=torch.bfloat16)
    key = cache_kwarg(model)
    ids = torch.randint(100, 20000, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    full = 2 * model.config.num_hidden_layers * model.config.num_key_value_heads * \
        (model.config.hidden_size // model.config.num_attention_heads) * 2 * args.tokens

    def plain():
        from transformers import DynamicCache
        cache = DynamicCache(config=model.config)
        model(input_ids=ids, use_cache=True, **{key: cache})
        return cache

    def compressed(ratio: float, policy: str = "", fused: bool = True):
        def build():
            from memvisor.kv.policies import make_policy

            over = {"token_policy": make_policy(policy)} if policy else {}
            over["fused_decode"] = fused
            spec = CacheSpec.plan(model.config, int(full / ratio), args.tokens, **over) if ratio else CacheSpec()
            cache = CompressedCache(model.config, spec)
            prefill_blockwise(model, ids, cache, block=512)
            return cache
        return build

    methods = {"DynamicCache": plain, "CompressedCache (none)": compressed(0)}
    methods.update({f"auto {b}x": compressed(float(b)) for b in args.budgets.split(",")})
    if args.torch_path:
        methods.update({f"auto {b}x torch path": compressed(float(b), fused=False) for b in args.budgets.split(",")})
    methods.update({f"{p} {b}x": compressed(float(b), p) for p in filter(None, args.policies.split(","))
                    for b in args.budgets.split(",")})
    if args.torch_path:
        methods.update({f"{p} {b}x torch path": compressed(float(b), p, fused=False)
                        for p in filter(None, args.policies.split(",")) for b in args.budgets.split(",")})
    if args.profile:
        name = [m for m in methods if m.startswith("auto")][0]
        cache = methods[name]()
        decode(model, key, cache, 42, args.tokens, 2)  # not profiled: numba's import and kernel load
        prof = cProfile.Profile()
        prof.enable()
        decode(model, key, cache, 42, args.tokens + 2, args.steps)
        prof.disable()
        stats = pstats.Stats(prof).sort_stats(args.sort)
        stats.print_stats(35)
        stats.print_callees("cpu/cache_path.py.*[(]decode[)]")  # what the kernel's wrapper spends around it
        return
    decode(model, key, plain(), 42, args.tokens, 8)  # warm-up: the process's first steps are slow
    # ... and the CPU kernel's first call compiles it (seconds) or loads it from numba's cache
    decode(model, key, methods[next(m for m in methods if m.startswith("auto"))](), 42, args.tokens, 2)
    best: dict[str, float] = {}
    for r in range(args.rounds):
        for name, build in methods.items():
            cache = build()
            rate = decode(model, key, cache, 42, args.tokens, args.steps)
            best[name] = max(best.get(name, 0.0), rate)
            print(f"round {r + 1} {name:24s} {rate:6.2f} tokens/s", flush=True)
    print(f"\nSmolLM2 bf16, {args.tokens}-token context, {args.steps} steps, {args.threads} threads, "
          f"best of {args.rounds}:")
    for name, rate in best.items():
        print(f"{name:24s} {rate:6.2f} tokens/s  ({rate / best['DynamicCache']:.2f}x DynamicCache)")


if __name__ == "__main__":
    main()
