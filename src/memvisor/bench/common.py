"""Pieces every benchmark shares: the system interface, turn formatting, greedy packing, timing, RSS."""
from __future__ import annotations

import ctypes
import functools
import os
import platform
import resource
import signal
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable, Protocol

from memvisor.bench.locomo_data import Turn


@dataclass
class ContextResult:
    """What a system returns for one question at one budget.

    text: the packed context, as it would go into a prompt (recall is read from this text only).
    tokens: its size under the shared tokenizer (the harness re-counts it).
    """
    text: str
    tokens: int


class BenchSystem(Protocol):
    """A memory system under test. It sees only `system_view(conversation)` and question texts."""

    name: str

    def reset(self) -> None:
        """Open a fresh, empty store (untimed: loading models or opening files is not ingest)."""
        ...

    def ingest(self, conversation: dict) -> None:
        """Load one conversation (LoCoMo format, turns only) into the store `reset` opened."""
        ...

    def search(self, question: str) -> list[str]:
        """The system's ranking of turns (dia_ids, best first), query embedding included (for MRR)."""
        ...

    def context(self, question: str, budget_tokens: int) -> ContextResult:
        """Retrieve and pack at most `budget_tokens` tokens of context for `question`."""
        ...

    def close(self) -> None: ...


def format_turn(turn: Turn) -> str:
    """One turn as every baseline puts it in a context: date, speaker, text, shared image."""
    extra = f" [shares {turn.caption}]" if turn.caption else ""
    return f"({turn.date}) {turn.speaker}: {turn.text}{extra}"


def pack_greedy(ordered: list[int], lines: list[str], line_tokens: list[int], budget: int,
                count: Callable[[str], int], chronological: bool = True) -> tuple[str, int]:
    """Take lines in `ordered` preference, skipping any that no longer fit, within `budget` tokens.

    lines: one formatted turn each; line_tokens: their token counts (same tokenizer as `count`).
    The chosen lines are written in conversation order when `chronological` (reads better and
    keeps the dates in sequence), joined by newlines; the final text is re-counted and trimmed
    from the least preferred line should joining ever cost more than the per-line sum.
    Returns (text, tokens).
    """
    chosen: list[int] = []
    used = 0
    for i in ordered:
        cost = line_tokens[i] + (1 if chosen else 0)  # the newline joining it
        if used + cost <= budget:
            chosen.append(i)
            used += cost
    while True:
        picked = sorted(chosen) if chronological else chosen
        text = "\n".join(lines[i] for i in picked)
        tokens = count(text) if text else 0
        if tokens <= budget or not chosen:
            return text, tokens
        chosen.pop()


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def current_rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    except OSError:
        return float("nan")


def percentiles_ms(seconds: list[float]) -> dict[str, float | None]:
    """p50/p95/p99 in milliseconds (nearest-rank on the sorted samples)."""
    if not seconds:
        return {"p50": None, "p95": None, "p99": None}
    xs = sorted(seconds)

    def at(p: float) -> float:
        k = min(len(xs) - 1, max(0, int(round(p / 100 * len(xs) + 0.5)) - 1))
        return round(xs[k] * 1000, 2)

    return {"p50": at(50), "p95": at(95), "p99": at(99)}


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages: on a shared 2-core machine they say how noisy timings are."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            kb = int(f.readline().split()[1])
            mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return f"{len(os.sched_getaffinity(0))} cores ({cpu}){mem}, {platform.system()} {platform.release()}, " \
           f"Python {platform.python_version()}"


@functools.cache
def _prctl():
    """libc's prctl, looked up before any fork (a forked child should not load libraries); None off Linux."""
    return ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def run_worker(argv: list[str]) -> int:
    """Run one benchmark worker process offline (``HF_HUB_OFFLINE=1``) and return its exit status.

    On Linux the worker is told to die with this process (``PR_SET_PDEATHSIG``): ``subprocess.run`` forwards no
    signal, so a bench stopped with SIGTERM (``kill``, a CI timeout) left its worker running behind it, e.g. an
    hour-long 1M-memory ingest holding both cores. Ctrl-C reaches both through the terminal anyway."""
    prctl, parent = _prctl(), os.getpid()

    def die_with_parent() -> None:  # runs in the child between fork and exec
        prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before the call took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return subprocess.run(argv, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                          preexec_fn=die_with_parent if prctl else None).returncode
