"""Where does KIVI-4's error come from, and what removes it at the same bytes? (session 9, NOTES.md "KV
(session 9)"): teacher-forced top-1 / KL on the bench's SmolLM2 tasks with probe_teacher_forced.py's pieces,
with these changes simulated for this process only (an experiment, not a code path):

- ``vrot`` / ``krot``: values / keys rotated by an orthonormal Hadamard matrix over the head's channels
  before quantization and rotated back on dequantization (QuaRot-style incoherence: outlier channels are
  spread over all channels, so per-group ranges shrink);
- (session 9 simulated exact sinks here too; the cache now has them, ``s<S>`` in a method name, and the
  simulation was wrong under eviction, so it is gone: ``probes.txt`` says which rows it gave);
- ``exact<a>-<b>`` / ``only<a>-<b>``: layers a..b (inclusive) left unquantized / the only ones quantized,
  with no budget (nothing evicted): which layers' quantization error reaches the logits;
- anything else is a method name for ``memvisor_method``.

    python benchmarks/kv/probe_precision.py BUDGET SAMPLES GEN DTYPE VARIANT[,VARIANT...]
    e.g. python benchmarks/kv/probe_precision.py 3 6 128 float32 kivi4+streaming:vrot,kivi4+s4+streaming

A VARIANT is ``method[:change[:change...]]``.
"""
import sys
import time
from pathlib import Path

import torch

import memvisor.kv.quant as quant
from memvisor.bench.kv_methods import memvisor_method
from memvisor.bench.kv_run import bf16_scale

sys.path.insert(0, str(Path(__file__).parent))
from probe_teacher_forced import references, teacher_forced  # noqa: E402

ON: set[str] = set()
_orig = {n: getattr(quant, n) for n in ("quantize_keys", "quantize_values", "dequantize_keys",
                                         "dequantize_key_runs", "dequantize_values")}


def hadamard(d: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / d ** 0.5


def _rot(x, on):
    return x if on not in ON else (x.float() @ hadamard(x.shape[-1])).to(x.dtype)


def qk(k, bits, group):
    return _orig["quantize_keys"](_rot(k, "krot"), bits, group)


def qv(v, bits, group):
    return _orig["quantize_values"](_rot(v, "vrot"), bits, group)


def dk(*a, **kw):
    return _rot(_orig["dequantize_keys"](*a, **kw), "krot")


def dkr(*a, **kw):
    return _rot(_orig["dequantize_key_runs"](*a, **kw), "krot")


def dv(*a, **kw):
    return _rot(_orig["dequantize_values"](*a, **kw), "vrot")


def install() -> None:
    quant.quantize_keys, quant.quantize_values, quant.dequantize_keys = qk, qv, dk
    quant.dequantize_key_runs, quant.dequantize_values = dkr, dv


def layer_variant(method, changes, n_layers):
    """The method's cache with some layers unquantized (``exact``/``only`` changes), or the method as is."""
    import dataclasses

    from memvisor.kv.storage import QuantConfig

    for c in changes:
        for mode in ("exact", "only"):
            if c.startswith(mode):
                a, b = (int(x) for x in c[len(mode):].split("-"))
                span = set(range(a, b + 1))
                plain = span if mode == "exact" else set(range(n_layers)) - span

                def new_cache(make=method.new_cache, plain=plain):
                    cache = make()
                    for core in cache.cores:
                        if core.cfg.layer_idx in plain:
                            core.cfg = dataclasses.replace(core.cfg, qcfg=QuantConfig(bits=None))
                    return cache

                return dataclasses.replace(method, new_cache=new_cache)
    return method


def main() -> None:
    budget, samples, gen, dtype = float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), getattr(torch, sys.argv[4])
    torch.set_num_threads(1)
    install()
    model, prompts, refs = references("smollm2", samples, gen, dtype)
    base = sum(r["bytes"] for r in refs) / len(refs) * bf16_scale(dtype)
    for variant in sys.argv[5].split(","):
        name, *changes = variant.split(":")
        ON.clear()
        ON.update(c for c in changes if c in ("vrot", "krot"))
        t0 = time.time()
        layered = any(c.startswith(("exact", "only")) for c in changes)
        method = memvisor_method(name, model.config, None if layered else int(base / budget), context_tokens=4096)
        r = teacher_forced(model, layer_variant(method, changes, model.config.num_hidden_layers), prompts, refs)
        print(f"{variant:40s} {budget}x ratio {base * len(refs) / r['bytes']:.3f} top1 {r['top1']:.3f} "
              f"kl {r['kl']:.4f} per-sample {r['per_task']} {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
