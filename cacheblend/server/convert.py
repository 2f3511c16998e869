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

from cacheblend.decode import SamplingParams
from cacheblend.engine import Engine, GenerateRequest, GenerateResult
from cacheblend.errors import CacheBlendError, InvalidRequestError
from cacheblend.prompt import Segments
from cacheblend.server.errors import ApiError
from cacheblend.server.protocol import ChatCompletionRequest, CompletionRequest, _Sampling
from cacheblend.server.settings import ServerSettings

Prepare = Callable[[], GenerateRequest]


def sampling_params(
    body: _Sampling, settings: ServerSettings, engine: Engine, max_tokens: int | None
) -> SamplingParams:
    if max_tokens is None:
        max_tokens = min(
            settings.default_max_tokens or engine.config.max_new_tokens, settings.max_tokens_limit
        )
    if max_tokens > settings.max_tokens_limit:
        raise ApiError(
            400,
            f"max_tokens is {max_tokens}; this server allows at most {settings.max_tokens_limit}",
            param="max_tokens",
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
        )
    except InvalidRequestError as exc:
        raise ApiError(400, str(exc), code="invalid_value") from exc


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
) -> Prepare:
    messages = [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        for m in body.messages
    ]
    if not any(m["role"] == "user" for m in messages):
        raise ApiError(
            400, "messages must include a user message", param="messages", code="invalid_value"
        )
    separator = settings.separator
    split = bool(separator) and any(separator in m["content"] for m in messages)
    _one_document_source(split, documents)
    method, ratio = fusion_options(body, settings)
    sampling = sampling_params(
        body, settings, engine, body.max_completion_tokens or body.max_tokens
    )
    def build() -> Segments:
        if split:
            return engine.prompts.split_by_separator(engine.prompts.render(messages), separator)
        return engine.chat_segments(messages, documents)

    def prepare() -> GenerateRequest:
        return GenerateRequest(
            segments=_guard(build), method=method, ratio=ratio, sampling=sampling
        )

    return prepare


def prepare_completion(
    engine: Engine, settings: ServerSettings, body: CompletionRequest, documents: list[str]
) -> Prepare:
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise ApiError(
                400,
                f"prompt holds {len(prompt)} prompts; send one per request",
                param="prompt",
                code="invalid_value",
            )
        prompt = prompt[0]
    if isinstance(prompt, list):
        if not prompt:
            raise ApiError(400, "prompt is empty", param="prompt", code="invalid_value")
        vocab = engine.runner.vocab_size
        if any(not 0 <= t < vocab for t in prompt):
            raise ApiError(
                400,
                f"prompt token ids must lie in [0, {vocab})",
                param="prompt",
                code="invalid_value",
            )
        if documents:
            raise ApiError(
                400,
                "documents need a text prompt, not token ids",
                param="documents",
                code="invalid_value",
            )
    separator = settings.separator
    split = isinstance(prompt, str) and bool(separator) and separator in prompt
    _one_document_source(split, documents)
    method, ratio = fusion_options(body, settings)
    sampling = sampling_params(body, settings, engine, body.max_tokens)
    prompts = engine.prompts

    def prepare() -> GenerateRequest:
        common = {"method": method, "ratio": ratio, "sampling": sampling}
        if isinstance(prompt, list):
            return GenerateRequest(segments=Segments((), (), tuple(prompt)), **common)
        if documents:
            return GenerateRequest(question=prompt, documents=documents, **common)
        if split:
            return GenerateRequest(
                segments=_guard(lambda: prompts.split_by_separator(prompt, separator)), **common
            )
        return GenerateRequest(segments=Segments((), (), prompts.template_ids(prompt)), **common)

    return prepare


# --- responses -------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(result: GenerateResult) -> dict:
    prompt, completion = result.stats.prompt_tokens, result.stats.completion_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def stats(result: GenerateResult, queue_s: float) -> dict:
    return {**result.stats.to_dict(), "queue_s": queue_s}


def chat_response(result: GenerateResult, queue_s: float, model: str) -> dict:
    return {
        "id": new_id("chatcmpl"),
        "object": "chat.completion",
        "created": now(),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result.text},
                "finish_reason": result.finish_reason,
                "logprobs": None,
            }
        ],
        "usage": usage(result),
        "cacheblend": stats(result, queue_s),
    }


def completion_response(result: GenerateResult, queue_s: float, model: str) -> dict:
    return {
        "id": new_id("cmpl"),
        "object": "text_completion",
        "created": now(),
        "model": model,
        "choices": [
            {
                "index": 0,
                "text": result.text,
                "finish_reason": result.finish_reason,
                "logprobs": None,
            }
        ],
        "usage": usage(result),
        "cacheblend": stats(result, queue_s),
    }


class ChunkMaker:
    """Server-sent event payloads of one streamed response (chat or completion)."""

    def __init__(self, chat: bool, model: str, include_usage: bool) -> None:
        self.chat = chat
        self.model = model
        self.include_usage = include_usage
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = now()

    def _chunk(self, choice: dict | None, **extra) -> dict:
        return {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice] if choice is not None else [],
            **extra,
        }

    def opening(self) -> list[dict]:
        if not self.chat:
            return []
        return [
            self._chunk(
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": ""},
                    "finish_reason": None,
                    "logprobs": None,
                }
            )
        ]

    def delta(self, text: str) -> dict:
        if self.chat:
            choice = {
                "index": 0,
                "delta": {"content": text},
                "finish_reason": None,
                "logprobs": None,
            }
        else:
            choice = {"index": 0, "text": text, "finish_reason": None, "logprobs": None}
        return self._chunk(choice)

    def closing(self, result: GenerateResult, queue_s: float) -> list[dict]:
        if self.chat:
            choice = {
                "index": 0,
                "delta": {},
                "finish_reason": result.finish_reason,
                "logprobs": None,
            }
        else:
            choice = {
                "index": 0,
                "text": "",
                "finish_reason": result.finish_reason,
                "logprobs": None,
            }
        chunks = [self._chunk(choice, cacheblend=stats(result, queue_s))]
        if self.include_usage:
            chunks.append(self._chunk(None, usage=usage(result)))
        return chunks


def _one_document_source(split: bool, documents) -> None:
    """Documents come from the ``documents`` field or from separator-split text, not both."""
    if split and documents:
        raise ApiError(
            400,
            "use either documents or the separator, not both",
            param="documents",
            code="invalid_value",
        )
