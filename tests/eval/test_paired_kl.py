"""benchmarks/paired_kl.py on a small eval run written here: the paired difference, and a
one-line error (not a traceback) when a method has no rows for the field compared."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "paired_kl.py"


def write_run(root: Path) -> Path:
    rows = []
    for i in range(6):
        example = f"musique-{i}"
        rows.append({"example": example, "method": "full", "kl_first_token": 0.0,
                     "f1_vs_full": 1.0})
        rows.append({"example": example, "method": "a", "kl_first_token": 0.1 + 0.01 * i})
        rows.append({"example": example, "method": "b", "kl_first_token": 0.2 + 0.01 * i})
    folder = root / "musique"
    folder.mkdir(parents=True)
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          check=False)


def test_paired_difference(tmp_path):
    result = run(str(write_run(tmp_path)), "a", "b", "musique")
    assert result.returncode == 0, result.stderr
    assert "n=6" in result.stdout
    assert "KL(A) - KL(B) = -0.1000" in result.stdout
    assert "A better on 6/6" in result.stdout


def test_a_field_no_row_has_is_a_one_line_error(tmp_path):
    result = run(str(write_run(tmp_path)), "a", "full", "musique", "--field", "vs_full")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "musique: no example has vs_full for both A and B (A: none in the run)" in result.stderr


def test_a_missing_run_is_a_one_line_error(tmp_path):
    result = run(str(tmp_path / "nowhere"), "a", "b", "musique")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "musique: no eval results at" in result.stderr
