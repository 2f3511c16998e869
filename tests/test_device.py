"""One device and one dtype per engine: how `auto` resolves, and bad values as one-line errors."""

from __future__ import annotations

import pytest
import torch

from cacheblend.cli import main
from cacheblend.config import EngineConfig, load_config
from cacheblend.device import resolve_dtype, torch_dtype
from cacheblend.errors import ConfigError


def test_auto_resolves_at_construction():
    config = EngineConfig()
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert config.device == expected
    assert config.dtype == ("bf16" if expected == "cuda" else "fp32")
    assert config.loading == ("prefetch" if expected == "cuda" else "bulk")
    assert resolve_dtype("auto", "cpu") == "fp32" and resolve_dtype("auto", "cuda:1") == "bf16"
    assert EngineConfig(device="cpu", dtype="bf16").dtype == "bf16"  # allowed, just slow
    assert torch_dtype("fp16") is torch.float16


@pytest.mark.parametrize("overrides, message", [
    ({"dtype": "fp8"}, "dtype must be one of"),
    ({"device": "tpu"}, "not a torch device"),
    ({"loading": "eager"}, "loading must be"),
])
def test_bad_values_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, **overrides)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_cuda_without_cuda_is_a_one_line_error(capsys):
    assert main(["bench", "prefill", "--device", "cuda", "--lengths", "8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: device 'cuda'") and err.count("\n") == 1


def test_unknown_random_shape_is_a_one_line_error(capsys):
    assert main(["bench", "prefill", "--random-model", "gpt5", "--lengths", "8"]) == 2
    err = capsys.readouterr().err
    assert "unknown model shape 'gpt5'" in err and err.count("\n") == 1
