"""The ``POST /v1/chat/completions`` request body: OpenAI's chat schema
(:class:`engine.protocol.ChatCompletionRequest`) plus the ``sot`` extension field
that carries the planner's options.

The ``sot`` object is ours, so unknown keys in it are an error: a typo there should
not fall back to a default unnoticed.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from engine.protocol import ChatCompletionRequest as OpenAIChatRequest
from sotserve.schemas import Mode


class SotOptions(BaseModel):
    """The ``sot`` extension: how the planner answers. Every field is optional; the
    server's defaults fill the rest."""

    model_config = ConfigDict(extra="forbid", strict=True)

    mode: Mode | None = None
    max_points: int | None = Field(default=None, ge=2, le=16)
    point_max_tokens: int | None = Field(default=None, ge=1, le=4096)
    skeleton_max_tokens: int | None = Field(default=None, ge=8, le=1024)
    pipeline: bool | None = None
    router: Literal["trained", "model", "rules"] | None = None


class ChatCompletionRequest(OpenAIChatRequest):
    """OpenAI's chat completion body, plus ``sot``. The penalties, ``logit_bias``,
    ``repetition_penalty`` and ``min_tokens`` (the least a sequential answer writes;
    points have their own minimum) reach every request of the answer."""

    sot: SotOptions | None = None

    def unsupported(self) -> tuple[str, str] | None:
        if self.stop:
            # The answer is stitched from several requests; a stop string would mean
            # something different in each of them.
            return "stop", "stop sequences are not supported"
        return super().unsupported()

    def plan_overrides(self) -> dict[str, Any]:
        """Planner options this request sets (``None`` means the server default);
        raises :class:`engine.protocol.APIError` for a bad ``logit_bias``."""
        sot = self.sot or SotOptions()
        return {
            "mode": sot.mode,
            "max_points": sot.max_points,
            "point_max_tokens": sot.point_max_tokens,
            "skeleton_max_tokens": sot.skeleton_max_tokens,
            "pipeline": sot.pipeline,
            "router": sot.router,
            "max_tokens": self.token_limit(),
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "repetition_penalty": self.repetition_penalty,
            "min_tokens": self.min_tokens,
            "logit_bias": self.logit_bias_ids(),
        }
