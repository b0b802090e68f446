"""A request's state inside the engine."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from engine.detokenizer import IncrementalDetokenizer
from engine.prefix_cache import TreeNode
from engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """Token ids, KV bookkeeping and stop state of one generation.

    ``num_computed`` tokens have their K/V in the pool, at the slots listed in
    ``req_to_token[row, :num_computed]``; the first ``cached_len`` of those belong to
    the prefix cache (see :mod:`engine.cache_manager`). A request needs
    ``num_tokens - num_computed`` new tokens computed: 1 while decoding, more while
    (re)filling its prompt.

    ``priority`` orders it in the scheduler, as vLLM's: lower is served first (it may
    be negative); see :mod:`engine.scheduler`.
    """

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival: int
    detok: IncrementalDetokenizer
    stop_ids: frozenset[int]
    generator: torch.Generator | None = None
    priority: int = 0
    output_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    row: int | None = None
    num_computed: int = 0
    cached_len: int = 0  # leading tokens whose slots belong to the prefix cache
    # prompt tokens the prefix cache served at first admission (OpenAI's cached_tokens)
    cached_prompt_tokens: int | None = None
    cache_node: TreeNode | None = None  # where its cached prefix ends; locked while running
    finish_reason: str | None = None
    # scheduler step (``Counters.steps``) at which it last joined the waiting queue:
    # on arrival, and again after a preemption; aging counts from here
    waiting_since: int = 0
    preemptions: int = 0  # times it was preempted; victims are the least preempted
    # pooling: keep the final hidden state (after the last norm) at the prompt's last
    # token, which the step that samples the first output token computes anyway
    return_hidden: bool = False
    hidden: torch.Tensor | None = None
    _emitted_tokens: int = 0
    _hidden_emitted: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_pending(self) -> int:
        """Tokens whose K/V still has to be computed."""
        return self.num_tokens - self.num_computed

    @property
    def is_decoding(self) -> bool:
        return self.status is RequestStatus.RUNNING and self.num_pending == 1

    def token_slice(self, start: int, end: int) -> list[int]:
        p = len(self.prompt_ids)
        if end <= p:
            return self.prompt_ids[start:end]
        return (self.prompt_ids + self.output_ids)[start:end]

    def pop_hidden(self) -> torch.Tensor | None:
        """The prompt's pooled hidden state, once (on the delta of the first token)."""
        if self.hidden is None or self._hidden_emitted:
            return None
        self._hidden_emitted = True
        return self.hidden

    def pop_new_tokens(self) -> list[int]:
        new = self.output_ids[self._emitted_tokens :]
        self._emitted_tokens = len(self.output_ids)
        return new
