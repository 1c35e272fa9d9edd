"""Every policy runs on a GPU cache as on the CPU (device tests; CI has no GPU and skips them).

The same float32 prefill and decode steps go through two layers, one on the CPU and one on CUDA, under a
byte budget that makes each policy evict several times: both must keep the same tokens per head and give
the same attention outputs (within float32 summation-order noise). Policies gather statistics on the
keys' device and keep them on the CPU (``policies/_stats.py``)."""

import pytest
import torch

from memvisor.kv.layer import LayerConfig, LayerCore
from memvisor.kv.policies.h2o import H2O
from memvisor.kv.policies.head_adakv import AdaKVHeadBudget
from memvisor.kv.policies.knorm import KeyNorm
from memvisor.kv.policies.merge import KVMerger
from memvisor.kv.policies.scissorhands import Scissorhands
from memvisor.kv.policies.snapkv import SnapKV
from memvisor.kv.policies.streaming import StreamingLLM
from memvisor.kv.policies.think import ThinK
from memvisor.kv.storage import QuantConfig

RECIPES = {
    "streaming": lambda: dict(policy=StreamingLLM(4)),
    "h2o": lambda: dict(policy=H2O(recent=16, sinks=4)),
    "h2o-adakv": lambda: dict(policy=H2O(recent=16, sinks=4), head_budget=AdaKVHeadBudget()),
    "scissorhands": lambda: dict(policy=Scissorhands(history=16, sinks=4)),
    "snapkv": lambda: dict(policy=SnapKV(window=16, sinks=4)),
    "knorm": lambda: dict(policy=KeyNorm(sinks=4, recent=16)),
    "streaming-merge": lambda: dict(policy=StreamingLLM(4), merge=KVMerger(0.5)),
    "streaming-think": lambda: dict(policy=StreamingLLM(4), channel=ThinK(0.25)),
}


BUDGET = 160_000


def _run(device: str, recipe: str, window: int | None = None,
         evictions: int = 3) -> tuple[list[torch.Tensor], list[list[int]], list[int], list[int]]:
    """Per step: attention output, tokens per head, bytes held, evictions so far."""
    g = torch.Generator().manual_seed(3)
    B, Hq, Hkv, D = 1, 8, 4, 64
    core = LayerCore(LayerConfig(0, window, QuantConfig(4, 32, 32), budget_bytes=BUDGET, slack=8,
                                 **RECIPES[recipe]()))
    outs, lengths, held, evicted = [], [], [], []
    for n in [200] + [1] * 40 + [64] + [1] * 20:
        k, v = (torch.randn(B, Hkv, n, D, generator=g).to(device) for _ in range(2))
        q = torch.randn(B, Hq, n, D, generator=g).to(device)
        core.update(k, v)
        outs.append(core.attend(q, D ** -0.5).cpu())
        lengths.append(core.lengths())
        held.append(core.nbytes())
        evicted.append(core.evictions)
    assert core.evictions >= evictions
    return outs, lengths, held, evicted


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_a_policy_keeps_the_same_tokens_on_cuda_as_on_the_cpu(recipe):
    """Step by step the same tokens and outputs, through at least the first eviction. After an eviction that cuts
    key groups, a CUDA head also keeps its group map (int32 a token: real bytes, counted), so its cache can reach
    the budget a few steps before the CPU's and evict there: from the first step where the two hold different
    counts, each side is checked against its own budget only, and that step must be a CUDA eviction made while
    the CUDA side held more bytes for the same tokens."""
    cpu_out, cpu_len, cpu_bytes, cpu_ev = _run("cpu", recipe)
    gpu_out, gpu_len, gpu_bytes, gpu_ev = _run("cuda", recipe)
    same = next((i for i, (a, b) in enumerate(zip(gpu_len, cpu_len)) if a != b), len(cpu_len))
    assert same == len(cpu_len) or (gpu_ev[same] > cpu_ev[same] and gpu_bytes[same - 1] > cpu_bytes[same - 1]
                                    and gpu_len[same - 1] == cpu_len[same - 1])
    assert cpu_ev[same - 1] >= 1  # the first eviction chose the same tokens on both
    for a, b in zip(gpu_out[:same], cpu_out[:same]):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-4)
    assert max(gpu_bytes) <= BUDGET and max(cpu_bytes) <= BUDGET


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("recipe", ["h2o", "streaming"])
def test_a_sliding_layer_with_a_policy_runs_on_cuda_as_on_the_cpu(recipe):
    cpu_out, cpu_len, _, _ = _run("cpu", recipe, window=96, evictions=0)
    gpu_out, gpu_len, _, _ = _run("cuda", recipe, window=96, evictions=0)
    assert gpu_len == cpu_len and max(cpu_len[-1]) < 96  # the window dropped the older tokens
    for a, b in zip(gpu_out, cpu_out):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-4)
