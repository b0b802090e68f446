"""The synchronous facade: ``LLM(...).generate(prompts, params)``."""

from __future__ import annotations

from typing import Any, TypeVar

import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from engine.chat_template import ChatRenderer
from engine.errors import InvalidRequestError
from engine.llm_engine import LLMEngine, Prompt
from engine.outputs import RequestOutput
from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.stats import EngineStats

T = TypeVar("T")


class LLM:
    """Offline batched generation, in the style of ``vllm.LLM``.

    ``LLM()`` loads the embedded SmolLM2-135M-Instruct; ``model`` may name a Hugging
    Face directory or hub id, or a GGUF file. Extra keyword arguments configure the
    engine (see :class:`engine.config.EngineConfig`).
    """

    def __init__(
        self,
        model: str | None = None,
        dtype: str | torch.dtype | None = "auto",
        device: str | torch.device | None = "auto",
        **config: Any,
    ) -> None:
        self.engine = LLMEngine(model, dtype=dtype, device=device, **config)

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.engine.tokenizer

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        """Render chat ``messages`` with the model's template, ready for the reply."""
        return render_chat(self.engine.tokenizer, messages)

    def generate(
        self,
        prompts: Prompt | list[Prompt],
        params: SamplingParams | list[SamplingParams] | None = None,
        priority: int | list[int] | None = None,
    ) -> list[RequestOutput]:
        """Generate for all prompts together (they batch); outputs in input order.

        ``priority`` (one for all prompts, or one each, as vLLM's list) orders them in
        the scheduler: lower is served first."""
        if isinstance(prompts, str) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]
        if not prompts:
            raise InvalidRequestError("no prompts given (an empty list is not a prompt)", "prompt")
        plist = _per_prompt(params or SamplingParams(), len(prompts), "params")
        prios = _per_prompt(0 if priority is None else priority, len(prompts), "priority")
        engine = self.engine
        reqs = [
            engine.make_request(p, sp, priority=pr)
            for p, sp, pr in zip(prompts, plist, prios, strict=True)
        ]
        self._run_to_end(reqs)
        return [engine.output_of(r) for r in reqs]

    def embed(self, prompts: list[Prompt]) -> list[torch.Tensor]:
        """The final hidden state at each prompt's last token ([hidden_size], float32),
        in input order: a prefill of each prompt (its K/V stay in the prefix cache) and
        one greedy token that is thrown away."""
        if not prompts:
            raise InvalidRequestError("no prompts given (an empty list is not a prompt)", "prompt")
        engine = self.engine
        params = SamplingParams(max_tokens=1, temperature=0.0)
        reqs = [engine.make_request(p, params, return_hidden=True) for p in prompts]
        self._run_to_end(reqs)
        return [r.hidden for r in reqs]

    def reset_prefix_cache(self) -> int:
        """Evict every cached prefix (:meth:`LLMEngine.reset_prefix_cache`); returns the
        tokens freed."""
        return self.engine.reset_prefix_cache()

    def _run_to_end(self, reqs: list[Request]) -> None:
        """Add ``reqs`` and step the engine until every one has finished; on any
        exception (a KeyboardInterrupt too) abort them all, so nothing stays queued."""
        engine = self.engine
        for req in reqs:
            engine.add(req)
        try:
            while any(r.finish_reason is None for r in reqs):
                engine.step()
        except BaseException:
            for req in reqs:
                engine.abort(req.request_id)
            raise

    def stats(self) -> EngineStats:
        """The engine's counters and gauges now."""
        return self.engine.stats()


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of ``messages`` through the tokenizer's chat template; control-token
    text inside a message stays text (:class:`engine.chat_template.ChatRenderer`)."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages must be a non-empty list", "messages")
    for m in messages:
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise InvalidRequestError("each message needs string 'role' and 'content'", "messages")
    # a trailing assistant message is a finished turn here, not a prefill
    turns = [{"role": m["role"], "content": m["content"]} for m in messages]
    return ChatRenderer(tokenizer).render_turns(turns)


def _per_prompt(value: T | list[T], n: int, name: str) -> list[T]:
    """One ``value`` for each of ``n`` prompts: a list must have one per prompt."""
    if isinstance(value, list):
        if len(value) != n:
            raise InvalidRequestError(f"{n} prompts but {len(value)} {name}", name)
        return value
    return [value] * n
