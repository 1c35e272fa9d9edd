"""Teacher-forced fidelity of candidate methods at a budget (cheap: no greedy decode); an ad-hoc probe
over the benchmark's own pieces (prompts, run_one, fidelity), not a bench command.

usage: python benchmarks/kv/probe_teacher_forced.py MODEL BUDGETS METHODS SAMPLES GEN_TOKENS
e.g.   python benchmarks/kv/probe_teacher_forced.py gemma3 4,8 kivi4+streaming+span,auto 2 64
(the first SAMPLES needle tasks, 4k tokens, GEN_TOKENS reference tokens; one torch thread)."""
import sys, time, torch, os
from pathlib import Path
from memvisor.kv import load_local_model
from memvisor.kv.adapter import cache_kwarg, kv_shape
from memvisor.bench.kv_run import KvBenchConfig, build_prompts, run_one, _forward
from memvisor.bench.kv_methods import memvisor_method
from memvisor.bench.kv_peers import plain_method
from memvisor.bench.kv_metrics import KVPeakTracker, fidelity, cache_bytes, stored_elements
mname, budgets, names, samples, gen = sys.argv[1], [float(b) for b in sys.argv[2].split(",")], sys.argv[3].split(","), int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(1)
model, tok = load_local_model(mname, dtype=torch.bfloat16)
tracker = KVPeakTracker(model)
cfg = KvBenchConfig(model=mname, out=Path("/tmp/x"), tokens=4096, samples=samples, gen_tokens=gen)
prompts = build_prompts(tok, cfg)
rp = f"/tmp/kv-probe-refs_{mname}_{samples}_{gen}.pt"  # the reference, cached between runs
if os.path.exists(rp):
    refs = torch.load(rp)
else:
    refs = [run_one(model, tok, plain_method(model.config), p, None, gen, tracker) for p in prompts]
    torch.save(refs, rp)
base = sum(r["bytes"] for r in refs) / len(refs)
key = cache_kwarg(model)
for budget in budgets:
  for name in names:
    m = memvisor_method(name, model.config, int(base / budget), context_tokens=4096)
    t0 = time.time(); top, kl, byts, el = [], [], 0, 0
    with torch.no_grad():
        for p, ref in zip(prompts, refs):
            cache = m.new_cache(); m.prefill(model, p.ctx, cache, key)
            byts += cache_bytes(cache); el += stored_elements(cache, kv_shape(model.config)[2])
            T = p.ctx.shape[1]
            first = _forward(model, key, cache, p.question, T)[-1:]
            rest = _forward(model, key, cache, torch.tensor([ref["tokens"][:-1]]), T + p.question.shape[1])
            f = fidelity(ref["logits"], torch.cat([first, rest], 0)); top.append(f["top1"]); kl.append(f["kl"])
    print(f"{name:32s} {budget}x ratio {base*len(refs)/byts:.3f} bits {8*byts/el:.2f} top1 {sum(top)/len(top):.3f} "
          f"kl {sum(kl)/len(kl):.4f} per-sample {[round(t,3) for t in top]} {time.time()-t0:.0f}s", flush=True)
