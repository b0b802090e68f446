"""Typed asyncio client for sotserve's OpenAI-compatible chat server.

:class:`AsyncClient` speaks ``POST /v1/chat/completions`` with sotserve's ``sot``
extension: :meth:`AsyncClient.chat` returns the whole answer as a
:class:`ChatResult` (content, usage and how the answer was made), and
:meth:`AsyncClient.stream` yields the planner's events as they happen, typed as
the classes of :mod:`sotserve.schemas` (the skeleton as it is written, the plan,
each point growing, the in-order merged answer, the final timings)::

    import asyncio
    from sotserve.client import AsyncClient, AnswerDelta, Done

    async def main() -> None:
        async with AsyncClient("http://127.0.0.1:8000") as client:
            result = await client.chat("How do I learn to cook?", mode="sot")
            print(result.mode, [p.title for p in result.points or []])
            print(result.content)

            async for event in client.stream("Why is the sky blue?", mode="auto"):
                if isinstance(event, AnswerDelta):
                    print(event.text, end="", flush=True)
                elif isinstance(event, Done):
                    print(f"\\n[{event.mode}, {event.timings.total_s:.2f} s]")

    asyncio.run(main())

Failures are exceptions, all subclasses of :class:`SotserveError`:

- :class:`APIConnectionError`: the server could not be reached, or the connection
  dropped mid-answer; :class:`APITimeoutError` (a subclass) when the call ran past
  ``timeout``.
- :class:`APIError`: the server answered an error (OpenAI's ``{"error": {...}}``
  body), with ``.status``, ``.message``, ``.type``, ``.param`` and ``.code``;
  :class:`BadRequestError` (400, 413, 422), :class:`NotFoundError` (404),
  :class:`RateLimitError` (429) and :class:`InternalServerError` (5xx) by status.

A streamed answer that fails after its ``200`` status line reports the error
in-band as a ``data: {"error": {...}}`` line; :meth:`AsyncClient.stream` raises it
as the :class:`APIError` subclass of the status the server would have answered
had it known before it started: ``400`` (:class:`BadRequestError`) for an
``invalid_request_error`` and ``500`` (:class:`InternalServerError`) for anything
else, such as a ``backend_error``. An integer ``status`` or ``code`` in the error
body (vLLM puts the status there) wins over that guess.

The client also works against a plain OpenAI-compatible server: the answer and
usage are read from the standard fields and :attr:`ChatResult.sot` is ``None``. A
stream yields its :class:`~sotserve.schemas.AnswerDelta` events and ends with a
``Done`` the client builds itself: mode ``sequential``, the answer, the finish
reason, the usage chunk's counts (one request) and timings measured here.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Final, Literal, get_args

import aiohttp
from pydantic import BaseModel, ValidationError

from sotserve.openai_http import (
    TRANSPORT_ERRORS,
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
    root_url,
)
from sotserve.schemas import (
    AnswerDelta,
    AnswerInfo,
    Done,
    ErrorEvent,
    Event,
    EventAdapter,
    Mode,
    PlanReady,
    PointDelta,
    PointDone,
    PointResult,
    PointStart,
    SkeletonDelta,
    Timings,
    Usage,
)

__all__ = [
    "MODES",
    "APIConnectionError",
    "APIError",
    "APITimeoutError",
    "AnswerDelta",
    "AsyncClient",
    "BadRequestError",
    "ChatResult",
    "ChatUsage",
    "Done",
    "InternalServerError",
    "Messages",
    "NotFoundError",
    "PlanReady",
    "PointDelta",
    "PointDone",
    "PointStart",
    "RateLimitError",
    "SkeletonDelta",
    "SotserveError",
]

DEFAULT_BASE_URL: Final = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT: Final = 600.0

Messages = str | Sequence[Mapping[str, Any]]
"""One user turn as a string, or OpenAI-style ``{"role", "content"}`` messages."""

# Event types this client knows; a newer server's unknown events are skipped.
_EVENT_TYPES: Final = frozenset(
    cls.model_fields["type"].default
    for cls in (
        SkeletonDelta,
        PointStart,
        PlanReady,
        PointDelta,
        PointDone,
        AnswerDelta,
        Done,
        ErrorEvent,
    )
)


# --------------------------------------------------------------------------- errors


class SotserveError(Exception):
    """Base class of every error this client raises."""


class APIConnectionError(SotserveError):
    """The server could not be reached, or the connection broke mid-answer."""

    def __init__(self, message: str, url: str) -> None:
        super().__init__(message)
        self.message = message
        self.url = url


class APITimeoutError(APIConnectionError):
    """The call took longer than the client's ``timeout``."""

    def __init__(self, url: str, timeout: float | None) -> None:
        after = f" after {timeout:g} s" if timeout is not None else ""
        super().__init__(f"request to {url} timed out{after}", url)
        self.timeout = timeout


class APIError(SotserveError):
    """The server answered an error; ``str(exc)`` is the server's message.

    ``status`` is the HTTP status, or for an error reported in-band mid-stream the
    status the server would have answered (see the module docstring).
    """

    def __init__(
        self,
        status: int | None,
        message: str,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        body: Any = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.body = body  # the decoded error body (or its text), for debugging

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(status={self.status!r}, message={self.message!r}, "
            f"type={self.type!r}, param={self.param!r}, code={self.code!r})"
        )


class BadRequestError(APIError):
    """400, 413 or 422: the request was invalid (``param`` names the field)."""


class NotFoundError(APIError):
    """404: e.g. an unknown model."""


class RateLimitError(APIError):
    """429: the server is at its concurrency limit; retry later."""


class InternalServerError(APIError):
    """5xx: the server or its backend failed."""


def _error_class(status: int | None) -> type[APIError]:
    if status in (400, 413, 422):
        return BadRequestError
    if status == 404:
        return NotFoundError
    if status == 429:
        return RateLimitError
    if status is not None and status >= 500:
        return InternalServerError
    return APIError


def _api_error(reply: ErrorReply) -> APIError:
    """The :class:`APIError` subclass of an error answer. An in-band error gets the
    status its body names, else the one the server would have answered had it known
    before its ``200``: 400 for an ``invalid_request_error``, else 500."""
    status = reply.status or reply.named_status
    if status is None:
        status = 400 if reply.type == "invalid_request_error" else 500
    code = None if reply.code is None else str(reply.code)
    return _error_class(status)(
        status, reply.message, type=reply.type, param=reply.param, code=code, body=reply.body
    )


# --------------------------------------------------------------------------- results


class ChatUsage(BaseModel):
    """Tokens of the whole answer (every request it made), as OpenAI's ``usage``."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served by the prefix cache, where reported


class ChatResult(BaseModel):
    """A whole chat answer.

    ``sot`` says how it was made (mode, points with their texts, timings, usage,
    route, fallback); it is ``None`` from a server without sotserve's extension.
    """

    id: str
    model: str
    content: str
    finish_reason: str | None = None
    usage: ChatUsage
    sot: AnswerInfo | None = None

    @property
    def mode(self) -> str | None:
        """The mode that answered (``sequential``, ``sot`` or ``graph``)."""
        return self.sot.mode if self.sot is not None else None

    @property
    def points(self) -> list[PointResult] | None:
        """The skeleton's points with their expansions (empty for a sequential answer)."""
        return self.sot.points if self.sot is not None else None

    @property
    def timings(self) -> Timings | None:
        """Seconds from the question's arrival to routing, skeleton, first token, end."""
        return self.sot.timings if self.sot is not None else None


# --------------------------------------------------------------------------- client


class AsyncClient:
    """An asyncio client for one sotserve (or OpenAI-compatible) server.

    ``base_url`` may end in ``/`` or ``/v1``. ``timeout`` is the total seconds one
    call may take, streamed answers included (``None``: no limit). ``api_key`` is
    sent as ``Authorization: Bearer``. ``model`` is the model id sent with each
    answer unless a call names another (``None``: the server's own model).

    Use it as an async context manager, or call :meth:`close` when done. The HTTP
    session is created on first use, inside the running event loop.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        timeout: float | None = DEFAULT_TIMEOUT,
        api_key: str | None = None,
        model: str | None = None,
    ) -> None:
        self.base_url = root_url(base_url)
        self.timeout = timeout
        self.api_key = api_key
        self.model = model
        self._session: aiohttp.ClientSession | None = None

    # ----------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> AsyncClient:
        self._get_session()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the HTTP session (and its connections). The client may be reused:
        the next call opens a new session."""
        session, self._session = self._session, None
        if session is not None and not session.closed:
            await session.close()

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            headers = {"User-Agent": "sotserve-client", **auth_headers(self.api_key)}
            self._session = aiohttp.ClientSession(headers=headers)
        return self._session

    def _url(self, path: str) -> str:
        return f"{self.base_url}{path}"

    def _client_timeout(self) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=self.timeout)

    @contextlib.contextmanager
    def _failures(self, url: str) -> Iterator[None]:
        """Raise the toolkit's and aiohttp's exceptions as this client's."""
        try:
            yield
        except ResponseError as exc:
            raise _api_error(exc.reply) from None
        except InvalidResponse as exc:
            raise APIError(None, f"{url} {exc}", type="invalid_response") from exc
        except TRANSPORT_ERRORS as exc:
            if isinstance(exc, TimeoutError):  # aiohttp's timeouts are TimeoutErrors too
                raise APITimeoutError(url, self.timeout) from exc
            raise APIConnectionError(f"connection to {url} failed: {describe(exc)}", url) from exc

    # ----------------------------------------------------------------- requests

    def _body(
        self,
        messages: Messages,
        mode: Mode | None,
        stream: bool,
        *,
        model: str | None,
        max_tokens: int | None,
        temperature: float | None,
        top_p: float | None,
        seed: int | None,
        max_points: int | None,
        point_max_tokens: int | None,
        skeleton_max_tokens: int | None,
        pipeline: bool | None,
        router: Literal["model", "rules"] | None,
    ) -> dict[str, Any]:
        if isinstance(messages, str):
            turns: list[dict[str, Any]] = [{"role": "user", "content": messages}]
        else:
            turns = [dict(m) for m in messages]
        body: dict[str, Any] = {"messages": turns}
        model = model if model is not None else self.model
        optional = {
            "model": model,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "seed": seed,
        }
        body.update({k: v for k, v in optional.items() if v is not None})
        body["stream"] = stream
        if stream:
            body["stream_options"] = {"include_usage": True}
        sot = {
            "mode": mode,
            "max_points": max_points,
            "point_max_tokens": point_max_tokens,
            "skeleton_max_tokens": skeleton_max_tokens,
            "pipeline": pipeline,
            "router": router,
        }
        sot = {k: v for k, v in sot.items() if v is not None}
        if sot:
            body["sot"] = sot
        return body

    async def chat(
        self,
        messages: Messages,
        mode: Mode | None = None,
        *,
        model: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        max_points: int | None = None,
        point_max_tokens: int | None = None,
        skeleton_max_tokens: int | None = None,
        pipeline: bool | None = None,
        router: Literal["model", "rules"] | None = None,
    ) -> ChatResult:
        """Answer ``messages`` and return the whole answer.

        ``messages`` is one user turn as a string or a list of ``{"role",
        "content"}`` dicts. ``mode`` is ``sequential``, ``sot``, ``graph`` or
        ``auto`` (``None``: the server's default). ``max_tokens`` caps every token
        the answer generates; ``max_points``, ``point_max_tokens``,
        ``skeleton_max_tokens``, ``pipeline`` and ``router`` go in the ``sot``
        extension. Parameters left ``None`` are not sent, so the server's defaults
        apply.

        Raises :class:`APIError` subclasses for error answers and
        :class:`APIConnectionError` / :class:`APITimeoutError` for transport
        failures.
        """
        body = self._body(
            messages, mode, False, model=model, max_tokens=max_tokens,
            temperature=temperature, top_p=top_p, seed=seed, max_points=max_points,
            point_max_tokens=point_max_tokens, skeleton_max_tokens=skeleton_max_tokens,
            pipeline=pipeline, router=router,
        )  # fmt: skip
        url = self._url("/v1/chat/completions")
        with self._failures(url):
            async with self._get_session().post(
                url, json=body, timeout=self._client_timeout()
            ) as resp:
                await raise_for_status(resp)
                raw = await resp.read()
            data = json_object(raw)  # an error in a 200 body raises here
            try:
                return _parse_completion(data)
            except (ValueError, TypeError, KeyError, IndexError) as exc:
                raise InvalidResponse(f"answered an unexpected body: {exc}") from exc

    async def stream(
        self,
        messages: Messages,
        mode: Mode | None = None,
        *,
        model: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        max_points: int | None = None,
        point_max_tokens: int | None = None,
        skeleton_max_tokens: int | None = None,
        pipeline: bool | None = None,
        router: Literal["model", "rules"] | None = None,
    ) -> AsyncIterator[Event]:
        """Answer ``messages`` as a stream of typed events, in the server's order.

        Yields :class:`~sotserve.schemas.AnswerDelta` for each piece of the merged
        answer, and the planner's other events as their classes
        (:class:`~sotserve.schemas.SkeletonDelta`, ``PointStart``, ``PlanReady``,
        ``PointDelta``, ``PointDone``, and ``Done`` last). Parameters are those of
        :meth:`chat`.

        Errors are raised, never yielded: an error answer before the stream starts
        and one reported mid-stream both raise :class:`APIError` subclasses; a
        connection that drops, or a stream that ends before ``[DONE]``, raises
        :class:`APIConnectionError`.

        Leaving the ``async for`` early closes the HTTP response once the generator
        is finalized, and the server then aborts the answer. To close it at once,
        wrap the call in :func:`contextlib.aclosing`::

            async with contextlib.aclosing(client.stream(question)) as events:
                async for event in events:
                    ...
        """
        body = self._body(
            messages, mode, True, model=model, max_tokens=max_tokens,
            temperature=temperature, top_p=top_p, seed=seed, max_points=max_points,
            point_max_tokens=point_max_tokens, skeleton_max_tokens=skeleton_max_tokens,
            pipeline=pipeline, router=router,
        )  # fmt: skip
        url = self._url("/v1/chat/completions")
        headers = {"Accept": "text/event-stream"}
        plain = _PlainAnswer()
        with self._failures(url):
            async with self._get_session().post(
                url, json=body, headers=headers, timeout=self._client_timeout()
            ) as resp:
                payloads = SSEStream(resp)
                try:
                    await raise_for_status(resp)
                    async for data in payloads:
                        for event in plain.see(_chunk_events(data)):
                            yield event
                    if payloads.done and not plain.saw_done:
                        yield plain.done()  # a plain OpenAI server: no planner events
                finally:
                    if not payloads.done:
                        # left early (or failed): drop the connection so the server
                        # sees the client go and aborts the answer
                        resp.close()
        if not payloads.done:
            raise APIConnectionError(f"the stream from {url} ended before [DONE]", url)

    async def model_cards(self) -> list[JSONObject]:
        """The model cards of ``GET /v1/models``, as the server sent them: ``id``,
        and ``owned_by`` (``"sotserve"`` for a sotserve server), ``max_model_len``
        and the like where it says."""
        with self._failures(self._url("/v1/models")):
            return await get_models(
                self._get_session(), self.base_url, timeout=self._client_timeout()
            )

    async def models(self) -> list[str]:
        """The ids of the models the server serves (``GET /v1/models``)."""
        cards = await self.model_cards()
        if any("id" not in c for c in cards):
            raise APIError(None, "a /v1/models card has no id", type="invalid_response")
        return [str(c["id"]) for c in cards]

    async def health(self) -> bool:
        """Whether ``GET /health`` answers 200. An error status, a server that
        cannot be reached or one that does not answer within ``timeout`` is
        ``False``, not an exception."""
        url = self._url("/health")
        try:
            async with self._get_session().get(url, timeout=self._client_timeout()) as resp:
                return resp.status == 200
        except TRANSPORT_ERRORS:
            return False


# --------------------------------------------------------------------------- parsing


def _parse_completion(data: JSONObject) -> ChatResult:
    """A ``chat.completion`` body as a :class:`ChatResult`; raises ValueError,
    KeyError, IndexError or TypeError for one that is not."""
    choice = data["choices"][0]
    message = choice.get("message") or {}
    usage = data.get("usage") or {}
    details = usage.get("prompt_tokens_details") or {}
    prompt = int(usage.get("prompt_tokens") or 0)
    completion = int(usage.get("completion_tokens") or 0)
    sot = data.get("sot")
    try:
        info = AnswerInfo.model_validate(sot) if sot is not None else None
    except ValidationError as exc:
        raise ValueError(f"invalid sot field: {exc}") from exc
    return ChatResult(
        id=str(data.get("id", "")),
        model=str(data.get("model", "")),
        content=message.get("content") or "",
        finish_reason=choice.get("finish_reason"),
        usage=ChatUsage(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=int(usage.get("total_tokens") or prompt + completion),
            cached_tokens=int(details.get("cached_tokens") or 0),
        ),
        sot=info,
    )


class _PlainAnswer:
    """What a stream from a server without the ``sot`` extension says about its
    answer, for the ``Done`` the client then builds itself."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.first_token_s: float | None = None
        self.parts: list[str] = []
        self.finish_reason: str | None = None
        self.usage = Usage(requests=1)
        self.saw_done = False

    def see(self, parsed: tuple[JSONObject, list[Event]]) -> list[Event]:
        chunk, events = parsed
        for event in events:
            if isinstance(event, Done):
                self.saw_done = True
            elif isinstance(event, AnswerDelta):
                if self.first_token_s is None:
                    self.first_token_s = time.perf_counter() - self.t0
                self.parts.append(event.text)
        for choice in chunk.get("choices") or []:
            if choice.get("index", 0) == 0 and choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            details = usage.get("prompt_tokens_details") or {}
            self.usage = Usage(
                prompt_tokens=int(usage.get("prompt_tokens") or 0),
                completion_tokens=int(usage.get("completion_tokens") or 0),
                cached_tokens=int(details.get("cached_tokens") or 0),
                requests=1,
            )
        return events

    def done(self) -> Done:
        timings = Timings(
            first_answer_token_s=self.first_token_s, total_s=time.perf_counter() - self.t0
        )
        return Done(
            mode="sequential", answer="".join(self.parts), points=[], timings=timings,
            usage=self.usage, finish_reason=self.finish_reason,
        )  # fmt: skip


def _chunk_events(data: str) -> tuple[JSONObject, list[Event]]:
    """One SSE ``data`` payload (a ``chat.completion.chunk``) and its typed events;
    raises an in-band error as :class:`ResponseError`."""
    chunk = json_object(data)
    events: list[Event] = []
    for choice in chunk.get("choices") or []:
        if choice.get("index", 0) != 0:
            continue
        content = (choice.get("delta") or {}).get("content")
        if content:
            events.append(AnswerDelta(text=content))
    sot = chunk.get("sot")
    raw_events = (sot.get("events") or []) if isinstance(sot, dict) else []
    for raw in raw_events:
        try:
            event = EventAdapter.validate_python(raw)
        except ValidationError as exc:
            if isinstance(raw, dict) and raw.get("type") not in _EVENT_TYPES:
                continue  # an event type from a newer server
            raise InvalidResponse(f"streamed an invalid event: {exc}") from exc
        if isinstance(event, ErrorEvent):
            status = 400 if event.code == "invalid_request" else 500
            kind = "invalid_request_error" if status == 400 else "server_error"
            raise _error_class(status)(status, event.message, type=kind, code=event.code)
        events.append(event)
    return chunk, events


# The mode names, for callers that validate before sending (e.g. a CLI's choices).
MODES: Final[tuple[str, ...]] = get_args(Mode)
