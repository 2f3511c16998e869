"""``open_store``: a store from a URL, e.g. ``memory,disk:/var/cache/kv,redis://host:6379/0``.

One tier per comma- (or ``+``-) separated part, fastest first; several parts make a
``TieredStore``. Per-tier settings go in the part (sizes accept K/M/G/T suffixes, 1024-based):

- ``gpu`` or ``gpu:<max_bytes>[?device=cuda:1]``: the hot tier in accelerator memory (first)
- ``memory`` or ``memory:<max_bytes>``
- ``disk`` (under ``$CACHEBLEND_HOME/kv``) or ``disk:<path>[?max_bytes=16G&codec=int8]``
- ``redis://[:password@]host:port/db[?prefix=..&ttl=<s>&chunk_bytes=8M&codec=..]``
  (also ``rediss://``; ``valkey://`` / ``valkeys://`` are aliases); other query parameters go
  to redis-py. Passwords containing ``,`` or ``+`` must be percent-encoded.

Keyword options apply to every tier that stores encoded bytes: ``model_fingerprint`` (entries of
another model are misses) and ``codec`` (a part's own ``codec=`` wins).
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from cacheblend.env import cacheblend_home
from cacheblend.store.base import KVStore
from cacheblend.store.codec import DEFAULT_CODEC
from cacheblend.store.disk import DiskStore
from cacheblend.store.memory import MemoryStore
from cacheblend.store.tiered import TieredStore

SUPPORTED_FORMS = (
    "gpu[:<max_bytes>][?device=cuda:N], memory, memory:<max_bytes>, disk, disk:<path>[?max_bytes=..&codec=..], "
    "redis://host:port/db[?prefix=..&ttl=..&chunk_bytes=..&codec=..] (rediss://, valkey://), "
    "or several of these joined by ',' or '+' for a tiered store"
)
_OPTIONS = ("model_fingerprint", "codec")
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_REDIS_SCHEMES = {"redis": "redis", "rediss": "rediss", "valkey": "redis", "valkeys": "rediss"}
_REDIS_OWN_PARAMS = {"prefix", "ttl", "chunk_bytes", "codec", "retry_after", "socket_timeout"}


def parse_size(text: str) -> int:
    """``"512M"`` -> 536870912; plain integers are bytes."""
    match = _SIZE_RE.match(text)
    if not match:
        raise ValueError(f"bad size {text!r}: use bytes or a K/M/G/T suffix, e.g. 512M")
    number, unit = match.groups()
    return int(float(number) * _UNITS[unit.upper()])


def _split_query(text: str) -> tuple[str, dict[str, str]]:
    base, _, query = text.partition("?")
    return base, dict(parse_qsl(query, keep_blank_values=True))


def _open_memory(spec: str) -> MemoryStore:
    _, _, size = spec.partition(":")
    return MemoryStore(parse_size(size)) if size else MemoryStore()


def _open_gpu(spec: str) -> KVStore:
    import torch

    from cacheblend.store.gpu import DeviceStore

    rest = spec[len("gpu"):]
    size, params = _split_query(rest.removeprefix(":"))
    unknown = set(params) - {"device"}
    if unknown:
        raise ValueError(f"unknown gpu store parameter(s) {sorted(unknown)} in {spec!r}")
    device = params.get("device", "cuda")
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"gpu store {spec!r}: bad device {device!r}") from exc
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"store tier {spec!r} needs a CUDA device; this torch sees none")
    kwargs: dict = {"device": device}
    if size:
        kwargs["max_bytes"] = parse_size(size)
    return DeviceStore(**kwargs)


def _open_disk(spec: str, model_fingerprint: str | None, codec: str) -> DiskStore:
    path, params = _split_query(spec.partition(":")[2])
    unknown = set(params) - {"max_bytes", "codec", "fsync"}
    if unknown:
        raise ValueError(f"unknown disk store parameter(s) {sorted(unknown)} in {spec!r}")
    kwargs: dict = {"codec": params.get("codec", codec), "model_fingerprint": model_fingerprint}
    if "max_bytes" in params:
        kwargs["max_bytes"] = parse_size(params["max_bytes"])
    if "fsync" in params:
        kwargs["fsync"] = params["fsync"].lower() in ("1", "true", "yes")
    return DiskStore(path or cacheblend_home() / "kv", **kwargs)


def _open_redis(spec: str, model_fingerprint: str | None, codec: str) -> KVStore:
    try:
        from cacheblend.store.redis_store import RedisStore  # lazy: redis is an optional extra
    except ImportError as exc:
        raise ValueError(f"store {spec!r} needs redis-py: pip install 'cacheblend[redis]'") from exc
    parts = urlsplit(spec)
    params = dict(parse_qsl(parts.query, keep_blank_values=True))
    own = {k: params.pop(k) for k in list(params) if k in _REDIS_OWN_PARAMS}
    url = urlunsplit(
        (_REDIS_SCHEMES[parts.scheme], parts.netloc, parts.path, urlencode(params), "")
    )
    kwargs: dict = {"codec": own.get("codec", codec), "model_fingerprint": model_fingerprint}
    if "prefix" in own:
        kwargs["prefix"] = own["prefix"]
    if own.get("ttl"):
        kwargs["ttl"] = float(own["ttl"])
    if "chunk_bytes" in own:
        kwargs["chunk_bytes"] = parse_size(own["chunk_bytes"])
    for name in ("retry_after", "socket_timeout"):
        if name in own:
            kwargs[name] = float(own[name])
    return RedisStore(url, **kwargs)


def _open_tier(spec: str, model_fingerprint: str | None, codec: str) -> KVStore:
    scheme = spec.split(":", 1)[0].split("?", 1)[0].lower()
    if scheme == "gpu":
        return _open_gpu(spec)
    if scheme == "memory":
        return _open_memory(spec)
    if scheme == "disk":
        return _open_disk(spec, model_fingerprint, codec)
    if scheme in _REDIS_SCHEMES and spec[len(scheme) :].startswith("://"):
        return _open_redis(spec, model_fingerprint, codec)
    raise ValueError(f"unknown store {spec!r}; supported: {SUPPORTED_FORMS}")


def open_store(url: str, **opts: object) -> KVStore:
    """The store ``url`` describes (see the module docstring); options: ``model_fingerprint``,
    ``codec``. Raises ValueError for an unknown or malformed URL."""
    unknown = set(opts) - set(_OPTIONS)
    if unknown:
        raise TypeError(f"unknown open_store option(s) {sorted(unknown)}; allowed: {_OPTIONS}")
    model_fingerprint = opts.get("model_fingerprint")
    codec = str(opts.get("codec") or DEFAULT_CODEC)
    specs = [spec.strip() for spec in re.split(r"[,+]", url) if spec.strip()]
    if not specs:
        raise ValueError(f"empty store URL; supported: {SUPPORTED_FORMS}")
    tiers: list[KVStore] = []
    try:
        for spec in specs:
            tiers.append(_open_tier(spec, model_fingerprint, codec))  # type: ignore[arg-type]
    except Exception:
        for tier in tiers:
            tier.close()
        raise
    return tiers[0] if len(tiers) == 1 else TieredStore(tiers)
