"""Every CLI command, in-process through `main()` (the console script's entry point)."""
from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest

from memvisor.api.cli import main


def run(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["memvisor", *args])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code or 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_every_command(monkeypatch, capsys, tmp_path, small_conversation):
    home = str(tmp_path / "home")
    h = ["--home", home]
    code, out, _ = run(monkeypatch, capsys, "add", "Ana lives in Grenoble", "--namespace", "app", "--user", "ana",
                       "--valid-from", "2020-01-01", *h)
    assert code == 0
    item_id = out.strip()
    assert len(item_id) == 16

    code, out, err = run(monkeypatch, capsys, "ingest", str(small_conversation), "--namespace", "app", *h)
    assert code == 0 and "added 8 memories" in out
    code, out, _ = run(monkeypatch, capsys, "ingest", str(small_conversation), "--namespace", "app", *h)
    assert "added 0 memories, skipped 8" in out

    code, out, _ = run(monkeypatch, capsys, "search", "Which islands will Ana hike?", "--namespace", "app",
                       "-k", "3", "--json", *h)
    hits = json.loads(out)
    assert code == 0 and len(hits) == 3 and {"id", "text", "score"} <= set(hits[0])
    assert "Lofoten" in hits[0]["text"]

    code, out, _ = run(monkeypatch, capsys, "context", "cello orchestra", "--namespace", "app", "--budget", "40",
                       "--json", *h)
    ctx = json.loads(out)
    assert code == 0 and ctx["tokens"] <= 40 and ctx["citations"] and "orchestra" in ctx["text"]
    code, out, err = run(monkeypatch, capsys, "context", "cello", "--namespace", "app", "--budget", "40", *h)
    assert "cello" in out and "tokens" in err

    code, out, _ = run(monkeypatch, capsys, "update", item_id, "--namespace", "app", "--text", "Ana lives in Lyon",
                       "--valid-from", "2024-04-01", *h)
    assert code == 0 and "version 2" in out
    code, out, _ = run(monkeypatch, capsys, "get", item_id, "--namespace", "app", *h)
    assert json.loads(out)["text"] == "Ana lives in Lyon"
    code, out, _ = run(monkeypatch, capsys, "history", item_id, "--namespace", "app", *h)
    assert [v["text"] for v in json.loads(out)] == ["Ana lives in Grenoble"] * 2 + ["Ana lives in Lyon"]
    code, out, _ = run(monkeypatch, capsys, "search", "Where does Ana live", "--namespace", "app",
                       "--as-of", "2021-01-01", "--json", *h)
    assert json.loads(out)[0]["text"] == "Ana lives in Grenoble"

    code, out, _ = run(monkeypatch, capsys, "export", str(tmp_path / "cube"), "--namespace", "app", *h)
    assert code == 0
    code, out, _ = run(monkeypatch, capsys, "import", str(tmp_path / "cube"), "--home", str(tmp_path / "h2"))
    assert code == 0 and "into namespace app" in out
    code, out, _ = run(monkeypatch, capsys, "get", item_id, "--namespace", "app", "--home", str(tmp_path / "h2"))
    assert json.loads(out)["text"] == "Ana lives in Lyon"

    code, out, _ = run(monkeypatch, capsys, "invalidate", item_id, "--namespace", "app", "--at", "2025-01-01", *h)
    assert code == 0 and "2025-01-01" in out
    code, out, _ = run(monkeypatch, capsys, "delete", item_id, "--namespace", "app", *h)
    assert code == 0 and "deleted" in out
    code, out, err = run(monkeypatch, capsys, "get", item_id, "--namespace", "app", *h)
    assert code == 2 and "error:" in err and item_id in err


@pytest.mark.parametrize("args, message", [
    (["context", "q", "--namespace", "app", "--budget", "0"], "Invalid value for '--budget'"),
    (["add", "", "--namespace", "app"], "text is empty"),
    (["add", "x", "--namespace", "app", "--valid-from", "someday"], "not an ISO-8601"),
    (["search", "q", "--namespace", "nowhere"], "has no memories"),
    (["add", "x", "--namespace", "app", "--metadata", "[1]"], "must be a JSON object"),
])
def test_errors_are_one_clear_line_and_status_2(monkeypatch, capsys, tmp_path, args, message):
    code, out, err = run(monkeypatch, capsys, *args, "--home", str(tmp_path / "home"))
    assert code == 2 and message in err and "Traceback" not in err


def test_console_script_and_environment_home(tmp_path):
    """The installed `memvisor` script, a real process, MEMVISOR_HOME instead of --home."""
    import os
    import shutil

    exe = shutil.which("memvisor") or str(sys.executable).replace("python", "memvisor")
    env = {**os.environ, "MEMVISOR_HOME": str(tmp_path / "envhome")}
    add = subprocess.run([exe, "add", "Pixel is a grey cat", "--namespace", "pets"], capture_output=True,
                         text=True, env=env, timeout=120)
    assert add.returncode == 0, add.stderr
    assert (tmp_path / "envhome" / "memvisor.db").exists()
    bad = subprocess.run([exe, "get", "0000", "--namespace", "pets"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("error:")


@pytest.mark.slow
def test_demo_runs_end_to_end(monkeypatch, capsys, tmp_path):
    code, out, err = run(monkeypatch, capsys, "demo", "--home", str(tmp_path / "demo"), "--budget", "120")
    assert code == 0, err
    assert out.count("Q: ") == 3 and out.count("answer") == 3
    assert "Lofoten" not in out and "Lyon" in out  # the demo's own conversation, evidence printed
    assert "tokens" in out and "sources (memory←turn)" in out


def test_user_text_is_printed_as_text_not_rich_markup(monkeypatch, capsys, tmp_path):
    h = ["--home", str(tmp_path / "home")]
    for text in ("tag is [/]", "[bold]x[/bold] stays bracketed"):
        assert run(monkeypatch, capsys, "add", text, "--namespace", "app", *h)[0] == 0
    code, out, err = run(monkeypatch, capsys, "search", "tag bold", "--namespace", "app", *h)
    assert code == 0, err
    assert "tag is [/]" in out and "[bold]x[/bold] stays bracketed" in out
    code, _, err = run(monkeypatch, capsys, "search", "tag", "--namespace", "[/oops]", *h)
    assert code == 2 and "error:" in err and "[/oops]" in err and "Traceback" not in err


def test_search_prints_dates_as_text_and_control_characters_as_escapes(monkeypatch, capsys, tmp_path):
    """The date is styled, not printed as markup ("[cyan]1 March 2024[/]" was); a memory's terminal escapes are
    shown escaped, so stored text cannot recolour or move the user's terminal."""
    h = ["--home", str(tmp_path / "home")]
    assert run(monkeypatch, capsys, "add", "Ana moved to Lyon", "--namespace", "app", "--valid-from", "2024-03-01",
               *h)[0] == 0
    assert run(monkeypatch, capsys, "add", "Frank \x1b[31mRED\x1b[0m\x07", "--namespace", "app", *h)[0] == 0
    code, out, err = run(monkeypatch, capsys, "search", "Ana Frank", "--namespace", "app", *h)
    assert code == 0, err
    assert "1 March 2024" in out and "[cyan]" not in out and "[/]" not in out
    assert "\x1b" not in out and "\x07" not in out and "Frank \\x1b[31mRED\\x1b[0m\\x07" in out


def test_home_before_the_command_and_the_commands_own_home_wins(monkeypatch, capsys, tmp_path):
    first, second = str(tmp_path / "first"), str(tmp_path / "second")
    monkeypatch.setenv("MEMVISOR_HOME", str(tmp_path / "env"))
    assert run(monkeypatch, capsys, "--home", first, "add", "Pixel is a grey cat", "-n", "pets")[0] == 0
    assert run(monkeypatch, capsys, f"--home={first}", "add", "Rex is a dog", "-n", "pets", "--home", second)[0] == 0
    assert run(monkeypatch, capsys, "add", "Tom is a cat", "-n", "pets")[0] == 0
    texts = {}
    for home in (first, second, str(tmp_path / "env")):
        code, out, _ = run(monkeypatch, capsys, "search", "animal", "-n", "pets", "--json", "--home", home)
        texts[home] = sorted(h["text"] for h in json.loads(out))
    assert list(texts.values()) == [["Pixel is a grey cat"], ["Rex is a dog"], ["Tom is a cat"]]


def test_update_merges_metadata_and_sets_kind(monkeypatch, capsys, tmp_path, small_conversation):
    h = ["--home", str(tmp_path / "home")]
    run(monkeypatch, capsys, "ingest", str(small_conversation), "-n", "chat", *h)
    _, out, _ = run(monkeypatch, capsys, "search", "Which islands is Ana hiking?", "-n", "chat", "-k", "1",
                    "--json", *h)
    turn = json.loads(out)[0]
    code, out, _ = run(monkeypatch, capsys, "update", turn["id"], "-n", "chat", "--metadata", '{"mood": "happy"}',
                       "--kind", "semantic", *h)
    assert code == 0 and "version 2" in out
    _, out, _ = run(monkeypatch, capsys, "get", turn["id"], "-n", "chat", *h)
    got = json.loads(out)
    assert got["kind"] == "semantic"
    assert got["metadata"] == {**turn["item"]["metadata"], "mood": "happy"} and got["metadata"]["speaker"] == "Ana"


def test_delete_namespace_asks_for_yes_then_frees_the_name(monkeypatch, capsys, tmp_path):
    h = ["--home", str(tmp_path / "home")]
    run(monkeypatch, capsys, "add", "Pixel is a grey cat", "-n", "pets", *h)
    run(monkeypatch, capsys, "export", str(tmp_path / "cube"), "-n", "pets", *h)
    code, _, err = run(monkeypatch, capsys, "import", str(tmp_path / "cube"), *h)
    assert code == 2 and "memvisor delete-namespace pets" in err
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # not a terminal: no prompt, a clear refusal
    code, _, err = run(monkeypatch, capsys, "delete-namespace", "pets", *h)
    assert code == 2 and "--yes" in err
    assert run(monkeypatch, capsys, "search", "cat", "-n", "pets", *h)[0] == 0  # nothing was removed
    code, out, _ = run(monkeypatch, capsys, "delete-namespace", "pets", "--yes", *h)
    assert code == 0 and "1 memory removed" in out
    code, _, err = run(monkeypatch, capsys, "search", "cat", "-n", "pets", *h)
    assert code == 2 and "has no memories" in err
    code, out, _ = run(monkeypatch, capsys, "import", str(tmp_path / "cube"), *h)
    assert code == 0 and "imported 1 memory into namespace pets" in out
