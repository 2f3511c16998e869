"""A request's prefill, from request to first-token logits: resolve its settings, build its
segments, plan it (``blend.planner``), allocate its KV cache and run the fusor's layer loop as
a generator the engine's ``step()`` advances under its budget. Its stats and the store writes it
owes (made after its first token) are set up here too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Generator

import torch

from cacheblend.blend.controller import LoadingController
from cacheblend.blend.fusor import FusionResult, Fusor
from cacheblend.blend.planner import Planner
from cacheblend.config import EngineConfig
from cacheblend.errors import InvalidRequestError
from cacheblend.kv import RequestKV
from cacheblend.model.runner import ModelRunner
from cacheblend.prompt import Segments
from cacheblend.request import GenerateRequest, RequestSettings, RequestStats
from cacheblend.sequence import Sequence, Status

log = logging.getLogger(__name__)


class Prefiller:
    def __init__(self, config: EngineConfig, runner: ModelRunner, fusor: Fusor,
                 planner: Planner, controller: LoadingController,
                 segments_for: Callable[[GenerateRequest], Segments]) -> None:
        self.config = config
        self.runner = runner
        self.fusor = fusor
        self.planner = planner
        self.chunks = planner.chunks
        self.controller = controller
        self.segments_for = segments_for

    def check_length(self, num_tokens: int) -> None:
        if num_tokens >= self.runner.max_positions:
            raise InvalidRequestError(
                f"prompt has {num_tokens} tokens; the model allows at most "
                f"{self.runner.max_positions - 1} plus generated tokens"
            )

    def start(self, seq: Sequence, chunked: bool) -> bool:
        """Resolve, plan and set up a request's prefill (``seq.prefill``); False, with the error
        sent to the request, if it cannot be served."""
        seq.started = time.perf_counter()
        seq.status = Status.PREFILL
        try:
            seq.settings = RequestSettings.resolve(seq.request, self.config.blend,
                                                   self.config.loading)
            seq.segments = self.segments_for(seq.request)
            total = seq.segments.num_tokens
            if total == 0:
                raise InvalidRequestError("the prompt is empty")
            self.check_length(total)
            seq.planned = self.planner.plan(seq.segments, seq.settings)
            capacity = min(self.runner.max_positions, total + seq.request.sampling.max_tokens)
            seq.kv = RequestKV(self.runner.num_layers, self.runner.num_kv_heads,
                               self.runner.head_dim, capacity, self.runner.device,
                               self.runner.dtype)
            seq.prefill = self._run(seq, chunked)
        except Exception as exc:  # noqa: BLE001 - invalid requests fail alone
            seq.finish("error", exc)
            return False
        return True

    def _run(self, seq: Sequence, chunked: bool) -> Generator[int, None, torch.Tensor]:
        """The fused prefill as a generator of tokens computed per layer; returns the last
        position's logits. A plain prefill started while others decode runs in token slices
        (chunked prefill); any prefill can pause between layers."""
        plan = seq.planned.plan
        pieces = plan.token_slices(self.config.prefill_step_tokens) if chunked else [plan]
        captured, computed, active_per_layer = [], [], [0] * self.runner.num_layers
        compute_start = time.perf_counter()
        for piece in pieces:
            result: FusionResult = yield from self.fusor.layers(piece, seq.kv,
                                                                seq.settings.loading)
            computed.append(result.computed)
            active_per_layer = [a + b for a, b in zip(active_per_layer, result.active_per_layer)]
            if result.captured is not None:
                captured.append(result.captured)
        self.controller.observe_compute(sum(active_per_layer), time.perf_counter() - compute_start)
        seq.stats = self._stats(seq, torch.cat(computed), len(pieces))
        if captured:  # a prefix request: its segments become exact prefix entries
            layers = [(torch.cat([c[i][0] for c in captured], dim=1),
                       torch.cat([c[i][1] for c in captured], dim=1))
                      for i in range(self.runner.num_layers)]
            seq.store_writes = self._store_writes(seq, int(plan.active[0]), layers)
        elif seq.planned.lookup.deferred:
            seq.store_writes = self._store_writes(seq, 0, None)
        return result.logits

    def _stats(self, seq: Sequence, computed: torch.Tensor, slices: int) -> RequestStats:
        planned, segments = seq.planned, seq.segments
        total = segments.num_tokens
        cached_rows = torch.zeros(total, dtype=torch.bool)
        for span in planned.plan.cached:
            cached_rows[span.start : span.end] = True
        plan = planned.plan
        # Exact-prefix entries: every span of a prefix plan, else the prefix's own entry at 0.
        prefix_end = (plan.cached[-1].end if planned.method == "prefix" and plan.cached
                      else len(segments.prefix) if plan.cached and plan.cached[0].start == 0
                      else 0)
        reused_rows = cached_rows.clone()
        reused_rows[computed.cpu()] = False
        elapsed = time.perf_counter() - seq.started
        lookup = planned.lookup
        return RequestStats(
            method=planned.method,
            ratio=planned.ratio,
            prompt_tokens=total,
            chunk_tokens=sum(len(c) for c in segments.chunks),
            reused_tokens=total - int(computed.shape[0]),
            recomputed_tokens=int(cached_rows[computed.cpu()].sum()),
            computed_tokens=int(computed.shape[0]),
            missed_tokens=lookup.missed_tokens,
            borrowed_tokens=lookup.borrowed_tokens,
            ttft_s=elapsed,
            prefill_s=elapsed - lookup.miss_s,
            miss_s=lookup.miss_s,
            load_s=lookup.load_s,
            load_bytes=lookup.load_bytes,
            requested_method=seq.settings.method,
            controller=lookup.reason,
            queue_s=seq.started - seq.created,
            prefill_slices=slices,
            prefix_reused_tokens=int(reused_rows[:prefix_end].sum()),
        )

    def _store_writes(self, seq: Sequence, computed_from: int, captured) -> Callable[[], None]:
        """The writes a request owes once its first token is out: its exact-prefix entries
        (``prefix``), the chunks a fallback request missed. Not part of its TTFT."""
        segments, lookup, blend = seq.segments, seq.planned.lookup, seq.settings.blend

        def write() -> None:
            start = time.perf_counter()
            try:
                if captured is not None:
                    self.chunks.store_prefix_chain(segments, computed_from, captured)
                if lookup.deferred:
                    self.chunks.ensure_prefix(segments.prefix)
                    preamble = self.chunks.preamble_for(segments.prefix, blend)
                    for index in lookup.deferred:
                        self.chunks.precompute(preamble, segments.chunks[index])
            except Exception:  # the answer stands; a later request recomputes what is missing
                log.exception("storing the KV a request computed failed")
            seq.stats.store_s = time.perf_counter() - start

        return write
