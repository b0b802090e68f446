"""The OpenAI wire protocol both servers speak, and their clients read: request and
response models for ``/v1/completions`` and ``/v1/chat/completions``, the error
body, and SSE framing.

Torch-free on purpose (``engine/__init__`` imports lazily): the async client, the
HTTP backend and the eval judge import it without loading a model runtime.

Requests are strict, as vLLM's: JSON ``"16"`` is not an integer and ``true`` is not 1.
Unknown fields are ignored, so SDKs that send newer fields keep working; known
fields this server cannot honour are refused by ``unsupported()`` rather than
silently ignored. One base, :class:`SamplingRequest`, holds the fields and bounds
both endpoints share, so a value means the same thing on each of them.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

# OpenAI's bounds; the engine's own SamplingParams accept the same.
MAX_TEMPERATURE = 2.0
MAX_PENALTY = 2.0  # presence and frequency, in [-2, 2]
MAX_REPETITION_PENALTY = 10.0
MAX_LOGIT_BIAS = 100.0
MAX_LOGIT_BIAS_ENTRIES = 1024
# Past any real context window: refused before it reaches the engine.
MAX_TOKENS_LIMIT = 1 << 20

SSE_DONE = "[DONE]"
SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # keep reverse proxies from buffering the stream
}


# -- errors ------------------------------------------------------------------------------------
class APIError(Exception):
    """An error answered as an OpenAI error body with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        """OpenAI's ``{"error": {...}}`` body."""
        error = ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code)
        return {"error": error.model_dump()}

    @classmethod
    def dead(cls) -> APIError:
        return cls(503, "the engine is not running", type="server_error", code="engine_dead")

    @classmethod
    def model_not_found(cls, model: str) -> APIError:
        return cls(404, f"The model `{model}` does not exist.", param="model",
                   code="model_not_found")  # fmt: skip


class ErrorInfo(BaseModel):
    """The ``error`` object of an error body. ``code`` is a string for OpenAI, an
    integer (the status) for vLLM, so a client reading one accepts both."""

    model_config = ConfigDict(extra="ignore")

    message: str = ""
    type: str | None = None
    param: str | None = None
    code: str | int | None = None


def validation_error(exc: ValidationError, accepted: dict[str, str] | None = None) -> APIError:
    """A 400 naming the first invalid field; ``accepted`` words union fields' errors
    (pydantic gives one error per alternative of a union)."""
    accepted = ACCEPTED if accepted is None else accepted
    err = exc.errors()[0]
    loc = [str(x) for x in err["loc"]]
    field = loc[0] if loc else None
    if field in accepted:
        return APIError(400, f"{field} must be {accepted[field]}", param=field)
    where = ".".join(loc) or "body"
    return APIError(400, f"{where}: {err['msg']}", param=field)


ACCEPTED = {
    "prompt": "a string, a list of token ids, or a one-element list of either",
    "stop": "a string or a list of strings",
}


# -- SSE ---------------------------------------------------------------------------------------
def sse_event(payload: dict[str, Any] | str) -> bytes:
    """One ``data:`` event; ``payload`` is a JSON object or a literal such as ``[DONE]``."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


def sse_data(line: str) -> str | None:
    """The data of one SSE line (a line without its end), or None for comments, blank
    lines and other fields. As the SSE spec says, one space after the colon is dropped
    and nothing else, and a bare ``data`` line is empty data."""
    name, _, value = line.partition(":")
    if name != "data":
        return None
    return value.removeprefix(" ")


# -- requests ----------------------------------------------------------------------------------
class StreamOptions(BaseModel):
    """OpenAI's ``include_usage`` (a last chunk with the request's usage) and vLLM's
    ``continuous_usage_stats`` (usage so far on every chunk as well)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    include_usage: bool = False
    continuous_usage_stats: bool = False


class SamplingRequest(BaseModel):
    """What both endpoints share: the model, sampling, streaming and the fields
    accepted only at their defaults. ``logit_bias`` is OpenAI's: token ids as decimal
    strings to a bias in [-100, 100]. ``repetition_penalty`` and ``min_tokens`` are
    vLLM's."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=MAX_TEMPERATURE)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(default=None, ge=-MAX_PENALTY, le=MAX_PENALTY)
    frequency_penalty: float | None = Field(default=None, ge=-MAX_PENALTY, le=MAX_PENALTY)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=MAX_REPETITION_PENALTY)
    min_tokens: int | None = Field(default=None, ge=0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # accepted only at their defaults
    n: int = 1

    def token_limit(self) -> int | None:
        """The most output tokens asked for (None: the server's default)."""
        return self.max_tokens

    def unsupported(self) -> tuple[str, str] | None:
        """``(param, message)`` for the first field set to something not supported."""
        if self.n != 1:
            return "n", "only n=1 is supported"
        if self.stream_options is not None and not self.stream:
            return "stream_options", "stream_options is only allowed when stream is true"
        limit = self.token_limit()
        if self.min_tokens and limit is not None and self.min_tokens > limit:
            return "min_tokens", f"min_tokens={self.min_tokens} is more than max_tokens={limit}"
        return None

    def logit_bias_ids(self) -> dict[int, float] | None:
        """``logit_bias`` keyed by int token ids; raises :class:`APIError` (400) for a
        key that is not a decimal integer, two keys naming one id ("7", "07"), a bias
        outside [-100, 100], or too many entries."""
        body = self.logit_bias
        if body is None:
            return None
        if len(body) > MAX_LOGIT_BIAS_ENTRIES:
            raise APIError(
                400, f"logit_bias has {len(body)} entries; at most {MAX_LOGIT_BIAS_ENTRIES}",
                param="logit_bias",
            )  # fmt: skip
        out: dict[int, float] = {}
        for key, value in body.items():
            # 18 digits: past any vocabulary, and int() refuses 4,300 digits
            if not _TOKEN_ID_KEY.fullmatch(key) or len(key) > 18:
                raise APIError(
                    400, f"logit_bias keys must be token ids as decimal integer strings, got "
                    f"{key[:24]!r}", param="logit_bias",
                )  # fmt: skip
            if not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:  # NaN fails too
                raise APIError(400, "logit_bias values must be in [-100, 100]",
                               param="logit_bias")  # fmt: skip
            token = int(key)
            if token in out:
                raise APIError(400, f"logit_bias names token id {token} twice", param="logit_bias")
            out[token] = value
        return out

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


_TOKEN_ID_KEY = re.compile(r"[0-9]+")


class CompletionRequest(SamplingRequest):
    """The OpenAI ``/v1/completions`` body, plus vLLM's ``top_k``, ``ignore_eos``,
    ``stop_token_ids``, ``return_token_ids`` and ``priority``."""

    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)
    top_k: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    return_token_ids: bool | None = None
    # vLLM's: lower is scheduled first, may be negative (engine.scheduler)
    priority: int = Field(default=0, ge=-(2**63), lt=2**63)
    # accepted only at their defaults
    best_of: int | None = None
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None

    def unsupported(self) -> tuple[str, str] | None:
        if self.best_of not in (None, 1):
            return "best_of", "only best_of=1 is supported"
        if self.echo:
            return "echo", "echo is not supported"
        if self.logprobs is not None:
            return "logprobs", "logprobs are not supported"
        if self.suffix:
            return "suffix", "suffix is not supported"
        return super().unsupported()

    def single_prompt(self) -> str | list[int]:
        """The one prompt: a string or token ids, unwrapped from a one-element list."""
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], str | list):
            if len(p) != 1:
                raise APIError(
                    400, f"only one prompt per request is supported, got {len(p)}", param="prompt"
                )
            return p[0]  # type: ignore[return-value]
        return p  # type: ignore[return-value]

    def include_continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One turn. ``content`` is a string or a list of text parts (images are not
    supported by any model this server runs)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)

    def as_turn(self) -> dict[str, str]:
        # "developer" is OpenAI's newer name for "system"; chat templates know only
        # the latter.
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": self.text()}


class ChatCompletionRequest(SamplingRequest):
    """OpenAI's chat completion body (a server may extend it with fields of its own)."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    # accepted only at their defaults
    stop: str | list[str] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    def token_limit(self) -> int | None:
        # max_completion_tokens is OpenAI's newer name; it wins when both are set
        return self.max_completion_tokens or self.max_tokens

    def token_limit_param(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens else "max_tokens"

    def unsupported(self) -> tuple[str, str] | None:
        if self.logprobs:
            return "logprobs", "logprobs are not supported"
        if self.top_logprobs:
            return "top_logprobs", "logprobs are not supported"
        if self.tools:
            return "tools", "tools are not supported"
        if self.tool_choice not in (None, "none", "auto"):
            return "tool_choice", "tools are not supported"
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            return "response_format", "only the text response format is supported"
        if not any(m.role == "user" and m.text().strip() for m in self.messages[-1:]):
            return "messages", "the last message must be a non-empty user message"
        return super().unsupported()

    def turns(self) -> list[dict[str, str]]:
        return [m.as_turn() for m in self.messages]


# -- responses ---------------------------------------------------------------------------------
class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens the prefix cache served


class UsageInfo(BaseModel):
    """OpenAI's ``usage`` object."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None

    @classmethod
    def of(cls, prompt: int, completion: int, cached: int | None) -> UsageInfo:
        return cls(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached or 0),
        )


class ModelCard(BaseModel):
    """One entry of ``GET /v1/models``, with vLLM's ``max_model_len``."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "sotserve"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
