"""Token selectors: which chunk tokens keep being recomputed after a check layer.

A selector sees the candidates (chunk tokens still being computed) with, when it asks for them,
their KV deviation at the check layer (``needs_deviation``) and each one's share of the attention
output of the prompt's last position (``needs_attention``, ``output_share``: at that layer, or
from a probe of the suffix, blend/probe.py), and returns which to keep. Selectors combine:
``UnionSelector`` keeps what any member keeps (for example HKVD plus the first k tokens of each
chunk).

Every ranked selector scores the candidates and keeps ``budget`` of them, where the budget is
``ceil(ratio x chunk tokens)`` (fixed), or, with ``coverage`` c > 0 (adaptive), the smallest
top-scored set holding c of the candidates' score mass, capped at that fixed budget: a prompt
whose mass sits on few tokens recomputes fewer. No selector syncs with the device: budgets are
Python ints or masks built from tensor comparisons.

Selectors run inside the fusor's layer loop, on the device of the candidates, and must not read
values back to the host (no ``int(tensor)``, ``.item()`` or boolean-mask indexing): on CUDA each
would stall the loop. A selector that knows how many tokens it keeps from the counts alone says
so (``kept_count``: every fixed budget), and the fusor then needs no host read at all after the
check layer; an adaptive budget costs one read there.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from cacheblend.config import SELECTORS


@dataclass
class Candidates:
    """The chunk tokens still computed at a check layer.

    positions: (n,) prompt positions, sorted; deviation: (n,) KV deviation (None unless the
    selector needs it); chunk_spans: (start, end) of every chunk; num_chunk_tokens: all chunk
    tokens; attention: (n,) each candidate's share of the attention output of the prompt's last
    position (whose output is the first answer token; ``output_share``), at the check layer or
    from a probe (None unless the selector needs it).
    """

    positions: torch.Tensor
    deviation: torch.Tensor | None
    chunk_spans: list[tuple[int, int]]
    num_chunk_tokens: int
    attention: torch.Tensor | None = None


class Selector(ABC):
    needs_attention = False  # the fusor computes Candidates.attention only when asked
    needs_deviation = True  # ... and Candidates.deviation only when asked

    @abstractmethod
    def keep(self, candidates: Candidates) -> torch.Tensor:
        """Bool mask (n,) over the candidates, on their device: True = keep computing it."""

    def kept_count(self, num_candidates: int, num_chunk_tokens: int) -> int | None:
        """How many candidates ``keep`` keeps, when the counts alone decide it (else None)."""
        return None


def kv_deviation(fresh_k, cached_k, fresh_v, cached_v, on: str) -> torch.Tensor:
    """Per-token squared L2 deviation, summed over heads: inputs (KV, n, hd) -> (n,).

    Keys may be compared after RoPE: a rotation preserves distances. "kv" adds both, each
    normalised by its mean so neither dominates.
    """
    # Summed in fp32 whatever the compute dtype: a bf16 sum of squares would round the ranking.
    dev_k = (fresh_k - cached_k).float().pow(2).sum(dim=(0, 2)) if on in ("k", "kv") else None
    dev_v = (fresh_v - cached_v).float().pow(2).sum(dim=(0, 2)) if on in ("v", "kv") else None
    if on == "k":
        return dev_k
    if on == "v":
        return dev_v
    return dev_k / dev_k.mean().clamp_min(1e-12) + dev_v / dev_v.mean().clamp_min(1e-12)


def suffix_probs(q: torch.Tensor, q_positions: torch.Tensor, keys: torch.Tensor,
                 key_positions: torch.Tensor) -> torch.Tensor:
    """The queries' attention weights, fp32: q (H, s, hd) after RoPE at q_positions (s,); keys
    (KV, T, hd) after RoPE at key_positions (T,) -> (KV, H/KV, s, T), each row summing to 1.
    Causal: a query at p sees keys at positions <= p. GQA: query head h reads KV head
    h // (H/KV), so the queries are grouped by KV head and the keys are never repeated."""
    heads, s, head_dim = q.shape
    kv_heads, total = keys.shape[0], keys.shape[1]
    grouped = q.reshape(kv_heads, heads // kv_heads * s, head_dim)
    scores = (grouped @ keys.transpose(1, 2)).view(kv_heads, heads // kv_heads, s, total)
    visible = key_positions[None, :] <= q_positions[:, None]  # (s, T)
    scores = scores.float().mul_(head_dim**-0.5).masked_fill_(~visible, float("-inf"))
    return torch.softmax(scores, dim=-1)


def output_share(probs: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """(T,) each key's share of one query's attention output, summing to 1: its attention weight
    times the norm of its value, summed over heads (probs (KV, H/KV, T), values (KV, T, hd)).
    A token the query reads but whose value is small moves the output little; weighting by the
    value norm ranked better than the weights alone on the development prompts (MuSiQue KL 0.069
    vs 0.080, MultiNews 0.102 vs 0.109, at 12%: docs/results.md)."""
    share = (probs * values.float().norm(dim=-1)[:, None, :]).sum(dim=(0, 1))
    return share / share.sum().clamp_min(1e-30)


def fixed_budget(ratio: float, candidates: Candidates) -> int:
    return min(candidates.positions.shape[0], math.ceil(ratio * candidates.num_chunk_tokens))


def top_mask(score: torch.Tensor, budget: int, coverage: float = 0.0,
             order_by: torch.Tensor | None = None) -> torch.Tensor:
    """Bool mask of the ``budget`` highest scores (or highest ``order_by``); with ``coverage``
    c > 0, only the first of them in that order that it takes to hold c of the total
    (non-negative) score, and at least one."""
    mask = torch.zeros(score.shape[0], dtype=torch.bool, device=score.device)
    if budget <= 0:
        return mask
    top = torch.topk(score if order_by is None else order_by, budget).indices
    if coverage <= 0.0:
        mask[top] = True
        return mask
    values = score.clamp_min(0)
    ranked = values[top]
    before = torch.cumsum(ranked, 0) - ranked  # mass held by the higher-ranked tokens
    take = before < coverage * values.sum()  # the first one always: before == 0
    mask[top[take]] = True
    return mask


class RankedSelector(Selector):
    """Keep the highest-scored candidates: ``ratio`` of the chunk tokens, or fewer under an
    adaptive ``coverage`` (see the module docstring). Subclasses define ``score``."""

    def __init__(self, ratio: float, coverage: float = 0.0) -> None:
        self.ratio = ratio
        self.coverage = coverage

    @abstractmethod
    def score(self, candidates: Candidates) -> torch.Tensor:
        """(n,) non-negative importance of every candidate."""

    def kept_count(self, num_candidates: int, num_chunk_tokens: int) -> int | None:
        if self.coverage:  # adaptive: the scores decide
            return None
        return min(num_candidates, math.ceil(self.ratio * num_chunk_tokens))

    def keep(self, candidates: Candidates) -> torch.Tensor:
        budget = fixed_budget(self.ratio, candidates)
        if budget <= 0:
            return torch.zeros(candidates.positions.shape[0], dtype=torch.bool,
                               device=candidates.positions.device)
        return top_mask(self.score(candidates), budget, self.coverage)


class HKVDSelector(RankedSelector):
    """Keep the ``ratio`` x chunk tokens with the highest KV deviation (CacheBlend's HKVD)."""

    def score(self, candidates: Candidates) -> torch.Tensor:
        assert candidates.deviation is not None, "HKVD needs a deviation"
        return candidates.deviation


class QueryAttentionSelector(RankedSelector):
    """Keep the chunk tokens the question attends to most at the check layer ("qa")."""

    needs_attention = True
    needs_deviation = False

    def score(self, candidates: Candidates) -> torch.Tensor:
        assert candidates.attention is not None, "query attention not computed"
        return candidates.attention


class QueryDeviationSelector(RankedSelector):
    """KV deviation weighted by the question's attention ("qkvd"): a token whose cached KV is
    off matters in proportion to how much the question reads it."""

    needs_attention = True

    def score(self, candidates: Candidates) -> torch.Tensor:
        assert candidates.deviation is not None and candidates.attention is not None
        return candidates.deviation * candidates.attention


class ChunkBudgetSelector(RankedSelector):
    """A per-chunk budget that follows the question's attention mass, HKVD inside each chunk
    ("qa-chunk"). The budget B is split over chunks in proportion to their attention mass
    (quota_c = B x mass_c / mass); the token of rank r (by deviation) in chunk c gets the
    priority (r + 1/2) / quota_c and the B lowest priorities are kept: exactly B tokens,
    apportioned like Webster's method, without a host sync."""

    needs_attention = True

    def score(self, candidates: Candidates) -> torch.Tensor:  # used by coverage only
        assert candidates.deviation is not None and candidates.attention is not None
        return candidates.deviation * candidates.attention

    def keep(self, candidates: Candidates) -> torch.Tensor:
        assert candidates.deviation is not None and candidates.attention is not None
        positions = candidates.positions
        budget = fixed_budget(self.ratio, candidates)
        if budget <= 0:
            return torch.zeros(positions.shape[0], dtype=torch.bool, device=positions.device)
        starts = torch.tensor([s for s, _ in candidates.chunk_spans], device=positions.device)
        chunk = torch.bucketize(positions, starts, right=True) - 1  # (n,) chunk index
        num_chunks = len(candidates.chunk_spans)
        mass = torch.zeros(num_chunks, dtype=candidates.attention.dtype, device=positions.device)
        mass.index_add_(0, chunk, candidates.attention.to(mass.dtype))
        quota = budget * mass / mass.sum().clamp_min(1e-30)  # (C,)
        order = torch.argsort(candidates.deviation, descending=True)  # (n,)
        chunk_sorted = chunk[order]
        one_hot = torch.nn.functional.one_hot(chunk_sorted, num_chunks)  # (n, C)
        rank = one_hot.cumsum(0).gather(1, chunk_sorted[:, None])[:, 0] - 1  # rank in chunk
        priority = torch.empty_like(quota[chunk])
        priority[order] = (rank + 0.5).to(quota.dtype) / quota[chunk_sorted].clamp_min(1e-30)
        # Adaptive: the coverage rule along the apportioned order.
        return top_mask(self.score(candidates), budget, self.coverage, order_by=-priority)


class FirstKSelector(Selector):
    """Keep the first k tokens of every chunk (EPIC / LegoLink: they absorb the sink effect)."""

    needs_deviation = False

    def __init__(self, k: int) -> None:
        self.k = k

    def keep(self, candidates: Candidates) -> torch.Tensor:
        return first_k_mask(candidates.positions, candidates.chunk_spans, self.k)


def first_k_mask(positions: torch.Tensor, spans: list[tuple[int, int]], k: int) -> torch.Tensor:
    """Bool mask over sorted positions: True where a position is among its chunk's first k."""
    mask = torch.zeros(positions.shape[0], dtype=torch.bool, device=positions.device)
    for start, end in spans:
        mask |= (positions >= start) & (positions < min(end, start + k))
    return mask


class UnionSelector(Selector):
    def __init__(self, *members: Selector) -> None:
        self.members = members
        self.needs_attention = any(m.needs_attention for m in members)
        self.needs_deviation = any(m.needs_deviation for m in members)

    def keep(self, candidates: Candidates) -> torch.Tensor:
        mask = torch.zeros(candidates.positions.shape[0], dtype=torch.bool,
                           device=candidates.positions.device)
        for member in self.members:
            mask |= member.keep(candidates)
        return mask


_RANKED = {"hkvd": HKVDSelector, "qa": QueryAttentionSelector, "qkvd": QueryDeviationSelector,
           "qa-chunk": ChunkBudgetSelector}


def make_selector(name: str, ratio: float, coverage: float = 0.0, first_k: int = 0) -> Selector:
    """The selector called ``name`` (one of SELECTORS) at ``ratio``, plus each chunk's first k
    tokens when ``first_k`` > 0."""
    assert set(_RANKED) == set(SELECTORS), "config.SELECTORS and select._RANKED differ"
    selector: Selector = _RANKED[name](ratio, coverage)
    return UnionSelector(selector, FirstKSelector(first_k)) if first_k else selector
