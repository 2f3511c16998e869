"""Wire requests -> engine requests, engine results -> wire responses.

Where documents go: with ``documents``, a chat request becomes ``system | instruction |
documents | question``: the engine's system prompt is added when the conversation has none and
its instruction opens the last user message, so the prefix is the one ``POST /v1/documents``
precomputes chunks after (their entries are then hits). A completion with documents is the
engine's RAG prompt with the prompt as the question. In separator mode (a configured string in
the prompt) the rendered text is split at the separator, LMCache-style, each piece tokenized
alone. Anything that tokenizes runs in the scheduler's worker thread (``prepare``).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace

from cacheblend.decode import SamplingParams, TokenLogprob
from cacheblend.engine import Engine, GenerateRequest, GenerateResult
from cacheblend.errors import CacheBlendError, InvalidRequestError
from cacheblend.prompt import Segments
from cacheblend.server.errors import ApiError
from cacheblend.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    _Sampling,
    unsupported_options,
)
from cacheblend.server.settings import ServerSettings

Prepare = Callable[[], GenerateRequest]


def sampling_params(
    body: _Sampling,
    settings: ServerSettings,
    engine: Engine,
    max_tokens: int | None,
    logprobs: int | None = None,
) -> SamplingParams:
    """The request's sampling values (``seed`` is set per choice by ``with_seed``)."""
    param = "max_tokens"
    if max_tokens is None:
        max_tokens = default_max_tokens(settings, engine)
    if max_tokens > settings.max_tokens_limit:
        raise ApiError(
            400,
            f"max_tokens is {max_tokens}; this server allows at most {settings.max_tokens_limit}",
            param=param,
            code="invalid_value",
        )
    if (body.min_tokens or 0) > max_tokens:
        raise ApiError(400, f"min_tokens ({body.min_tokens}) exceeds max_tokens ({max_tokens})",
                       param="min_tokens", code="invalid_value")
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=0.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=body.top_k or 0,
            seed=body.seed,
            stop=body.stop_strings(),
            min_tokens=body.min_tokens or 0,
            logprobs=logprobs,
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
            logit_bias=logit_bias(body.logit_bias, engine.runner.vocab_size),
        )
    except InvalidRequestError as exc:
        raise ApiError(400, str(exc), code="invalid_value") from exc


def default_max_tokens(settings: ServerSettings, engine: Engine) -> int:
    return min(
        settings.default_max_tokens or engine.config.max_new_tokens, settings.max_tokens_limit
    )


def logit_bias(bias: dict[str, float] | None, vocab_size: int) -> dict[int, float]:
    """OpenAI's ``{"token id": bias}`` -> ``{id: bias}``, every id checked against the vocab."""
    out = {}
    for key, value in (bias or {}).items():
        if not (key.isascii() and key.isdigit()) or int(key) >= vocab_size:
            raise ApiError(
                400,
                f"logit_bias key {key!r} is not a token id; keys are ids in [0, {vocab_size}) "
                "written as strings, e.g. {\"1234\": -100}",
                param="logit_bias",
                code="invalid_value",
            )
        if not -100.0 <= value <= 100.0:
            raise ApiError(
                400,
                f"logit_bias[{key!r}] is {value}; biases lie in [-100, 100]",
                param="logit_bias",
                code="invalid_value",
            )
        out[int(key)] = float(value)
    return out


def with_seed(sampling: SamplingParams, index: int) -> SamplingParams:
    """Choice ``index``'s params: seed + index when a seed is given (choices differ, runs
    repeat)."""
    if index == 0 or sampling.seed is None:
        return sampling
    seed = sampling.seed + index
    return replace(sampling, seed=seed if seed < 2**64 else sampling.seed - index)


def fusion_options(body: _Sampling, settings: ServerSettings) -> tuple[str | None, float | None]:
    options = body.cacheblend
    method = options.method if options and options.method else settings.default_method
    ratio = options.ratio if options and options.ratio is not None else settings.default_ratio
    return method, ratio


def _guard(build: Callable[[], Segments | GenerateRequest]):
    """Template and split failures are the request's fault: make them 400s."""
    try:
        return build()
    except CacheBlendError:
        raise
    except Exception as exc:  # jinja2 TemplateError, ValueError, ...
        raise InvalidRequestError(f"cannot build the prompt: {exc}") from exc


def prepare_chat(
    engine: Engine, settings: ServerSettings, body: ChatCompletionRequest, documents: list[str]
) -> list[Prepare]:
    """One ``Prepare`` per choice (``n``)."""
    for index, message in enumerate(body.messages):
        refuse_unsupported(message.model_extra or {}, f"messages[{index}].")
    messages = [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        for m in body.messages
    ]
    if not any(m["role"] == "user" for m in messages):
        raise ApiError(
            400, "messages must include a user message", param="messages", code="invalid_value"
        )
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(
            400,
            "top_logprobs needs logprobs: true",
            param="top_logprobs",
            code="invalid_value",
        )
    separator = settings.separator
    split = bool(separator) and any(separator in m["content"] for m in messages)
    _one_document_source(split, documents)
    method, ratio = fusion_options(body, settings)
    sampling = sampling_params(
        body,
        settings,
        engine,
        body.max_completion_tokens or body.max_tokens,
        (body.top_logprobs or 0) if body.logprobs else None,
    )
    def build() -> Segments:
        if split:
            return engine.prompts.split_by_separator(engine.prompts.render(messages), separator)
        return engine.chat_segments(messages, documents)

    def prepare(choice: SamplingParams) -> Prepare:
        return lambda: GenerateRequest(
            segments=_guard(build), method=method, ratio=ratio, sampling=choice
        )

    return [prepare(with_seed(sampling, i)) for i in range(body.n)]


def completion_prompts(engine: Engine, body: CompletionRequest) -> list[str | list[int]]:
    """The request's prompts: one string, one list of ids, or a batch of either."""
    prompt = body.prompt
    if isinstance(prompt, str):
        batch: list = [prompt]
    elif prompt and isinstance(prompt[0], str | list):
        batch = list(prompt)
    else:
        batch = [prompt]
    if not batch:
        raise ApiError(400, "prompt is an empty list", param="prompt", code="invalid_value")
    vocab = engine.runner.vocab_size
    for index, item in enumerate(batch):
        param = "prompt" if len(batch) == 1 else f"prompt[{index}]"
        if isinstance(item, list):
            if not item:
                raise ApiError(400, f"{param} is empty", param=param, code="invalid_value")
            if any(not 0 <= t < vocab for t in item):
                raise ApiError(
                    400,
                    f"{param}: token ids must lie in [0, {vocab})",
                    param=param,
                    code="invalid_value",
                )
    return batch


def prepare_completion(
    engine: Engine, settings: ServerSettings, body: CompletionRequest, documents: list[str]
) -> list[tuple[int, Prepare]]:
    """(prompt index, Prepare) per choice: ``n`` for each prompt, in vLLM's order."""
    if body.best_of is not None and body.best_of != body.n:
        raise ApiError(
            400,
            f"best_of={body.best_of} is not supported; leave it out or set it to n ({body.n})",
            param="best_of",
            code="unsupported",
        )
    batch = completion_prompts(engine, body)
    if len(batch) * body.n > settings.max_choices:
        raise ApiError(
            400,
            f"{len(batch)} prompts x n={body.n} is {len(batch) * body.n} choices; at most "
            f"{settings.max_choices} per request",
            param="n",
            code="invalid_value",
        )
    if documents and any(isinstance(p, list) for p in batch):
        raise ApiError(
            400,
            "documents need a text prompt, not token ids",
            param="documents",
            code="invalid_value",
        )
    separator = settings.separator
    for prompt in batch:
        _one_document_source(
            isinstance(prompt, str) and bool(separator) and separator in prompt, documents
        )
    method, ratio = fusion_options(body, settings)
    sampling = sampling_params(body, settings, engine, body.max_tokens, body.logprobs)
    prompts = engine.prompts

    def prepare(prompt: str | list[int], choice: SamplingParams) -> Prepare:
        common = {"method": method, "ratio": ratio, "sampling": choice}

        def build() -> GenerateRequest:
            if isinstance(prompt, list):
                return GenerateRequest(segments=Segments((), (), tuple(prompt)), **common)
            if documents:
                return GenerateRequest(question=prompt, documents=documents, **common)
            if separator and separator in prompt:
                return GenerateRequest(
                    segments=_guard(lambda: prompts.split_by_separator(prompt, separator)),
                    **common,
                )
            if not prompt:
                raise InvalidRequestError("the prompt is empty")
            return GenerateRequest(segments=Segments((), (), prompts.template_ids(prompt)),
                                   **common)

        return build

    return [
        (index, prepare(prompt, with_seed(sampling, i)))
        for index, prompt in enumerate(batch)
        for i in range(body.n)
    ]


def refuse_unsupported(fields: dict, prefix: str = "") -> None:
    """400 naming the first option this server does not implement (see ``UNSUPPORTED``)."""
    found = unsupported_options(fields)
    if found:
        name, why = found[0]
        raise ApiError(
            400,
            f"{prefix}{name}: {why}; remove it from the request",
            param=f"{prefix}{name}",
            code="unsupported",
        )


# --- responses -------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


@dataclass
class Outcome:
    """One choice's result, the prompt it answers and the time it waited in the queue."""

    result: GenerateResult
    queue_s: float
    prompt_index: int = 0


def usage(outcomes: list[Outcome]) -> dict:
    """Prompt tokens once per prompt (not per choice), completion tokens of every choice;
    ``cached_tokens``: prompt tokens whose KV came from the cache (``reused_tokens``)."""
    first: dict[int, GenerateResult] = {}
    for outcome in outcomes:
        first.setdefault(outcome.prompt_index, outcome.result)
    prompt = sum(r.stats.prompt_tokens for r in first.values())
    cached = sum(r.stats.reused_tokens for r in first.values())
    completion = sum(o.result.stats.completion_tokens for o in outcomes)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def stats(result: GenerateResult, queue_s: float) -> dict:
    return {**result.stats.to_dict(), "queue_s": queue_s}


def all_stats(outcomes: list[Outcome]) -> dict:
    """The first choice's stats; with several choices, every choice's under ``choices``."""
    first = stats(outcomes[0].result, outcomes[0].queue_s)
    if len(outcomes) > 1:
        first["choices"] = [stats(o.result, o.queue_s) for o in outcomes]
    return first


def output_logprobs(result: GenerateResult) -> list[TokenLogprob]:
    """Entries of the output tokens (an end-of-sequence token is sampled but not output)."""
    return (result.logprobs or [])[: len(result.token_ids)]


class TokenText:
    """Every token id's text and bytes, decoded once (in the worker thread: the tokenizer is
    only used there), so responses can name tokens from any thread."""

    def __init__(self, tokenizer, vocab_size: int) -> None:
        self.texts = tokenizer.batch_decode([[i] for i in range(vocab_size)])
        byte_of = {c: b for b, c in _bytes_to_unicode().items()}
        pieces = tokenizer.convert_ids_to_tokens(list(range(vocab_size)))
        self.bytes = []
        for text, piece in zip(self.texts, pieces):
            if piece is not None and piece and all(c in byte_of for c in piece):
                self.bytes.append(list(bytes(byte_of[c] for c in piece)))  # byte-level BPE
            else:
                self.bytes.append(list(text.encode()))

    def chat_entry(self, token: int, logprob: float) -> dict:
        return {"token": self.texts[token], "logprob": logprob, "bytes": self.bytes[token]}

    def chat(self, entries: list[TokenLogprob]) -> dict:
        """OpenAI chat ``logprobs``: ``{"content": [{token, logprob, bytes, top_logprobs}]}``."""
        return {
            "content": [
                {
                    **self.chat_entry(e.token, e.logprob),
                    "top_logprobs": [self.chat_entry(t, lp) for t, lp in e.top],
                }
                for e in entries
            ]
        }

    def completion(self, entries: list[TokenLogprob], offset: int = 0) -> dict:
        """OpenAI completion ``logprobs``; ``top_logprobs`` holds the top k and the sampled
        token (as vLLM); ``text_offset`` counts from ``offset``."""
        offsets, tokens = [], []
        for entry in entries:
            offsets.append(offset)
            tokens.append(self.texts[entry.token])
            offset += len(tokens[-1])
        return {
            "text_offset": offsets,
            "token_logprobs": [e.logprob for e in entries],
            "tokens": tokens,
            "top_logprobs": [
                {self.texts[t]: lp for t, lp in [*e.top, (e.token, e.logprob)]} for e in entries
            ],
        }


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map used by byte-level BPE vocabularies."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in keep:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return chars


def chat_response(
    outcomes: list[Outcome], model: str, response_id: str, texts: TokenText | None
) -> dict:
    return _response(outcomes, model, response_id, texts, chat=True)


def completion_response(
    outcomes: list[Outcome], model: str, response_id: str, texts: TokenText | None
) -> dict:
    return _response(outcomes, model, response_id, texts, chat=False)


def _response(outcomes: list[Outcome], model: str, response_id: str, texts: TokenText | None,
              chat: bool) -> dict:
    """A whole (non-streamed) chat.completion or text_completion body."""
    choices = []
    for index, outcome in enumerate(outcomes):
        result = outcome.result
        logprobs = None
        if texts is not None and result.logprobs is not None:
            entries = output_logprobs(result)
            logprobs = texts.chat(entries) if chat else texts.completion(entries)
        choice = {"index": index, "finish_reason": result.finish_reason, "logprobs": logprobs}
        if chat:
            choice["message"] = {"role": "assistant", "content": result.text}
        else:
            choice["text"] = result.text
        choices.append(choice)
    return {
        "id": response_id,
        "object": "chat.completion" if chat else "text_completion",
        "created": now(),
        "model": model,
        "choices": choices,
        "usage": usage(outcomes),
        "cacheblend": all_stats(outcomes),
    }


class ChunkMaker:
    """Server-sent event payloads of one streamed response (chat or completion), any number of
    choices; each choice's logprobs go out with its text."""

    def __init__(
        self,
        chat: bool,
        model: str,
        include_usage: bool,
        response_id: str,
        texts: TokenText | None = None,
    ) -> None:
        self.chat = chat
        self.model = model
        self.include_usage = include_usage
        self.id = response_id
        self.texts = texts
        self.created = now()
        self.sent: dict[int, int] = {}  # choice -> logprob entries sent
        self.offsets: dict[int, int] = {}  # choice -> text length sent (completion offsets)

    def _chunk(self, choice: dict | None, **extra) -> dict:
        return {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice] if choice is not None else [],
            **extra,
        }

    def _logprobs(self, index: int, entries: list[TokenLogprob] | None) -> dict | None:
        if self.texts is None or entries is None:
            return None
        self.sent[index] = self.sent.get(index, 0) + len(entries)
        if self.chat:
            return self.texts.chat(entries)
        return self.texts.completion(entries, self.offsets.get(index, 0))

    def opening(self, choices: int) -> list[dict]:
        if not self.chat:
            return []
        return [
            self._chunk(
                {
                    "index": index,
                    "delta": {"role": "assistant", "content": ""},
                    "finish_reason": None,
                    "logprobs": None,
                }
            )
            for index in range(choices)
        ]

    def delta(self, index: int, text: str, entries: list[TokenLogprob] | None = None) -> dict:
        logprobs = self._logprobs(index, entries)
        self.offsets[index] = self.offsets.get(index, 0) + len(text)
        if self.chat:
            choice = {
                "index": index,
                "delta": {"content": text},
                "finish_reason": None,
                "logprobs": logprobs,
            }
        else:
            choice = {"index": index, "text": text, "finish_reason": None, "logprobs": logprobs}
        return self._chunk(choice)

    def closing(self, index: int, outcome: Outcome) -> dict:
        """The choice's last chunk: finish_reason, the logprobs not sent yet, its stats."""
        result = outcome.result
        rest = None
        if result.logprobs is not None:
            rest = output_logprobs(result)[self.sent.get(index, 0) :]
        logprobs = self._logprobs(index, rest) if rest else None
        if self.chat:
            choice = {
                "index": index,
                "delta": {},
                "finish_reason": result.finish_reason,
                "logprobs": logprobs,
            }
        else:
            choice = {
                "index": index,
                "text": "",
                "finish_reason": result.finish_reason,
                "logprobs": logprobs,
            }
        return self._chunk(choice, cacheblend=stats(result, outcome.queue_s))

    def final(self, outcomes: list[Outcome]) -> list[dict]:
        return [self._chunk(None, usage=usage(outcomes))] if self.include_usage else []


def _one_document_source(split: bool, documents) -> None:
    """Documents come from the ``documents`` field or from separator-split text, not both."""
    if split and documents:
        raise ApiError(
            400,
            "use either documents or the separator, not both",
            param="documents",
            code="invalid_value",
        )
