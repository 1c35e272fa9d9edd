"""`memvisor bench scale`: ingest throughput, search/context latency, RSS and disk per memory by size.

Each (system, n) runs in its own worker process (`scale_worker`), so RSS is that run's own; Mem0
runs under `--mem0-python` when given. Results: DIR/scale.json and DIR/scale.md, with memvisor's
speed relative to Mem0 at each size both ran.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import sys
from pathlib import Path

import typer

from memvisor.errors import InvalidInput


def run_scale(sizes: list[int], out: Path, systems: list[str], *, mem0_max: int = 100_000,
              queries: int = 200, mem0_python: str = "", seed: int = 7, command: str = "",
              keep: Path | None = None, reuse: Path | None = None) -> dict:
    """`keep`: keep each run's store in `keep/{system}-{n}` (a new folder) instead of deleting it.
    `reuse`: time memvisor's queries again on the stores an earlier `keep` run left there (no ingest); the
    earlier run's ingest figures stay in the results."""
    from memvisor.bench.common import machine_description, run_worker

    bad = [s for s in systems if s not in ("memvisor", "mem0", "mem0-dense")]
    if bad:
        raise InvalidInput(f"unknown scale systems {bad}; choose from memvisor, mem0, mem0-dense")
    out.mkdir(parents=True, exist_ok=True)
    parts = out / "parts"
    parts.mkdir(exist_ok=True)
    path = out / "scale.json"
    # Runs accumulate across invocations (a 1M run may come later, from another machine session).
    results = json.loads(path.read_text()) if path.exists() else {"runs": []}
    results.update({"machine": machine_description(), "date": _dt.date.today().isoformat()})
    results.setdefault("commands", [])
    if command and command not in results["commands"]:
        results["commands"].append(command)
    for n in sizes:
        for name in systems:
            if name.startswith("mem0") and n > mem0_max:
                continue
            python = (mem0_python or os.environ.get("MEMVISOR_MEM0_PYTHON") or sys.executable) \
                if name.startswith("mem0") else sys.executable
            part = parts / f"{name}-{n}.json"
            if part.exists():
                part.unlink()
            typer.echo(f"scale: {name} n={n:,}", err=True)
            argv = [python, "-m", "memvisor.bench.scale_worker", "--system", name, "--n", str(n),
                    "--queries", str(queries), "--seed", str(seed), "--out", str(part)]
            if keep is not None:
                argv += ["--keep-at", str(keep / f"{name}-{n}")]
            if reuse is not None:
                if name != "memvisor":
                    continue
                argv += ["--reuse-at", str(reuse / f"{name}-{n}")]
            code = run_worker(argv)
            if code != 0 or not part.exists():
                typer.echo(f"  {name} n={n} failed (exit {code})", err=True)
                continue
            run = json.loads(part.read_text())
            run["date"] = results["date"]
            earlier = next((r for r in results["runs"] if (r["system"], r["n"]) == (name, n)), None)
            if run.get("reused_store") and earlier and earlier.get("ingest_per_s"):
                for key in ("ingest_seconds", "ingest_per_s", "rss_after_ingest_mb"):
                    run[key] = earlier[key]
                run["peak_rss_mb"] = max(run["peak_rss_mb"], earlier["peak_rss_mb"])
            results["runs"] = [r for r in results["runs"] if (r["system"], r["n"]) != (name, n)] + [run]
            # After each run: a long run stopped later still leaves its finished sizes, rendered.
            path.write_text(json.dumps(results, indent=1))
            (out / "scale.md").write_text(markdown(results))
    results["runs"].sort(key=lambda r: (r["n"], r["system"]))
    path.write_text(json.dumps(results, indent=1))
    (out / "scale.md").write_text(markdown(results))
    return results


def _f(x, d=1):
    return "–" if x is None else (f"{x:,.{d}f}" if isinstance(x, float) else f"{x:,}")


def markdown(results: dict) -> str:
    runs = results["runs"]
    lines = ["# Scale — synthetic memories (`memvisor.bench.synthetic`)", "",
             f"Machine: {results['machine']}; date {results['date']}.", ""]
    lines += [f"Command: `{c}`" for c in results.get("commands", [])]
    lines += ["", "| system | n | ingest /s | search p50 / p95 / p99 ms | context p50 / p95 ms (1,024 tok) "
                  "| source in top 10 | one user's search p50 / p95 ms | peak RSS MiB | disk B / memory "
                  "| load avg (1 min) start, end |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in runs:
        s, c, u = r["search_ms"], r["context_ms"], r.get("user_search_ms") or {}
        lines.append(f"| {r['system']} | {r['n']:,} | {_f(r['ingest_per_s'], 0)} | {_f(s['p50'])} / "
                     f"{_f(s['p95'])} / {_f(s['p99'])} | {_f(c['p50'])} / {_f(c['p95'])} | "
                     f"{_f(r['source_in_top10'], 2)} | {_f(u.get('p50'))} / {_f(u.get('p95'))} | "
                     f"{_f(r['peak_rss_mb'], 0)} | "
                     f"{_f(r['disk_bytes_per_memory'], 0)} | "
                     f"{(r.get('load_average_start') or ['–'])[0]}, {(r.get('load_average_end') or ['–'])[0]} |")
    by = {(r["system"], r["n"]): r for r in runs}
    ratios = []
    for (name, n), r in sorted(by.items(), key=lambda x: x[0][1]):
        m0 = by.get(("mem0", n))
        if name == "memvisor" and m0:
            ratios.append(f"| {n:,} | {r['ingest_per_s'] / m0['ingest_per_s']:.1f}x | "
                          f"{m0['search_ms']['p95'] / r['search_ms']['p95']:.1f}x | "
                          f"{m0['context_ms']['p95'] / r['context_ms']['p95']:.1f}x |")
    if ratios:
        lines += ["", "memvisor relative to Mem0 (higher is better for memvisor):", "",
                  "| n | ingest throughput | search p95 speed-up | context p95 speed-up |",
                  "|---:|---:|---:|---:|", *ratios]
    return "\n".join(lines) + "\n"
