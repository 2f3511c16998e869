"""Sampling and stopping: greedy, or temperature / top-k / top-p with a seed; logit bias,
presence / frequency / repetition penalties and logprobs, as vLLM."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from cacheblend.errors import InvalidRequestError

MAX_LOGPROBS = 20  # as vLLM's default max_logprobs


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    min_tokens: int = 0  # end-of-sequence is not sampled before this many tokens (as vLLM)
    logprobs: int | None = None  # None: off; k: each sampled token's logprob and the top k
    presence_penalty: float = 0.0  # minus this for every token generated so far (once)
    frequency_penalty: float = 0.0  # minus this times how often a token was generated so far
    repetition_penalty: float = 1.0  # tokens of prompt + output: logit / p if > 0 else * p
    logit_bias: dict[int, float] = field(default_factory=dict, hash=False)  # id -> added to logit

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidRequestError(
                f"min_tokens must lie in [0, max_tokens], got {self.min_tokens}")
        if not 0.0 <= self.temperature <= 5.0:
            raise InvalidRequestError(f"temperature must lie in [0, 5], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must lie in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidRequestError(f"top_k must be >= 0, got {self.top_k}")
        if any(not s for s in self.stop):
            raise InvalidRequestError("stop strings must be non-empty")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise InvalidRequestError(
                f"logprobs must lie in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise InvalidRequestError(f"{name} must lie in [-2, 2], got {getattr(self, name)}")
        if not 0.0 < self.repetition_penalty < float("inf"):
            raise InvalidRequestError(
                f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        for token, bias in self.logit_bias.items():
            if not isinstance(token, int) or token < 0:
                raise InvalidRequestError(f"logit_bias keys must be token ids >= 0, got {token!r}")
            if not -100.0 <= bias <= 100.0:
                raise InvalidRequestError(
                    f"logit_bias values must lie in [-100, 100], got {bias} for token {token}")

    @property
    def uses_prompt(self) -> bool:
        """True when sampling depends on the prompt's tokens (the repetition penalty)."""
        return self.repetition_penalty != 1.0


class TokenLogprob(NamedTuple):
    """A sampled token's logprob and the ``top`` most likely tokens (id, logprob), from the
    model's raw distribution (log-softmax of the logits before penalties and temperature)."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


MIN_TEMPERATURE = 1e-5  # below it, float32 logits / temperature would overflow: sample greedily


class Sampler:
    """Picks the next token from logits; one per request (it owns the request's RNG and the
    history penalties need: ``prompt_ids`` and the tokens it sampled itself)."""

    def __init__(self, params: SamplingParams, device: str | torch.device = "cpu",
                 eos_ids: Iterable[int] = (), prompt_ids: Sequence[int] | None = None) -> None:
        self.params = params
        self.eos_ids = list(eos_ids)
        self.sampled = 0
        self.prompt_ids = list(prompt_ids or ())
        self.output_ids: list[int] = []
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        self.generator = None
        if params.temperature > 0:
            self.generator = torch.Generator(device=device)
            if params.seed is not None:
                self.generator.manual_seed(params.seed)
            else:
                self.generator.seed()

    def __call__(self, logits: torch.Tensor) -> int:
        """logits (V,) -> token id."""
        token = self._sample(self._adjust(logits))
        if self.logprobs is not None:
            self.logprobs.append(self._logprob(logits, token))
        self.output_ids.append(token)
        return token

    def _adjust(self, logits: torch.Tensor) -> torch.Tensor:
        """Logit bias, then penalties (as vLLM), then the min_tokens EOS mask."""
        p = self.params
        penalize = p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0
        if not (p.logit_bias or penalize or (self.sampled < p.min_tokens and self.eos_ids)):
            return logits
        logits = logits.float().clone()  # (V,)
        vocab = logits.shape[-1]
        if p.logit_bias:
            ids = [t for t in p.logit_bias if t < vocab]
            logits[ids] += torch.tensor([p.logit_bias[t] for t in ids])
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(self.prompt_ids) | set(self.output_ids)),
                                dtype=torch.long)
            seen = seen[seen < vocab]
            values = logits[seen]
            logits[seen] = torch.where(values > 0, values / p.repetition_penalty,
                                       values * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and self.output_ids:
            counts = torch.bincount(torch.tensor(self.output_ids), minlength=vocab)[:vocab]
            logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
        if self.sampled < p.min_tokens and self.eos_ids:
            logits[self.eos_ids] = float("-inf")
        # An extreme penalty can overflow a logit to inf: keep it the largest, but finite.
        return torch.nan_to_num(logits, nan=float("-inf"), posinf=torch.finfo(logits.dtype).max)

    def _logprob(self, logits: torch.Tensor, token: int) -> TokenLogprob:
        logprobs = torch.log_softmax(logits.float(), dim=-1)  # (V,) the raw distribution
        top: list[tuple[int, float]] = []
        if self.params.logprobs:
            values, ids = torch.topk(logprobs, min(self.params.logprobs, logprobs.shape[-1]))
            top = list(zip(ids.tolist(), values.tolist()))
        return TokenLogprob(token, float(logprobs[token]), top)

    def _sample(self, logits: torch.Tensor) -> int:
        p = self.params
        self.sampled += 1
        if p.temperature < MIN_TEMPERATURE:  # 0 = greedy; the limit of tinier ones too
            return int(torch.argmax(logits))
        # Shifted so the largest is 0: no overflow to inf (and NaN) at small temperatures.
        logits = logits.float()
        logits = (logits - logits.max()) / p.temperature
        if p.top_k > 0:
            kth = torch.topk(logits, min(p.top_k, logits.shape[-1])).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            cumulative = torch.cumsum(sorted_probs, dim=-1)
            drop = cumulative - sorted_probs > p.top_p  # keep the smallest set reaching top_p
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=self.generator))


class StopChecker:
    """Tracks generated text; finds EOS and stop strings (which are cut from the output)."""

    def __init__(self, tokenizer, params: SamplingParams, eos_ids: set[int]) -> None:
        self.tokenizer = tokenizer
        self.params = params
        self.eos_ids = eos_ids
        self.tokens: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None

    def add(self, token: int) -> str:
        """Record a token; return the newly final text (may be empty while a stop may start)."""
        if token in self.eos_ids:
            self.finish_reason = "stop"
            return ""
        self.tokens.append(token)
        full = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        for stop in self.params.stop:
            cut = full.find(stop)
            if cut != -1:
                self.finish_reason = "stop"
                delta, self.text = full[len(self.text) : cut], full[:cut]
                return delta
        if len(self.tokens) >= self.params.max_tokens:
            self.finish_reason = "length"
        # Hold back text that could be the start of a stop string, and incomplete UTF-8.
        safe = len(full)
        if full.endswith("\ufffd"):
            safe = len(full) - 1
        for stop in self.params.stop:
            for n in range(min(len(stop) - 1, len(full)), 0, -1):
                if full.endswith(stop[:n]):
                    safe = min(safe, len(full) - n)
                    break
        if self.finish_reason is not None:
            safe = len(full)
        delta = full[len(self.text) : safe] if safe > len(self.text) else ""
        self.text += delta
        return delta

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


@torch.inference_mode()
def decode_step(runner, caches: list, tokens: list[int]) -> torch.Tensor:
    """One decode step for B requests: append each token at its cache's own position (the
    cache's length) and return logits (B, V).

    The projections, the MLP and the LM head run once over the stacked tokens, so the weights
    are read once per step for every running request. Attention runs per request against its own
    cache (``runner.attend``, no mask: a decoded token sees every earlier key), so no row ever
    sees another request's keys. ``runner`` is a ModelRunner, ``caches`` RequestKVs.
    """
    assert caches and len(caches) == len(tokens), (len(caches), len(tokens))
    device = caches[0].keys.device
    lengths = [cache.length for cache in caches]
    for cache, length in zip(caches, lengths):
        assert length < cache.capacity, (length, cache.capacity)
    ids = torch.tensor(tokens, device=device)  # (B,)
    positions = torch.tensor(lengths, device=device)  # (B,)
    hidden = runner.embed(ids)  # (B, D)
    for index in range(runner.num_layers):
        q, k, v = runner.project_qkv(index, hidden)  # q (H, B, hd); k, v (KV, B, hd)
        q = runner.rope.apply(q, positions)
        k = runner.rope.apply(k, positions)
        outputs = []
        for row, (cache, length) in enumerate(zip(caches, lengths)):
            cache.keys[index, :, length] = k[:, row]
            cache.values[index, :, length] = v[:, row]
            keys, values = cache.layer(index, length + 1)  # (KV, length + 1, hd)
            outputs.append(runner.attend(q[:, row : row + 1], keys, values))  # (H, 1, hd)
        hidden = runner.finish_layer(index, hidden, torch.cat(outputs, dim=1))  # (B, D)
    for cache in caches:
        cache.length += 1
    return runner.logits(hidden)  # (B, V)
