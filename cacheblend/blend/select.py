"""Token selectors: which chunk tokens keep being recomputed after a check layer.

A selector sees the candidates (chunk tokens still being computed) with their KV deviation at
the check layer, and returns which to keep. Selectors combine: ``UnionSelector`` keeps what any
member keeps (for example HKVD plus the first k tokens of each chunk).

Selectors run inside the fusor's layer loop, on the device of the candidates, and must not read
values back to the host (no ``int(tensor)``, ``.item()`` or boolean-mask indexing): on CUDA each
would stall the loop. A selector that knows how many tokens it keeps from the counts alone says
so (``kept_count``), and the fusor then needs no host read at all after the check layer.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass
class Candidates:
    """The chunk tokens still computed at a check layer.

    positions: (n,) prompt positions, sorted; deviation: (n,) KV deviation (None before any
    layer ran); chunk_spans: (start, end) of every chunk; num_chunk_tokens: all chunk tokens.
    """

    positions: torch.Tensor
    deviation: torch.Tensor | None
    chunk_spans: list[tuple[int, int]]
    num_chunk_tokens: int


class Selector(ABC):
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


class HKVDSelector(Selector):
    """Keep the ``ratio`` x chunk tokens with the highest KV deviation (CacheBlend's HKVD)."""

    def __init__(self, ratio: float) -> None:
        self.ratio = ratio

    def kept_count(self, num_candidates: int, num_chunk_tokens: int) -> int:
        return min(num_candidates, math.ceil(self.ratio * num_chunk_tokens))

    def keep(self, candidates: Candidates) -> torch.Tensor:
        n = candidates.positions.shape[0]
        budget = self.kept_count(n, candidates.num_chunk_tokens)
        mask = torch.zeros(n, dtype=torch.bool, device=candidates.positions.device)
        if budget > 0:
            assert candidates.deviation is not None, "HKVD needs a deviation"
            mask[torch.topk(candidates.deviation, budget).indices] = True
        return mask


class FirstKSelector(Selector):
    """Keep the first k tokens of every chunk (EPIC / LegoLink: they absorb the sink effect)."""

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

    def keep(self, candidates: Candidates) -> torch.Tensor:
        mask = torch.zeros(candidates.positions.shape[0], dtype=torch.bool,
                           device=candidates.positions.device)
        for member in self.members:
            mask |= member.keep(candidates)
        return mask
