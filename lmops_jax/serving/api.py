"""The OpenAI-compatible HTTP API: request and response bodies (pydantic) and OpenAI-style errors.

Requests are validated here, so a bad body never reaches the scheduler: an unknown field, a value of the
wrong type or out of range gives `APIError` 400 whose `param` names the field (`validation_error`).
What only the model knows (prompt too long for MAX_LENGTH, token id outside the vocabulary) the
scheduler checks (`RequestError`), and the server maps it to the same 400. Supported subsets:
  - one prompt per request (a string or a list of token ids), `n` completions of it;
  - log-probabilities of the sampled tokens and of up to MAX_TOP_LOGPROBS most likely alternatives per
    token (`logprobs` N for completions; `logprobs: true` with `top_logprobs` N for chat);
  - `presence_penalty` / `frequency_penalty` are accepted only as 0, `echo` only as false.
"""
from __future__ import annotations

import time
from typing import Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field, StrictInt

MAX_N = 16  # completions per request; each takes a decode slot
MAX_TOP_LOGPROBS = 20  # = serving.engine.MAX_TOP_LOGPROBS (OpenAI's chat limit)


class APIError(Exception):
    """An error answered as OpenAI's `{"error": {"message", "type", "param", "code"}}` with `status`.

    headers: extra response headers (429's Retry-After).
    """

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 error_type: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.error_type = error_type
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}


def bad_request(param: str | None, message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _path(loc: list[Any]) -> str:
    """A field path as `messages[0].content`: pydantic's union member tags ('str', 'list[int]') dropped."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.isidentifier() and part not in _TYPE_TAGS:
            out += f".{part}" if out else part
    return out


def validation_error(errors: list[dict[str, Any]]) -> APIError:
    """The 400 for FastAPI's request validation errors (pydantic's `errors()`, locations under 'body').

    Malformed JSON has no field: `param` is "body". A union field (`prompt`, `stop`) reports one error
    per member; the one that got deepest into the value is told (a list prompt's bad element, not
    "not a string").
    """
    located = [(e, [p for p in e.get("loc", ()) if p != "body"]) for e in errors]
    first, loc = max(located, key=lambda item: (item[1][:1] == located[0][1][:1], len(item[1])))
    if first.get("type") == "json_invalid":
        return bad_request("body", f"malformed JSON body: {first.get('msg')} "
                                   f"(at character {first.get('loc', ('', '?'))[-1]})", code="invalid_json")
    if not loc:
        return bad_request("body", f"the body must be a JSON object: {first.get('msg')}", code="invalid_json")
    param = str(loc[0])
    if first.get("type") == "extra_forbidden":
        return bad_request(param, f"unknown or unsupported field {param!r}", code="unsupported_parameter")
    return bad_request(param, f"{_path(loc)}: {first.get('msg')} (got {first.get('input')!r})")


class _Strict(BaseModel):
    """Request bodies: unknown fields are errors naming them, not silently ignored."""
    model_config = ConfigDict(extra="forbid")


def _zero_only(name: str, value: float | None, why: str) -> float | None:
    if value not in (None, 0):
        raise ValueError(f"{name} must be 0 or absent: {why}")
    return value


class StreamOptions(_Strict):
    include_usage: bool = False


class SamplingFields(_Strict):
    """The fields completions and chat share. temperature 0 is greedy; top_k 0 or -1 turns top-k off."""
    model: str | None = None
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: str | None = None

    @pydantic.field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalties(cls, value: float | None, info: pydantic.ValidationInfo) -> float | None:
        return _zero_only(info.field_name, value, "repetition penalties are not implemented")

    @pydantic.field_validator("stop", mode="before")
    @classmethod
    def _stop_strings(cls, value: Any) -> Any:
        """OpenAI's `stop` is a string, a list of strings or null."""
        stops = [value] if isinstance(value, str) else [] if value is None else value
        if isinstance(stops, list) and any(s == "" for s in stops):
            raise ValueError("stop strings must be non-empty")
        return stops

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingFields):
    """POST /v1/completions. prompt: one string (tokenized, the model's BOS added) or token ids (BOS added)."""
    prompt: str | list[StrictInt]
    max_tokens: int = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False

    @pydantic.field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool) -> bool:
        if value:
            raise ValueError("echo is not supported")
        return value


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    """One message; content as a string or OpenAI's list of text parts."""
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions. No max_tokens: up to MAX_LENGTH minus the prompt."""
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @pydantic.field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, value: int | None, info: pydantic.ValidationInfo) -> int | None:
        if value and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return value

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


# ------------------------------------------------------------------------------------------ responses
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """The legacy completions format: top_logprobs, per token {token text: logprob} of the most likely."""
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None = None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    """A whole completion, or one streamed chunk of it (then `usage` only on the last chunk, if asked)."""
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[dict[str, Any]] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "lmops_jax"
    max_model_len: int
    root: str | None = None  # vLLM's: the model an adapter is served on
    parent: str | None = None  # vLLM's: an adapter's base model (None for a model)
    resident: bool = True  # loaded on the devices now (else loaded on a request's demand)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
