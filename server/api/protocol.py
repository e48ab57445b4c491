"""Pydantic models of the HTTP API: they validate requests and generate /openapi.json.

OpenAI-compatible bodies (completions, chat) plus the native /generate form. Field limits
live here so that the OpenAPI document states exactly what the server accepts.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from server.api.sglang_fields import RouterChatFields, RouterCompletionFields, RouterGenerateFields

FinishReasonName = Literal["stop", "length", "abort"]
MAX_STOP_STRINGS = 16
MAX_TOP_LOGPROBS = 20


def _integral_number(value: object) -> object:
    """JSON Schema counts 5.0 as an integer: accept it as 5 (strings stay rejected)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def json_int(**constraints: int) -> object:
    """An int field type; the constraints sit inside so the OpenAPI schema shows them."""
    return Annotated[int, Field(**constraints), BeforeValidator(_integral_number)]


NonEmptyStr = Annotated[str, Field(min_length=1)]
TokenIds = Annotated[list[json_int(ge=0)], Field(min_length=1)]
StopField = NonEmptyStr | Annotated[list[NonEmptyStr], Field(max_length=MAX_STOP_STRINGS)] | None


class _Strict(BaseModel):
    """Unknown fields are refused (a 400 naming them: no field is silently ignored), known
    ones are type-checked strictly."""

    model_config = ConfigDict(extra="forbid", strict=True)


# OpenAI request fields attnserve knows of but does not implement: a 400 that says so.
UNIMPLEMENTED_FIELDS = frozenset({
    "tools", "tool_choice", "functions", "function_call", "parallel_tool_calls", "suffix",
    "audio", "modalities", "prediction", "reasoning_effort", "store", "metadata",
    "service_tier", "web_search_options", "guided_json", "guided_regex", "guided_choice",
    "guided_grammar", "structured_outputs",
})


class ResponseFormat(_Strict):
    type: Literal["text"] = Field(description='only {"type": "text"} is implemented')


class StreamOptions(_Strict):
    include_usage: bool = False


class SamplingFields(_Strict):
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: json_int(ge=-1) = Field(0, description="0 or -1: disabled")
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    seed: json_int(ge=0, le=2**63 - 1) | None = None
    stop: StopField = None
    stop_token_ids: list[json_int(ge=0)] = Field(default_factory=list, max_length=64)
    ignore_eos: bool = False
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    logit_bias: dict[str, float] | None = Field(
        None, description="token id (as a string) -> bias added to its logit, in [-100, 100]")
    min_tokens: json_int(ge=0) = 0
    n: json_int(ge=1) = 1

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class OpenAIFields(SamplingFields):
    model: str | None = Field(None, description="the served model name; omitted = the only one")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    response_format: ResponseFormat | None = None

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> OpenAIFields:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options can only be set when stream is true")
        return self


PromptField = (
    Annotated[str, Field(min_length=1)]
    | Annotated[list[NonEmptyStr], Field(min_length=1)]
    | TokenIds
    | Annotated[list[TokenIds], Field(min_length=1)]
)


class CompletionRequest(OpenAIFields, RouterCompletionFields):
    prompt: PromptField
    max_tokens: json_int(ge=1) = 16
    logprobs: json_int(ge=0, le=MAX_TOP_LOGPROBS) | None = None
    echo: bool = Field(False, description="prepend the prompt to each choice's text")
    best_of: json_int(ge=1) | None = Field(
        None, description="candidates per prompt; the n with the highest cumulative logprob "
                          "are returned (not with stream)")

    def prompt_list(self) -> list[str] | list[list[int]]:
        """The prompts as a list: texts or token-id lists."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [p]  # type: ignore[list-item]
        return p  # type: ignore[return-value]


class TextContentPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    name: str | None = None
    content: str | Annotated[list[TextContentPart], Field(min_length=1)]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(OpenAIFields, RouterChatFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: json_int(ge=1) | None = Field(
        None, description="deprecated alias of max_completion_tokens"
    )
    max_completion_tokens: json_int(ge=1) | None = Field(
        None, description="omitted: up to the model's context length"
    )
    logprobs: bool = False
    top_logprobs: json_int(ge=0, le=MAX_TOP_LOGPROBS) | None = None

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs can only be set when logprobs is true")
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens


class NativeSamplingParams(SamplingFields):
    """attnserve's names, and SGLang's where they differ (max_new_tokens, min_new_tokens)."""

    max_tokens: json_int(ge=1) | None = None
    max_new_tokens: json_int(ge=1) | None = Field(None, description="SGLang's max_tokens")
    min_new_tokens: json_int(ge=0) | None = Field(None, description="SGLang's min_tokens")
    logprobs: json_int(ge=0, le=MAX_TOP_LOGPROBS) | None = None

    @model_validator(mode="after")
    def _one_length_name(self) -> NativeSamplingParams:
        if self.max_tokens is not None and self.max_new_tokens is not None:
            raise ValueError("give max_tokens or max_new_tokens, not both")
        if self.min_new_tokens is not None and self.min_tokens:
            raise ValueError("give min_tokens or min_new_tokens, not both")
        return self

    def length_limit(self) -> int:
        limit = self.max_tokens if self.max_tokens is not None else self.max_new_tokens
        return 16 if limit is None else limit

    def min_length(self) -> int:
        return self.min_new_tokens if self.min_new_tokens is not None else self.min_tokens


class GenerateRequest(_Strict, RouterGenerateFields):
    text: NonEmptyStr | None = Field(None, description="prompt text (no chat template applied)")
    input_ids: TokenIds | None = Field(None, description="prompt token ids")
    sampling_params: NativeSamplingParams = Field(default_factory=NativeSamplingParams)
    stream: bool = False

    @model_validator(mode="after")
    def _exactly_one_prompt(self) -> GenerateRequest:
        if (self.text is None) == (self.input_ids is None):
            raise ValueError("give exactly one of text or input_ids")
        return self


# ---- responses -------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict[str, int] | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] | None = None
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReasonName | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatCompletionChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReasonName | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionChoice]
    usage: Usage | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReasonName | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class RequestTiming(BaseModel):
    arrival_time: float = Field(description="wall clock (Unix seconds) when the engine got it")
    first_token_time: float | None = None
    finish_time: float | None = None
    ttft_s: float | None = Field(None, description="first_token_time - arrival_time")
    e2e_s: float | None = Field(None, description="finish_time - arrival_time")


class GenerateResponse(BaseModel):
    request_id: str
    index: int = 0
    text: str
    output_ids: list[int]
    finish_reason: FinishReasonName | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    logprobs: list[float] | None = None
    timing: RequestTiming
    meta_info: dict[str, Any] = Field(description="SGLang's: id, prompt_tokens, "
                                      "completion_tokens, cached_tokens, finish_reason")


class GenerateChunk(BaseModel):
    request_id: str
    index: int = 0
    text: str = Field(description="the whole text so far (SGLang's convention)")
    output_ids: list[int] = Field(description="every token id so far")
    delta_text: str = Field(description="new text since the previous chunk")
    token_ids: list[int] = Field(description="new token ids since the previous chunk")
    finished: bool
    finish_reason: FinishReasonName | None = None
    completion_tokens: int
    timing: RequestTiming | None = Field(None, description="only in the last chunk")
    meta_info: dict[str, Any] = Field(description="SGLang's, as in GenerateResponse")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "attnserve"
    root: str | None = None
    parent: str | None = None
    max_model_len: int
    permission: list[dict[str, object]] = Field(default_factory=list)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class HealthResponse(BaseModel):
    status: Literal["ok"]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class EngineStatsResponse(BaseModel):
    model_config = ConfigDict(extra="allow")

    state: str
    num_active_requests: int = Field(description="HTTP-side requests not finished yet")
    num_queued_requests: int = Field(description="admitted requests with no output yet")
    engine: dict[str, float | int | str | bool | None] = Field(
        description="EngineCore.stats(): scheduler and KV page counters"
    )
