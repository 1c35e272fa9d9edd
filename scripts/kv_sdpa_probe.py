"""One layer's prefill-block attention on the CPU, three ways: float32 products (what the block loop
computes), bf16 SDPA with a 2-D mask, and bf16 SDPA with a per-head window mask given as 3-D and as 4-D.

    python scripts/kv_sdpa_probe.py

Shapes: SmolLM2 (9 query heads over 3 KV heads, head dim 64), 512 queries over 3,500 stored keys; and a
Gemma 3 sliding layer (4 over 1, head dim 256), 512 queries over 1,023 keys, window 512. Prints ms per call
(median of 10, 2 threads) and the largest difference to a float32 reference. NOTES.md, "KV (session 10)".
"""
import time

import torch
import torch.nn.functional as F


def timed(fn, reps=10):
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[reps // 2] * 1e3


def float32_products(q, k, v, mask, scale):
    g = q.shape[1] // k.shape[1]
    s = (q.float() @ k.float().repeat_interleave(g, 1).transpose(-1, -2)) * scale
    return (s.masked_fill(~mask, float("-inf")).softmax(-1) @ v.float().repeat_interleave(g, 1))


def main():
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    # SmolLM2-shaped, causal mask only
    Hq, Hkv, D, Tq, n = 9, 3, 64, 512, 3500
    q = torch.randn(1, Hq, Tq, D, generator=g).bfloat16()
    k, v = (torch.randn(1, Hkv, n, D, generator=g).bfloat16() for _ in range(2))
    causal = torch.arange(n).unsqueeze(0) <= (n - Tq + torch.arange(Tq)).unsqueeze(1)
    ref = float32_products(q, k, v, causal, D ** -0.5)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=causal, scale=D ** -0.5, enable_gqa=True)
    print(f"SmolLM2 shape: float32 products {timed(lambda: float32_products(q, k, v, causal, D ** -0.5)):.1f} ms, "
          f"bf16 SDPA {timed(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=causal, scale=D ** -0.5, enable_gqa=True)):.1f} ms; "
          f"max |SDPA - ref| {(out.float() - ref).abs().max():.4f}, bf16 rounding of ref {(ref.bfloat16().float() - ref).abs().max():.4f}")
    # Gemma-3-sliding-shaped, causal and window mask per head
    Hq, Hkv, D, Tq, n, window = 4, 1, 256, 512, 1023, 512
    q = torch.randn(1, Hq, Tq, D, generator=g).bfloat16()
    k, v = (torch.randn(1, Hkv, n, D, generator=g).bfloat16() for _ in range(2))
    pos, q_pos = torch.arange(n).unsqueeze(0), torch.arange(n - Tq, n)
    causal = torch.arange(n).unsqueeze(0) <= (n - Tq + torch.arange(Tq)).unsqueeze(1)
    mask3 = (causal.unsqueeze(0) & (pos.unsqueeze(1) > (q_pos.view(1, Tq, 1) - window))).repeat_interleave(Hq // Hkv, 0)
    ref = float32_products(q, k, v, mask3, D ** -0.5)
    for name, mask in (("3-D", mask3), ("4-D", mask3.unsqueeze(0))):
        def run(mask=mask):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=D ** -0.5, enable_gqa=True)
        print(f"Gemma sliding shape, {name} mask: {timed(run):.1f} ms, max |SDPA - ref| {(run().float() - ref).abs().max():.4f}")


if __name__ == "__main__":
    main()
