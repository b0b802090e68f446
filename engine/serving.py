"""The HTTP serving layer both servers share (``python -m engine.server`` and
``sotserve serve``), as vLLM's ``OpenAIServing`` and SGLang's ``OpenAIServingBase``:

- :class:`ServerLimits` and :class:`Security`: what a request may ask, and who may
  ask it (API keys, the ``Host`` names a loopback server answers to);
- middlewares: OpenAI error bodies for every failure, API-key and ``Host`` checks,
  JSON-only POST bodies (a cross-site ``text/plain`` form cannot drive the server);
- :func:`read_json`: the body, read with a timeout and parsed into a JSON object,
  every malformed body a 400 (bad UTF-8 or JSON, lone surrogates, absurd nesting, a
  corrupt gzip encoding);
- :class:`AdmissionGate`: engine requests running at once, a bounded queue and a
  queue-wait timeout;
- :class:`OpenAIServing`: read body → validate once → check the model → admit, the
  steps every endpoint shares;
- one set of command-line options and one way to turn them into the above.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import hmac
import ipaddress
import json
import logging
import os
import re
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web
from pydantic import ValidationError

from engine.protocol import APIError, SamplingRequest, validation_error

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=SamplingRequest)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# -- options -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ServerLimits:
    """What one request may ask of the server.

    ``max_concurrency`` engine requests run at once: a completion is one, a chat
    answer as many as it runs side by side (a skeleton answer fans out to its points).
    Up to ``max_queue`` more answers wait for room, for at most ``queue_timeout_s``
    (then 503); past that a request gets 429 at once. ``max_request_bytes`` caps the
    body (413), which must arrive within ``body_timeout_s`` (408: a client that
    trickles its body in must not hold a connection for ever). ``request_timeout_s``
    bounds a whole answer, off by default (long answers on a slow CPU are legitimate).
    """

    max_concurrency: int = 64
    max_queue: int = 256
    max_request_bytes: int = 8 * 2**20
    max_messages: int = 256
    body_timeout_s: float = 30.0
    queue_timeout_s: float = 120.0
    request_timeout_s: float | None = None

    def __post_init__(self) -> None:
        if self.max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        if self.max_queue < 0 or self.max_messages < 1 or self.max_request_bytes < 1024:
            raise ValueError("max_queue >= 0, max_messages >= 1, max_request_bytes >= 1024")
        if self.body_timeout_s <= 0 or self.queue_timeout_s <= 0:
            raise ValueError("body_timeout_s and queue_timeout_s must be positive")
        if self.request_timeout_s is not None and self.request_timeout_s <= 0:
            raise ValueError("request_timeout_s must be positive (or None: no limit)")


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class Security:
    """Who may use the server.

    ``api_key``: every ``/v1/*`` request needs ``Authorization: Bearer <key>``
    (``/health``, the web page and its static files stay open). ``admin_api_key``:
    the admin routes (:data:`ADMIN_PATHS`) exist only when it is set, and need it.
    ``allowed_hosts``: the ``Host`` names served (any port); None serves every name.
    A server bound to a loopback address answers only loopback names by default, so
    a web page cannot reach it through DNS rebinding (a name of the attacker's that
    resolves to 127.0.0.1).
    """

    api_key: str | None = None
    admin_api_key: str | None = None
    allowed_hosts: frozenset[str] | None = None

    @classmethod
    def for_bind(
        cls,
        host: str,
        api_key: str | None = None,
        admin_api_key: str | None = None,
        extra_hosts: list[str] | tuple[str, ...] = (),
    ) -> Security:
        """Options for a server bound to ``host``: a loopback bind serves only the
        loopback names, ``host`` and ``extra_hosts``; any other bind serves every name
        unless ``extra_hosts`` lists some. ``*`` in ``extra_hosts`` serves every name."""
        if "*" in extra_hosts:
            allowed = None
        elif _is_loopback(host) or extra_hosts:
            names = (*LOOPBACK_NAMES, host, *extra_hosts) if _is_loopback(host) else extra_hosts
            allowed = frozenset(h.strip("[]").lower() for h in names)
        else:
            allowed = None
        return cls(api_key or None, admin_api_key or None, allowed)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# Routes that change server state for everyone; only served with an admin key.
ADMIN_PATHS = frozenset({"/reset_prefix_cache"})


# -- middlewares -------------------------------------------------------------------------------
def error_response(exc: APIError) -> web.Response:
    resp = web.json_response(exc.body(), status=exc.status)
    if exc.status == 401:
        resp.headers["WWW-Authenticate"] = "Bearer"
    return resp


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer aiohttp's own errors (404, 405, 413...) and unexpected failures with an
    OpenAI error body; never a traceback."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        resp = error_response(APIError(exc.status, exc.reason, type=_status_type(exc.status)))
        if "Allow" in exc.headers:
            resp.headers["Allow"] = exc.headers["Allow"]
        return resp
    except APIError as exc:
        resp = error_response(exc)
        if isinstance(exc, UnreadableBodyError):
            resp.force_close()
        return resp
    except Exception:
        logger.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(APIError(500, "internal server error", type="server_error"))


class UnreadableBodyError(APIError):
    """A body that could not be read to its end: the connection closes after the
    error, since what is left of the request on it cannot be parsed."""


def _status_type(status: int) -> str:
    return "invalid_request_error" if status < 500 else "server_error"


def security_middleware(security: Security) -> Any:
    """``Host``, API-key and ``Content-Type`` checks, before any handler runs."""

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if security.allowed_hosts is not None and _host_name(request) not in security.allowed_hosts:
            # 421 Misdirected Request: this server is not the one that name meant
            raise APIError(
                421, f"the Host header {request.host[:80]!r} is not served here; start the "
                "server with --allowed-hosts to serve it", code="host_not_allowed",
            )  # fmt: skip
        path = request.path
        if path in ADMIN_PATHS:
            if security.admin_api_key is None:
                raise web.HTTPNotFound()  # the route does not exist without an admin key
            _check_key(request, security.admin_api_key, "admin API key")
        elif security.api_key is not None and path.startswith("/v1/"):
            _check_key(request, security.api_key, "API key")
        if request.method == "POST" and _has_body(request) and not _is_json(request):
            # Browsers send text/plain and form bodies cross-site without a preflight;
            # only JSON needs one, so refusing the rest is the CSRF defence.
            raise APIError(
                415, f"Content-Type must be application/json, got "
                f"{request.content_type!r}", code="unsupported_media_type",
            )  # fmt: skip
        return await handler(request)

    return check


def _host_name(request: web.Request) -> str:
    host = (request.host or "").strip().lower()
    if host.startswith("["):  # [::1]:8000
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _check_key(request: web.Request, key: str, what: str) -> None:
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise APIError(401, f"this server needs an {what}: send Authorization: Bearer <key>",
                       code="invalid_api_key")  # fmt: skip
    # constant time, so the key cannot be guessed a byte at a time
    if not hmac.compare_digest(given.strip().encode(), key.encode()):
        raise APIError(401, f"incorrect {what}", code="invalid_api_key")


def _has_body(request: web.Request) -> bool:
    return bool(request.content_length) or request.headers.get("Transfer-Encoding") is not None


def _is_json(request: web.Request) -> bool:
    ctype = request.content_type.lower()
    return ctype == "application/json" or (
        ctype.startswith("application/") and ctype.endswith("+json")
    )


# -- request bodies ----------------------------------------------------------------------------
MAX_JSON_DEPTH = 64  # OpenAI bodies are a few levels deep; tool schemas a few more

# A \uXXXX escape of a surrogate; only then can json.loads return a lone surrogate,
# which cannot be encoded (a 500 later, in a tokenizer or a JSON encoder).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


async def read_json(request: web.Request, limits: ServerLimits) -> dict[str, Any]:
    """The body as a JSON object; an :class:`APIError` for anything else: 408 when
    it does not arrive within ``body_timeout_s``, 413 over the size limit, 400 for a
    body that cannot be decoded or parsed, nests deeper than :data:`MAX_JSON_DEPTH`,
    or holds a lone surrogate."""
    try:
        async with asyncio.timeout(limits.body_timeout_s):
            raw = await request.read()
    except TimeoutError:
        raise APIError(408, f"the request body did not arrive within {limits.body_timeout_s:g} s",
                       code="request_timeout") from None  # fmt: skip
    except web.HTTPRequestEntityTooLarge as exc:
        raise APIError(413, exc.text or "request body too large") from None
    except web.HTTPException:
        raise
    except Exception as exc:  # a corrupt gzip or deflate encoding, a broken chunk
        # The rest of the body cannot be parsed either: stop aiohttp from draining it
        # (it would raise again, unhandled, and drop the answer) and close after it.
        request.content.feed_eof()
        raise UnreadableBodyError(400, f"the request body could not be read: {exc}") from None
    try:
        data = json.loads(raw, parse_constant=_reject_constant)
    except RecursionError:
        raise APIError(400, "request body nests too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object")
    _check_tree(data, bool(_SURROGATE_ESCAPE.search(raw)))
    return data


def _reject_constant(name: str) -> Any:
    # Python's json accepts NaN and Infinity; JSON (and OpenAI) do not.
    raise ValueError(f"{name} is not valid JSON")


def _check_tree(data: dict[str, Any], strings: bool) -> None:
    """Reject nesting past :data:`MAX_JSON_DEPTH`, and (``strings``) text that is not
    valid Unicode. Iterative, so depth cannot overflow the stack here."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise APIError(400, f"request body nests deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(node, dict):
            items = list(node.keys()) + list(node.values()) if strings else list(node.values())
        elif isinstance(node, list):
            items = node
        else:
            continue
        for item in items:
            if isinstance(item, dict | list):
                stack.append((item, depth + 1))
            elif strings and isinstance(item, str):
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    raise APIError(400, "request body holds a lone surrogate (\\ud800-\\udfff) "
                                   "that is not valid Unicode text") from None  # fmt: skip


def client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


# -- admission ---------------------------------------------------------------------------------
class AdmissionGate:
    """At most ``limit`` engine requests at once, ``max_queue`` waiting answers, 429
    past that, 503 after ``queue_timeout_s`` in the queue.

    An answer is admitted with :meth:`admit`, which holds one unit for its life:
    whichever of its requests runs alone runs on it. Each request it runs beside
    another takes one more unit (:meth:`Lease.acquire`) and gives it back when it
    ends. So a completion costs one unit and a skeleton answer as many as it has
    points decoding at once. A request of an admitted answer waits for either a free
    unit or its answer's own unit to go idle, so admitted answers cannot deadlock
    waiting on each other's units.
    """

    def __init__(self, limit: int, max_queue: int, queue_timeout_s: float = 120.0) -> None:
        self.limit = limit
        self.max_queue = max_queue
        self.queue_timeout_s = queue_timeout_s
        self.free = limit  # units nobody holds
        self.waiting = 0  # answers queued for their first unit
        self._changed_cv = asyncio.Condition()
        self.on_change: Callable[[AdmissionGate], None] | None = None

    @property
    def running(self) -> int:
        """Units held (by running requests, or by admitted answers between them)."""
        return self.limit - self.free

    @contextlib.asynccontextmanager
    async def admit(self, what: str = "requests") -> AsyncIterator[Lease]:
        """Hold one unit while the block runs; raises :class:`APIError` 429 when the
        queue is full and 503 when the wait times out."""
        if self.free == 0 and self.waiting >= self.max_queue:
            raise APIError(
                429, f"the server is at its limit of {self.limit} concurrent {what} and "
                f"{self.max_queue} queued; retry later", type="rate_limit_error",
                code="rate_limit_exceeded",
            )  # fmt: skip
        self.waiting += 1
        self._notify_metrics()
        try:
            async with asyncio.timeout(self.queue_timeout_s), self._changed_cv:
                # a client that leaves while queued is cancelled here, holding nothing
                await self._changed_cv.wait_for(lambda: self.free > 0)
                self.free -= 1
        except TimeoutError:
            raise APIError(
                503, f"waited {self.queue_timeout_s:g} s for room to run; retry later",
                type="server_error", code="queue_timeout",
            ) from None  # fmt: skip
        finally:
            self.waiting -= 1
        self._notify_metrics()
        lease = Lease(self)
        token = CURRENT_LEASE.set(lease)
        try:
            yield lease
        finally:
            CURRENT_LEASE.reset(token)
            lease.closed = True
            if not lease.held_busy:  # else the request still on it gives it back
                await self._release(None, extra=True)

    async def _release(self, held_by: Lease | None, extra: bool) -> None:
        """Give back an extra unit (``extra``), or mark a lease's own unit idle; a
        closed lease's own unit goes back to the gate once idle."""
        async with self._changed_cv:
            if extra:
                self.free += 1
            elif held_by is not None:
                held_by.held_busy = False
            self._changed_cv.notify_all()
        self._notify_metrics()

    def _notify_metrics(self) -> None:
        if self.on_change is not None:
            self.on_change(self)


@dataclass(eq=False)
class Lease:
    """The unit one admitted answer holds, and whether a request runs on it now."""

    gate: AdmissionGate
    held_busy: bool = False
    closed: bool = False

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[None]:
        """Room for one engine request of this answer: its own unit when idle, else
        a free one of the gate's (no queue bound: the answer was admitted)."""
        gate = self.gate
        own = False
        async with gate._changed_cv:

            def room() -> bool:
                return (not self.held_busy and not self.closed) or gate.free > 0

            await gate._changed_cv.wait_for(room)
            if not self.held_busy and not self.closed:
                self.held_busy = own = True
            else:
                gate.free -= 1
        gate._notify_metrics()
        try:
            yield
        finally:
            if own and self.closed:
                # the answer ended while this ran: its unit goes back to the gate now
                self.held_busy = False
                await gate._release(None, extra=True)
            else:
                await gate._release(self if own else None, extra=not own)


# The lease of the answer the current task works for, so a backend deep in the
# planner finds it without every layer passing it along (tasks copy it on creation).
CURRENT_LEASE: contextvars.ContextVar[Lease | None] = contextvars.ContextVar(
    "sotserve_lease", default=None
)


# -- the shared handler base -------------------------------------------------------------------
class OpenAIServing:
    """What every OpenAI endpoint does before its own work: read the body, validate
    it once into its model, refuse unsupported fields and unknown models; and admit
    it through the shared gate."""

    def __init__(
        self, model_names: tuple[str, ...], limits: ServerLimits, gate: AdmissionGate
    ) -> None:
        self.model_names = model_names  # the first is the served name
        self.limits = limits
        self.gate = gate

    @property
    def model_name(self) -> str:
        return self.model_names[0]

    async def parse(
        self, request: web.Request, model: type[M], accepted: dict[str, str] | None = None
    ) -> M:
        """The body validated into ``model``; a 4xx :class:`APIError` otherwise."""
        data = await read_json(request, self.limits)
        try:
            body = model.model_validate(data)
        except ValidationError as exc:
            raise validation_error(exc, accepted) from None
        if body.model is not None and body.model not in self.model_names:
            raise APIError.model_not_found(body.model)
        bad = body.unsupported()
        if bad is not None:
            raise APIError(400, bad[1], param=bad[0])
        return body


def public_model_name(model: str) -> str:
    """The name a server shows for ``model``: a hub id as it is, a local path by its
    last component (never the directory layout of the machine)."""
    if os.sep in model or "/" in model:
        path = Path(model)
        if path.is_absolute() or path.exists() or model.startswith("."):
            return path.stem if path.suffix == ".gguf" else path.name
    return model


# -- command line ------------------------------------------------------------------------------
def add_model_args(p: argparse.ArgumentParser) -> None:
    """``--model``, ``--load-format``, ``--tokenizer``, ``--dtype`` and ``--device``:
    spelled once for every command."""
    from engine.config import LOAD_FORMATS
    from engine.loader import shape_names

    p.add_argument(
        "--model", default=None,
        help="HF directory, hub id or .gguf (default: embedded SmolLM2); with "
        "--load-format dummy, a config.json, a model directory or a shape: "
        + ", ".join(shape_names()),
    )  # fmt: skip
    p.add_argument(
        "--load-format", default="auto", choices=LOAD_FORMATS,
        help="auto: the model's weights; dummy: seeded random weights made on the device "
        "from the model's config (no weight files; vLLM's --load-format dummy)",
    )  # fmt: skip
    p.add_argument(
        "--tokenizer", default=None,
        help="a tokenizer apart from the model's (directory, .gguf or hub id); default "
        "the model's, the embedded SmolLM2's for a dummy model",
    )  # fmt: skip
    p.add_argument("--dtype", default="auto", help="float32 | bfloat16 | float16 | auto")
    p.add_argument("--device", default="auto", help="cpu | cuda | auto")


def add_http_args(p: argparse.ArgumentParser, *, what: str = "engine requests") -> None:
    """Address, served name, security and request limits of an HTTP server."""
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="model id clients send")
    g = p.add_argument_group("security")
    g.add_argument(
        "--api-key", default=os.environ.get("SOTSERVE_API_KEY"),
        help="require Authorization: Bearer KEY on /v1/* (default: $SOTSERVE_API_KEY)",
    )  # fmt: skip
    g.add_argument(
        "--admin-api-key", default=os.environ.get("SOTSERVE_ADMIN_API_KEY"),
        help="serve the admin routes (/reset_prefix_cache) to this key only; without it "
        "they do not exist (default: $SOTSERVE_ADMIN_API_KEY)",
    )  # fmt: skip
    g.add_argument(
        "--allowed-hosts", default="", metavar="NAMES",
        help="comma-separated Host names served besides the loopback ones, when bound to "
        "a loopback address ('*': any)",
    )  # fmt: skip
    d = ServerLimits()
    g = p.add_argument_group("request limits")
    g.add_argument(
        "--max-concurrency", type=int, default=d.max_concurrency,
        help=f"{what} running at once (default {d.max_concurrency})",
    )  # fmt: skip
    g.add_argument(
        "--max-queue", type=int, default=d.max_queue,
        help=f"requests waiting for room before 429s start (default {d.max_queue})",
    )  # fmt: skip
    g.add_argument(
        "--max-request-bytes", type=int, default=d.max_request_bytes,
        help="largest request body; 413 above it",
    )  # fmt: skip
    g.add_argument("--max-messages", type=int, default=d.max_messages)
    g.add_argument(
        "--body-timeout", type=float, default=d.body_timeout_s,
        help="seconds a request's head, and then its body, may take to arrive "
        f"(default {d.body_timeout_s:g})",
    )  # fmt: skip
    g.add_argument(
        "--queue-timeout", type=float, default=d.queue_timeout_s,
        help=f"seconds a request may wait for room before a 503 (default {d.queue_timeout_s:g})",
    )  # fmt: skip
    g.add_argument(
        "--request-timeout", type=float, default=None,
        help="seconds a whole answer may take (default: no limit)",
    )  # fmt: skip


def http_options(args: argparse.Namespace) -> tuple[ServerLimits, Security]:
    """The limits and security of :func:`add_http_args`'s options."""
    limits = ServerLimits(
        max_concurrency=args.max_concurrency,
        max_queue=args.max_queue,
        max_request_bytes=args.max_request_bytes,
        max_messages=args.max_messages,
        body_timeout_s=args.body_timeout,
        queue_timeout_s=args.queue_timeout,
        request_timeout_s=args.request_timeout,
    )
    hosts = [h.strip() for h in args.allowed_hosts.split(",") if h.strip()]
    return limits, Security.for_bind(args.host, args.api_key, args.admin_api_key, hosts)


def make_app(limits: ServerLimits, security: Security, *middlewares: Any) -> web.Application:
    """An aiohttp app with the shared middlewares, ``middlewares`` outermost."""
    return web.Application(
        middlewares=[*middlewares, error_middleware, security_middleware(security)],
        client_max_size=limits.max_request_bytes,
    )


# -- connections -------------------------------------------------------------------------------
class GuardedSite(web.TCPSite):
    """A TCP site whose connections must deliver a complete request head (request
    line and headers) within ``head_timeout_s`` of connecting, else they get a 408 and
    are closed. aiohttp has no such timeout: a client that connects and sends
    nothing, or trickles its headers in a byte at a time (slowloris), would hold its
    connection for ever. Once a connection has sent a head, aiohttp's keep-alive
    timeout closes it when idle, and :func:`read_json`'s timeout covers bodies."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, head_timeout_s: float) -> None:
        super().__init__(runner, host, port)
        self.head_timeout_s = head_timeout_s

    async def start(self) -> None:
        await web.BaseSite.start(self)  # TCPSite's own start would serve unguarded
        server = self._runner.server
        assert server is not None
        timeout = self.head_timeout_s
        self._server = await asyncio.get_running_loop().create_server(
            lambda: _HeadDeadline(server(), timeout), self._host, self._port,
            backlog=self._backlog, reuse_address=self._reuse_address,
        )  # fmt: skip
        self._bound_port = self._server.sockets[0].getsockname()[1]


class _HeadDeadline(asyncio.Protocol):
    """Passes everything to aiohttp's protocol ``inner``; closes the connection with
    a 408 if no complete request head (up to its blank line) arrived in time."""

    def __init__(self, inner: asyncio.Protocol, timeout: float) -> None:
        self.inner = inner
        self.timeout = timeout
        self.transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._tail = b""  # the last bytes seen, as the blank line may span two reads

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._timer = asyncio.get_running_loop().call_later(self.timeout, self._expire)
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._timer is not None:
            seen = self._tail + data
            if b"\r\n\r\n" in seen or b"\n\n" in seen:
                self._timer.cancel()
                self._timer = None
            else:
                self._tail = seen[-3:]
        self.inner.data_received(data)

    def _expire(self) -> None:
        self._timer = None
        if self.transport is not None and not self.transport.is_closing():
            logger.info("closing a connection that sent no request head in %g s", self.timeout)
            self.transport.write(
                b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
            )
            self.transport.close()

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


def serve_http(
    app: web.Application,
    host: str,
    port: int,
    head_timeout_s: float,
    on_ready: Callable[[], None] | None = None,
) -> None:
    """Serve ``app`` (no engine in this process) until SIGINT or SIGTERM, through a
    :class:`GuardedSite`; a client that hangs up cancels its handler at once."""

    async def main() -> None:
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await runner.setup()
        try:
            await GuardedSite(runner, host, port, head_timeout_s).start()
            if on_ready is not None:
                on_ready()
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()
        finally:
            await runner.cleanup()

    asyncio.run(main())
