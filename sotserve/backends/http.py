"""Any OpenAI-compatible ``/v1/completions`` server: sotserve's own, SGLang or vLLM.

Prompts go out as token ids, so the server's radix cache sees exactly the ids the
planner built. ``return_token_ids`` (a vLLM extension that sotserve's server also
speaks) asks for the generated ids; servers that do not send them make the planner
re-tokenize the skeleton text instead.

What real servers accept is respected: OpenAI and vLLM take at most 4 ``stop``
strings, so the rest are watched for here, on the streamed text, and the request is
aborted when one appears. Failures come back typed: a 4xx as
:class:`BackendRequestError`, a 429 as :class:`BackendOverloadedError`, a 5xx, a
refused connection or a stream that stalls longer than ``read_timeout`` between
chunks as :class:`BackendUnavailableError`, each naming the server.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp

from sotserve.backends.base import (
    Backend,
    BackendError,
    BackendOverloadedError,
    BackendRequestError,
    BackendUnavailableError,
    CompletionChunk,
    CompletionParams,
)
from sotserve.openai_http import (
    ErrorReply,
    InvalidResponse,
    JSONObject,
    ResponseError,
    SSEStream,
    auth_headers,
    describe,
    get_models,
    json_object,
    raise_for_status,
    read_error,
    reset_prefix_cache,
    root_url,
)

# The most ``stop`` strings OpenAI's API and vLLM accept in one request.
MAX_SERVER_STOPS = 4


class HTTPBackend(Backend):
    """Streams ``/v1/completions`` with aiohttp.

    ``model`` is sent with each request and names the tokenizer too (a Hugging Face
    directory or hub id; None is the embedded SmolLM2) unless ``tokenizer`` is
    given, either as a tokenizer object or as a name for ``AutoTokenizer``.
    """

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        tokenizer: Any = None,
        *,
        api_key: str | None = None,
        admin_api_key: str | None = None,
        timeout: float = 600.0,
        read_timeout: float = 120.0,
        max_model_len: int | None = None,
        send_priority: bool = False,
    ) -> None:
        self.url = root_url(base_url)  # names the server in errors, too
        self._model = model
        self._max_model_len = max_model_len
        # vLLM refuses a non-zero priority unless it runs with --scheduling-policy
        # priority, so it is only sent when asked for (sotserve's engine takes it).
        self._send_priority = send_priority
        if tokenizer is None or isinstance(tokenizer, str):
            tokenizer = load_tokenizer(tokenizer or model)
        self._tokenizer = tokenizer
        self._headers = auth_headers(api_key)
        # admin routes (a cache reset) take their own key on sotserve's servers
        self._admin_key = admin_api_key or api_key
        # sock_read: the longest wait for the next chunk, so a stalled stream fails
        # instead of hanging until the total timeout
        self._timeout = aiohttp.ClientTimeout(
            total=timeout, sock_connect=10, sock_read=read_timeout
        )
        self._session: aiohttp.ClientSession | None = None
        self._ids_accepted = True  # until the server refuses a token-id prompt

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def model_name(self) -> str:
        return self._model or "default"

    @property
    def max_model_len(self) -> int | None:
        return self._max_model_len

    async def models(self) -> list[JSONObject]:
        """``GET /v1/models``: the server's model cards; raises :class:`BackendError`.

        The first card's ``max_model_len`` (vLLM's, and sotserve's) becomes this
        backend's context length unless one was given."""
        with self._failures(self.url):
            cards = await get_models(
                self._client(), self.url, timeout=aiohttp.ClientTimeout(total=10)
            )
        if self._max_model_len is None and cards:
            limit = cards[0].get("max_model_len")
            self._max_model_len = limit if isinstance(limit, int) and limit > 0 else None
        return cards

    @contextlib.contextmanager
    def _failures(self, where: str) -> Iterator[None]:
        """Raise the toolkit's and aiohttp's exceptions as typed backend errors."""
        try:
            yield
        except ResponseError as exc:
            raise _backend_error(exc.reply, self.url) from None
        except InvalidResponse as exc:
            raise BackendUnavailableError(f"{self.url}: {exc}", 502) from exc
        except TimeoutError as exc:  # aiohttp's read and connect timeouts are ones too
            raise BackendUnavailableError(f"{where}: timed out waiting for the server") from exc
        except aiohttp.ClientError as exc:
            raise BackendUnavailableError(f"{where}: {describe(exc)}") from exc

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(headers=self._headers, timeout=self._timeout)
        return self._session

    def _as_text(self, body: dict[str, Any], prompt: list[int]) -> None:
        """Make ``body`` fit a server that takes text prompts only: llama-cpp-python's.
        Its ``min_tokens`` (0.3.36) replaces the request's ``logit_bias`` rather than
        adding to it, so a request with both keeps the bans (a point's bar on line
        breaks matters more than its minimum length)."""
        body["prompt"] = self._tokenizer.decode(prompt)
        if "logit_bias" in body:
            body.pop("min_tokens", None)

    async def reset_prefix_cache(self) -> bool:
        """Ask the server to empty its prefix cache (:func:`openai_http.reset_prefix_cache`);
        False when it cannot. The admin key is sent (sotserve serves the route only to
        it), else the API key."""
        return await reset_prefix_cache(self._client(), self.url, self._admin_key)

    async def complete(
        self, prompt: str | list[int], params: CompletionParams
    ) -> AsyncIterator[CompletionChunk]:
        # counted while it streams: the remote engine's load as this process sees it
        self.in_flight += 1
        try:
            async with contextlib.aclosing(self._complete(prompt, params)) as chunks:
                async for chunk in chunks:
                    yield chunk
        finally:
            self.in_flight -= 1

    async def _complete(
        self, prompt: str | list[int], params: CompletionParams
    ) -> AsyncIterator[CompletionChunk]:
        body: dict[str, Any] = {
            "prompt": prompt,
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "stream": True,
            # continuous_usage_stats (vLLM's; others ignore it) puts usage on every
            # chunk, so a caller that stops reading early still learns its cached tokens
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            "return_token_ids": True,
        }
        if self._model is not None:
            body["model"] = self._model
        if params.seed is not None:
            body["seed"] = params.seed
        # the server takes the first MAX_SERVER_STOPS stop strings; the rest are
        # watched for below
        watched = list(params.stop[MAX_SERVER_STOPS:])
        if params.stop:
            body["stop"] = list(params.stop[:MAX_SERVER_STOPS])
        # vLLM's and OpenAI's extra sampling fields, only when used
        defaults = CompletionParams(max_tokens=1)
        for name in ("min_tokens", "repetition_penalty", "frequency_penalty", "presence_penalty"):
            if getattr(params, name) != getattr(defaults, name):
                body[name] = getattr(params, name)
        if params.logit_bias:
            body["logit_bias"] = {str(t): b for t, b in params.logit_bias.items()}  # as OpenAI
        if params.priority and self._send_priority:
            body["priority"] = params.priority
        url = f"{self.url}/v1/completions"
        finished: CompletionChunk | None = None
        stops = _StopWatch(watched)
        with self._failures(url):
            # Leaving this block early closes the connection, and the server aborts.
            if isinstance(prompt, list) and not self._ids_accepted:
                self._as_text(body, prompt)
            resp = await self._client().post(url, json=body)
            if resp.status in (400, 422, 500) and isinstance(prompt, list) and self._ids_accepted:
                # llama.cpp's server (llama-cpp-python) takes text prompts only (and
                # says so with a 500 naming body.prompt). Its tokenizer reads the chat
                # template's special tokens back from the text, so the ids come out
                # the same; ids stay the first choice, for servers that re-tokenize
                # text differently.
                async with resp:
                    reply = await read_error(resp)
                if "prompt" not in reply.message:
                    raise ResponseError(reply)
                self._ids_accepted = False
                self._as_text(body, prompt)
                resp = await self._client().post(url, json=body)
            async with resp:
                await raise_for_status(resp)
                async for data in SSEStream(resp):
                    event = json_object(data)  # an in-band error: the server failed
                    usage = event.get("usage")
                    choices = event.get("choices") or []
                    if not choices:
                        if usage and finished is not None:
                            finished.prompt_tokens = usage.get("prompt_tokens")
                            details = usage.get("prompt_tokens_details") or {}
                            finished.cached_tokens = details.get("cached_tokens")
                        continue
                    choice = choices[0]
                    chunk = CompletionChunk(
                        choice.get("text") or "",
                        choice.get("token_ids"),
                        choice.get("finish_reason"),
                    )
                    if usage:
                        details = usage.get("prompt_tokens_details") or {}
                        chunk.cached_tokens = details.get("cached_tokens")
                    if stops.watching:
                        chunk = stops.feed(chunk)
                        if chunk.finish_reason == "stop" and stops.hit:
                            # a watched stop string: leaving the block aborts upstream
                            yield chunk
                            return
                    if chunk.finish_reason is None:
                        yield chunk
                    else:
                        finished = chunk  # held until the usage event that follows it
        if finished is None:
            raise BackendUnavailableError(f"{url}: the stream ended without a finish_reason", 502)
        yield finished

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


class _StopWatch:
    """Stop strings beyond what the server takes, found in the streamed text.

    Text that could be the start of a stop string is held back until the next chunk
    tells; a chunk in which one completes is cut before it and ends the request with
    ``finish_reason`` "stop" (its token ids are dropped: they no longer match the
    text)."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.watching = bool(self.stops)
        self.hit = False
        self._held = ""
        self._longest = max((len(s) for s in self.stops), default=0)

    def feed(self, chunk: CompletionChunk) -> CompletionChunk:
        text = self._held + chunk.text
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if found:
            self.hit = True
            return CompletionChunk(text[: min(found)], None, "stop")
        if chunk.finish_reason is not None:  # the end: nothing more can complete a stop
            self._held = ""
            return CompletionChunk(text, chunk.token_ids, chunk.finish_reason)
        keep = next(
            (k for k in range(min(self._longest - 1, len(text)), 0, -1)
             if any(s.startswith(text[-k:]) for s in self.stops)),
            0,
        )  # fmt: skip
        self._held = text[len(text) - keep :]
        out = text[: len(text) - keep]
        # ids stay with the chunk that carries them; held text shows up a chunk late
        return CompletionChunk(out, chunk.token_ids)


def _backend_error(reply: ErrorReply, server: str) -> BackendError:
    """The typed error of an error answer: a 429 is overload, another 4xx the request's
    fault; a 5xx, or an error sent after the stream began (no status), the server's."""
    status = reply.status
    message = f"{server}: {reply.brief()}"
    if status is not None:
        message = f"{server}: HTTP {status}: {reply.brief()}"
    if status == 429:
        return BackendOverloadedError(message)
    if status is not None and status < 500:
        code = reply.code if isinstance(reply.code, str) else None  # vLLM's is the status
        return BackendRequestError(message, reply.param, code, upstream=True)
    return BackendUnavailableError(message, 502)


def load_tokenizer(name: str | None) -> Any:
    """The tokenizer of a local directory, hub id or GGUF; None is the embedded model."""
    from engine.loader import resolve_model

    return resolve_model(name).tokenizer()
