"""A request in flight (``Sequence``) and a unit of other work (``Task``), as the engine's
``step()`` sees them.

A sequence moves WAITING -> PREFILL -> RUNNING -> FINISHED. It owns everything about its
request: the resolved settings, the plan, its KV cache, its sampler (and RNG), its stop checker
and its stats. Nothing is shared between sequences but the weights. Events go to ``emit`` (the
server's bridge to asyncio) or, without one, to ``outbox`` (``Engine.generate_iter``):
``("delta", (text, logprobs))`` (the TokenLogprob entries since the previous delta, None unless
asked), then ``("done", GenerateResult)`` or ``("error", exception)``.
"""

from __future__ import annotations

import enum
import itertools
import time
from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

import torch

from cacheblend.blend.planner import PlannedPrefill
from cacheblend.decode import Sampler, StopChecker
from cacheblend.kv import RequestKV
from cacheblend.prompt import Segments
from cacheblend.request import GenerateRequest, GenerateResult, RequestSettings, RequestStats

Emit = Callable[[str, Any], None]
_ids = itertools.count(1)


class Status(enum.Enum):
    WAITING = "waiting"
    PREFILL = "prefill"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request: GenerateRequest
    emit: Emit | None = None
    id: int = field(default_factory=lambda: next(_ids))
    status: Status = Status.WAITING
    created: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    outbox: deque = field(default_factory=deque)
    # owned by the engine's step
    segments: Segments | None = None
    settings: RequestSettings | None = None
    planned: PlannedPrefill | None = None
    prefill: Generator[int, None, torch.Tensor] | None = None  # yields token-layers per layer
    kv: RequestKV | None = None
    sampler: Sampler | None = None
    stopper: StopChecker | None = None
    stats: RequestStats | None = None
    next_token: int = 0
    logprobs_sent: int = 0  # sampler.logprobs entries already sent with a delta
    started: float = 0.0  # the prefill began
    first_token_at: float = 0.0
    first_logits: torch.Tensor | None = None
    store_writes: Callable[[], None] | None = None  # owed once the first token is out

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def send(self, kind: str, value: Any) -> None:
        if self.emit is not None:
            self.emit(kind, value)
        else:
            self.outbox.append((kind, value))

    def finish(self, kind: str, value: Any) -> None:
        """Send the last event and free the KV cache."""
        self.status = Status.FINISHED
        if self.prefill is not None:
            self.prefill.close()
        self.prefill = self.kv = self.sampler = None
        self.send(kind, value)

    def result(self) -> GenerateResult:
        stopper = self.stopper
        return GenerateResult(stopper.text, stopper.tokens, stopper.finish_reason or "length",
                              self.stats, self.first_logits, self.sampler.logprobs)


@dataclass(eq=False)
class Task:
    """Work other than a generation: a quick call (``fn``), or in the background lane a
    generator that yields between slices (one document's precompute each) and returns its value.
    """

    fn: Callable[[], Any] | None = None
    slices: Generator[None, None, Any] | None = None
    emit: Emit | None = None
    background: bool = False
    cancelled: bool = False
    created: float = field(default_factory=time.perf_counter)
    outbox: deque = field(default_factory=deque)

    send = Sequence.send
