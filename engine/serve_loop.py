"""Run an aiohttp app and an :class:`AsyncEngine` with the step loop on the main thread.

Both servers (``python -m engine.server`` and ``sotserve serve``) serve this way: the
event loop gets a thread of its own and the engine's step loop keeps the main thread,
where torch's CPU kernels run fastest (see :class:`engine.async_engine.AsyncEngine`).
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Awaitable, Callable
from typing import TypeVar

from aiohttp import web

from engine.async_engine import AsyncEngine
from engine.errors import EngineDeadError


def serve_app(
    engine: AsyncEngine,
    app: web.Application,
    host: str,
    port: int,
    on_ready: Callable[[], None] | None = None,
) -> None:
    """Serve ``app`` with its event loop in a thread and ``engine``'s step loop in this,
    the main, thread (see :class:`AsyncEngine`); returns after SIGINT or SIGTERM, and
    raises :class:`EngineDeadError` if the step loop dies (so the process exits non-zero
    for its supervisor to restart it, instead of answering 500s).

    ``handler_cancellation``: a client that hangs up cancels its handler at once, which
    closes its stream and aborts its requests, even while waiting for a first token.
    """
    listening = threading.Event()
    failure: list[BaseException] = []
    stop: list[Callable[[], None]] = []

    def web_thread() -> None:
        loop = asyncio.new_event_loop()
        runner = web.AppRunner(app, handler_cancellation=True)
        try:
            loop.run_until_complete(runner.setup())
            loop.run_until_complete(web.TCPSite(runner, host, port).start())
            done = asyncio.Event()
            stop.append(lambda: loop.call_soon_threadsafe(done.set))
            listening.set()
            loop.run_until_complete(done.wait())
        except BaseException as exc:  # a port in use, say: end the step loop too
            failure.append(exc)
        finally:
            listening.set()
            try:
                loop.run_until_complete(runner.cleanup())
            finally:
                loop.close()
                engine.close()

    thread = threading.Thread(target=web_thread, name="sotserve-http")
    thread.start()
    listening.wait()
    if failure:
        thread.join()
        raise failure[0]
    if on_ready is not None:
        on_ready()
    previous = {sig: signal.signal(sig, lambda *_: engine.close()) for sig in _STOP_SIGNALS}
    try:
        engine.run_step_loop()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for fn in stop:
            fn()
        thread.join()
    if engine.failure is not None:
        raise EngineDeadError("the engine's step loop died") from engine.failure


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

T = TypeVar("T")


def run_beside_step_loop(engine: AsyncEngine, main: Callable[[], Awaitable[T]]) -> T:
    """``main()``'s result, run in an event loop of its own thread while ``engine``'s
    step loop (an engine made with ``step_thread=False``) keeps this, the main, thread.
    The engine is closed once ``main`` returns or raises; an exception of ``main`` is
    raised here, and :class:`EngineDeadError` if the step loop died first."""
    result: list[T] = []
    failure: list[BaseException] = []

    def worker() -> None:
        try:
            result.append(asyncio.run(main()))  # type: ignore[arg-type]
        except BaseException as exc:
            failure.append(exc)
        finally:
            engine.close()

    thread = threading.Thread(target=worker, name="sotserve-main")
    thread.start()
    try:
        engine.run_step_loop()
    finally:
        engine.close()
        thread.join()
    if failure:
        raise failure[0]
    if engine.failure is not None:
        raise EngineDeadError("the engine's step loop died") from engine.failure
    return result[0]
