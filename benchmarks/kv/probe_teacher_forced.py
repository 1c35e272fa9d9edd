"""Teacher-forced fidelity of candidate methods at a budget (cheap: no greedy decode); an ad-hoc probe
over the benchmark's own pieces (prompts, run_one, fidelity), not a bench command.

usage: python benchmarks/kv/probe_teacher_forced.py MODEL BUDGETS METHODS SAMPLES GEN_TOKENS [DTYPE]
e.g.   python benchmarks/kv/probe_teacher_forced.py gemma3 4,8 kivi4+streaming+span,auto 2 64
(the first SAMPLES needle tasks, 4k tokens, GEN_TOKENS reference tokens; one torch thread). DTYPE
(bfloat16, the default, or float32) is the model's; BUDGETS are ratios against the context's bf16 cache
whatever DTYPE is (issue 4's ratio), so a float32 run gives the same budgets in bytes."""
import os
import sys
import time
from pathlib import Path

import torch

from memvisor.bench.kv_methods import memvisor_method
from memvisor.bench.kv_metrics import KVPeakTracker, cache_bytes, fidelity, stored_elements
from memvisor.bench.kv_peers import plain_method
from memvisor.bench.kv_run import KvBenchConfig, _forward, bf16_scale, build_prompts, run_one
from memvisor.kv import load_local_model
from memvisor.kv.adapter import cache_kwarg, kv_shape


def references(mname: str, samples: int, gen: int, dtype: torch.dtype = torch.bfloat16):
    """(model, prompts, refs): the bench's first ``samples`` tasks at 4k tokens and the uncompressed reference of
    ``gen`` tokens each (cached in /tmp between runs)."""
    model, tok = load_local_model(mname, dtype=dtype)
    cfg = KvBenchConfig(model=mname, out=Path("/tmp/x"), tokens=4096, samples=samples, gen_tokens=gen)
    prompts = build_prompts(tok, cfg)
    rp = f"/tmp/kv-probe-refs_{mname}_{samples}_{gen}{'' if dtype == torch.bfloat16 else '_' + str(dtype)[6:]}.pt"
    if os.path.exists(rp):
        refs = torch.load(rp)
    else:
        tracker = KVPeakTracker(model)
        refs = [run_one(model, tok, plain_method(model.config), p, None, gen, tracker) for p in prompts]
        torch.save(refs, rp)
    return model, prompts, refs


@torch.no_grad()
def teacher_forced(model, method, prompts, refs) -> dict:
    """Mean top-1 / KL over the tasks, per-task top-1, real bytes, K+V elements stored and tokens per head."""
    key, (L, H, D) = cache_kwarg(model), kv_shape(model.config)
    top, kl, byts, el = [], [], 0, 0
    for p, ref in zip(prompts, refs):
        cache = method.new_cache()
        method.prefill(model, p.ctx, cache, key)
        byts += cache_bytes(cache)
        el += stored_elements(cache, D)
        T = p.ctx.shape[1]
        first = _forward(model, key, cache, p.question, T)[-1:]
        rest = _forward(model, key, cache, torch.tensor([ref["tokens"][:-1]]), T + p.question.shape[1])
        f = fidelity(ref["logits"], torch.cat([first, rest], 0))
        top.append(f["top1"])
        kl.append(f["kl"])
    return {"top1": sum(top) / len(top), "kl": sum(kl) / len(kl), "per_task": [round(t, 3) for t in top],
            "bytes": byts, "elements": el, "tokens_per_head": el / (2 * D * L * H) / len(prompts)}


def main() -> None:
    mname, budgets, names = sys.argv[1], [float(b) for b in sys.argv[2].split(",")], sys.argv[3].split(",")
    samples, gen = int(sys.argv[4]), int(sys.argv[5])
    dtype = getattr(torch, sys.argv[6]) if len(sys.argv) > 6 else torch.bfloat16
    torch.set_num_threads(1)
    model, prompts, refs = references(mname, samples, gen, dtype)
    base = sum(r["bytes"] for r in refs) / len(refs) * bf16_scale(dtype)  # the bf16 cache's bytes
    for budget in budgets:
        for name in names:
            t0 = time.time()
            r = teacher_forced(model, memvisor_method(name, model.config, int(base / budget), context_tokens=4096),
                               prompts, refs)
            print(f"{name:32s} {budget}x ratio {base * len(refs) / r['bytes']:.3f} bits {8 * r['bytes'] / r['elements']:.2f} "
                  f"top1 {r['top1']:.3f} kl {r['kl']:.4f} per-sample {r['per_task']} {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
