"""Sampling and stopping: greedy, or temperature / top-k / top-p with a seed."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from cacheblend.errors import InvalidRequestError


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    min_tokens: int = 0  # end-of-sequence is not sampled before this many tokens (as vLLM)

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


MIN_TEMPERATURE = 1e-5  # below it, float32 logits / temperature would overflow: sample greedily


class Sampler:
    """Picks the next token from logits; one per request (it owns the request's RNG)."""

    def __init__(self, params: SamplingParams, device: str | torch.device = "cpu",
                 eos_ids: Iterable[int] = ()) -> None:
        self.params = params
        self.eos_ids = list(eos_ids)
        self.sampled = 0
        self.generator = None
        if params.temperature > 0:
            self.generator = torch.Generator(device=device)
            if params.seed is not None:
                self.generator.manual_seed(params.seed)
            else:
                self.generator.seed()

    def __call__(self, logits: torch.Tensor) -> int:
        """logits (V,) -> token id."""
        p = self.params
        if self.sampled < p.min_tokens and self.eos_ids:
            logits = logits.clone()
            logits[self.eos_ids] = float("-inf")
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
