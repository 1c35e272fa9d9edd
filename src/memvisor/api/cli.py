"""The `memvisor` command line: the same verbs as `memvisor.Memory`, one command each.

Errors print one line, `error: <what to fix>`, and exit with status 2; nothing is partly written.
"""
from __future__ import annotations

import json
import sys
import unicodedata
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from memvisor.api.limits import MAX_BUDGET_TOKENS
from memvisor.errors import MemvisorError

app = typer.Typer(help="memvisor: memory for LLM applications (plaintext, KV and parametric).",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
bench_app = typer.Typer(help="Benchmarks on real data, peers side by side.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
out = Console()
err = Console(stderr=True)

# Each command takes --home too (after its name); the root's --home and MEMVISOR_HOME apply when it is not given.
HomeOpt = typer.Option(None, "--home", help="Memory home folder (default: --home before the command, "
                       "MEMVISOR_HOME, or ~/.memvisor).")
NsOpt = typer.Option(..., "--namespace", "-n", help="Namespace (a hard partition, e.g. one app or tenant).")
JsonOpt = typer.Option(False, "--json", help="Print JSON instead of text.")


# The root's --home (or MEMVISOR_HOME), set by `_root` before the command runs; "typed": on the command line.
_root_home: dict[str, Any] = {"home": None, "typed": False}


@app.callback()
def _root(ctx: typer.Context, home: Optional[Path] = typer.Option(
        None, "--home", envvar="MEMVISOR_HOME", help="Memory home folder for every command (default ~/.memvisor).")
          ) -> None:
    source = ctx.get_parameter_source("home")
    _root_home.update(home=home, typed=source is not None and source.name == "COMMANDLINE")


def _memory(home: Optional[Path]):
    from memvisor.api.memory import Memory

    return Memory(home or _root_home["home"])


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, ensure_ascii=False, indent=2) + "\n")


def progress_bar() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=err, transient=False)


@app.command()
def add(text: str, namespace: str = NsOpt, user: Optional[str] = typer.Option(None, "--user"),
        agent: Optional[str] = typer.Option(None, "--agent"), session: Optional[str] = typer.Option(None, "--session"),
        kind: str = typer.Option("episodic", "--kind", help="episodic | semantic | core | procedural"),
        valid_from: Optional[str] = typer.Option(None, "--valid-from", help="ISO-8601: when it became true."),
        metadata: Optional[str] = typer.Option(None, "--metadata", help="A JSON object."),
        home: Optional[Path] = HomeOpt) -> None:
    """Store one memory and print its id."""
    meta = _json_object(metadata, "--metadata")
    with _memory(home) as m:
        item = m.add(text, namespace=namespace, user=user, agent=agent, session=session, kind=kind,
                     valid_from=valid_from, metadata=meta)
    out.print(item.id, markup=False)


@app.command()
def ingest(file: Path, namespace: str = NsOpt, user: Optional[str] = typer.Option(None, "--user"),
           home: Optional[Path] = HomeOpt) -> None:
    """Ingest conversations: LoCoMo JSON or JSON-lines turns ({"speaker", "text", "time", "session"})."""
    from memvisor.text.formats import load_conversations

    conversations = load_conversations(file)
    total = sum(len(c.turns) for c in conversations)
    with _memory(home) as m, progress_bar() as bar:
        task = bar.add_task(f"ingesting {escape(file.name)}", total=total)
        report = m.ingest(conversations, namespace=namespace, user=user,
                          progress=lambda n: bar.advance(task, n))
    out.print(f"added {_memories(report.added)}, skipped {report.skipped_duplicates} already present "
              f"(namespace {namespace})", markup=False)


@app.command()
def search(query: str, namespace: str = NsOpt, user: Optional[str] = typer.Option(None, "--user"),
           k: int = typer.Option(10, "-k", help="How many results."),
           as_of: Optional[str] = typer.Option(None, "--as-of", help="ISO-8601: what was true then."),
           kind: Optional[list[str]] = typer.Option(None, "--kind"), as_json: bool = JsonOpt,
           home: Optional[Path] = HomeOpt) -> None:
    """Hybrid search (full-text + vectors); each result with its score and why."""
    with _memory(home) as m:
        hits = m.search(query, namespace=namespace, user=user, k=k, as_of=as_of, kinds=kind)
    if as_json:
        _print_json([h.to_dict() for h in hits])
        return
    for h in hits:
        e = h.explanation
        why = f"bm25 #{e.bm25_rank or '-'} · vector #{e.vector_rank or '-'}"
        out.print(f"[bold]{h.score:.4f}[/] {escape(h.item.id)}  {_when(h.item.valid_from)}[dim]{why}[/]\n"
                  f"    {escape(_printable(h.item.text))}", highlight=False)


@app.command()
def context(query: str, namespace: str = NsOpt,
            budget: int = typer.Option(..., "--budget", min=1, max=MAX_BUDGET_TOKENS, help="Token budget."),
            user: Optional[str] = typer.Option(None, "--user"),
            as_of: Optional[str] = typer.Option(None, "--as-of", help="ISO-8601: what was true then."),
            as_json: bool = JsonOpt, home: Optional[Path] = HomeOpt) -> None:
    """The best memories that fit a token budget, formatted for a prompt, with citations."""
    with _memory(home) as m:
        ctx = m.context(query, namespace=namespace, budget_tokens=budget, user=user, as_of=as_of)
    if as_json:
        _print_json(ctx.to_dict())
        return
    sys.stdout.write((_printable(ctx.text) if sys.stdout.isatty() else ctx.text) + "\n")  # a pipe gets it as is
    err.print(f"[dim]{ctx.tokens}/{ctx.budget_tokens} tokens · {len(ctx.citations)} memories cited · "
              f"{ctx.dropped} candidates did not fit[/]")


@app.command()
def get(memory_id: str, namespace: str = NsOpt, home: Optional[Path] = HomeOpt) -> None:
    """Print a memory (its newest version) as JSON."""
    with _memory(home) as m:
        _print_json(m.get(memory_id, namespace=namespace).to_dict())


@app.command()
def history(memory_id: str, namespace: str = NsOpt, home: Optional[Path] = HomeOpt) -> None:
    """Every version of a memory with its valid and recorded times, as JSON."""
    with _memory(home) as m:
        _print_json([v.to_dict() for v in m.history(memory_id, namespace=namespace)])


@app.command()
def update(memory_id: str, namespace: str = NsOpt, text: Optional[str] = typer.Option(None, "--text"),
           metadata: Optional[str] = typer.Option(
               None, "--metadata", help="A JSON object merged into the old (a key set to null is removed)."),
           kind: Optional[str] = typer.Option(None, "--kind", help="episodic | semantic | core | procedural"),
           valid_from: Optional[str] = typer.Option(
               None, "--valid-from", help="ISO-8601: the world changed then (else: a correction)."),
           home: Optional[Path] = HomeOpt) -> None:
    """Write a new version of a memory; the old one stays in its history."""
    with _memory(home) as m:
        item = m.update(memory_id, namespace=namespace, text=text, metadata=_json_object(metadata, "--metadata"),
                        kind=kind, valid_from=valid_from)
    out.print(f"{item.id} is now version {item.version}", markup=False)


@app.command()
def invalidate(memory_id: str, namespace: str = NsOpt,
               at: Optional[str] = typer.Option(None, "--at", help="ISO-8601: when it stopped being true."),
               home: Optional[Path] = HomeOpt) -> None:
    """Mark a memory as no longer true (kept for 'as of' queries)."""
    with _memory(home) as m:
        item = m.invalidate(memory_id, namespace=namespace, at=at)
    out.print(f"{item.id} valid until {item.valid_to}", markup=False)


@app.command()
def delete(memory_id: str, namespace: str = NsOpt, home: Optional[Path] = HomeOpt) -> None:
    """Delete a memory and every version of it from every index."""
    with _memory(home) as m:
        removed = m.delete(memory_id, namespace=namespace)
    out.print(f"deleted {memory_id} ({removed} stored versions removed)", markup=False)


@app.command("delete-namespace")
def delete_namespace(namespace: str, yes: bool = typer.Option(False, "--yes", help="Do not ask for confirmation."),
                     home: Optional[Path] = HomeOpt) -> None:
    """Purge a namespace: every memory, version and log entry in it (its name is free again)."""
    from memvisor.errors import InvalidInput

    if not yes:
        if not sys.stdin.isatty():
            raise InvalidInput(f"deleting namespace {namespace!r} removes all its memories: add --yes to confirm")
        typer.confirm(f"Delete namespace {namespace!r} and all its memories?", abort=True, err=True)
    with _memory(home) as m:
        removed = m.delete_namespace(namespace)
    out.print(f"deleted namespace {namespace} ({_memories(removed)} removed)", markup=False)


@app.command("export")
def export_(directory: Path, namespace: str = NsOpt, home: Optional[Path] = HomeOpt) -> None:
    """Write a namespace to DIR as plain files (JSON lines + safetensors)."""
    with _memory(home) as m:
        m.export(namespace, directory)
    out.print(f"exported namespace {namespace} to {directory}", markup=False)


@app.command("import")
def import_(directory: Path, home: Optional[Path] = HomeOpt) -> None:
    """Load a namespace exported with `memvisor export`."""
    with _memory(home) as m:
        report = m.import_(directory)
    out.print(f"imported {_memories(report.added)} into namespace {report.namespace}", markup=False)


@app.command()
def demo(home: Optional[Path] = typer.Option(None, "--home", help="Keep the demo's memory here (default: a "
                                             "temporary folder)."),
         budget: int = typer.Option(160, "--budget", help="Token budget for each question's context.")) -> None:
    """Ingest a small bundled conversation, then answer questions from memory with the local SmolLM2."""
    from memvisor.api.demo import run_demo

    # the demo writes into a home only when told to on its command line, never because MEMVISOR_HOME is set
    run_demo(home or (_root_home["home"] if _root_home["typed"] else None), budget, out, progress_bar)


def _json_object(text: Optional[str], flag: str) -> Optional[dict]:
    from memvisor.errors import InvalidInput

    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidInput(f"{flag} is not valid JSON ({e.msg}); give an object like '{{\"k\": \"v\"}}'") from None
    if not isinstance(value, dict):
        raise InvalidInput(f"{flag} must be a JSON object like '{{\"k\": \"v\"}}'")
    return value


def _memories(count: int) -> str:
    return f"{count} memory" if count == 1 else f"{count} memories"


def _when(valid_from: Optional[str]) -> str:
    from memvisor import timeutil

    return f"[cyan]{escape(timeutil.human(valid_from))}[/] " if valid_from else ""


def _printable(text: str) -> str:
    """Stored text for a terminal: control characters other than newline and tab written as escapes (``\\x1b``),
    so a memory cannot move the cursor, recolour or retitle the user's terminal."""
    return "".join(c if c in "\n\t" or unicodedata.category(c) != "Cc" else f"\\x{ord(c):02x}" for c in text)


def _register_benches() -> None:
    """Benchmarks import heavy optional packages; they are registered only for `memvisor bench ...`."""
    from memvisor.bench import kv, locomo

    locomo.register(bench_app)
    kv.register(bench_app)


def _command_name(args: list[str]) -> Optional[str]:
    """The command named on the command line, past the root's options (`--home DIR` or `--home=DIR`)."""
    rest = iter(args)
    for arg in rest:
        if arg == "--home":
            next(rest, None)
        elif not arg.startswith("-"):
            return arg
    return None


def main() -> None:
    if _command_name(sys.argv[1:]) == "bench":
        _register_benches()
    try:
        app()
    except MemvisorError as e:
        err.print(f"[red]error:[/] {escape(_printable(str(e)))}", highlight=False)
        raise SystemExit(2) from None
