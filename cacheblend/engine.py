"""Engine: the one place the parts meet. The CLI, the server, eval, the benchmarks and the tests
all drive the same request lifecycle through it.

    add_request(request) -> Sequence        queue a generation (WAITING)
    submit(fn | slices, background=...)     queue other work (a call; an upload in the background)
    step()                                  advance everything one turn (below)
    generate_iter / generate                "add, then step until done"
    ingest(documents)                       precompute and store documents now

One ``step()`` (as nano-vllm's ``LLMEngine.step``): make the store writes owed by requests whose
first token went out last step; drop cancelled work; run the waiting calls; advance
prefills (admit waiting requests up to ``max_batch_size``; while other requests are decoding, a
prefill advances by at most ``prefill_step_tokens`` per step, so a long prompt cannot stall their
streams); run one batched decode step over every running request and finish the ones that
stopped; and when no live request waits, one slice of background work (a document's precompute).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
from tqdm import tqdm

from cacheblend.blend.chunks import ChunkCache
from cacheblend.blend.controller import LoadingController
from cacheblend.blend.fusor import Fusor, run_to_end
from cacheblend.blend.planner import Planner
from cacheblend.config import BlendConfig, EngineConfig
from cacheblend.decode import Sampler, StopChecker, decode_step
from cacheblend.device import dtype_name
from cacheblend.errors import InvalidRequestError
from cacheblend.kv import RequestKV
from cacheblend.model.loader import LoadedModel, load_model
from cacheblend.prefill import Prefiller
from cacheblend.prompt import PromptBuilder, Segments
from cacheblend.request import (
    GenerateRequest,
    GenerateResult,
    IngestResult,
    RequestStats,
)
from cacheblend.sequence import Emit, Sequence, Status, Task
from cacheblend.store.base import KVStore
from cacheblend.store.factory import open_store

__all__ = ["Engine", "GenerateRequest", "GenerateResult", "IngestResult", "RequestStats"]

log = logging.getLogger(__name__)


@dataclass
class StepReport:
    """What one step did (the server's metrics read it)."""

    decoded: int = 0  # requests in the batched decode step
    prefill_tokens: float = 0.0  # token-layers / layers computed by prefills
    background: bool = False  # ran a background slice

    @property
    def idle(self) -> bool:
        return not (self.decoded or self.prefill_tokens or self.background)


class Engine:
    def __init__(self, config: EngineConfig | None = None, store: KVStore | None = None,
                 loaded: LoadedModel | None = None) -> None:
        self.config = config or EngineConfig()
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        self.loaded = loaded or load_model(self.config.model, self.config.device,
                                           dtype=self.config.dtype)
        self.tokenizer = self.loaded.tokenizer
        self.runner = self.loaded.runner()
        if loaded is not None:  # an engine over a loaded model computes where and as it does
            self.config = replace(self.config, device=str(self.runner.device),
                                  dtype=dtype_name(self.runner.dtype))
        self.controller = LoadingController(self.runner.num_layers, self.config.blend.min_ratio)
        self.prompts = PromptBuilder(self.tokenizer)
        self.fingerprint = self.loaded.fingerprint
        if store is None:
            store = open_store(self.config.store, model_fingerprint=self.fingerprint,
                               codec=self.config.store_codec)
        self.store = store
        self.fusor = Fusor(self.runner, self.controller)
        # The config is frozen: the default prefix (template head, system prompt, instruction)
        # is rendered once.
        self._default_prefix = self.prompts.build(self.config.system_prompt,
                                                  self.config.instruction, [], "").prefix
        self.chunks = ChunkCache(self.fusor, store, self.fingerprint, self.prompts,
                                 self.config.store_codec, self._default_prefix)
        self.planner = Planner(self.chunks, self.controller, self.runner.num_layers)
        self.prefiller = Prefiller(self.config, self.runner, self.fusor, self.planner,
                                   self.controller, self.segments_for)
        self.eos_ids = _eos_ids(self.tokenizer, self.loaded.model)
        self.lock = threading.RLock()  # one model: one step at a time
        # Queues, shared with the threads that add work (the server's event loop).
        self.work_added = threading.Condition()
        self._waiting: deque[Sequence] = deque()
        self._calls: deque[Task] = deque()
        self._background: deque[Task] = deque()
        # Owned by step() (under self.lock).
        self._prefilling: list[Sequence] = []
        self._running: list[Sequence] = []
        self._owed: list[Callable[[], None]] = []
        self._decode_s: float | None = None  # recent decode step time: the prefill's budget

    # --- prompts and keys ---------------------------------------------------------------------

    def segments_for(self, request: GenerateRequest) -> Segments:
        if request.segments is not None:
            return request.segments
        system = self.config.system_prompt if request.system is None else request.system
        instruction = (self.config.instruction if request.instruction is None
                       else request.instruction)
        return self.prompts.build(system, instruction, request.documents, request.question)

    def chat_segments(self, messages: list[dict], documents: list[str]) -> Segments:
        """A chat with documents, with this engine's system prompt and instruction."""
        return self.prompts.build_chat(messages, documents, self.config.system_prompt,
                                       self.config.instruction)

    def default_prefix(self) -> tuple[int, ...]:
        return self._default_prefix

    def preamble_for(self, prefix: tuple[int, ...], blend: BlendConfig) -> tuple[int, ...]:
        return self.chunks.preamble_for(prefix, blend)

    def document_key(self, text: str, blend: BlendConfig | None = None) -> str:
        """The store key ``ingest`` writes ``text`` under (and the requests that use it read)."""
        return self.document_keys(text, blend)[0]

    def document_keys(self, text: str, blend: BlendConfig | None = None) -> list[str]:
        """``document_key`` and the keys a request may borrow ``text``'s entry from (the
        preamble's, in prefix mode): what deleting a document drops. Entries that requests
        under other prefixes computed for themselves (when nothing could be borrowed) are keyed
        by those prefixes; they leave by the store's eviction or TTL."""
        blend = blend or self.config.blend
        preamble = self.preamble_for(self.default_prefix(), blend)
        chunk = self.prompts.chunk_ids(text)
        return [self.chunks.chunk_key(p, chunk)
                for p in (preamble, *self.chunks.borrow_preambles(preamble, blend))]

    def document_tokens(self, text: str, blend: BlendConfig | None = None) -> tuple[int, int]:
        """(tokens of the document, tokens with its preamble): what ingest computes."""
        blend = blend or self.config.blend
        tokens = len(self.prompts.chunk_ids(text))
        return tokens, tokens + len(self.preamble_for(self.default_prefix(), blend))


    # --- ingest -------------------------------------------------------------------------------

    def ingest(self, documents: list[str], progress: bool = True,
               blend: BlendConfig | None = None) -> list[IngestResult]:
        """Precompute and store every document's KV now (skipping those already stored)."""
        with tqdm(total=len(documents), desc="ingest", unit="doc", disable=not progress) as bar:
            slices = self.ingest_slices(documents, blend, on_document=bar.update)
            with self.lock, torch.inference_mode():
                return run_to_end(slices)

    def ingest_slices(self, documents: list[str], blend: BlendConfig | None = None,
                      on_document: Callable[[int], Any] | None = None):
        """Ingest as a generator that pauses after every layer of every document's precompute
        (the background lane's slices); returns the list of IngestResult. The caller holds the
        engine's lock while it advances it."""
        blend = blend or self.config.blend
        prefix = self.default_prefix()
        preamble = self.preamble_for(prefix, blend)
        results = []
        for text in documents:
            chunk = self.prompts.chunk_ids(text)
            self.prefiller.check_length(len(preamble) + len(chunk))
            key = self.chunks.chunk_key(preamble, chunk)
            cached = self.store.get(key) is not None
            if not cached:
                yield from self.chunks.precompute_steps(preamble, chunk)
            results.append(IngestResult(key=key, num_tokens=len(chunk), cached=cached))
            if on_document is not None:
                on_document(1)
        self.chunks.ensure_prefix(prefix)
        return results

    def ensure_prefix(self, prefix: tuple[int, ...]) -> None:
        with self.lock, torch.inference_mode():
            self.chunks.ensure_prefix(prefix)

    # --- adding work --------------------------------------------------------------------------

    def add_request(self, request: GenerateRequest, emit: Emit | None = None) -> Sequence:
        """Queue a generation; its events go to ``emit`` (or the sequence's outbox)."""
        return self._add(self._waiting, Sequence(request, emit))

    def submit(self, fn: Callable[[], Any] | None = None, *, slices=None,
               background: bool = False, emit: Emit | None = None) -> Task:
        """Queue a call (``fn``, run whole) or, in the background lane, ``slices`` (a generator
        run one slice per step while no live request waits)."""
        task = Task(fn=fn, slices=slices, emit=emit, background=background)
        return self._add(self._background if background else self._calls, task)

    def _add(self, queue: deque, item):
        with self.work_added:
            queue.append(item)
            self.work_added.notify_all()
        return item

    def abort(self, item: Sequence | Task) -> None:
        """Cancel a request or task wherever it is; it is dropped at the next step."""
        item.cancelled = True

    @property
    def num_waiting(self) -> int:
        return len(self._waiting) + len(self._calls) + len(self._prefilling)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_background(self) -> int:
        return len(self._background)

    def has_work(self) -> bool:
        return bool(self._waiting or self._calls or self._background or self._prefilling
                    or self._running or self._owed)

    # --- the step -----------------------------------------------------------------------------

    def step(self, max_batch_size: int | None = None) -> StepReport:
        """Advance every request and task one turn (see the module docstring)."""
        report = StepReport()
        limit = max_batch_size or self.config.max_batch_size
        with self.lock, torch.inference_mode():
            self.flush_store_writes()
            self._drop_cancelled()
            for _ in range(len(self._calls)):  # the calls waiting now (they are quick)
                with self.work_added:
                    task = self._calls.popleft()
                self._run_call(task)
            self._prefill_turn(limit, report)
            if self._running:
                self._decode(report)
            if self._background and not self._waiting and not self._prefilling:
                self._background_slice(report)
        return report

    def flush_store_writes(self) -> None:
        """Make the store writes owed by requests whose first token is out."""
        owed, self._owed = self._owed, []
        for write in owed:
            with self.lock, torch.inference_mode():
                write()

    def _drop_cancelled(self) -> None:
        with self.work_added:
            for queue in (self._waiting, self._calls, self._background):
                for item in [i for i in queue if i.cancelled]:
                    queue.remove(item)
                    if isinstance(item, Task) and item.slices is not None:
                        item.slices.close()
        for group in (self._prefilling, self._running):
            for seq in [s for s in group if s.cancelled]:
                group.remove(seq)
                seq.finish("error", InvalidRequestError("the request was cancelled"))

    def _run_call(self, task: Task) -> None:
        try:
            value = task.fn()
        except Exception as exc:  # noqa: BLE001 - the failure goes back to its caller
            task.send("error", exc)
            return
        task.send("done", value)

    def _background_slice(self, report: StepReport) -> None:
        """Background work, a layer at a time, until a live request arrives (or, while others
        decode, for a prefill's step budget)."""
        task = self._background[0]
        report.background = True
        _, seconds = self._prefill_budget()
        start = time.perf_counter()
        try:
            while True:
                next(task.slices)
                if self._waiting or self._calls or time.perf_counter() - start >= seconds:
                    return
        except StopIteration as done:
            task.send("done", done.value)
        except Exception as exc:  # noqa: BLE001
            task.send("error", exc)
        with self.work_added:
            self._background.remove(task)

    def _prefill_budget(self) -> tuple[float, float]:
        """(tokens, seconds) a prefill may use this step. Unbounded while nothing decodes;
        otherwise ``prefill_step_tokens`` and ``prefill_step_s`` (default: 3/4 of a decode
        step's time, so a running stream's inter-token latency stays under ~2x)."""
        if not self._running:
            return float("inf"), float("inf")
        seconds = self.config.prefill_step_s
        if seconds is None:
            seconds = 0.75 * (self._decode_s or 0.0)
        return self.config.prefill_step_tokens, seconds

    def _prefill_turn(self, limit: int, report: StepReport) -> None:
        """Admit waiting requests and advance prefills; bounded per step while others decode."""
        started = time.perf_counter()
        while True:
            if not self._prefilling:
                if not self._waiting or len(self._running) >= limit:
                    return
                with self.work_added:
                    seq = self._waiting.popleft() if self._waiting else None
                if seq is None:
                    return
                if not self.prefiller.start(seq, chunked=bool(self._running)):
                    continue
                self._prefilling.append(seq)
            seq = self._prefilling[0]
            tokens, seconds = self._prefill_budget()
            try:
                layer_start = time.perf_counter()
                while True:  # at least one layer per step: every prefill makes progress
                    report.prefill_tokens += next(seq.prefill) / self.runner.num_layers
                    now = time.perf_counter()
                    # Stop before a layer that would likely overrun the time budget.
                    if (report.prefill_tokens >= tokens
                            or now + (now - layer_start) - started > seconds):
                        break
                    layer_start = now
            except StopIteration as done:
                self._prefilling.pop(0)
                seq.prefill = None
                self._first_token(seq, done.value)
                continue
            except Exception as exc:
                log.exception("prefill failed")
                self._prefilling.pop(0)
                seq.finish("error", exc)
                continue
            return  # out of budget for this step

    def _first_token(self, seq: Sequence, logits: torch.Tensor) -> None:
        sampling = seq.request.sampling
        try:
            prompt_ids = seq.segments.ids if sampling.uses_prompt else None
            seq.sampler = Sampler(sampling, self.config.device, self.eos_ids, prompt_ids)
            seq.stopper = StopChecker(self.tokenizer, sampling, self.eos_ids)
            token = seq.sampler(logits)
        except Exception as exc:  # noqa: BLE001
            seq.finish("error", exc)
            return
        seq.first_logits = logits
        seq.first_token_at = time.perf_counter()
        seq.stats.ttft_s = seq.first_token_at - seq.started
        if seq.store_writes is not None:  # made at the next step: after this token is out
            self._owed.append(seq.store_writes)
            seq.store_writes = None
        seq.status = Status.RUNNING
        if self._advance(seq, token):
            self._running.append(seq)

    def _advance(self, seq: Sequence, token: int) -> bool:
        """Record a sampled token and send its text; True while the request goes on."""
        delta = seq.stopper.add(token)
        if delta:  # with the logprobs of the tokens since the last delta (None unless asked)
            logprobs = seq.sampler.logprobs
            new = None if logprobs is None else logprobs[seq.logprobs_sent :]
            seq.logprobs_sent = 0 if logprobs is None else len(logprobs)
            seq.send("delta", (delta, new))
        if seq.stopper.done or seq.kv.length >= seq.kv.capacity:
            stats = seq.stats
            stats.decode_s = time.perf_counter() - seq.first_token_at
            stats.completion_tokens = len(seq.stopper.tokens)
            seq.finish("done", seq.result())
            return False
        seq.next_token = token
        return True

    def _decode(self, report: StepReport) -> None:
        batch = self._running
        report.decoded = len(batch)
        start = time.perf_counter()
        try:
            logits = decode_step(self.runner, [s.kv for s in batch],
                                 [s.next_token for s in batch])  # (B, V)
            tokens = [seq.sampler(logits[row]) for row, seq in enumerate(batch)]
            elapsed = time.perf_counter() - start
            self._decode_s = elapsed if self._decode_s is None else \
                0.7 * self._decode_s + 0.3 * elapsed
        except Exception as exc:
            log.exception("decode step failed for %d requests", len(batch))
            for seq in batch:
                seq.finish("error", exc)
            self._running = []
            return
        self._running = [seq for seq, token in zip(batch, tokens) if self._advance(seq, token)]

    # --- the synchronous front: add, then step until done -------------------------------------

    def generate_iter(self, request: GenerateRequest) -> Iterator[tuple[str, GenerateResult | None]]:
        """Yields (text delta, None) as tokens are produced, then ("", GenerateResult)."""
        seq = self.add_request(request)
        try:
            while True:
                while seq.outbox:
                    kind, value = seq.outbox.popleft()
                    if kind == "delta":
                        yield value[0], None
                    elif kind == "done":
                        yield "", value
                        return
                    else:
                        raise value
                self.step()
        finally:
            if not seq.finished:
                self.abort(seq)
                with self.lock:
                    self._drop_cancelled()
            self.flush_store_writes()  # a caller that stopped reading still gets them stored

    def generate(self, request: GenerateRequest) -> GenerateResult:
        result = None
        for _, final in self.generate_iter(request):
            result = final or result
        assert result is not None
        return result

    def prefill(self, request: GenerateRequest) -> tuple[RequestKV, torch.Tensor, RequestStats]:
        """The fused prefill alone (no sampling): (request KV, last-position logits, stats). The
        store writes the request owes are made before it returns. Same code path as step()."""
        seq = Sequence(request)
        with self.lock, torch.inference_mode():
            if not self.prefiller.start(seq, chunked=False):
                raise seq.outbox[-1][1]
            logits = run_to_end(seq.prefill)
            if seq.store_writes is not None:
                seq.store_writes()
        return seq.kv, logits, seq.stats


def _eos_ids(tokenizer, model) -> set[int]:
    ids = set()
    for value in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    return ids
