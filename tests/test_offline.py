"""Nothing contacts the network at run time: every socket connect is refused and recorded."""
from __future__ import annotations

import subprocess
import sys

GUARD = r"""
import socket, sys, json, tempfile
attempts = []
def refuse(self, address, *a, **k):
    attempts.append(repr(address))
    raise OSError("network blocked by test")
socket.socket.connect = refuse
socket.socket.connect_ex = refuse
socket.create_connection = lambda address, *a, **k: refuse(None, address)

from memvisor import Memory
from memvisor.api.cli import main
home = tempfile.mkdtemp()
with Memory(home) as m:
    m.add("Ana moved to Lyon", namespace="app", user="ana")
    m.search("Where does Ana live?", namespace="app")
    ctx = m.context("Where does Ana live?", namespace="app", budget_tokens=64)
    assert "Lyon" in ctx.text
sys.argv = ["memvisor", "search", "Lyon", "--namespace", "app", "--home", home, "--json"]
try:
    main()
except SystemExit:
    pass
print("ATTEMPTS", json.dumps(attempts))
"""


def test_no_network_at_run_time(tmp_path):
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    import os

    env["MEMVISOR_CACHE"] = os.environ.get("MEMVISOR_CACHE", os.path.expanduser("~/.cache/memvisor"))
    out = subprocess.run([sys.executable, "-c", GUARD], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ATTEMPTS []" in out.stdout, out.stdout[-2000:]
    assert "telemetry" not in (out.stdout + out.stderr).lower()
