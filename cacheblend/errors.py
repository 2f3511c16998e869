"""Errors a user can cause and fix; the CLI prints them in one line, the server maps them to 4xx."""


class CacheBlendError(Exception):
    """Base class of every user-facing error."""


class UnsupportedModelError(CacheBlendError):
    """The model's architecture or RoPE variant is one the runner cannot serve exactly."""


class InvalidRequestError(CacheBlendError):
    """A request that cannot be served as given (too long, bad sampling values, ...)."""


class ConfigError(CacheBlendError):
    """A configuration value that is out of range or unknown."""
