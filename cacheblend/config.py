"""Every knob, as frozen dataclasses validated at construction; loaded from YAML and overrides."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import yaml

from cacheblend.errors import ConfigError

METHODS = ("full", "prefix", "reuse", "blend", "epic")
DEVIATIONS = ("v", "k", "kv")
PRECOMPUTE_MODES = ("alone", "sink", "preamble", "prefix")
LOADING_MODES = ("bulk", "layer", "prefetch")  # see cacheblend.blend.loader
DTYPES = ("auto", "bf16", "fp16", "fp32")  # see cacheblend.device
# hkvd: KV deviation (CacheBlend); qa: the question's attention; qkvd: deviation x attention;
# qa-chunk: per-chunk budget by the question's attention, HKVD inside. See blend/select.py.
SELECTORS = ("hkvd", "qa", "qkvd", "qa-chunk")
DEFAULT_DRIFT = (1.0, 0.75)  # BlendConfig.drift: picked on development prompts (docs/results.md)


@dataclass(frozen=True)
class BlendConfig:
    """How a request's chunk caches are fused.

    check_layers / check_ratios: the gradual-filtering schedule. At check_layers[j] the tokens
    still being computed are narrowed, by KV deviation, to check_ratios[j] of the chunk tokens.
    The last ratio is the request's recompute ratio; a request's ``ratio`` replaces it (and
    scales the earlier ones by the same factor).
    selector: how tokens are ranked at a check layer: one of SELECTORS for every check layer, or
    one per check layer (a two-stage schedule: e.g. ``("qa", "qkvd")`` with check layers (0, 4)
    narrows by the question's attention at layer 0, then by attention x KV deviation at layer
    4, among the tokens the first stage kept). coverage: 0 = a fixed budget; c > 0 = adaptive,
    keep the smallest top-ranked set holding c of the selector's score mass, capped at the
    check ratio (see blend/select.py).
    probe_layers: with a query-aware selector, run the suffix over the cached KV for this many
    layers first (-1: every layer) and rank by that attention (its cost is taken out of the
    ratio). probe_tail: a suffix too long to probe whole within half the budget (SAMSum's
    dialogue) is probed by its last probe_tail tokens; if even those do not fit, HKVD selects.
    probe_ramp: how the probed layers weigh in the ranking: layer i of the L probed weighs
    ((i + 1) / L) ** probe_ramp (0: every layer alike; 1: in proportion to its depth).
    drift: (key, value) scales of the drift correction (blend/drift.py): at every layer after
    the first, each chunk's cached rows that are not recomputed are moved by the mean of
    (fresh - cached) over the chunk's recomputed tokens, times these scales; (0, 0) turns it
    off (CacheBlend's blend). drift_pool: each chunk's mean is shrunk toward the mean over
    every chunk token recomputed at that layer, as if drift_pool tokens at that request-wide
    mean joined the chunk's own (0: the chunk's mean alone).
    precompute: the context a chunk is computed after before it is stored (PRECOMPUTE_MODES:
    nothing, one BOS token, ``preamble``, or the request's prefix); it is part of the entry's
    key. borrow: in ``prefix`` mode, a chunk missing under the request's prefix is read from its
    entry under the engine's default prefix or the preamble, when stored (blend/chunks.py).
    """

    # The default, picked by measurement (docs/results.md, issue 12, rounds 4 to 7): two
    # stages. At layer 0, each chunk token's share of the last position's attention output,
    # from a probe of every layer, keeps 15% of the chunk tokens; at layer 4, that share x the
    # token's KV deviation there (K and V, after the drift correction) keeps 10% (less the
    # probe's cost). A suffix too long to probe whole is probed by its last probe_tail tokens.
    # Every layer after the first corrects the drift of the rows not recomputed (``drift``),
    # each chunk's offset pooled with the request's (``drift_pool``).
    method: str = "blend"
    check_layers: tuple[int, ...] = (0, 4)
    check_ratios: tuple[float, ...] = (0.15, 0.1)
    deviation: str = "kv"
    selector: str | tuple[str, ...] = ("qa", "qkvd")
    coverage: float = 0.0
    probe_layers: int = -1  # != 0: query-aware selectors read a probe of the suffix (blend/probe.py)
    probe_tail: int = 8  # a long suffix: probe its last 8 tokens (picked on 16 SAMSum prompts)
    probe_ramp: float = 0.0  # layer i of L probed weighs ((i + 1) / L) ** probe_ramp
    first_k: int = 0  # also keep the first k tokens of each chunk at check layers (0 = off)
    drift: tuple[float, float] = DEFAULT_DRIFT
    # A chunk's offset borrows 10 pseudo-tokens at the request-wide mean drift (round 7 in
    # docs/results.md: +1.6 points of reuse's loss recovered at 10%, +3.9 at 5%, 50 examples
    # on each of the four datasets; 30 did no better).
    drift_pool: float = 10.0
    epic_k: int = 16
    # Chunks are precomputed after the request's prefix (system prompt and instruction): with
    # the query-aware default, KL halves on SAMSum and moves by under 0.01 elsewhere (slightly
    # worse on 2WikiMQA; docs/results.md, round 3). An entry is keyed by its context, so a
    # request under another prefix borrows the entry stored under the engine's default prefix,
    # or the preamble, when its own is missing.
    precompute: str = "prefix"
    preamble: str = "Document:\n"  # the context of "preamble" mode
    borrow: bool = True  # prefix mode: on a miss, read the chunk's entry under another context
    min_ratio: float = 0.0
    fallback: bool = True  # full prefill when too many chunk tokens miss for blend to pay

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.deviation not in DEVIATIONS:
            raise ConfigError(f"deviation must be one of {DEVIATIONS}, got {self.deviation!r}")
        names = (self.selector,) if isinstance(self.selector, str) else self.selector
        if not names or any(name not in SELECTORS for name in names):
            raise ConfigError(f"selector must be one of {SELECTORS} (or one per check layer), "
                              f"got {self.selector!r}")
        if not 0.0 <= self.coverage < 1.0:
            raise ConfigError("coverage must lie in [0, 1) (0 = a fixed budget)")
        if self.precompute not in PRECOMPUTE_MODES:
            raise ConfigError(f"precompute must be one of {PRECOMPUTE_MODES}, got {self.precompute!r}")
        if not self.check_layers or len(self.check_layers) != len(self.check_ratios):
            raise ConfigError(
                f"check_layers {list(self.check_layers)} and check_ratios "
                f"{list(self.check_ratios)} must be non-empty and of equal length (to change only "
                f"the recompute ratio, set blend.ratio)")
        if not isinstance(self.selector, str) and len(self.selector) != len(self.check_layers):
            raise ConfigError(f"selector names {len(self.selector)} selectors "
                              f"({', '.join(self.selector)}) for {len(self.check_layers)} check "
                              f"layer(s): set selector too, one name for every check layer or "
                              f"one per check layer")
        if list(self.check_layers) != sorted(set(self.check_layers)) or self.check_layers[0] < 0:
            raise ConfigError("check_layers must be increasing and >= 0")
        if any(not 0.0 <= r <= 1.0 for r in self.check_ratios):
            raise ConfigError("check_ratios must lie in [0, 1]")
        if list(self.check_ratios) != sorted(self.check_ratios, reverse=True):
            raise ConfigError("check_ratios must not increase (each check layer narrows the set)")
        if (not isinstance(self.drift, (tuple, list)) or len(self.drift) != 2
                or any(isinstance(x, bool) or not isinstance(x, (int, float))
                       or not math.isfinite(x) or x < 0 for x in self.drift)):
            raise ConfigError(f"drift must be two numbers >= 0 (key and value scales; [0, 0]: "
                              f"off), got {self.drift!r}")
        object.__setattr__(self, "drift", tuple(float(x) for x in self.drift))
        if (isinstance(self.drift_pool, bool) or not isinstance(self.drift_pool, (int, float))
                or not math.isfinite(self.drift_pool) or self.drift_pool < 0):
            raise ConfigError(f"drift_pool must be a number >= 0, got {self.drift_pool!r}")
        object.__setattr__(self, "drift_pool", float(self.drift_pool))
        if self.epic_k < 0 or self.first_k < 0:
            raise ConfigError("epic_k and first_k must be >= 0")
        if not isinstance(self.borrow, bool):
            raise ConfigError(f"borrow must be true or false, got {self.borrow!r}")
        if self.probe_tail < 1:
            raise ConfigError("probe_tail must be >= 1")
        if (isinstance(self.probe_ramp, bool) or not isinstance(self.probe_ramp, (int, float))
                or not math.isfinite(self.probe_ramp) or self.probe_ramp < 0):
            raise ConfigError(f"probe_ramp must be a number >= 0, got {self.probe_ramp!r}")
        object.__setattr__(self, "probe_ramp", float(self.probe_ramp))
        if self.probe_layers < -1:
            raise ConfigError("probe_layers must be >= 0, or -1 for every layer")
        if not 0.0 <= self.min_ratio <= 1.0:
            raise ConfigError("min_ratio must lie in [0, 1]")

    @property
    def ratio(self) -> float:
        return self.check_ratios[-1]

    @property
    def selectors(self) -> tuple[str, ...]:
        """The selector of each check layer."""
        if isinstance(self.selector, str):
            return (self.selector,) * len(self.check_layers)
        return tuple(self.selector)

    def with_ratio(self, ratio: float) -> BlendConfig:
        """The same schedule narrowed to ``ratio`` at the last check layer."""
        if not 0.0 <= ratio <= 1.0:
            raise ConfigError(f"ratio must lie in [0, 1], got {ratio}")
        ratio = max(ratio, self.min_ratio)
        scale = ratio / self.ratio if self.ratio > 0 else 1.0
        ratios = tuple(min(1.0, max(ratio, r * scale)) for r in self.check_ratios[:-1]) + (ratio,)
        return replace(self, check_ratios=ratios)


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # None: the bundled SmolLM2-135M-Instruct
    device: str = "auto"  # auto: cuda when present, else cpu; resolved at construction
    dtype: str = "auto"  # auto: bf16 on cuda, fp32 on cpu; resolved at construction
    store: str = "memory"  # a store URL, see cacheblend.store.factory
    store_codec: str = "fp16"
    threads: int | None = None
    system_prompt: str = "You are a helpful assistant. Answer using the documents."
    instruction: str = "Read the documents below and answer the question."
    max_new_tokens: int = 64
    loading: str = "auto"  # auto | bulk | layer | prefetch: see cacheblend.blend.loader
    # Engine.step(): at most this many requests decode together. While any are decoding, a
    # plain prefill runs in token slices of prefill_step_tokens, and each step a prefill runs
    # for at most prefill_step_tokens tokens (token-layers / layers) and prefill_step_s seconds
    # (None: 3/4 of a decode step's time), pausing between layers: a long prompt does not
    # stall running streams. See docs/serving.md.
    max_batch_size: int = 8
    prefill_step_tokens: int = 256
    prefill_step_s: float | None = None
    blend: BlendConfig = field(default_factory=BlendConfig)

    def __post_init__(self) -> None:
        if self.store_codec not in ("fp32", "fp16", "int8"):
            raise ConfigError(f"store_codec must be fp32, fp16 or int8, got {self.store_codec!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.loading not in ("auto", *LOADING_MODES):
            raise ConfigError(f"loading must be auto or one of {LOADING_MODES}, "
                              f"got {self.loading!r}")
        if not isinstance(self.device, str):
            raise ConfigError(f"device must be a string, got {self.device!r}")
        # Resolved once, here: every part of the engine reads concrete values.
        from cacheblend.device import resolve_device, resolve_dtype  # torch loads only here

        device = resolve_device(self.device)
        object.__setattr__(self, "device", device)
        object.__setattr__(self, "dtype", resolve_dtype(self.dtype, device))
        if self.loading == "auto":  # one bulk step on the CPU; a side stream on CUDA
            object.__setattr__(self, "loading", "prefetch" if device.startswith("cuda") else "bulk")
        if self.max_new_tokens < 1:
            raise ConfigError("max_new_tokens must be >= 1")
        if self.threads is not None and self.threads < 1:
            raise ConfigError("threads must be >= 1")
        if self.max_batch_size < 1 or self.prefill_step_tokens < 1:
            raise ConfigError("max_batch_size and prefill_step_tokens must be >= 1")
        if self.prefill_step_s is not None and self.prefill_step_s < 0:
            raise ConfigError("prefill_step_s must be >= 0")

    def to_dict(self) -> dict:
        return asdict(self)


def _build(cls, values: dict):
    known = {f.name for f in fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} keys: {', '.join(sorted(unknown))}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return cls(**values)


def load_config(path: str | Path | None = None, **overrides) -> EngineConfig:
    """EngineConfig from an optional YAML file, then keyword overrides (None values ignored)."""
    values: dict = {}
    if path is not None:
        try:
            values = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from exc
        if not isinstance(values, dict):
            raise ConfigError(f"config {path} must be a mapping")
    blend_values = dict(values.pop("blend", {}) or {})
    blend_values.update(overrides.pop("blend", {}) or {})
    values.update({k: v for k, v in overrides.items() if v is not None})
    # blend.ratio: the recompute ratio, narrowing the schedule's last check (and scaling the
    # earlier ones), as a request's ratio does; check_ratios sets every check's ratio itself.
    ratio = blend_values.pop("ratio", None)
    try:
        blend = _build(BlendConfig, blend_values)
        if ratio is not None:
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
                raise ConfigError(f"blend.ratio must be a number in [0, 1], got {ratio!r}")
            blend = blend.with_ratio(float(ratio))
        return _build(EngineConfig, {**values, "blend": blend})
    except TypeError as exc:
        raise ConfigError(str(exc)) from exc
