"""Engine-only OpenAI-compatible completions server.

``python -m engine.server --model PATH`` serves one :class:`engine.AsyncEngine` over
``POST /v1/completions`` (streaming or not), ``GET /v1/models`` and ``GET /health``,
so the engine can stand in for vLLM or SGLang behind an HTTP backend. The handlers
take the engine as an argument (no module globals), so ``sotserve``'s server mounts
the same routes with :func:`add_completion_routes`. The serving steps every endpoint
shares (body, validation, security, admission) are :mod:`engine.serving`'s.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from engine.async_engine import AsyncEngine
from engine.chat_template import ChatRenderer, fewest_tokens
from engine.cli_args import add_engine_args
from engine.errors import ContextLengthExceededError, EngineDeadError, InvalidRequestError
from engine.outputs import RequestDelta
from engine.protocol import (
    SSE_DONE,
    SSE_HEADERS,
    APIError,
    CompletionRequest,
    ModelCard,
    ModelList,
    UsageInfo,
    sse_event,
)
from engine.sampling_params import SamplingParams
from engine.serve_loop import serve_from_args
from engine.serving import (
    AdmissionGate,
    OpenAIServing,
    Security,
    ServerLimits,
    add_http_args,
    add_model_args,
    client_gone,
    error_response,
    make_app,
    public_model_name,
)

logger = logging.getLogger(__name__)

# Body fields passed to SamplingParams as they are (when not null).
_SAMPLING_FIELDS = (
    "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids",
    "presence_penalty", "frequency_penalty", "repetition_penalty", "min_tokens",
)  # fmt: skip


def sampling_params(body: CompletionRequest, prompt_len: int, max_model_len: int) -> SamplingParams:
    """Engine parameters of a completion; :class:`SamplingParams` checks the ranges."""
    max_tokens = body.max_tokens
    if max_tokens is None:
        # vLLM's meaning of null: whatever the context has left. At least 1, so an
        # over-long prompt is reported as such by the engine, not as max_tokens=0.
        max_tokens = max(max_model_len - prompt_len, 1)
    # null means "the engine's default", so only pass what was given
    given = {k: v for k in _SAMPLING_FIELDS if (v := getattr(body, k)) is not None}
    if body.logit_bias:
        given["logit_bias"] = body.logit_bias_ids()
    return SamplingParams(max_tokens=max_tokens, ignore_eos=body.ignore_eos, **given)


def engine_error(exc: InvalidRequestError | EngineDeadError) -> APIError:
    """The HTTP error of an engine error: bad input 400, a dead engine 503."""
    if isinstance(exc, EngineDeadError):
        return APIError.dead()
    code = "context_length_exceeded" if isinstance(exc, ContextLengthExceededError) else None
    return APIError(400, str(exc), param=exc.param, code=code)


async def tokenize_prompt(engine: AsyncEngine, prompt: str | list[int]) -> list[int]:
    """A client's prompt as ids, control-token text kept as text, tokenized off the
    event loop; a text far too long for the context is refused before tokenizing
    (a cheap bound), so a huge body cannot hold a tokenizer thread for seconds."""
    limit = engine.max_model_len
    if isinstance(prompt, str) and fewest_tokens(engine.tokenizer, prompt) > limit:
        raise ContextLengthExceededError(
            f"the prompt has {len(prompt)} characters, more than {limit} tokens of "
            f"this model's context can hold", "prompt",
        )  # fmt: skip
    if isinstance(prompt, list) and len(prompt) > limit:
        raise ContextLengthExceededError(
            f"the prompt has {len(prompt)} tokens; this model's context length is {limit}",
            "prompt",
        )
    if isinstance(prompt, str):
        return await asyncio.to_thread(ChatRenderer(engine.tokenizer).encode_plain, prompt)
    return await engine.tokenize(prompt)


# -- handlers ----------------------------------------------------------------------------------
class CompletionHandlers(OpenAIServing):
    """``/v1/completions``, ``/v1/models``, ``/health`` and ``/reset_prefix_cache``
    over one engine."""

    def __init__(
        self,
        engine: AsyncEngine,
        model_name: str | None = None,
        limits: ServerLimits | None = None,
        gate: AdmissionGate | None = None,
    ) -> None:
        limits = limits or ServerLimits()
        gate = gate or AdmissionGate(limits.max_concurrency, limits.max_queue,
                                     limits.queue_timeout_s)  # fmt: skip
        served = model_name or public_model_name(engine.model_name)
        # the engine's own model string is accepted too: naming it is no leak
        super().__init__((served, engine.model_name), limits, gate)
        self.engine = engine
        self.created = int(time.time())
        # Called after ``/reset_prefix_cache`` emptied the cache, with the request; what
        # it returns is added to the reply (sotserve re-caches its fixed prompt heads).
        self.after_reset: Callable[[web.Request], Awaitable[dict[str, int]]] | None = None

    async def health(self, request: web.Request) -> web.Response:
        """200 ``{"status": "ok"}`` while the engine loop runs, else 503."""
        if self.engine.is_alive:
            return web.json_response({"status": "ok"})
        return error_response(APIError.dead())

    async def reset_prefix_cache(self, request: web.Request) -> web.Response:
        """``POST /reset_prefix_cache`` (as vLLM): empty the prefix cache of everything
        no running request holds, so benchmarks can start each run cold."""
        if not self.engine.is_alive:
            return error_response(APIError.dead())
        freed = await self.engine.reset_prefix_cache()
        extra = await self.after_reset(request) if self.after_reset is not None else {}
        return web.json_response({"status": "ok", "freed_tokens": freed, **extra})

    async def models(self, request: web.Request) -> web.Response:
        """The served model in OpenAI's list shape, with vLLM's ``max_model_len``."""
        card = ModelCard(id=self.model_name, created=self.created, root=self.model_name,
                         max_model_len=self.engine.max_model_len)  # fmt: skip
        return web.json_response(ModelList(data=[card]).model_dump())

    async def completions(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/completions``: one prompt, a JSON answer or an SSE stream."""
        try:
            body = await self.parse(request, CompletionRequest)
            async with self.gate.admit("requests"):
                return await self._complete(request, body)
        except (InvalidRequestError, EngineDeadError) as exc:
            return error_response(engine_error(exc))
        except ConnectionResetError:
            # The client left before the answer; the engine request is already
            # aborted. 499 (nginx's "client closed request") is for the access log.
            return web.Response(status=499)

    async def _complete(self, request: web.Request, body: CompletionRequest) -> web.StreamResponse:
        if not self.engine.is_alive:
            raise APIError.dead()
        # Tokenize here so usage and prompt_token_ids can be reported; generate()
        # then gets the ids.
        prompt_ids = await tokenize_prompt(self.engine, body.single_prompt())
        params = sampling_params(body, len(prompt_ids), self.engine.max_model_len)
        rid = f"cmpl-{uuid.uuid4().hex}"
        # aclosing: however this handler ends (disconnect, cancellation, error), the
        # generator is closed at once, and closing it aborts the engine request.
        deltas = self.engine.generate(prompt_ids, params, rid, priority=body.priority)
        async with aclosing(deltas) as gen:
            # Bad input surfaces at the first delta, before a status line is sent.
            first = await anext(gen)
            meta = _Meta(
                rid,
                int(time.time()),
                self.model_name,
                prompt_ids,
                token_ids=bool(body.return_token_ids),
                include_usage=body.include_usage(),
                continuous_usage=body.include_continuous_usage(),
            )
            timeout = self.limits.request_timeout_s
            async with asyncio.timeout(timeout):
                if body.stream:
                    return await _stream(request, meta, first, gen)
                return await _collect(request, meta, first, gen)


@dataclass
class _Meta:
    """What every response of one request repeats."""

    rid: str
    created: int
    model: str
    prompt_ids: list[int]
    token_ids: bool  # return_token_ids
    include_usage: bool
    continuous_usage: bool = False  # usage on every chunk (vLLM's continuous_usage_stats)

    def envelope(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.rid,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def usage(self, completion_tokens: int, cached_tokens: int | None) -> dict[str, Any]:
        return UsageInfo.of(len(self.prompt_ids), completion_tokens, cached_tokens).model_dump()


Deltas = AsyncIterator[RequestDelta]


async def _collect(
    request: web.Request, meta: _Meta, first: RequestDelta, gen: Deltas
) -> web.Response:
    text: list[str] = []
    ids: list[int] = []
    delta = first
    while True:
        text.append(delta.text)
        ids.extend(delta.token_ids)
        if delta.finished:
            break
        if client_gone(request):
            # Without handler cancellation nobody else notices: stop paying for it.
            raise ConnectionResetError("client disconnected")
        delta = await anext(gen)
    choice: dict[str, Any] = {
        "index": 0,
        "text": "".join(text),
        "finish_reason": delta.finish_reason,
        "logprobs": None,
    }
    if meta.token_ids:
        # inside the choice, where vLLM puts them
        choice["prompt_token_ids"] = meta.prompt_ids
        choice["token_ids"] = ids
    out = meta.envelope([choice])
    out["usage"] = meta.usage(len(ids), delta.cached_tokens)
    return web.json_response(out)


async def send_sse(resp: web.StreamResponse, payload: dict[str, Any] | str) -> None:
    await resp.write(sse_event(payload))


async def _stream(
    request: web.Request, meta: _Meta, first: RequestDelta, gen: Deltas
) -> web.StreamResponse:
    resp = web.StreamResponse(headers=SSE_HEADERS)
    await resp.prepare(request)
    n_tokens = 0
    sent_any = False
    delta = first
    try:
        try:
            while True:
                n_tokens += len(delta.token_ids)
                # Held-back text (a possible stop-string prefix) gives empty deltas; skip
                # them unless they carry token ids the client asked for, or the finish.
                if delta.text or delta.finished or (meta.token_ids and delta.token_ids):
                    chunk = _chunk(meta, delta, first=not sent_any)
                    if meta.continuous_usage:
                        chunk["usage"] = meta.usage(n_tokens, delta.cached_tokens)
                    await send_sse(resp, chunk)
                    sent_any = True
                elif client_gone(request):
                    raise ConnectionResetError("client disconnected")
                if delta.finished:
                    break
                delta = await anext(gen)
            if meta.include_usage:
                chunk = meta.envelope([])
                chunk["usage"] = meta.usage(n_tokens, delta.cached_tokens)
                await send_sse(resp, chunk)
        except EngineDeadError:
            # The status line is long gone; tell the client in-band, as vLLM does.
            await send_sse(resp, APIError.dead().body())
        except TimeoutError:
            await send_sse(resp, answer_timeout().body())
        await send_sse(resp, SSE_DONE)
        await resp.write_eof()
    except ConnectionResetError:
        # Returning leaves the caller's aclosing block with the generator unfinished,
        # and closing it aborts the engine request.
        logger.debug("client left %s mid-stream", meta.rid)
    return resp


def answer_timeout() -> APIError:
    return APIError(504, "the answer took longer than the server's --request-timeout",
                    type="server_error", code="request_timeout")  # fmt: skip


def _chunk(meta: _Meta, delta: RequestDelta, first: bool) -> dict[str, Any]:
    choice: dict[str, Any] = {
        "index": 0,
        "text": delta.text,
        "logprobs": None,
        "finish_reason": delta.finish_reason,
    }
    if meta.token_ids:
        if first:
            choice["prompt_token_ids"] = meta.prompt_ids
        choice["token_ids"] = delta.token_ids
    chunk = meta.envelope([choice])
    if meta.include_usage:
        chunk["usage"] = None  # as OpenAI: null on all but the usage chunk
    return chunk


# -- app ---------------------------------------------------------------------------------------
def add_completion_routes(
    app: web.Application,
    engine: AsyncEngine,
    model_name: str | None = None,
    limits: ServerLimits | None = None,
    gate: AdmissionGate | None = None,
) -> CompletionHandlers:
    """Mount ``POST /v1/completions``, ``GET /v1/models``, ``GET /health`` and
    ``POST /reset_prefix_cache`` (an admin route, see :class:`Security`) for
    ``engine`` on ``app``; ``model_name`` defaults to the model's public name."""
    handlers = CompletionHandlers(engine, model_name, limits, gate)
    app.router.add_post("/v1/completions", handlers.completions)
    app.router.add_get("/v1/models", handlers.models)
    app.router.add_get("/health", handlers.health)
    app.router.add_post("/reset_prefix_cache", handlers.reset_prefix_cache)
    return handlers


def build_app(
    engine: AsyncEngine,
    model_name: str | None = None,
    limits: ServerLimits | None = None,
    security: Security | None = None,
) -> web.Application:
    """An aiohttp app serving ``engine``. The caller keeps ownership of the engine.
    ``security`` defaults to a loopback server's: no keys (so no admin routes),
    loopback ``Host`` names only."""
    limits = limits or ServerLimits()
    app = make_app(limits, security or Security.for_bind("127.0.0.1"))
    add_completion_routes(app, engine, model_name, limits)
    return app


def main(argv: list[str] | None = None) -> None:
    """``python -m engine.server --model PATH [--host] [--port] [engine options]``."""
    p = argparse.ArgumentParser(prog="python -m engine.server", description=__doc__)
    add_model_args(p)
    add_http_args(p)
    add_engine_args(p)
    args = p.parse_args(argv)
    try:
        serve_from_args(
            args, lambda engine, limits, security: build_app(
                engine, args.served_model_name, limits, security
            ),
        )  # fmt: skip
    except ValueError as exc:  # a bad option value, or a model this engine cannot run
        p.error(str(exc))


if __name__ == "__main__":
    main()
