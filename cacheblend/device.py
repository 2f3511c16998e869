"""One device and one dtype per engine: how ``auto`` resolves, and the one marked host sync.

On this project's CPU, fp32 matmul runs at ~145 GFLOP/s on 2 cores and bf16 at ~1.4, so ``auto``
computes in fp32 there; on CUDA it computes in bf16 (tensor cores). See docs/architecture.md.
"""

from __future__ import annotations

import torch

from cacheblend.errors import ConfigError

DTYPE_NAMES = ("auto", "bf16", "fp16", "fp32")
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` when a CUDA device is present, else ``cpu``; others are checked."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"device {name!r} is not a torch device (cpu, cuda, cuda:1, auto)") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r}: this torch build sees no CUDA device "
                              f"(torch {torch.__version__}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {name!r}: only {torch.cuda.device_count()} CUDA devices")
    elif device.type != "cpu":
        raise ConfigError(f"device {name!r} is not supported; use cpu, cuda[:N] or auto")
    return name


def resolve_dtype(name: str, device: str) -> str:
    """``auto`` -> ``bf16`` on CUDA, ``fp32`` elsewhere (bf16 matmul is ~100x slower on CPU)."""
    if name not in DTYPE_NAMES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {name!r}")
    if name != "auto":
        return name
    return "bf16" if torch.device(device).type == "cuda" else "fp32"


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    """A dtype name (``bf16``, ``fp16``, ``fp32``) or a torch dtype -> the torch dtype."""
    if isinstance(name, torch.dtype):
        return name
    if name not in TORCH_DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(TORCH_DTYPES)}, got {name!r}")
    return TORCH_DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in TORCH_DTYPES.items()}.get(dtype, str(dtype))


def host_sync(value: torch.Tensor) -> int:
    """Read a 0-d integer tensor back to the host: the one intended device->host wait of the
    fusor's layer loop (after a check layer whose kept count the host cannot know). A named
    function so that tests running the loop on fake CUDA tensors can allow exactly these."""
    return int(value)


def synchronize(device: str | torch.device) -> None:
    """Wait for the device's queued work (timing only; a no-op on the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
