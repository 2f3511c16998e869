"""What a caller hands the engine and what it gets back: plain dataclasses, no torch work."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from cacheblend.config import LOADING_MODES, METHODS, BlendConfig
from cacheblend.decode import SamplingParams, TokenLogprob
from cacheblend.errors import InvalidRequestError
from cacheblend.prompt import Segments


@dataclass
class GenerateRequest:
    """One request. Either (documents, question) with optional system/instruction overrides,
    or ready-made ``segments`` (separator mode).

    Blend settings are the request's own: ``blend`` replaces the engine's ``BlendConfig`` for
    this request (check layers, deviation, precompute mode, ...), ``method`` and ``ratio``
    override that config's, ``loading`` the engine's loading mode. Nothing on the engine is
    swapped to serve a setting."""

    question: str = ""
    documents: list[str] = field(default_factory=list)
    system: str | None = None
    instruction: str | None = None
    segments: Segments | None = None
    method: str | None = None
    ratio: float | None = None
    blend: BlendConfig | None = None
    loading: str | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)


@dataclass(frozen=True)
class RequestSettings:
    """A request's resolved settings: what the planner and the fusor run with."""

    method: str
    blend: BlendConfig
    loading: str

    @staticmethod
    def resolve(request: GenerateRequest, blend: BlendConfig, loading: str) -> RequestSettings:
        blend = request.blend or blend
        method = request.method or blend.method
        if method not in METHODS:
            raise InvalidRequestError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
        if request.ratio is not None:
            if not 0.0 <= request.ratio <= 1.0:
                raise InvalidRequestError(f"ratio must lie in [0, 1], got {request.ratio}")
            blend = blend.with_ratio(request.ratio)
        loading = request.loading or loading
        if loading not in LOADING_MODES:
            raise InvalidRequestError(
                f"loading must be one of {', '.join(LOADING_MODES)}, got {loading!r}")
        return RequestSettings(method, blend, loading)


@dataclass
class RequestStats:
    """Token counts add up: ``reused_tokens + computed_tokens == prompt_tokens``; of the
    computed ones, ``recomputed_tokens`` had a cached row (selected by the fusor).
    ``missed_tokens`` counts chunk/prefix tokens that had no entry (computed and stored first;
    they are reused afterwards, so they are part of ``reused_tokens`` too). ``borrowed_tokens``
    counts chunk tokens that missed under the request's own context but were read from an entry
    stored under another (``BlendConfig.borrow``): hits, not misses."""

    method: str
    ratio: float | None
    prompt_tokens: int
    chunk_tokens: int
    reused_tokens: int  # positions whose final K/V came from cache
    recomputed_tokens: int  # cached positions computed again (selected by the fusor)
    computed_tokens: int  # positions with fresh K/V at the last layer
    missed_tokens: int  # chunk/prefix tokens with no entry: computed and stored first
    ttft_s: float
    prefill_s: float
    miss_s: float
    load_s: float = 0.0  # store lookups (read, verify, decode)
    load_bytes: int = 0
    requested_method: str = ""
    controller: str = ""  # the loading controller's reason for what ran
    decode_s: float = 0.0
    completion_tokens: int = 0
    store_s: float = 0.0  # store writes after the first token (prefix entries, fallback misses)
    queue_s: float = 0.0  # waiting before the prefill started
    prefill_slices: int = 0  # steps the prefill was split over (chunked prefill)
    prefix_reused_tokens: int = 0  # of reused_tokens, those from exact-prefix entries
    # chunk tokens read from an entry precomputed after another context (BlendConfig.borrow)
    borrowed_tokens: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GenerateResult:
    text: str
    token_ids: list[int]
    finish_reason: str
    stats: RequestStats
    first_logits: torch.Tensor | None = None
    logprobs: list[TokenLogprob] | None = None  # per sampled token, when sampling.logprobs set


@dataclass
class IngestResult:
    key: str
    num_tokens: int
    cached: bool  # already in the store
