"""Would a 3-bit KIVI width beat KIVI-4 with more eviction at a 4x budget? (session 7, NOTES.md "KV (session 7,
CPU)"): teacher-forced top-1 / KL on the bench's SmolLM2 tasks, with probe_teacher_forced.py's pieces.

The cache stores 2- and 4-bit codes only, so a narrower width is simulated inside the 4-bit container: this
script wraps `memvisor.kv.quant.minmax_quant` for its own process (an experiment, not a code path) so codes are
clamped to the simulated width, and gives the cache the budget under which it holds exactly the tokens a true
cache of that width would hold at the real budget (`kv/budget.py`'s token cost at group 32).

    python benchmarks/kv/probe_narrow_widths.py 6 128 k4v4r128:4:4:128,k3v3r128:3:3:128,k3v3r32:3:3:32,k4v3r128:4:3:128,k4v3r32:4:3:32

MODE = name:key_bits:value_bits:residual; an optional 4th argument is the budget ratio (default 4).
"""
import sys
import time
from pathlib import Path

import torch

import memvisor.kv.quant as quant
from memvisor.bench.kv_methods import memvisor_method
from memvisor.kv.adapter import kv_shape
from memvisor.kv.budget import token_cost

sys.path.insert(0, str(Path(__file__).parent))
from probe_teacher_forced import references, teacher_forced  # noqa: E402

SIMULATED = {"k": 4, "v": 4}  # bits the 4-bit container's codes are clamped to, keys / values
_minmax = quant.minmax_quant


def _clamped(x, bits, reduce_dim):
    """Keys are grouped along tokens (reduce_dim -2), values along channels (-1)."""
    return _minmax(x, min(bits, SIMULATED["k"] if reduce_dim == -2 else SIMULATED["v"]), reduce_dim)


def main() -> None:
    samples, gen, modes = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3].split(",")
    budget_x = float(sys.argv[4]) if len(sys.argv) > 4 else 4.0
    torch.set_num_threads(2)
    quant.minmax_quant = _clamped
    model, prompts, refs = references("smollm2", samples, gen)
    base = sum(r["bytes"] for r in refs) / len(refs)
    L, H, D = kv_shape(model.config)
    for mode in modes:
        name, kb, vb, r = mode.split(":")
        kb, vb, r = int(kb), int(vb), int(r)
        true, container = (token_cost(1, D, 2, kb, 32, r, False, None, vb), token_cost(1, D, 2, 4, 32, r, False))
        per_head = base / budget_x / (L * H)
        fp_part = true.residual_max * true.fp  # the residual at its largest, as the planner prices it
        tokens = (per_head - fp_part) / true.q
        SIMULATED["k"], SIMULATED["v"] = kb, vb
        method = memvisor_method(f"kivi4+r{r}+streaming", model.config,
                                 int((fp_part + tokens * container.q) * L * H), context_tokens=4096)
        t0 = time.time()
        res = teacher_forced(model, method, prompts, refs)
        print(f"{name:10s} {budget_x}x k{kb}v{vb} r{r} tokens/head {res['tokens_per_head']:.0f} top1 {res['top1']:.3f} "
              f"kl {res['kl']:.4f} per-sample {res['per_task']} {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
