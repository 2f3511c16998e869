"""Loading: the converted model cache, fingerprints, and clear errors for what is unsupported."""

from __future__ import annotations

import json
import time

import pytest

from cacheblend.errors import UnsupportedModelError
from cacheblend.model.loader import fingerprint_model_dir, load_model


def test_bundled_model_loads_from_cache_quickly(loaded_model):
    assert (loaded_model.path / "model.safetensors").is_file()
    assert loaded_model.model.config.num_hidden_layers == 30
    assert loaded_model.model.config.num_key_value_heads == 3
    start = time.perf_counter()
    again = load_model()
    assert time.perf_counter() - start < 10  # ~1 s here; generous for a loaded CI machine
    assert again.fingerprint == loaded_model.fingerprint
    assert len(loaded_model.fingerprint) == 32


def test_fingerprint_changes_with_config(tmp_path, loaded_model):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "a": 1}))
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    first = fingerprint_model_dir(tmp_path, home=tmp_path / "home")
    assert first == fingerprint_model_dir(tmp_path, home=tmp_path / "home")
    time.sleep(0.01)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "a": 2}))
    assert fingerprint_model_dir(tmp_path, home=tmp_path / "home") != first


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(UnsupportedModelError, match="does not exist"):
        load_model(str(tmp_path / "nope"))


def test_unsupported_architecture_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(UnsupportedModelError, match="llama, mistral, qwen2, qwen3"):
        load_model(str(tmp_path), home=tmp_path / "home")


def test_non_model_file_is_refused(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"x")
    with pytest.raises(UnsupportedModelError, match="neither a GGUF"):
        load_model(str(path))
