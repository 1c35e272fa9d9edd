"""One layer of the planes decode kernel at 32k tokens (Llama-3.1-8B heads), launched 6 times, for Nsight
Compute on a CUDA card (the profiles behind BENCHMARKS.md kv-gpu, "Where the time goes"):

    ncu --clock-control none -k regex:_planes_split --launch-skip 3 --launch-count 1 \
        --section WarpStateStats --section SchedulerStats python scripts/kv_gpu_profile_layer.py 2
    ncu ... --section SourceCounters --page source --print-source sass python scripts/kv_gpu_profile_layer.py 2

Arguments: the code width, 2 or 4; ``swap`` for the Gluon operand-swap kernel (gluon_kivi_swap.py, its
default settings; ``-k regex:_swap_split`` under ncu).
"""

import sys

import torch

from memvisor.kv.gpu import random_layer, to_planes
from memvisor.kv.gpu.triton_decode import planes_decode_attention, swap_decode_attention

bits = int(sys.argv[1])
attend = swap_decode_attention if sys.argv[2:3] == ["swap"] else planes_decode_attention
g = torch.Generator(device="cuda").manual_seed(0)
layer = to_planes(random_layer(1, 8, 32768 - 32, 128, bits, 32, 32, torch.bfloat16, "cuda", g))
q = torch.randn(1, 32, 128, device="cuda").bfloat16()
for _ in range(6):
    attend(q, layer)
torch.cuda.synchronize()
print("done", bits)
