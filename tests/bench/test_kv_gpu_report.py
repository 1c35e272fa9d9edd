"""The kv-gpu report: table and results.json from a results dict (the measuring runs on a CUDA card)."""

import json

import pytest

from memvisor.bench.kv_gpu import GpuBenchConfig, parse_lengths, table, write_results


def _row(tokens, sdpa, tri, k2, k4):
    def e(us, gbps, **kw):
        return {"us_per_step": us, "GBps": gbps, "frac_copy_bw": gbps / 3000, **kw}
    return {"tokens": tokens, "bf16_sdpa": e(sdpa, 2500), "bf16_triton": e(tri, 2400),
            "kivi2": e(k2, 500, speedup_vs_best_bf16=min(sdpa, tri) / k2),
            "kivi4": e(k4, 800, speedup_vs_best_bf16=min(sdpa, tri) / k4)}


def test_table_and_results(tmp_path):
    res = {"card": "NVIDIA H100 80GB HBM3", "sm_count": 132, "date": "2026-11-26", "torch": "2.11", "triton": "3.6",
           "copy_bandwidth_GBps": 3000.0, "shape": {"layers": 32, "q_heads": 32, "kv_heads": 8, "head_dim": 128,
                                                     "batch": 1, "group": 32, "residual": 32},
           "rows": [_row(8192, 600, 610, 680, 670), _row(32768, 1650, 1670, 1800, 1780)]}
    text = table(res)
    assert "| 32768 | 1650 | 1670 | 1800 | 0.92x |" in text
    write_results(res, tmp_path)
    assert json.loads((tmp_path / "results.json").read_text())["card"].startswith("NVIDIA")
    assert "Copy bandwidth 3000 GB/s" in (tmp_path / "table.md").read_text()


def test_config_and_lengths():
    assert parse_lengths("8192,16384") == (8192, 16384)
    with pytest.raises(ValueError):
        parse_lengths("8192,-1")
    cfg = GpuBenchConfig()
    assert cfg.q_heads // cfg.kv_heads == 4 and cfg.head_dim == 128 and 32768 in cfg.lengths
    assert all(c["block_n"] % cfg.group == 0 for c in cfg.configs if c["variant"] == "tile")
