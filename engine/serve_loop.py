"""Run an aiohttp app and an :class:`AsyncEngine` with the step loop on the main thread.

Both servers (``python -m engine.server`` and ``sotserve serve``) serve this way: the
event loop gets a thread of its own and the engine's step loop keeps the main thread,
where torch's CPU kernels run fastest (see :class:`engine.async_engine.AsyncEngine`).

A dead engine ends the process with a non-zero status, so that a supervisor restarts
it, unless ``keep_alive_on_engine_death`` (vLLM's ``--keep-alive-on-engine-death``):
then the HTTP side keeps answering (``/health`` 503, requests fail fast with
:class:`EngineDeadError`) until SIGINT or SIGTERM, and the exit is still non-zero.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Awaitable, Callable
from typing import NoReturn, TypeVar

from aiohttp import web

from engine.async_engine import AsyncEngine
from engine.errors import EngineDeadError
from engine.serving import GuardedSite, Security, ServerLimits, http_options

logger = logging.getLogger(__name__)

STUCK_GRACE_S = 3.0
"""Once the engine is dead and the HTTP side stopped, how long the step loop gets to hand
the main thread back before the process ends itself (:func:`_exit_stuck`)."""

HTTP_STOP_TIMEOUT_S = 15.0
"""How long stopping the HTTP side may take when the process is about to end itself
(in-flight requests have already failed, so it is normally instant)."""

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def serve_app(
    engine: AsyncEngine,
    app: web.Application,
    host: str,
    port: int,
    on_ready: Callable[[], None] | None = None,
    keep_alive_on_engine_death: bool = False,
    head_timeout_s: float = 30.0,
) -> None:
    """Serve ``app`` with its event loop in a thread and ``engine``'s step loop in this,
    the main, thread (see :class:`AsyncEngine`); returns after SIGINT or SIGTERM.

    When the engine dies (its step loop raised, or its watchdog gave up on a hung
    step), every in-flight request fails at once and, unless
    ``keep_alive_on_engine_death``, the server stops and this raises
    :class:`EngineDeadError`, so the process exits non-zero for its supervisor to
    restart it instead of answering 500s. A hung step keeps the main thread, so this
    cannot return then: the process ends itself with status 1 (:func:`_exit_stuck`)
    once the HTTP side has stopped. With ``keep_alive_on_engine_death`` the HTTP side
    keeps serving (``/health`` 503, requests fail fast) until SIGINT or SIGTERM, after
    which this raises (or, for a hung step, the process exits) the same way.

    ``handler_cancellation``: a client that hangs up cancels its handler at once, which
    closes its stream and aborts its requests, even while waiting for a first token.
    """
    listening = threading.Event()
    failure: list[BaseException] = []
    stop: list[Callable[[], None]] = []
    stopping = threading.Event()  # SIGINT or SIGTERM came
    step_loop_done = threading.Event()  # run_step_loop handed the main thread back

    def web_thread() -> None:
        loop = asyncio.new_event_loop()
        runner = web.AppRunner(app, handler_cancellation=True)
        try:
            loop.run_until_complete(runner.setup())
            # a connection must send its request head in time (slowloris)
            site = GuardedSite(runner, host, port, head_timeout_s)
            loop.run_until_complete(site.start())
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

    def stop_http(timeout: float | None = None) -> None:
        for fn in stop:
            with contextlib.suppress(RuntimeError):  # its loop is closed: stopped already
                fn()
        thread.join(timeout)

    def request_stop() -> None:
        stopping.set()
        engine.close()

    def exit_if_stuck(why: str) -> None:
        """Off the main thread, with the engine dead: stop serving, then end the
        process unless the step loop returns (a step that was slow, not hung)."""
        stop_http(HTTP_STOP_TIMEOUT_S)
        if not step_loop_done.wait(STUCK_GRACE_S):
            _exit_stuck(why)
        # else the main thread is back in serve_app, which raises EngineDeadError

    def on_death(err: EngineDeadError) -> None:
        if keep_alive_on_engine_death and not stopping.is_set():
            logger.error(
                "%s; still serving, every request fails with 503, until SIGINT or SIGTERM "
                "(keep_alive_on_engine_death)",
                err,
            )
            return
        logger.error("%s; stopping the server", err)
        if threading.current_thread() is not threading.main_thread():
            # The watchdog's thread: the main thread is stuck in the step.
            exit_if_stuck(str(err))
        # else the step loop raised on the main thread and run_step_loop returns next

    engine.on_death(on_death)
    if on_ready is not None:
        on_ready()

    # Python runs signal handlers on the main thread only, between bytecodes, so a
    # step hung in native code would never see SIGINT or SIGTERM. The C-level handler
    # also writes the signal's number to a wakeup fd, whichever thread it interrupts:
    # a watcher thread reading that fd can end a process whose main thread is stuck.
    wake_r, wake_w = socket.socketpair()
    wake_w.setblocking(False)
    stop_numbers = {int(sig) for sig in _STOP_SIGNALS}

    def signal_watcher() -> None:
        with wake_r:
            while True:
                try:
                    data = wake_r.recv(64)
                except OSError:
                    return
                if not data:  # serve_app closed the write end: done
                    return
                if not stop_numbers.intersection(data):
                    continue
                request_stop()
                if engine.failure is not None and not step_loop_done.is_set():
                    exit_if_stuck(f"stopped by a signal while {engine.failure}")

    previous = {sig: signal.signal(sig, lambda *_: request_stop()) for sig in _STOP_SIGNALS}
    previous_fd = signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
    watcher = threading.Thread(target=signal_watcher, name="sotserve-signals", daemon=True)
    watcher.start()
    try:
        try:
            engine.run_step_loop()
        finally:
            step_loop_done.set()
        if engine.failure is not None and keep_alive_on_engine_death:
            # The loop died and the main thread is free: keep the HTTP side up (its
            # handlers answer 503) until told to stop, or until it ends on its own.
            while thread.is_alive() and not stopping.wait(0.5):
                pass
    finally:
        signal.set_wakeup_fd(previous_fd)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        wake_w.close()  # the watcher reads end-of-file and leaves
        stop_http()
    if engine.failure is not None:
        raise EngineDeadError(f"the engine died: {engine.failure}") from engine.failure


def _exit_stuck(why: str) -> NoReturn:
    """End the process with status 1 from a thread other than the main one.

    The main thread is stuck in a step (a hung kernel, a deadlock) and nothing in
    Python can interrupt it: ``sys.exit`` here would only end this thread, and the
    interpreter's own shutdown waits for the main thread. ``os._exit`` skips atexit
    handlers and finalizers, so the HTTP side is stopped and logs are flushed first.
    """
    logger.critical(
        "%s: the engine's step loop is stuck on the main thread; exiting with status 1", why
    )
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(1)


T = TypeVar("T")


def run_beside_step_loop(engine: AsyncEngine, main: Callable[[], Awaitable[T]]) -> T:
    """``main()``'s result, run in an event loop of its own thread while ``engine``'s
    step loop (an engine made with ``step_thread=False``) keeps this, the main, thread.
    The engine is closed once ``main`` returns or raises; an exception of ``main`` is
    raised here, and :class:`EngineDeadError` if the step loop died first.

    A step the watchdog gives up on keeps the main thread: once ``main`` has ended
    (its engine calls fail at once), the process then exits with status 1
    (:func:`_exit_stuck`) after logging ``main``'s error."""
    result: list[T] = []
    failure: list[BaseException] = []
    step_loop_done = threading.Event()

    def worker() -> None:
        try:
            result.append(asyncio.run(main()))  # type: ignore[arg-type]
        except BaseException as exc:
            failure.append(exc)
        finally:
            engine.close()

    thread = threading.Thread(target=worker, name="sotserve-main")

    def on_death(err: EngineDeadError) -> None:
        if threading.current_thread() is threading.main_thread():
            return  # the step loop raised: run_step_loop returns, and this raises
        thread.join()
        if not step_loop_done.wait(STUCK_GRACE_S):
            if failure:
                logger.error("main() failed", exc_info=failure[0])
            _exit_stuck(str(err))

    thread.start()
    engine.on_death(on_death)  # after start: it may run at once, and join the worker
    try:
        engine.run_step_loop()
    finally:
        step_loop_done.set()
        engine.close()
        thread.join()
    if failure:
        raise failure[0]
    if engine.failure is not None:
        raise EngineDeadError(f"the engine died: {engine.failure}") from engine.failure
    return result[0]


AppFactory = Callable[[AsyncEngine, ServerLimits, Security], web.Application]


def serve_from_args(
    args: argparse.Namespace,
    make: AppFactory,
    announce: Callable[[AsyncEngine], str] | None = None,
) -> None:
    """The one start-up path of both servers: logging, the engine of ``--model`` and
    the engine options, the limits and security of the HTTP options, ``make``'s app,
    then :func:`serve_app` with the step loop on this thread. ``announce`` gives the
    line printed once the socket listens (scripts wait for it). Raises ``ValueError``
    for an option the engine refuses, before anything listens."""
    from engine.cli_args import engine_kwargs, serve_kwargs

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    limits, security = http_options(args)
    logger.info("loading %s", args.model or "the embedded SmolLM2-135M-Instruct")
    engine = AsyncEngine(
        args.model, dtype=args.dtype, device=args.device, step_thread=False,
        **engine_kwargs(args),
    )  # fmt: skip
    app = make(engine, limits, security)
    line = announce(engine) if announce is not None else None
    on_ready = None if line is None else (lambda: print(line, flush=True))
    serve_app(
        engine, app, args.host, args.port, on_ready=on_ready,
        head_timeout_s=limits.body_timeout_s, **serve_kwargs(args),
    )  # fmt: skip
