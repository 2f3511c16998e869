"""`cacheblend serve` flags, settings validation, and the security defaults."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import cacheblend.server
from cacheblend.cli import build_parser, main
from cacheblend.errors import ConfigError
from cacheblend.server.cli import redact, settings_from_args
from cacheblend.server.settings import ServerSettings


def parse(*argv):
    return build_parser().parse_args(["serve", *argv])


def test_defaults_bind_loopback_without_key(monkeypatch):
    monkeypatch.delenv("CACHEBLEND_API_KEY", raising=False)
    settings = settings_from_args(parse())
    assert settings.host == "127.0.0.1" and settings.is_loopback
    assert settings.api_key is None and settings.port == 8000


def test_api_key_from_env_or_flag(monkeypatch):
    monkeypatch.setenv("CACHEBLEND_API_KEY", "from-env")
    assert settings_from_args(parse()).api_key == "from-env"
    assert settings_from_args(parse("--api-key", "from-flag")).api_key == "from-flag"


def test_flags_reach_settings():
    settings = settings_from_args(
        parse(
            "--host",
            "0.0.0.0",
            "--port",
            "9001",
            "--separator",
            " # # ",
            "--default-method",
            "reuse",
            "--default-ratio",
            "0.3",
            "--max-body-bytes",
            "1000",
            "--max-batch-size",
            "1",
        )
    )
    assert (settings.host, settings.port, settings.separator) == ("0.0.0.0", 9001, " # # ")
    assert (settings.default_method, settings.default_ratio) == ("reuse", 0.3)
    assert (settings.max_body_bytes, settings.max_batch_size) == (1000, 1)
    assert not settings.is_loopback


@pytest.mark.parametrize(
    "field, value",
    [
        ("default_ratio", 1.5),
        ("default_method", "magic"),
        ("port", -1),
        ("api_key", " "),
        ("separator", ""),
        ("max_body_bytes", 0),
        ("max_batch_size", 0),
        ("max_queue", 0),
    ],
)
def test_bad_settings_fail_at_start(field, value):
    with pytest.raises(ConfigError, match=field):
        ServerSettings(**{field: value})


def test_bad_flag_is_one_line_before_loading_the_model(capsys):
    assert main(["serve", "--default-ratio", "2"]) == 2
    assert "default_ratio" in capsys.readouterr().err


def test_redact_hides_passwords():
    assert redact("memory,redis://:secret@host:6379/0") == "memory,redis://***@host:6379/0"
    assert redact("disk:/tmp/kv") == "disk:/tmp/kv"


def test_no_pickle_in_the_server():
    for path in Path(cacheblend.server.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not any("pickle" in n or n == "marshal" for n in names), path


def test_served_model_name_repeats():
    settings = settings_from_args(parse("--served-model-name", "a", "--served-model-name", "b"))
    assert settings.served_model_names == ("a", "b") and settings.served_model_name == "a"
    assert settings_from_args(parse()).served_model_name is None
    assert not settings_from_args(parse("--disable-log-requests")).log_requests


def test_unexpected_errors_are_one_line(capsys, monkeypatch):
    import cacheblend.store.cli

    def boom(_args):
        raise RuntimeError("something nobody foresaw")

    monkeypatch.setattr(cacheblend.store.cli, "run", boom)
    assert main(["store", "stats", "--store", "memory"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == ("error: RuntimeError: something nobody foresaw "
                           "(rerun with -v for the traceback)")
