"""The Gluon operand-swap decode kernel (gluon_kivi_swap.py) against the torch reference; runs only where
CUDA and Triton are (the device)."""

import pytest
import torch

from memvisor.kv.gpu import decode_attention_reference, quantize_layer, triton_available
from tests.kv.planes_cases import planes_case, rel_error

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs CUDA and Triton")


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("shape", [
    (1, 32, 8, 128, 4096 + 45),   # Llama-3.1-8B heads: whole tiles + residual
    (1, 32, 8, 128, 20000),       # many splits, a part-filled last tile
    (2, 9, 3, 64, 1000),          # SmolLM2 heads (3 query heads per kv head, one pair of value groups)
    (1, 4, 1, 256, 700),          # Gemma 3 270M: head_dim 256 (4 pairs of value groups)
    (1, 8, 8, 128, 20),           # residual only (one query head per kv head)
    (3, 16, 4, 128, 96),          # quantized tokens without residual (R=0 below)
])
def test_swap_kernel_matches_reference(shape, bits):
    from memvisor.kv.gpu.triton_decode import swap_decode_attention

    planes, q, want = planes_case(shape, bits, hash(shape) % 1000 + bits + 7)
    variants = [dict()]
    if shape[4] == 20000:  # warps per program, programs per SM (splits of other sizes), loads without shared memory
        variants += [dict(num_warps=2, waves=3.0), dict(num_warps=8, waves=1.0, staged=False), dict(waves=5.0),
                     dict(num_warps=4, waves=16.0, staged=False), dict(staged=False), dict(late_copy=False),
                     dict(late_copy=False, num_warps=2, waves=3.0), dict(pdl=False), dict(pdl_split_trigger="middle"),
                     dict(pdl_split_trigger="exit", pdl_combine_trigger="start"), dict(pdl_combine_trigger="middle")]
    for kw in variants:
        got = swap_decode_attention(q, planes, **kw)
        assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
        assert rel_error(got, want) < 1e-2, (kw, rel_error(got, want))


def test_swap_kernel_fp16_query():
    """fp16 model dtype: the residual's products run in fp16."""
    from memvisor.kv.gpu.planes import to_planes
    from memvisor.kv.gpu.triton_decode import swap_decode_attention

    k = torch.randn(1, 2, 777, 128, device="cuda")
    v = torch.randn(1, 2, 777, 128, device="cuda")
    layer = quantize_layer(k.half().float(), v.half().float(), 2, 32, 32)
    layer.k_res, layer.v_res = layer.k_res.half().contiguous(), layer.v_res.half().contiguous()
    q = torch.randn(1, 8, 128, device="cuda").half()
    got = swap_decode_attention(q, to_planes(layer))
    assert rel_error(got, decode_attention_reference(q, layer)) < 1e-2


def _graph(step):
    """``step`` captured in a CUDA graph (after one eager call that compiles), replayed 3 times."""
    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        graph.capture_begin()
        step()
        graph.capture_end()
    torch.cuda.current_stream().wait_stream(stream)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()


@pytest.mark.parametrize("bits", [2, 4])
def test_swap_kernel_in_a_graph_waits_for_the_kernels_before_it(bits):
    """Programmatic dependent launches (pdl.py) in a CUDA graph, with the pipelined split plan (swap_plan.py) at
    32k tokens: (a) each layer's query is copied into ONE buffer just before that layer's launches, so a launch
    that read the query or wrote its partials before the kernels before it ended would give another layer's
    answer; (b) the layers' launches back to back (each launch lets the next one start at once)."""
    from memvisor.kv.gpu.pdl import pdl_available
    from memvisor.kv.gpu.triton_decode import swap_decode_attention

    cases = [planes_case((1, 32, 8, 128, 32768 + 300 * i), bits, 50 + i) for i in range(4)]
    hopper = pdl_available(cases[0][1].device)
    assert hopper == (torch.cuda.get_device_capability() >= (9, 0))
    if hopper:
        swap_decode_attention(cases[0][1], cases[0][0], pipeline=True)  # the plan applies (else it raises)
    q_buf = torch.empty_like(cases[0][1])
    outs = [torch.empty_like(q_buf) for _ in cases]

    def one_buffer():
        for (planes, q, _), out in zip(cases, outs):
            q_buf.copy_(q)
            out.copy_(swap_decode_attention(q_buf, planes))

    _graph(one_buffer)
    for (_, _, want), out in zip(cases, outs):
        assert rel_error(out, want) < 1e-2
    chained = []

    def back_to_back():
        chained[:] = [swap_decode_attention(q, planes) for planes, q, _ in cases]

    _graph(back_to_back)
    for (_, _, want), out in zip(cases, chained):
        assert rel_error(out, want) < 1e-2
