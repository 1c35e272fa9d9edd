"""Host microseconds of each piece of a stacked-kernel decode step (``kv/gpu/cache_path.py``), one layer.

    python scripts/kv_gpu_stack_host.py --tokens 32768 --out DIR

Builds one layer of ``kv_gpu_block_size.py``'s ``kivi4-stream-4x`` cache (Llama-3.1-8B heads: 8 KV heads of 128,
32 query heads, KIVI-4 group 32 residual 128 + StreamingLLM(4) at a quarter of the bf16 bytes), decodes two steps
(the layer takes the stacked kernel path), then times each piece 100 times in a row without a sync in the loop:
the host's time per call (what an eager step pays per layer; GPU work queues behind it). A torch op on a tiny
tensor calibrates what one launch costs this host. Writes DIR/stack_host.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import kv_gpu_block_size as bench  # noqa: E402

from memvisor.kv.gpu.cache_path import stacked_decode  # noqa: E402
from memvisor.kv.storage import StackedHeads  # noqa: E402


def per_call_us(fn, n: int = 100) -> float:
    """Host microseconds per call of ``fn`` over ``n`` calls (the GPU catches up after the clock stops)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    us = (time.perf_counter() - t0) * 1e6 / n
    torch.cuda.synchronize()
    return round(us, 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    bench.LAYERS = 1
    gen = torch.Generator(device="cuda").manual_seed(7)
    core = bench.build("kivi4-stream-4x", a.tokens, None, gen)[0]
    D = bench.D
    q = torch.randn(1, bench.HQ, 1, D, device="cuda", generator=gen).bfloat16()
    for _ in range(2):
        k = torch.randn(1, bench.HKV, 1, D, device="cuda", generator=gen).bfloat16()
        core.update(k, k)
        core.attend(q, D ** -0.5)
    stores, stack = core.stores, core.stack
    tiny = torch.zeros(1, device="cuda")
    scale = D ** -0.5
    pieces = {
        "one torch op (x.add_(1))": lambda: tiny.add_(1),
        "stacked_decode (all of it)": lambda: stacked_decode(q, stores, scale, stack),
        "key-group rows (group_of_tokens)": lambda: stores[0].group_of_tokens(0, stores[0].nq),
        "HeadStack.stacked (one name)": lambda: stack.stacked(stores, "k_codes"),
        "HeadStack.compatible": lambda: stack.compatible(stores),
        "StackedHeads.compatible (reads back)": lambda: StackedHeads.compatible(stores),
        "LayerCore.nbytes": core.nbytes,
        "LayerCore._flush (nothing to quantize)": core._flush,
    }
    res = {"card": torch.cuda.get_device_name(0), "torch": torch.__version__, "tokens": a.tokens,
           "nq": stores[0].nq, "groups": stores[0].group_sizes.numel(), "evictions": core.evictions,
           "host_us_per_call": {name: per_call_us(fn) for name, fn in pieces.items()}}
    print(json.dumps(res, indent=1))
    (a.out / "stack_host.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
