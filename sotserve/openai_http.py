"""The client half of the OpenAI wire protocol, over aiohttp: what every client of an
OpenAI-compatible server in this project needs, written once.

- :func:`root_url` reads a base URL as users write it (``http://h:8000``, with a
  trailing ``/`` or ``/v1``) as the server's root; :func:`auth_headers` is the
  ``Authorization: Bearer`` header of an API key.
- :class:`ErrorReply` is an error answer read from its body: the status and the
  ``message``, ``type``, ``param`` and ``code`` of OpenAI's ``{"error": {...}}``
  (:class:`engine.protocol.ErrorInfo`), of vLLM's older top-level error object, or
  whatever text a proxy sent. :class:`ResponseError` carries one.
- :class:`SSEStream` yields the ``data`` payloads of a streamed body up to ``[DONE]``;
  :func:`json_object` decodes one, raising an in-band error as a
  :class:`ResponseError`.
- :func:`get_models` lists ``GET /v1/models``; :func:`reset_prefix_cache` empties a
  server's prefix cache (vLLM's and sotserve's route, or SGLang's).

Failures are :class:`ResponseError` (the server answered an error),
:class:`InvalidResponse` (it answered something the protocol does not say) and
aiohttp's own (:data:`TRANSPORT_ERRORS`); each caller turns them into its own typed
errors. Torch-free, as :mod:`engine.protocol` is.
"""

from __future__ import annotations

import codecs
import http
import json
import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
from pydantic import ValidationError

from engine.protocol import SSE_DONE, ErrorInfo, sse_data

__all__ = [
    "TRANSPORT_ERRORS",
    "ErrorReply",
    "InvalidResponse",
    "JSONObject",
    "ResponseError",
    "SSEParser",
    "SSEStream",
    "auth_headers",
    "describe",
    "get_models",
    "json_object",
    "raise_for_status",
    "read_error",
    "reset_prefix_cache",
    "root_url",
]

JSONObject = dict[str, Any]
"""A decoded JSON object, as a server sent it (its values are unchecked)."""

#: What aiohttp raises when a server cannot be reached, stalls or drops the
#: connection (its timeouts are :class:`TimeoutError`\\ s).
TRANSPORT_ERRORS: Final = (aiohttp.ClientError, TimeoutError)


# -- addressing ------------------------------------------------------------------------------
def root_url(base_url: str) -> str:
    """``base_url`` without a trailing ``/`` or ``/v1``: the server's root, to which
    ``/v1/...``, ``/health`` and the admin routes are appended."""
    url = base_url.strip().rstrip("/")
    return url.removesuffix("/v1").rstrip("/")


def auth_headers(api_key: str | None) -> dict[str, str]:
    """The ``Authorization: Bearer`` header of ``api_key``; none without a key."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def describe(exc: BaseException) -> str:
    """A transport failure in a few words: ``timed out``, or its class and message."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    return f"{exc.__class__.__name__}: {exc}" if str(exc) else exc.__class__.__name__


# -- errors ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ErrorReply:
    """An error answer, read from its body.

    ``status`` is the HTTP status, None for an error sent in-band (a ``data:
    {"error": ...}`` line after a 200, or an error in a 200 body); ``named_status``
    is the status the error object itself names, if any (vLLM puts it in ``code``).
    ``code`` is as sent: a string for OpenAI, an int for vLLM. ``body`` is the decoded
    JSON, or the text when it was not JSON.
    """

    status: int | None
    message: str
    type: str | None = None
    param: str | None = None
    code: str | int | None = None
    named_status: int | None = None
    body: object = None

    @classmethod
    def parse(
        cls, raw: bytes | str, status: int | None = None, reason: str | None = None
    ) -> ErrorReply:
        """The reply in an error body; ``reason`` is the status line's phrase, for a
        body that says nothing."""
        text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
        try:
            body = json.loads(text)
        except ValueError:
            body = None
        return cls._of(body, text, status, reason)

    @classmethod
    def _of(
        cls, body: object, text: str, status: int | None, reason: str | None = None
    ) -> ErrorReply:
        info = ErrorInfo()
        message = text.strip()
        named = None
        if isinstance(body, dict):
            # OpenAI nests the error object; vLLM's older servers sent it at the top
            err = body.get("error", body)
            if isinstance(err, dict):
                info = _error_info(err)
                detail = err.get("detail")  # FastAPI's {"detail": "..."}
                message = info.message or (detail if isinstance(detail, str) else message)
                named = _status_in(err.get("status")) or _status_in(info.code)
            elif isinstance(err, str):
                message = err
        if not message:
            message = f"HTTP {status} {reason or _phrase(status)}".strip() if status else ""
        return cls(
            status, message or "unknown error", info.type, info.param, info.code, named,
            body if body else text,
        )  # fmt: skip

    def brief(self, limit: int = 500) -> str:
        """The message, cut to ``limit`` characters (a validation error may list every
        token of a prompt)."""
        return self.message if len(self.message) <= limit else self.message[:limit] + "..."


def _error_info(err: Mapping[str, object]) -> ErrorInfo:
    """``err`` as :class:`ErrorInfo`; a field of the wrong type (a null message, a list
    ``param``) is dropped rather than hiding the rest."""
    try:
        return ErrorInfo.model_validate(err)
    except ValidationError as exc:
        bad = {e["loc"][0] for e in exc.errors() if e["loc"]}
        return ErrorInfo.model_validate({k: v for k, v in err.items() if k not in bad})


def _status_in(value: object) -> int | None:
    """``value`` if it reads as an HTTP status (vLLM's ``code``), else None."""
    if isinstance(value, int) and not isinstance(value, bool) and 100 <= value <= 599:
        return value
    return None


def _phrase(status: int | None) -> str:
    try:
        return http.HTTPStatus(status).phrase if status is not None else ""
    except ValueError:
        return ""


class ResponseError(Exception):
    """The server answered an error (a status of 400 or more, or an in-band error)."""

    def __init__(self, reply: ErrorReply) -> None:
        super().__init__(reply.message)
        self.reply = reply


class InvalidResponse(ValueError):
    """The server answered something the protocol does not allow (not JSON, not an
    object, no model list). The message reads on from the URL: ``"{url} {exc}"``."""


async def read_error(resp: aiohttp.ClientResponse) -> ErrorReply:
    """The reply in ``resp``'s (error) body, read whole."""
    return ErrorReply.parse(await resp.read(), resp.status, resp.reason)


async def raise_for_status(resp: aiohttp.ClientResponse) -> None:
    """Raise :class:`ResponseError` for a status of 400 or more."""
    if resp.status >= 400:
        raise ResponseError(await read_error(resp))


def json_object(data: str | bytes) -> JSONObject:
    """A body or stream payload as a JSON object. Raises :class:`InvalidResponse` if it
    is not one, and :class:`ResponseError` if it is an error (``{"error": ...}``)."""
    try:
        obj = json.loads(data)
    except ValueError as exc:
        raise InvalidResponse(f"sent invalid JSON: {data[:200]!r}") from exc
    if not isinstance(obj, dict):
        raise InvalidResponse(f"sent {data[:200]!r}, not a JSON object")
    if "error" in obj:
        text = data.decode("utf-8", errors="replace") if isinstance(data, bytes) else data
        raise ResponseError(ErrorReply._of(obj, text, None))
    return obj


# -- server-sent events ----------------------------------------------------------------------
_EOL = re.compile(r"\r\n|\r|\n")


class SSEParser:
    """Incremental server-sent-events parser: feed bytes, get each event's data.

    Reads may split anywhere: inside a line, a UTF-8 character or a ``\\r\\n``.
    Lines end in ``\\n``, ``\\r\\n`` or ``\\r``; a blank line ends an event, whose data
    is its ``data`` lines (:func:`engine.protocol.sse_data`) joined by ``\\n``;
    comments and other fields are skipped. An event not ended by a blank line when the
    stream ends is dropped, as the SSE spec says.
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buf = ""
        self._data: list[str] = []

    def feed(self, chunk: bytes, end: bool = False) -> list[str]:
        """The data of every event that ``chunk`` completes; ``end``: the stream ends
        after it."""
        self._buf += self._decoder.decode(chunk, final=end)
        out: list[str] = []
        start = 0
        for m in _EOL.finditer(self._buf):
            if m.group() == "\r" and m.end() == len(self._buf) and not end:
                break  # maybe the first half of a "\r\n": wait for the next read
            line = self._buf[start : m.start()]
            start = m.end()
            if line:
                data = sse_data(line)
                if data is not None:
                    self._data.append(data)
            elif self._data:
                out.append("\n".join(self._data))
                self._data = []
        self._buf = self._buf[start:]
        return out


class SSEStream:
    """The ``data`` payloads of a streamed response, in order, up to ``[DONE]``.

    ``done`` says whether ``[DONE]`` came; a stream that ends without it may have been
    cut short. Reads whatever the connection delivers (no line-length limit)::

        stream = SSEStream(resp)
        async for data in stream:
            ...
        if not stream.done:
            ...
    """

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._content = resp.content
        self.done = False

    async def __aiter__(self) -> AsyncIterator[str]:
        parser = SSEParser()
        while True:
            chunk = await self._content.readany()  # b"" at the end
            for data in parser.feed(chunk, end=not chunk):
                if data.strip() == SSE_DONE:
                    self.done = True
                    return
                yield data
            if not chunk:
                return


# -- routes ----------------------------------------------------------------------------------
async def get_models(
    session: aiohttp.ClientSession, root: str, *, timeout: aiohttp.ClientTimeout
) -> list[JSONObject]:
    """``GET /v1/models`` of the server at ``root``: its model cards (entries that are
    not objects are dropped). Raises :class:`ResponseError`, :class:`InvalidResponse`,
    or aiohttp's errors."""
    async with session.get(f"{root}/v1/models", timeout=timeout) as resp:
        await raise_for_status(resp)
        cards = json_object(await resp.read()).get("data")
    if not isinstance(cards, list):
        raise InvalidResponse("sent a /v1/models body without a data list")
    return [c for c in cards if isinstance(c, dict)]


async def reset_prefix_cache(
    session: aiohttp.ClientSession,
    root: str,
    api_key: str | None,
    *,
    params: Mapping[str, str] | None = None,
) -> bool:
    """Empty the prefix cache of the server at ``root``: ``POST /reset_prefix_cache``
    (vLLM's, served with ``VLLM_SERVER_DEV_MODE=1``, and sotserve's, which takes
    ``params``) or SGLang's ``/flush_cache``. ``api_key`` (sotserve: the admin key)
    replaces the session's. False when the server has neither route or cannot be
    reached."""
    headers = auth_headers(api_key)
    for path, query in (("/reset_prefix_cache", params), ("/flush_cache", None)):
        try:
            async with session.post(root + path, params=query, headers=headers) as resp:
                if resp.status == 200:
                    return True
        except TRANSPORT_ERRORS:
            return False
    return False
