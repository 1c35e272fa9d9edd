"""Synthetic corpus and the scale command on a small n (real memvisor store, real MiniLM)."""
from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from memvisor.bench.synthetic import SyntheticCorpus


def test_synthetic_corpus_is_deterministic_and_varied():
    a, b = SyntheticCorpus(3000, seed=3), SyntheticCorpus(3000, seed=3)
    ra, rb = a.records(), b.records()
    assert ra == rb and a.queries(20) == b.queries(20)
    assert SyntheticCorpus(3000, seed=4).records() != ra
    lengths = sorted(len(r["text"].split()) for r in ra)
    assert lengths[0] >= 4 and lengths[-1] >= 40 and lengths[len(lengths) // 2] < 30
    assert len({r["user"] for r in ra}) >= 50
    assert len({w for r in ra for w in r["text"].split()}) > 1500
    times = [r["valid_from"] for r in ra if r["user"] == ra[0]["user"]]
    assert times == sorted(times) and len(set(times)) == len(times)  # per-user time moves forward
    for q in a.queries(20):
        first = ra[q.target]["text"].split()[0].split("'")[0]
        assert first in q.text or " in " in q.text  # written from its source memory


@pytest.mark.slow
def test_scale_command_writes_json_and_table(tmp_path):
    from memvisor.bench.locomo import register

    app, bench = typer.Typer(), typer.Typer()
    app.add_typer(bench, name="bench")
    register(bench)
    out = tmp_path / "scale"
    r = CliRunner().invoke(app, ["bench", "scale", "--n", "300", "--queries", "10",
                                 "--systems", "memvisor", "--out", str(out), "--keep", str(tmp_path / "homes")])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "scale.json").read_text())
    (run,) = res["runs"]
    assert run["system"] == "memvisor" and run["n"] == 300
    assert run["ingest_per_s"] > 0 and run["disk_bytes_per_memory"] > 0
    assert run["search_ms"]["p95"] >= run["search_ms"]["p50"] > 0
    assert run["context_ms"]["p50"] > 0 and run["peak_rss_mb"] > 0
    assert run["source_in_top10"] > 0.2  # the query's own memory is usually found
    assert run["user_search_ms"]["p95"] >= run["user_search_ms"]["p50"] > 0  # searched within its user
    assert run["user_source_in_top10"] > 0.2
    assert "| memvisor | 300 |" in (out / "scale.md").read_text()
    from memvisor import Memory

    with Memory(tmp_path / "homes" / "memvisor-300" / "home") as kept:  # --keep left the store whole
        assert len(kept.store.vector_index("scale")) == 300
    # --reuse times the queries again on that store and keeps the first run's ingest figures.
    r = CliRunner().invoke(app, ["bench", "scale", "--n", "300", "--queries", "10", "--systems", "memvisor",
                                 "--out", str(out), "--reuse", str(tmp_path / "homes")])
    assert r.exit_code == 0, r.output
    (again,) = json.loads((out / "scale.json").read_text())["runs"]
    assert again["reused_store"] and again["ingest_per_s"] == run["ingest_per_s"]
    assert again["search_ms"]["p50"] > 0 and again["source_in_top10"] == run["source_in_top10"]
    assert "--reuse" in (out / "scale.md").read_text()  # the recorded command reproduces the run
