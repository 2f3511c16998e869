"""The README's "Using it" examples, run as written in a scratch directory: the shell lines that
make the example files, then every `cacheblend ask | ingest | store` line (in process, through
the same `main`), then the Python snippet. `serve`, `bench` and `eval` run until stopped or for
minutes: their own tests cover them (tests/server, tests/store/test_bench.py, tests/eval)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import torch

from cacheblend.cli import main


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The commands leave torch's thread count alone; on 2 shared cores one is much faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


README = Path(__file__).resolve().parents[1] / "README.md"
LONG_RUNNING = ("serve", "bench", "eval")


def using_it() -> str:
    text = README.read_text()
    return re.search(r"## Using it\n\n```bash\n(.*?)```", text, re.DOTALL).group(1)


@pytest.mark.slow  # the bundled model
def test_readme_commands_run_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ran = []
    for line in using_it().splitlines():
        if not line.strip() or line.startswith(("#", ". ")):
            continue
        if line.startswith("printf"):
            subprocess.run(["bash", "-c", line], check=True, cwd=tmp_path)
            continue
        argv = shlex.split(line, comments=True)
        assert argv[0] == "cacheblend", line
        if argv[1] in LONG_RUNNING:
            continue
        assert main(argv[1:]) == 0, line
        ran.append((argv[1], capsys.readouterr().out))
    assert [name for name, _ in ran] == ["ask", "ingest", "ask", "ask", "store", "store", "store"]
    assert "[full instead of blend: " in ran[0][1]  # nothing stored yet: the reason is shown
    assert "[blend ratio=0.1] TTFT" in ran[2][1]  # after ingest: blended, all hits
    assert json.loads(ran[3][1])["stats"]["missed_tokens"] == 0
    assert json.loads(ran[6][1])["deleted"] > 0


@pytest.mark.slow  # the bundled model
def test_readme_python_snippet_runs_as_written(capsys):
    (snippet,) = re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL)
    exec(compile(snippet, str(README), "exec"), {})  # noqa: S102
    assert capsys.readouterr().out.strip()
