"""The OpenAI wire format: pydantic request and response models, and the OpenAI error body.

Requests are validated strictly (no "10" for an integer) and refuse every field this server does
not implement, with an error that names the field: unknown fields are forbidden, and OpenAI fields
the server has no implementation for (penalties, logit_bias, best_of, tools, ...) are accepted
only at their no-op values. `user` is accepted: it only identifies the caller.

Logprobs are the model's own: log_softmax of the raw logits, before temperature and the top-k /
top-p / min-p filters (vLLM's default), floored at -9999 because JSON has no -inf. A completion's
top_logprobs hold the `logprobs` best tokens and the chosen one (OpenAI's and vLLM's rule); a chat
token's hold exactly `top_logprobs`. The prompt's logprobs (`echo` with `logprobs`) are not computed.
"""
import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_serializer, field_validator, model_validator

from ..engine import MAX_LOGPROBS

_STRICT = ConfigDict(strict=True, extra="forbid")
MAX_N = 128
MIN_LOGPROB = -9999.0


class APIError(Exception):
    """An error the client gets as {"error": {"message", "type", "param", "code"}} with `status`."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             405: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "service_unavailable"}

    def __init__(self, status, message, param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self):
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status, message, param=None, code=None):
    return {"error": {"message": message, "type": APIError.TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def _unsupported(name, value, allowed):
    """Refuse a value of an OpenAI field the server does not implement (its no-op values pass)."""
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported by this server (only {allowed[0]!r})")
    return value


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False


class _Sampling(BaseModel):
    """The parameters completions and chat share (OpenAI's, then the vLLM / llama.cpp extras)."""
    model_config = _STRICT
    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    top_k: int | None = Field(None, ge=-1)        # -1 or 0: off
    min_p: float | None = Field(None, ge=0, le=1)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _no_penalty(cls, v, info):
        return _unsupported(info.field_name, v, (0, 0.0, None))

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, v):
        if v:
            raise ValueError("logit_bias is not supported by this server (only {} or null)")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else v or []
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        return stops

    @field_validator("stop_token_ids")
    @classmethod
    def _stop_ids(cls, v):
        if v and any(t < 0 for t in v):
            raise ValueError("stop_token_ids must be token ids >= 0")
        return v

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @property
    def include_usage(self):
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def num_logprobs(self):
        """Alternatives per token for the engine's SamplingParams.logprobs, None when not asked."""
        return None

    def sampling(self, max_tokens, index=0):
        """The SamplingParams fields of choice `index` (seed + index: vLLM's convention for n > 1)."""
        return dict(max_new_tokens=max_tokens, temperature=1.0 if self.temperature is None else self.temperature,
                    top_p=1.0 if self.top_p is None else self.top_p, top_k=max(0, self.top_k or 0),
                    min_p=self.min_p or 0.0, seed=None if self.seed is None else self.seed + index,
                    stop=tuple(self.stop or ()), stop_token_ids=tuple(self.stop_token_ids or ()),
                    ignore_eos=self.ignore_eos, logprobs=self.num_logprobs)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _no_prompt_logprobs(self):
        if self.echo and self.logprobs is not None:
            raise ValueError("logprobs with echo (the prompt's logprobs) is not supported by this server")
        return self

    @property
    def num_logprobs(self):
        return self.logprobs

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v):
        return _unsupported("suffix", v, (None, ""))

    @model_validator(mode="after")
    def _best_of(self):
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError(f"best_of={self.best_of} is not supported by this server (only best_of = n)")
        return self

    @property
    def prompts(self):
        """The prompts: a list of strings or of token-id lists."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        if not p:
            raise APIError(400, "the prompt is empty", "prompt")
        return list(p)


class TextPart(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = _STRICT
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def as_dict(self):
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": content, **({"name": self.name} if self.name is not None else {})}


class ResponseFormat(BaseModel):
    model_config = _STRICT
    type: Literal["text"]


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[dict] | None = None
    tool_choice: str | None = None
    parallel_tool_calls: bool | None = None
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs is only allowed when logprobs is true")
        return self

    @property
    def num_logprobs(self):
        return (self.top_logprobs or 0) if self.logprobs else None

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, v):
        if v:
            raise ValueError("tools are not supported by this server")
        return v

    @field_validator("tool_choice")
    @classmethod
    def _no_tool_choice(cls, v):
        return _unsupported("tool_choice", v, (None, "none"))

    @property
    def max_new_tokens(self):
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class TokenizeRequest(BaseModel):
    model_config = _STRICT
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class DetokenizeRequest(BaseModel):
    model_config = _STRICT
    model: str | None = None
    tokens: list[int]


# ---------------------------------------------------------------- responses

class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


def _created():
    return int(time.time())


class CompletionResponse(BaseModel):
    """A completion, and each chunk of a streamed one (the same object, as OpenAI sends it)."""
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_created)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_created)
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None

    @field_serializer("delta")
    def _only_set(self, delta):  # {"role": "assistant", "content": ""} first, then {"content": ...}, last {}
        return delta.model_dump(exclude_none=True)


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_created)
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "fuselm"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def _spelled(tokenizer, token):
    b = tokenizer.token_bytes(token)
    return b.decode("utf-8", "replace"), b


def completion_logprobs(tokenizer, entries, offset):
    """TokenLogprobs -> a completion's logprobs, text offsets counted from `offset` (characters);
    and the offset after them (a stream's next chunk goes on from there)."""
    tokens, lps, tops, offsets = [], [], [], []
    for e in entries:
        text, _ = _spelled(tokenizer, e.token)
        tokens.append(text)
        lps.append(max(e.logprob, MIN_LOGPROB))
        best = {_spelled(tokenizer, t)[0]: max(v, MIN_LOGPROB) for t, v in e.top}
        tops.append({**best, text: lps[-1]})
        offsets.append(offset)
        offset += len(text)
    return CompletionLogprobs(tokens=tokens, token_logprobs=lps, top_logprobs=tops, text_offset=offsets), offset


def chat_logprobs(tokenizer, entries):
    """TokenLogprobs -> a chat choice's logprobs."""
    def one(token, logprob):
        text, b = _spelled(tokenizer, token)
        return dict(token=text, logprob=max(logprob, MIN_LOGPROB), bytes=list(b))
    return ChatLogprobs(content=[ChatTokenLogprob(**one(e.token, e.logprob),
                                                  top_logprobs=[TopLogprob(**one(t, v)) for t, v in e.top])
                                 for e in entries])


def new_id(prefix):
    return f"{prefix}-{uuid.uuid4().hex}"
