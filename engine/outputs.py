"""What the engine hands back: streamed deltas and finished outputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RequestDelta:
    """New tokens of one request since its last delta.

    ``text`` never ends inside a multi-byte character, and text that may still
    turn out to be the start of a stop string is held back until it cannot be.
    ``finish_reason`` is set on the last delta: ``"stop"``, ``"length"`` or ``"abort"``.
    ``cached_tokens`` is the prompt tokens the prefix cache served: on every delta
    once the request was admitted, and always on the last one.
    ``hidden`` is the final hidden state at the prompt's last token ([hidden_size],
    float32, on the CPU), on the first delta of a request made with
    ``return_hidden=True``, else None.
    """

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    cached_tokens: int | None = None
    hidden: torch.Tensor | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """A finished request."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
