"""What a key-group map costs the stacked "dequant" decode kernel (GPU).

Eviction that cuts a key group short (StreamingLLM keeping 4 sinks of a 32-token group, any policy evicting inside
a group) makes the layer pass ``KiviLayer.key_groups``: the kernel then reads each token's key-scale row from an
int32 map instead of computing ``t // G``, and the cache path rebuilds that map every step
(``HeadStore.group_of_tokens``: cumsum + searchsorted over the quantized tokens). This times, for a
Llama-3.1-8B-shaped layer stack (32 layers, 8 KV heads of 128, 32 query heads, keys 4 / values 2 bits, G 32,
32 residual tokens), one decode step's attention (all layers, CUDA events, after warm-up) for:

- ``whole``: every group whole, no map;
- ``map``: the same tokens with an explicit map equal to ``t // G`` (the map's own cost);
- ``cut``: group 0 cut to 4 tokens (what StreamingLLM's 4 sinks leave), the rest whole: a map;
- ``cut+build``: ``cut`` with the map rebuilt each step as the cache path does.

    python scripts/kv_gpu_group_map_cost.py --tokens 8192,32768 --steps 20 --out DIR
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from memvisor.kv.gpu.layout import KiviLayer
from memvisor.kv.gpu.triton_decode import kivi_decode_attention

LAYERS, HQ, HKV, D, G, RES = 32, 32, 8, 128, 32, 32


def layer(tokens: int, cut: int, gen: torch.Generator) -> tuple[KiviLayer, torch.Tensor]:
    """A random k4v2 layer of ``tokens`` quantized tokens whose first group holds ``G - cut`` of them, and its
    group sizes (int16, as the cache stores them)."""
    t = tokens - cut
    n_groups = tokens // G
    dev = "cuda"
    k_codes = torch.randint(0, 256, (1, HKV, (t + 1) // 2, D), dtype=torch.uint8, generator=gen, device=dev)
    v_codes = torch.randint(0, 256, (1, HKV, t, D // 4), dtype=torch.uint8, generator=gen, device=dev)

    def meta(*shape: int) -> torch.Tensor:
        return (torch.rand(*shape, generator=gen, device=dev) * 0.1).to(torch.float16)

    k_res = torch.randn(1, HKV, RES, D, generator=gen, device=dev).bfloat16()
    v_res = torch.randn(1, HKV, RES, D, generator=gen, device=dev).bfloat16()
    sizes = torch.full((n_groups,), G, dtype=torch.int16, device=dev)
    sizes[0] = G - cut
    lay = KiviLayer(4, G, k_codes, meta(1, HKV, n_groups, D), meta(1, HKV, n_groups, D), v_codes,
                    meta(1, HKV, t, D // G), meta(1, HKV, t, D // G), k_res, v_res, None, vbits=2)
    return lay, sizes


def group_rows(sizes: torch.Tensor, t: int) -> torch.Tensor:
    """int32 [t]: each token's group row (what cache_path._launch builds through HeadStore.group_of_tokens)."""
    ends = torch.cumsum(sizes.long(), 0)
    return torch.searchsorted(ends, torch.arange(t, device=sizes.device), right=True).to(torch.int32)


def time_variant(layers: list[KiviLayer], sizes: list[torch.Tensor], variant: str, steps: int,
                 gen: torch.Generator) -> float:
    """Milliseconds of one step's attention over all layers (mean of ``steps`` after 3 warm-up steps)."""
    t = layers[0].t_quant
    if variant in ("map", "cut"):
        for lay, s in zip(layers, sizes):
            lay.key_groups = group_rows(s, t)
    q = torch.randn(1, HQ, D, generator=gen, device="cuda").bfloat16()

    def step() -> None:
        for lay, s in zip(layers, sizes):
            if variant == "cut+build":
                lay.key_groups = group_rows(s, t)
            kivi_decode_attention(q, lay, variant="dequant")

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="8192,32768")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for tokens in map(int, a.tokens.split(",")):
        gen = torch.Generator(device="cuda").manual_seed(3)
        for variant in ("whole", "map", "cut", "cut+build") * a.rounds:
            built = [layer(tokens, 28 if variant.startswith("cut") else 0, gen) for _ in range(LAYERS)]
            ms = time_variant([b[0] for b in built], [b[1] for b in built], variant, a.steps, gen)
            row = dict(tokens=tokens, variant=variant, ms_per_step=round(ms, 3))
            print(json.dumps(row), flush=True)
            rows.append(row)
            del built
            torch.cuda.empty_cache()
    (a.out / "group_map_cost.json").write_text(json.dumps(
        {"card": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
