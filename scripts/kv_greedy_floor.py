"""How far free-running greedy agreement falls with NO compression: the metric's noise floor.

`memvisor bench kv` scores each method by free-running greedy agreement with the uncompressed model
over 128 tokens (issue 4's goal: >= 0.95 at 4x). This runs the bench's own tasks and measurement
(`kv_run.run_one`) on caches that drop nothing and change only float rounding:

- `blocked-512`: transformers' DynamicCache, the context prefilled in 512-token blocks (what memvisor's
  block-wise prefill does, with no compression) instead of one pass;
- `eager`: the reference's cache and one-pass prefill, with transformers' eager attention instead of
  SDPA (another summation order of the same products).

Each keeps every bf16 key and value (ratio 1.00x). Their greedy agreement is what a perfect
compression would score on these tasks at best; BENCHMARKS.md (kv) reports it beside the methods
(`greedy_agreement` up to the reference's end of sequence; `greedy_agreement_all` over every position,
the figure of the first floor runs: 0.276 / 0.333 on SmolLM2).

    python scripts/kv_greedy_floor.py [--samples 6] [--tokens 4096] [--gen-tokens 128] [--model smollm2]
                                      [--dtype bfloat16|float32] [--auto 4,8] [--methods kivi4@3,...]

``--dtype float32`` runs everything in float32 (is the floor a bf16 rounding effect?); ``--auto R`` also
runs the planner's ``auto`` cache at R x fewer bytes than the context's bf16 cache (the issue's ratio,
whatever the run's dtype), for the same figures side by side; ``--methods NAME@R,...`` runs any of the
bench's memvisor methods (``memvisor.bench.kv_methods``) at R x fewer bytes than bf16 the same way.
"""
import argparse
import json

import torch
from transformers import DynamicCache

from memvisor.bench.kv_methods import memvisor_method
from memvisor.bench.kv_metrics import KVPeakTracker
from memvisor.bench.kv_peers import Method, _full_prefill, lossless_blocked_method, plain_method
from memvisor.bench.kv_run import KvBenchConfig, aggregate, bf16_scale, build_prompts, run_one
from memvisor.kv import load_local_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--samples", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    ap.add_argument("--auto", default="", help="compression ratios against bf16 for the planner's cache, e.g. 4,8")
    ap.add_argument("--no-floor", action="store_true", help="skip the two lossless rows (only --auto / --methods)")
    ap.add_argument("--methods", default="", help="memvisor methods at a ratio against bf16, e.g. kivi4@3,kivi2@4")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    model, tok = load_local_model(args.model, dtype=dtype)
    cfg = KvBenchConfig(model=args.model, out=None, tokens=args.tokens, samples=args.samples,
                        gen_tokens=args.gen_tokens)
    tracker = KVPeakTracker(model)
    prompts = build_prompts(tok, cfg)
    refs = [run_one(model, tok, plain_method(model.config), p, None, cfg.gen_tokens, tracker) for p in prompts]
    rows = {}
    bf16_bytes = sum(r["bytes"] for r in refs) / len(refs) * bf16_scale(dtype)
    planned = [("auto", float(x)) for x in args.auto.split(",") if x]
    planned += [(m.split("@")[0], float(m.split("@")[1])) for m in args.methods.split(",") if m]
    for name, ratio in planned:
        method = memvisor_method(name, model.config, int(bf16_bytes / ratio), context_tokens=args.tokens)
        rows[f"{name} {ratio:g}x"] = [run_one(model, tok, method, p, r, cfg.gen_tokens, tracker)
                                      for p, r in zip(prompts, refs)]
    if not args.no_floor:
        blocked = lossless_blocked_method(model.config, 512)  # also `memvisor bench kv`'s floor row
        rows[blocked.name] = [run_one(model, tok, blocked, p, r, cfg.gen_tokens, tracker)
                              for p, r in zip(prompts, refs)]
        model.set_attn_implementation("eager")
        eager = Method("eager", lambda: DynamicCache(config=model.config), _full_prefill)
        rows[eager.name] = [run_one(model, tok, eager, p, r, cfg.gen_tokens, tracker) for p, r in zip(prompts, refs)]
    for name, runs in rows.items():
        fig = aggregate(runs, refs, bf16_scale(dtype))  # ratio against bf16
        keep = ("ratio", "top1", "kl", "greedy_agreement", "greedy_agreement_all", "needle_retention")
        print(args.dtype, name, json.dumps({k: fig.get(k) for k in keep}),
              "per task greedy", [round(r["greedy_agreement"], 3) for r in runs],
              "first differing token", [next((i for i, (a, b) in enumerate(zip(rf["tokens"], r["tokens"]))
                                              if a != b), None) for r, rf in zip(runs, refs)])


if __name__ == "__main__":
    main()
