"""cacheblend: reuse per-document KV caches at any prompt position, recompute only what matters."""

__version__ = "0.1.0"
