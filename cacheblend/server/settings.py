"""Server knobs (the engine's own knobs stay in ``EngineConfig``): a frozen dataclass, validated
at construction so a bad flag fails at start with one clear line."""

from __future__ import annotations

from dataclasses import dataclass

from cacheblend.config import METHODS
from cacheblend.errors import ConfigError

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = 8000
    api_key: str | None = None  # required on every endpoint but /health when set
    # Ids clients may pass as ``model``; the first is the one responses carry. Empty: the
    # loaded model's name. The model's own name (and ``org/<name>``) is accepted in any case.
    served_model_names: tuple[str, ...] = ()
    max_body_bytes: int = 4 << 20
    max_document_chars: int = 256 << 10  # one document's text, in characters
    max_documents_per_request: int = 64
    max_stored_documents: int = 100_000  # in-memory registry only; Redis has its own limits
    separator: str | None = None  # LMCache-compatible mode: splits a prompt into segments
    default_method: str | None = None  # None: the engine config's blend.method
    default_ratio: float | None = None  # None: the engine config's ratio
    default_max_tokens: int | None = None  # None: the engine config's max_new_tokens
    max_tokens_limit: int = 4096  # a request asking for more is refused
    max_batch_size: int = 8  # requests decoded together in one step (1 = one at a time)
    max_queue: int = 256  # waiting requests beyond this are refused with 429
    drain_timeout_s: float = 30.0  # on SIGTERM/SIGINT, in-flight requests get this long
    retry_after_s: int = 5  # Retry-After on a 503 while draining
    max_choices: int = 16  # n x prompts per request
    log_requests: bool = True  # one INFO line per request (cacheblend.server.requests)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must lie in [0, 65535], got {self.port}")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("api_key must not be blank")
        if self.separator is not None and not self.separator:
            raise ConfigError("separator must not be empty")
        if self.default_method is not None and self.default_method not in METHODS:
            raise ConfigError(
                f"default_method must be one of {', '.join(METHODS)}, got {self.default_method!r}"
            )
        if self.default_ratio is not None and not 0.0 <= self.default_ratio <= 1.0:
            raise ConfigError(f"default_ratio must lie in [0, 1], got {self.default_ratio}")
        for name in (
            "max_body_bytes",
            "max_document_chars",
            "max_documents_per_request",
            "max_stored_documents",
            "max_tokens_limit",
            "max_batch_size",
            "max_queue",
            "max_choices",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.drain_timeout_s < 0 or self.retry_after_s < 0:
            raise ConfigError("drain_timeout_s and retry_after_s must be >= 0")
        if self.default_max_tokens is not None and self.default_max_tokens < 1:
            raise ConfigError(f"default_max_tokens must be >= 1, got {self.default_max_tokens}")
        if any(not name.strip() for name in self.served_model_names):
            raise ConfigError("served_model_names must not be blank")

    @property
    def served_model_name(self) -> str | None:
        """The id responses carry (None: the loaded model's name)."""
        return self.served_model_names[0] if self.served_model_names else None

    @property
    def is_loopback(self) -> bool:
        return self.host in LOOPBACK_HOSTS or self.host.startswith("127.")
