"""`bench prefill|ttft --random-model`: a random-weight model of a named shape with the bundled
tokenizer (so these are slow: the tokenizer comes from the bundled model's files)."""

from __future__ import annotations

import json

import pytest

from cacheblend.cli import main

pytestmark = pytest.mark.slow


def run_json(argv, capsys) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_bench_prefill_random_tiny_prints_device_dtype_and_peer(capsys):
    out = run_json(["bench", "prefill", "--random-model", "tiny", "--device", "cpu", "--dtype",
                    "bf16", "--lengths", "16,32", "--repeats", "1", "--json"], capsys)
    assert out["model"] == "random-tiny" and out["dtype"] == "bf16"
    assert out["device"].startswith("cpu") and "attn=sdpa" in out["peer"]
    assert out["lengths"] == [16, 32] and len(out["ratio"]) == 2


def test_bench_ttft_random_tiny_runs_every_method(capsys):
    out = run_json(["bench", "ttft", "--random-model", "tiny", "--device", "cpu", "--chunks",
                    "2", "--chunk-tokens", "32", "--repeats", "1", "--json"], capsys)
    assert out["dtype"] == "fp32" and out["model"] == "random-tiny"
    assert set(out["methods"]) == {"full", "prefix", "reuse", "blend", "epic"}
    assert out["methods"]["reuse"]["reused_tokens"] > out["methods"]["full"]["reused_tokens"]


def test_model_and_random_model_together_is_an_error(capsys, tmp_path):
    assert main(["bench", "prefill", "--random-model", "tiny", "--model", str(tmp_path)]) == 2
    assert "not both" in capsys.readouterr().err
