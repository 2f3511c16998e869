"""`cacheblend ask` and `cacheblend ingest` as a person runs them: one-line errors, a stats
line that explains itself, store failures that are failures."""

from __future__ import annotations

import re
import socket

import pytest

from cacheblend.cli import main
from cacheblend.commands.ask import summary
from cacheblend.engine import RequestStats

DOC = "The Greywater Lighthouse was designed by the engineer Miriam Osk in 1798."


def stats(**changes) -> RequestStats:
    values = {"method": "blend", "ratio": 0.15, "prompt_tokens": 230, "chunk_tokens": 180,
              "reused_tokens": 180, "recomputed_tokens": 27, "computed_tokens": 50,
              "missed_tokens": 180, "ttft_s": 0.2, "prefill_s": 0.2, "miss_s": 0.1,
              "requested_method": "blend", "controller": "requested"}
    return RequestStats(**{**values, **changes})


def test_summary_adds_up_and_explains_misses():
    line = summary(stats())
    assert "230 prompt tokens = 180 reused + 27 recomputed + 23 not cached" in line
    assert "180 of them were not in the store (computed and stored first" in line
    assert "requested" not in line  # nothing to explain
    fallback = summary(stats(method="full", ratio=None, reused_tokens=0, recomputed_tokens=0,
                             computed_tokens=230,
                             controller="180/180 chunk tokens missed: a full prefill is cheaper"))
    assert fallback.startswith("[full instead of blend: 180/180 chunk tokens missed")
    assert "= 0 reused + 0 recomputed + 230 not cached" in fallback
    assert "stored after the answer" in fallback


@pytest.mark.slow  # the bundled model
def test_ask_prints_the_reason_and_a_sum(tmp_path, capsys):
    doc = tmp_path / "a.txt"
    doc.write_text(DOC)
    argv = ["ask", "--doc", str(doc), "--question", "Who designed it?", "--method", "blend",
            "--max-tokens", "2", "--threads", "1"]
    assert main(argv) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("[full instead of blend: "), last  # nothing stored: the fallback
    prompt, reused, recomputed, fresh = map(int, re.search(
        r"(\d+) prompt tokens = (\d+) reused \+ (\d+) recomputed \+ (\d+) not cached",
        last).groups())
    assert reused + recomputed + fresh == prompt


def _dead_redis() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"redis://127.0.0.1:{sock.getsockname()[1]}/0?socket_timeout=0.2"


def test_ingest_into_a_dead_redis_fails(tmp_path, capsys):
    doc = tmp_path / "a.txt"
    doc.write_text(DOC)
    assert main(["ingest", "--store", _dead_redis(), str(doc)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.strip().splitlines()
    assert line.startswith("error: redis store") and "unreachable" in line


def test_ingest_into_an_unwritable_directory_fails(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    doc = tmp_path / "a.txt"
    doc.write_text(DOC)
    assert main(["ingest", "--store", f"disk:{blocker}/kv", str(doc)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "not writable" in line and str(blocker) in line


def test_serve_checks_the_port_before_loading_the_model(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        # --model points nowhere: had it been loaded first, the error would be about the model
        assert main(["serve", "--port", str(port), "--model", "/nonexistent"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"cannot listen on 127.0.0.1:{port}" in line and "--port" in line


@pytest.mark.parametrize("argv", [["ask", "--doc", "/nonexistent.txt", "--question", "q"],
                                  ["store", "stats", "--store", "nosuch://x"]])
def test_cli_errors_are_one_line(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
