"""OpenAI wire schemas (pydantic, only at this edge) and cacheblend's extensions.

Extensions, all optional: ``documents`` (strings, ``{id, text}`` or ``{id}`` of an uploaded
document) and ``cacheblend`` (per-request ``method`` / ``ratio``) on requests; ``cacheblend``
(the request's stats) on responses. Types are strict: ``"5"`` is not an integer. Unknown
top-level fields are ignored, as OpenAI-compatible servers do; unknown fields inside the
extensions are refused, so a typo there is not silently dropped.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from cacheblend.config import METHODS

Method = Literal[METHODS]  # type: ignore[valid-type]
DOCUMENT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
DocumentId = Annotated[str, StringConstraints(pattern=DOCUMENT_ID_PATTERN)]
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")


class _Closed(_Strict):
    model_config = ConfigDict(extra="forbid")


# --- extensions ------------------------------------------------------------------------------


class CacheBlendOptions(_Closed):
    """Per-request fusion options; the server's defaults fill what is left out."""

    method: Method | None = None
    ratio: float | None = Field(None, ge=0.0, le=1.0, description="blend recompute ratio")


class DocumentRef(_Closed):
    """A document by text (``id`` optional: the text is then also registered under it), or by
    the ``id`` of a document uploaded before."""

    id: DocumentId | None = None
    text: str | None = None

    @model_validator(mode="after")
    def _id_or_text(self) -> DocumentRef:
        if self.id is None and self.text is None:
            raise ValueError("a document needs an id or a text")
        return self


Document = str | DocumentRef


class _Sampling(_Strict):
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, description="extension: 0 = off")
    min_tokens: int | None = Field(None, ge=0, description="extension (as vLLM): no EOS before")
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=1, description="only 1 is supported")
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=0.0, le=0.0, description="only 0")
    frequency_penalty: float | None = Field(None, ge=0.0, le=0.0, description="only 0")
    user: str | None = None
    documents: list[Document] | None = None
    cacheblend: CacheBlendOptions | None = None

    @model_validator(mode="after")
    def _check_stop(self) -> _Sampling:
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop must be up to 4 non-empty strings")
        return self

    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class StreamOptions(_Strict):
    include_usage: bool = False


# --- chat ------------------------------------------------------------------------------------


class TextPart(_Closed):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = Field(None, description="not supported: only false")


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] = Field(
        description="one prompt: a string, a list of one string, or token ids"
    )
    echo: bool = Field(False, description="not supported: only false")
    logprobs: int | None = Field(None, ge=0, le=0, description="not supported")
    suffix: str | None = Field(None, max_length=0, description="not supported")
    best_of: int | None = Field(None, ge=1, le=1, description="only 1 is supported")


# --- responses -------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Stats(BaseModel):
    """``RequestStats`` of the engine plus the time the request waited in the queue."""

    model_config = ConfigDict(extra="allow")

    method: str
    ratio: float | None
    prompt_tokens: int
    reused_tokens: int
    recomputed_tokens: int
    computed_tokens: int
    missed_tokens: int
    ttft_s: float
    queue_s: float


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    finish_reason: str | None
    logprobs: None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    cacheblend: Stats


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    cacheblend: Stats


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "cacheblend"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# --- documents -------------------------------------------------------------------------------


class UploadDocument(_Closed):
    id: DocumentId | None = None
    text: str


class DocumentUpload(_Closed):
    documents: list[str | UploadDocument] = Field(min_length=1)


class DocumentInfo(BaseModel):
    id: str
    object: Literal["document"] = "document"
    num_tokens: int
    cached: bool  # its KV was in the store already


class DocumentList(BaseModel):
    object: Literal["list"] = "list"
    data: list[DocumentInfo]


class DocumentDeleted(BaseModel):
    id: str
    object: Literal["document"] = "document"
    deleted: bool = True


class Health(BaseModel):
    status: Literal["ok", "draining"]
    model: str
    queue_length: int
    running: int


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


_Sampling.model_rebuild()
ChatCompletionRequest.model_rebuild()
CompletionRequest.model_rebuild()
