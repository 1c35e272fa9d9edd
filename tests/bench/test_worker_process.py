"""Benchmark workers die with the bench that started them (bench/common.run_worker)."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from memvisor.bench.common import run_worker

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")


def _alive(pid: int) -> bool:
    """Running, not a zombie (an orphan's zombie may wait for a reaper that never comes in a container)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _wait_for(predicate, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_worker_returns_its_exit_status_and_runs_offline():
    assert run_worker([sys.executable, "-c", "import os, sys; sys.exit(0 if os.environ['HF_HUB_OFFLINE'] == '1' "
                                             "else 5)"]) == 0
    assert run_worker([sys.executable, "-c", "raise SystemExit(3)"]) == 3


def test_worker_dies_when_the_bench_is_terminated(tmp_path):
    """A bench killed with SIGTERM (kill, a CI timeout) takes its worker with it: subprocess.run alone left the
    worker running (a 1M-memory ingest kept both cores for an hour)."""
    pid_file = tmp_path / "worker.pid"
    worker = f"import os, pathlib, time; pathlib.Path({str(pid_file)!r}).write_text(str(os.getpid())); time.sleep(120)"
    bench = textwrap.dedent(f"""
        import sys
        from memvisor.bench.common import run_worker
        run_worker([sys.executable, "-c", {worker!r}])
    """)
    parent = subprocess.Popen([sys.executable, "-c", bench])
    try:
        assert _wait_for(lambda: pid_file.exists() and pid_file.read_text(), 60), "the worker never started"
        child = int(pid_file.read_text())
        assert _alive(child)
        parent.send_signal(signal.SIGTERM)
        parent.wait(timeout=30)
        assert _wait_for(lambda: not _alive(child), 10), "the worker outlived the bench"
    finally:
        parent.kill()
        if pid_file.exists() and pid_file.read_text() and _alive(int(pid_file.read_text())):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
