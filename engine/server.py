"""Engine-only OpenAI-compatible completions server.

``python -m engine.server --model PATH`` serves one :class:`engine.AsyncEngine` over
``POST /v1/completions`` (streaming or not), ``GET /v1/models`` and ``GET /health``,
so the engine can stand in for vLLM or SGLang behind an HTTP backend. The handlers
take the engine as an argument (no module globals), so ``sotserve``'s server mounts
the same routes with :func:`add_completion_routes`.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, ValidationError

from engine.async_engine import AsyncEngine
from engine.cli_args import add_engine_args, engine_kwargs
from engine.errors import ContextLengthExceededError, EngineDeadError, InvalidRequestError
from engine.outputs import RequestDelta
from engine.sampling_params import MAX_LOGIT_BIAS_ENTRIES, SamplingParams
from engine.serve_loop import serve_app

logger = logging.getLogger(__name__)

# Token-id prompts are verbose JSON (~6 bytes a token); aiohttp's 1 MiB default would
# refuse long contexts before the engine could judge them.
CLIENT_MAX_SIZE = 64 * 2**20

SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # keep reverse proxies from buffering the stream
}


# -- request schema ----------------------------------------------------------------------------
class StreamOptions(BaseModel):
    """OpenAI's ``include_usage`` (a last chunk with the request's usage) and vLLM's
    ``continuous_usage_stats`` (usage so far on every chunk as well)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    include_usage: bool = False
    continuous_usage_stats: bool = False


class CompletionRequest(BaseModel):
    """The OpenAI ``/v1/completions`` body, plus vLLM's ``top_k``, ``ignore_eos``,
    ``stop_token_ids``, ``repetition_penalty``, ``min_tokens`` and ``return_token_ids``.
    ``presence_penalty`` and ``frequency_penalty`` are OpenAI's; :class:`SamplingParams`
    checks the ranges of all four. ``logit_bias`` is OpenAI's: an object whose keys are
    token ids as decimal strings (``{"50256": -100}``), see :func:`_logit_bias`.

    Strict types: JSON ``"16"`` is not an integer and ``true`` is not 1. Unknown fields
    are ignored (as vLLM does); known ones this engine cannot honour are rejected by
    :meth:`unsupported` rather than silently ignored.
    """

    model_config = ConfigDict(extra="ignore", strict=True)

    prompt: str | list[int] | list[str] | list[list[int]]
    model: str | None = None
    max_tokens: int | None = 16
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    return_token_ids: bool | None = None
    # vLLM's: lower is scheduled first, may be negative (engine.scheduler)
    priority: int = 0
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    logit_bias: dict[str, float] | None = None
    # accepted only at their defaults
    n: int = 1
    best_of: int | None = None
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None

    def unsupported(self) -> tuple[str, str] | None:
        """``(param, message)`` for the first field set to something not supported."""
        if self.n != 1:
            return "n", "only n=1 is supported"
        if self.best_of not in (None, 1):
            return "best_of", "only best_of=1 is supported"
        if self.echo:
            return "echo", "echo is not supported"
        if self.logprobs is not None:
            return "logprobs", "logprobs are not supported"
        if self.suffix:
            return "suffix", "suffix is not supported"
        if self.stream_options is not None and not self.stream:
            return "stream_options", "stream_options is only allowed when stream is true"
        return None

    def single_prompt(self) -> str | list[int]:
        """The one prompt: a string or token ids, unwrapped from a one-element list."""
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], str | list):
            if len(p) != 1:
                raise InvalidRequestError(
                    f"only one prompt per request is supported, got {len(p)}", "prompt"
                )
            return p[0]  # type: ignore[return-value]
        return p  # type: ignore[return-value]

    def sampling_params(self, prompt_len: int, max_model_len: int) -> SamplingParams:
        """Engine parameters; raises :class:`InvalidRequestError` for values out of range."""
        max_tokens = self.max_tokens
        if max_tokens is None:
            # vLLM's meaning of null: whatever the context has left. At least 1, so an
            # over-long prompt is reported as such by the engine, not as max_tokens=0.
            max_tokens = max(max_model_len - prompt_len, 1)
        # null means "the engine's default", so only pass what was given
        given = {k: v for k in _SAMPLING_FIELDS if (v := getattr(self, k)) is not None}
        if self.logit_bias:
            given["logit_bias"] = _logit_bias(self.logit_bias)
        return SamplingParams(max_tokens=max_tokens, ignore_eos=self.ignore_eos, **given)


# Body fields passed to SamplingParams as they are (when not null).
_SAMPLING_FIELDS = (
    "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids",
    "presence_penalty", "frequency_penalty", "repetition_penalty", "min_tokens",
)  # fmt: skip


_TOKEN_ID_KEY = re.compile(r"[0-9]+")


def _logit_bias(body: dict[str, float]) -> dict[int, float]:
    """OpenAI's ``logit_bias`` with its keys as ints; :class:`SamplingParams` checks
    the values and the engine the ids' range. Raises :class:`InvalidRequestError`
    for a key that is not a decimal integer, or two keys naming one id ("7", "07")."""
    if len(body) > MAX_LOGIT_BIAS_ENTRIES:  # before a long loop on the event loop
        raise InvalidRequestError(
            f"logit_bias has {len(body)} entries; at most {MAX_LOGIT_BIAS_ENTRIES}", "logit_bias"
        )
    out: dict[int, float] = {}
    for key, value in body.items():
        if not _TOKEN_ID_KEY.fullmatch(key):
            raise InvalidRequestError(
                f"logit_bias keys must be token ids as decimal integer strings, got {key!r}",
                "logit_bias",
            )
        if len(key) > 18:  # past any vocabulary, and int() refuses 4,300 digits
            raise InvalidRequestError(
                f"logit_bias key {key[:24]!r}... is not a token id", "logit_bias"
            )
        token = int(key)
        if token in out:
            raise InvalidRequestError(f"logit_bias names token id {token} twice", "logit_bias")
        out[token] = value
    return out


# Union fields give one pydantic error per alternative; say what is accepted instead.
_ACCEPTED = {
    "prompt": "a string, a list of token ids, or a one-element list of either",
    "stop": "a string or a list of strings",
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
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> web.Response:
        return web.json_response(self.body(), status=self.status)

    @classmethod
    def invalid(cls, exc: InvalidRequestError) -> APIError:
        code = "context_length_exceeded" if isinstance(exc, ContextLengthExceededError) else None
        return cls(400, str(exc), param=exc.param, code=code)

    @classmethod
    def dead(cls) -> APIError:
        return cls(503, "the engine is not running", type="server_error", code="engine_dead")


def validation_error(exc: ValidationError, accepted: dict[str, str] | None = None) -> APIError:
    """A 400 naming the first invalid field; ``accepted`` words union fields' errors."""
    accepted = _ACCEPTED if accepted is None else accepted
    err = exc.errors()[0]
    loc = [str(x) for x in err["loc"]]
    field = loc[0] if loc else None
    if field in accepted:
        return APIError(400, f"{field} must be {accepted[field]}", param=field)
    where = ".".join(loc) or "body"
    return APIError(400, f"{where}: {err['msg']}", param=field)


def _reject_constant(name: str) -> Any:
    # Python's json accepts NaN and Infinity; JSON (and OpenAI) do not.
    raise ValueError(f"{name} is not valid JSON")


async def read_json(request: web.Request) -> dict[str, Any]:
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise APIError(413, exc.text or "request body too large") from None
    try:
        data = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object")
    return data


def engine_alive(engine: AsyncEngine) -> bool:
    """Whether the engine's step loop can still serve requests."""
    # AsyncEngine has no public liveness flag: its loop records the exception it died
    # of in ``_dead``, and after close() the thread is gone and a request would wait
    # forever, so both count as dead here.
    thread = getattr(engine, "_thread", None)
    return getattr(engine, "_dead", None) is None and (thread is None or thread.is_alive())


def client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


@web.middleware
async def error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Answer aiohttp's own errors (404, 405, 413...) and unexpected failures with an
    OpenAI error body; never a traceback."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        resp = APIError(exc.status, exc.reason, type=_status_type(exc.status)).response()
        if "Allow" in exc.headers:
            resp.headers["Allow"] = exc.headers["Allow"]
        return resp
    except APIError as exc:
        return exc.response()
    except Exception:
        logger.exception("unhandled error in %s %s", request.method, request.path)
        return APIError(500, "internal server error", type="server_error").response()


def _status_type(status: int) -> str:
    return "invalid_request_error" if status < 500 else "server_error"


# -- handlers ----------------------------------------------------------------------------------
class CompletionHandlers:
    """``/v1/completions``, ``/v1/models`` and ``/health`` over one engine."""

    def __init__(self, engine: AsyncEngine, model_name: str | None = None) -> None:
        self.engine = engine
        self.model_name = model_name or engine.model_name
        self.created = int(time.time())
        # Called after ``/reset_prefix_cache`` emptied the cache, with the request; what
        # it returns is added to the reply (sotserve re-caches its fixed prompt heads).
        self.after_reset: Callable[[web.Request], Awaitable[dict[str, int]]] | None = None

    async def health(self, request: web.Request) -> web.Response:
        """200 ``{"status": "ok"}`` while the engine loop runs, else 503."""
        if engine_alive(self.engine):
            return web.json_response({"status": "ok"})
        return APIError.dead().response()

    async def reset_prefix_cache(self, request: web.Request) -> web.Response:
        """``POST /reset_prefix_cache`` (as vLLM): empty the prefix cache of everything
        no running request holds, so benchmarks can start each run cold."""
        if not engine_alive(self.engine):
            return APIError.dead().response()
        freed = await self.engine.reset_prefix_cache()
        extra = await self.after_reset(request) if self.after_reset is not None else {}
        return web.json_response({"status": "ok", "freed_tokens": freed, **extra})

    async def models(self, request: web.Request) -> web.Response:
        """The served model in OpenAI's list shape, with vLLM's ``max_model_len``."""
        card = {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "sotserve",
            "root": self.engine.model_name,
            "max_model_len": self.engine.max_model_len,
        }
        return web.json_response({"object": "list", "data": [card]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/completions``: one prompt, a JSON answer or an SSE stream."""
        try:
            return await self._completions(request)
        except APIError as exc:
            return exc.response()
        except InvalidRequestError as exc:
            return APIError.invalid(exc).response()
        except EngineDeadError:
            return APIError.dead().response()
        except ConnectionResetError:
            # The client left before the answer; the engine request is already
            # aborted. 499 (nginx's "client closed request") is for the access log.
            return web.Response(status=499)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        data = await read_json(request)
        try:
            body = CompletionRequest.model_validate(data)
        except ValidationError as exc:
            raise validation_error(exc) from None
        if body.model is not None and body.model != self.model_name:
            raise APIError(
                404,
                f"The model `{body.model}` does not exist.",
                param="model",
                code="model_not_found",
            )
        bad = body.unsupported()
        if bad is not None:
            raise APIError(400, bad[1], param=bad[0])
        # Tokenize here (the same code path generate() uses) so usage and
        # prompt_token_ids can be reported; generate() then gets the ids.
        prompt_ids = self.engine.engine.tokenize(body.single_prompt())
        params = body.sampling_params(len(prompt_ids), self.engine.max_model_len)
        if not engine_alive(self.engine):
            raise APIError.dead()

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
                include_usage=bool(body.stream_options and body.stream_options.include_usage),
                continuous_usage=bool(
                    body.stream_options and body.stream_options.continuous_usage_stats
                ),
            )
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
        n = len(self.prompt_ids)
        return {
            "prompt_tokens": n,
            "completion_tokens": completion_tokens,
            "total_tokens": n + completion_tokens,
            # as OpenAI: prompt tokens the prefix cache served
            "prompt_tokens_details": {"cached_tokens": cached_tokens or 0},
        }


async def _collect(
    request: web.Request, meta: _Meta, first: RequestDelta, gen: Any
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
    data = payload if isinstance(payload, str) else json.dumps(payload)
    await resp.write(f"data: {data}\n\n".encode())


async def _stream(
    request: web.Request, meta: _Meta, first: RequestDelta, gen: Any
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
        await send_sse(resp, "[DONE]")
        await resp.write_eof()
    except ConnectionResetError:
        # Returning leaves the caller's aclosing block with the generator unfinished,
        # and closing it aborts the engine request.
        logger.debug("client left %s mid-stream", meta.rid)
    return resp


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
    app: web.Application, engine: AsyncEngine, model_name: str | None = None
) -> CompletionHandlers:
    """Mount ``POST /v1/completions``, ``GET /v1/models``, ``GET /health`` and
    ``POST /reset_prefix_cache`` for ``engine`` on ``app``; ``model_name`` defaults to
    the engine's model name."""
    handlers = CompletionHandlers(engine, model_name)
    app.router.add_post("/v1/completions", handlers.completions)
    app.router.add_get("/v1/models", handlers.models)
    app.router.add_get("/health", handlers.health)
    app.router.add_post("/reset_prefix_cache", handlers.reset_prefix_cache)
    return handlers


def build_app(engine: AsyncEngine, model_name: str | None = None) -> web.Application:
    """An aiohttp app serving ``engine``. The caller keeps ownership of the engine."""
    app = web.Application(middlewares=[error_middleware], client_max_size=CLIENT_MAX_SIZE)
    add_completion_routes(app, engine, model_name)
    return app


def main(argv: list[str] | None = None) -> None:
    """``python -m engine.server --model PATH [--host] [--port] [engine options]``."""
    p = argparse.ArgumentParser(prog="python -m engine.server", description=__doc__)
    p.add_argument(
        "--model", default=None, help="HF directory, hub id or .gguf (default: embedded)"
    )
    p.add_argument("--served-model-name", default=None, help="name clients use (default: --model)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--dtype", default="auto", help="float32 | bfloat16 | auto")
    p.add_argument("--device", default="auto", help="cpu | cuda | auto")
    add_engine_args(p)
    args = p.parse_args(argv)

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        engine = AsyncEngine(
            args.model, dtype=args.dtype, device=args.device, step_thread=False,
            **engine_kwargs(args),
        )  # fmt: skip
    except ValueError as exc:  # a bad option value, or a model this engine cannot run
        p.error(str(exc))
    app = build_app(engine, args.served_model_name)
    serve_app(engine, app, args.host, args.port)


if __name__ == "__main__":
    main()
