"""The ``POST /v1/chat/completions`` request body (OpenAI's chat schema) and the
``sot`` extension field that carries the planner's options.

Strict types, as the completions endpoint: JSON ``"16"`` is not an integer. Unknown
top-level fields are ignored (as vLLM does) so SDKs that send newer fields keep
working; fields this server cannot honour are rejected by :meth:`unsupported`
rather than silently ignored. The ``sot`` object is ours, so unknown keys in it are
an error: a typo there should not fall back to a default unnoticed.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from sotserve.schemas import Mode


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


class SotOptions(BaseModel):
    """The ``sot`` extension: how the planner answers. Every field is optional; the
    server's defaults fill the rest."""

    model_config = ConfigDict(extra="forbid", strict=True)

    mode: Mode | None = None
    max_points: int | None = Field(default=None, ge=2, le=16)
    point_max_tokens: int | None = Field(default=None, ge=1, le=4096)
    skeleton_max_tokens: int | None = Field(default=None, ge=8, le=1024)
    pipeline: bool | None = None
    router: Literal["model", "rules"] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """OpenAI's chat completion body, plus ``sot``."""

    model_config = ConfigDict(extra="ignore", strict=True)

    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    sot: SotOptions | None = None
    # OpenAI's penalties and logit_bias (token id strings -> [-100, 100]), and vLLM's
    # repetition_penalty and min_tokens (min_tokens: the least a sequential answer
    # writes; points have their own minimum): every request of the answer gets them
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0)
    min_tokens: int | None = Field(default=None, ge=0)
    logit_bias: dict[str, float] | None = None
    # accepted only at their defaults
    n: int = 1
    stop: str | list[str] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    def unsupported(self) -> tuple[str, str] | None:
        """``(param, message)`` for the first field set to something not supported."""
        if self.n != 1:
            return "n", "only n=1 is supported"
        if self.stop:
            # The answer is stitched from several requests; a stop string would mean
            # something different in each of them.
            return "stop", "stop sequences are not supported"
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
        limit = self.max_completion_tokens or self.max_tokens
        if self.min_tokens and limit is not None and self.min_tokens > limit:
            return "min_tokens", f"min_tokens={self.min_tokens} is more than max_tokens={limit}"
        if self.logit_bias and not all(k.isdecimal() for k in self.logit_bias):
            return "logit_bias", "logit_bias keys must be token ids"
        if self.logit_bias and not all(-100 <= b <= 100 for b in self.logit_bias.values()):
            return "logit_bias", "logit_bias values must be in [-100, 100]"
        if self.stream_options is not None and not self.stream:
            return "stream_options", "stream_options is only allowed when stream is true"
        if not any(m.role == "user" and m.text().strip() for m in self.messages[-1:]):
            return "messages", "the last message must be a non-empty user message"
        return None

    def turns(self) -> list[dict[str, str]]:
        return [m.as_turn() for m in self.messages]

    def plan_overrides(self) -> dict[str, Any]:
        """Planner options this request sets (``None`` means the server default)."""
        sot = self.sot or SotOptions()
        return {
            "mode": sot.mode,
            "max_points": sot.max_points,
            "point_max_tokens": sot.point_max_tokens,
            "skeleton_max_tokens": sot.skeleton_max_tokens,
            "pipeline": sot.pipeline,
            "router": sot.router,
            # max_completion_tokens is OpenAI's newer name; it wins when both are set
            "max_tokens": self.max_completion_tokens or self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "repetition_penalty": self.repetition_penalty,
            "min_tokens": self.min_tokens,
            "logit_bias": (
                None if self.logit_bias is None else {int(k): v for k, v in self.logit_bias.items()}
            ),
        }


# Union fields give one pydantic error per alternative; say what is accepted instead.
ACCEPTED = {
    "stop": "a string or a list of strings",
}
