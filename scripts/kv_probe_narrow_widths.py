"""Would a 3-bit KIVI width beat KIVI-4 with more eviction at a 4x budget? (session 7, NOTES.md "KV (session 7,
CPU)"): teacher-forced top-1 / KL on the bench's SmolLM2 tasks (`kv_run`'s prompts, reference and `fidelity`).

The cache stores 2- and 4-bit codes only, so a narrower width is simulated inside the 4-bit container: this
script wraps `memvisor.kv.quant.minmax_quant` for its own process (an experiment, not a code path) so codes are
clamped to the simulated width, and gives the cache the budget under which it holds exactly the tokens a true
cache of that width would hold at the real budget (the same `TokenCost` arithmetic as `kv/budget.py`).

    python scripts/kv_probe_narrow_widths.py 6 128 k4v4r128:4:4:128,k3v3r128:3:3:128,k3v3r32:3:3:32,k4v3r128:4:3:128,k4v3r32:4:3:32

MODE = name:key_bits:value_bits:residual; an optional 4th argument is the budget ratio (default 4).
"""
import sys, time, os, torch
from pathlib import Path
import memvisor.kv.quant as Q
from memvisor.kv import load_local_model
from memvisor.kv.adapter import cache_kwarg, kv_shape
from memvisor.bench.kv_run import KvBenchConfig, build_prompts, run_one, _forward
from memvisor.bench.kv_methods import memvisor_method
from memvisor.bench.kv_peers import plain_method
from memvisor.bench.kv_metrics import KVPeakTracker, fidelity, cache_bytes, stored_elements

SIM = {"k": 4, "v": 4}
_orig = Q.minmax_quant
def sim(x, bits, reduce_dim):
    b = SIM["k"] if reduce_dim == -2 else SIM["v"]
    return _orig(x, min(bits, b), reduce_dim)
Q.minmax_quant = sim

samples, gen, modes = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3].split(",")
budget_x = float(sys.argv[4]) if len(sys.argv) > 4 else 4.0
torch.set_num_threads(2)
model, tok = load_local_model("smollm2", dtype=torch.bfloat16)
tracker = KVPeakTracker(model)
cfg = KvBenchConfig(model="smollm2", out=Path("/tmp/x"), tokens=4096, samples=samples, gen_tokens=gen)
prompts = build_prompts(tok, cfg)
rp = f"/tmp/kv-probe-refs_smollm2_{samples}_{gen}.pt"
if os.path.exists(rp):
    refs = torch.load(rp)
else:
    refs = [run_one(model, tok, plain_method(model.config), p, None, gen, tracker) for p in prompts]
    torch.save(refs, rp)
base = sum(r["bytes"] for r in refs) / len(refs)
key = cache_kwarg(model)
L, H, D = kv_shape(model.config)
fp = 2 * D * 2
for mode in modes:
    name, kb, vb, r = mode.split(":"); kb, vb, r = int(kb), int(vb), int(r)
    budget = base / budget_x
    per_head = budget / (L * H)
    rfp = (r + 31) * fp
    q_true = (D * (kb + vb)) / 8 + D * 4 / 32 + (D / 32) * 4 + 2 / 32
    q_cont = (D * 8) / 8 + D * 4 / 32 + (D / 32) * 4 + 2 / 32
    tokens = (per_head - rfp) / q_true
    cont = (rfp + tokens * q_cont) * L * H
    SIM["k"], SIM["v"] = kb, vb
    m = memvisor_method(f"kivi4+r{r}+streaming", model.config, int(cont), context_tokens=4096)
    t0 = time.time(); top, kl, kept = [], [], 0
    with torch.no_grad():
        for p, ref in zip(prompts, refs):
            cache = m.new_cache(); m.prefill(model, p.ctx, cache, key)
            kept += stored_elements(cache, D) / (2 * D * L * H)
            T = p.ctx.shape[1]
            first = _forward(model, key, cache, p.question, T)[-1:]
            rest = _forward(model, key, cache, torch.tensor([ref["tokens"][:-1]]), T + p.question.shape[1])
            f = fidelity(ref["logits"], torch.cat([first, rest], 0)); top.append(f["top1"]); kl.append(f["kl"])
    print(f"{name:10s} {budget_x}x k{kb}v{vb} r{r} tokens/head {kept/len(prompts):.0f} top1 {sum(top)/len(top):.3f} "
          f"kl {sum(kl)/len(kl):.4f} per-sample {[round(t,3) for t in top]} {time.time()-t0:.0f}s", flush=True)
