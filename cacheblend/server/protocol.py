"""OpenAI wire schemas (pydantic, only at this edge) and cacheblend's extensions.

Extensions, all optional: ``documents`` (strings, ``{id, text}`` or ``{id}`` of an uploaded
document) and ``cacheblend`` (per-request ``method`` / ``ratio``) on requests; ``cacheblend``
(the request's stats) on responses. Types are strict: ``"5"`` is not an integer. Options this
server does not implement (``UNSUPPORTED``: tools, response_format, beam search, ...) are
refused by name unless they hold their no-op value; other unknown top-level fields are ignored,
as OpenAI-compatible servers do; unknown fields inside the extensions are refused, so a typo
there is not silently dropped.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from cacheblend.config import METHODS

Method = Literal[METHODS]  # type: ignore[valid-type]
DOCUMENT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
DocumentId = Annotated[str, StringConstraints(pattern=DOCUMENT_ID_PATTERN)]
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts
MAX_N = 16  # choices per request (n x prompts)
MAX_LOGPROBS = 20  # as vLLM's default max_logprobs

_TOOLS = "tool calling is not supported by this server"
_GUIDED = "structured output / guided decoding is not supported by this server"
_BEAM = "beam search is not supported by this server"
# Options an OpenAI or vLLM client may send that would change the answer, and the value each
# may hold because it changes nothing (None always may). Anything else is refused by name.
UNSUPPORTED: dict[str, tuple[str, tuple[Any, ...]]] = {
    "tools": (_TOOLS, ([],)),
    "tool_choice": (_TOOLS, ("none", "auto")),
    "functions": (_TOOLS, ([],)),
    "function_call": (_TOOLS, ("none", "auto")),
    "parallel_tool_calls": (_TOOLS, (True, False)),
    "tool_calls": (_TOOLS, ([],)),  # on a message
    "tool_call_id": (_TOOLS, ()),  # on a message
    "response_format": (_GUIDED, ({"type": "text"},)),
    "guided_json": (_GUIDED, ()),
    "guided_regex": (_GUIDED, ()),
    "guided_choice": (_GUIDED, ()),
    "guided_grammar": (_GUIDED, ()),
    "guided_decoding_backend": (_GUIDED, ()),
    "guided_whitespace_pattern": (_GUIDED, ()),
    "structured_outputs": (_GUIDED, ()),
    "use_beam_search": (_BEAM, (False,)),
    "length_penalty": (_BEAM, (1.0, 1)),
    "early_stopping": (_BEAM, (False,)),
    "prompt_logprobs": ("prompt_logprobs is not supported", ()),
    "min_p": ("min_p is not supported; use top_p or top_k", (0, 0.0)),
    "stop_token_ids": ("stop_token_ids is not supported; use stop strings", ([],)),
    "bad_words": ("bad_words is not supported; use logit_bias", ([],)),
    "allowed_token_ids": ("allowed_token_ids is not supported; use logit_bias", ()),
    "ignore_eos": ("ignore_eos is not supported; use min_tokens", (False,)),
    "include_stop_str_in_output": ("include_stop_str_in_output is not supported", (False,)),
    "skip_special_tokens": ("skip_special_tokens=false is not supported", (True,)),
    "spaces_between_special_tokens": ("spaces_between_special_tokens is not supported", (True,)),
    "truncate_prompt_tokens": ("truncate_prompt_tokens is not supported", ()),
    "echo": ("echo is not supported", (False,)),
    "suffix": ("suffix (insertion) is not supported", ("",)),
    "add_generation_prompt": ("add_generation_prompt=false is not supported", (True,)),
    "continue_final_message": ("continue_final_message is not supported", (False,)),
    "chat_template": ("a per-request chat_template is not supported", ()),
    "chat_template_kwargs": ("chat_template_kwargs is not supported", ({},)),
    "return_tokens_as_token_ids": ("return_tokens_as_token_ids is not supported", (False,)),
    "logits_processors": ("logits_processors are not supported", ([],)),
    "audio": ("audio output is not supported", ()),
    "modalities": ("only text output is supported", (["text"],)),
    "prediction": ("predicted outputs are not supported", ()),
    "web_search_options": ("web search is not supported", ()),
    "reasoning_effort": ("reasoning_effort is not supported", ()),
}
# Known fields that do not change the answer: accepted and ignored.
IGNORED = ("user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier",
           "request_id", "priority")


def unsupported_options(fields: dict[str, Any]) -> list[tuple[str, str]]:
    """(field, why) for each field of ``fields`` that asks for something not implemented."""
    found = []
    for name, value in fields.items():
        if name in UNSUPPORTED and value is not None:
            why, no_op = UNSUPPORTED[name]
            if value not in no_op:
                found.append((name, why))
    return found


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")


class _Open(_Strict):
    """A request object whose unknown fields are kept (``model_extra``), so the ones naming an
    unsupported option can be refused."""

    model_config = ConfigDict(extra="allow")


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


class _Sampling(_Open):
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, description="extension: 0 = off")
    min_tokens: int | None = Field(None, ge=0, description="extension (as vLLM): no EOS before")
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=MAX_N, description=f"choices per prompt (at most {MAX_N})")
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(
        None, gt=0.0, description="extension (as vLLM): 1 = off; over prompt and output"
    )
    logit_bias: dict[str, float] | None = Field(
        None, description="token id (as a string) -> bias in [-100, 100]"
    )
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


class ChatMessage(_Open):
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
    logprobs: bool | None = Field(None, description="each output token's logprob")
    top_logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS, description="with logprobs: the k most likely tokens"
    )


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="a string, token ids, or a batch: a list of strings or of token-id lists"
    )
    logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS, description="each output token's logprob and the top k"
    )
    best_of: int | None = Field(None, ge=1, description="only best_of = n is supported")


# --- responses -------------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int  # prompt tokens whose KV came from the cache (reused_tokens)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


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


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprobOut(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprobOut] | None


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    finish_reason: str | None
    logprobs: ChatLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    cacheblend: Stats


class CompletionLogprobs(BaseModel):
    text_offset: list[int]
    token_logprobs: list[float | None]
    tokens: list[str]
    top_logprobs: list[dict[str, float] | None]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None


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


class DocumentDetail(DocumentInfo):
    text: str


class DocumentDeleted(BaseModel):
    id: str
    object: Literal["document"] = "document"
    deleted: bool = True


class Health(BaseModel):
    status: Literal["ok", "degraded", "draining"]
    model: str
    queue_length: int
    running: int
    problems: list[str] = Field(default_factory=list, description="why it is degraded")


# --- tokenizer endpoints (vLLM's shapes) -------------------------------------------------------


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = False  # the chat template or text as given, no BOS added
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either prompt or messages")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


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
TokenizeRequest.model_rebuild()
