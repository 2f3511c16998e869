"""Every environment variable cacheblend reads, in one typed place."""

from __future__ import annotations

import os
from pathlib import Path


def cacheblend_home() -> Path:
    """Root of the model cache and default disk store (``$CACHEBLEND_HOME``)."""
    return Path(os.environ.get("CACHEBLEND_HOME", Path.home() / ".cache" / "cacheblend"))


def api_key() -> str | None:
    """API key the server requires when set (``$CACHEBLEND_API_KEY``)."""
    return os.environ.get("CACHEBLEND_API_KEY") or None


def num_threads() -> int | None:
    """Torch intra-op threads (``$CACHEBLEND_THREADS``); None keeps torch's default."""
    value = os.environ.get("CACHEBLEND_THREADS")
    return int(value) if value else None
