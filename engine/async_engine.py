"""Asyncio front of the engine: the step loop runs in its own thread.

Callers ``async for`` over :meth:`AsyncEngine.generate`; concurrent calls batch
together because the step thread admits every pending request before each step.
Tensor work releases the GIL, so the event loop stays responsive while a step runs.

Nothing waits forever on a broken engine. An exception in the step loop, or a step
that a watchdog thread sees running longer than ``step_timeout`` (a stuck kernel, a
deadlock), marks the engine dead: every stream and pending call fails at once with
:class:`~engine.errors.EngineDeadError` (:class:`~engine.errors.EngineStepTimeoutError`
for the watchdog), :attr:`AsyncEngine.is_alive` turns False, and new requests are
refused. A hung step that returns late changes nothing: its results are dropped.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from engine.errors import (
    DEFAULT_STEP_TIMEOUT_S,
    EngineDeadError,
    EngineError,
    EngineStepTimeoutError,
    InvalidRequestError,
)
from engine.llm import render_chat
from engine.llm_engine import LLMEngine, Prompt
from engine.outputs import RequestDelta
from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.stats import EngineStats

logger = logging.getLogger(__name__)

T = TypeVar("T")

_INLINE_TOKENIZE_CHARS = 4096
"""Prompts up to this many characters tokenize on the event loop (well under a
millisecond); longer ones go to a worker thread, which costs a thread hop but keeps a
huge prompt from stalling every other request's stream."""

DeathCallback = Callable[[EngineDeadError], None]


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestDelta | BaseException]


@dataclass
class _Waiters:
    """Everyone waiting on the engine at one moment, taken out of it under the lock so
    that exactly one party (death or close) fails them, outside the lock."""

    streams: list[_Stream] = field(default_factory=list)
    # abort() futures resolve False (the request is gone either way); call futures fail
    aborts: list[tuple[asyncio.Future[bool], asyncio.AbstractEventLoop]] = field(
        default_factory=list
    )
    calls: list[tuple[asyncio.Future[Any], asyncio.AbstractEventLoop]] = field(default_factory=list)
    callbacks: list[DeathCallback] = field(default_factory=list)


class AsyncEngine:
    """Streams of token deltas from a continuously batched engine.

    Same loading arguments as :class:`engine.LLM`. The step loop runs in a thread of
    its own, unless ``step_thread=False``: then whoever owns the process's main thread
    calls :meth:`run_step_loop` there (the servers do, :func:`engine.serve_loop.serve_app`), and the
    event loop lives in another thread. That matters on the CPU: measured here, a
    SmolLM2 decode step took 15.9 ms on the main thread and 26-33 ms on any other
    (torch's OpenMP workers serve a non-main thread's parallel regions slowly).

    ``step_timeout`` (seconds, default :data:`DEFAULT_STEP_TIMEOUT_S`; None turns the
    watchdog off): a step, or a call run between steps, that takes longer kills the
    engine with :class:`EngineStepTimeoutError` (see the module docstring).
    """

    def __init__(
        self,
        model: str | None = None,
        dtype: str | torch.dtype | None = "auto",
        device: str | torch.device | None = "auto",
        step_thread: bool = True,
        step_timeout: float | None = DEFAULT_STEP_TIMEOUT_S,
        **config: Any,
    ) -> None:
        # checked before loading, which can take a while
        if step_timeout is not None and (
            isinstance(step_timeout, bool)
            or not isinstance(step_timeout, int | float)
            or not step_timeout > 0
        ):
            raise ValueError(
                f"step_timeout must be a positive number of seconds, or None for no "
                f"watchdog, not {step_timeout!r}"
            )
        self.step_timeout: float | None = None if step_timeout is None else float(step_timeout)
        self.engine = LLMEngine(model, dtype=dtype, device=device, **config)
        # One lock guards everything below that the step loop, the watchdog and the
        # event loops share.
        self._cv = threading.Condition()
        self._pending_add: list[Request] = []
        self._pending_abort: list[
            tuple[str, asyncio.Future[bool] | None, asyncio.AbstractEventLoop | None]
        ] = []
        self._pending_calls: list[
            tuple[Callable[[LLMEngine], Any], asyncio.Future[Any], asyncio.AbstractEventLoop]
        ] = []
        self._streams: dict[str, _Stream] = {}
        self._stats: EngineStats = self.engine.stats()
        # What the loop took off the queues for the turn it is in: if the watchdog
        # gives up on that turn, their callers must hear of it too.
        self._turn = _Waiters()
        # time.monotonic() when the loop's current turn began (None while it waits
        # for work), and what it is doing: the watchdog's view of the loop
        self._busy_since: float | None = None
        self._busy_what = ""
        self._dead: BaseException | None = None
        self._death_error: Callable[[], EngineDeadError] | None = None
        self._death_callbacks: list[DeathCallback] = []
        self._closed = False
        self._thread: threading.Thread | None = None
        self._watchdog: threading.Thread | None = None
        if step_thread:
            self._thread = threading.Thread(target=self._run, name="sotserve-engine", daemon=True)
            self._thread.start()
        if self.step_timeout is not None:
            # A daemon: a hung step must not keep the process from exiting either.
            self._watchdog = threading.Thread(
                target=self._watch, name="sotserve-engine-watchdog", daemon=True
            )
            self._watchdog.start()

    # -- public API ----------------------------------------------------------------
    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.engine.tokenizer

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    @property
    def max_model_len(self) -> int:
        return int(self.engine.config.max_model_len)

    @property
    def is_alive(self) -> bool:
        """Whether a request made now will be served: the step loop has not died (an
        exception, or a step the watchdog gave up on), the engine is not closed, and
        its step thread, if it has one, runs. What ``/health`` reports."""
        thread = self._thread
        return self._dead is None and not self._closed and (thread is None or thread.is_alive())

    @property
    def failure(self) -> BaseException | None:
        """What killed the step loop, if it died: the exception it raised, or the
        :class:`EngineStepTimeoutError` of the watchdog."""
        return self._dead

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        return render_chat(self.engine.tokenizer, messages)

    async def tokenize(self, prompt: Prompt) -> list[int]:
        """The token ids :meth:`generate` would run for ``prompt``: a string through
        the tokenizer (no special tokens added), a list of ids as it is. Long strings
        tokenize in a worker thread, so the event loop keeps streaming meanwhile (the
        fast tokenizers are safe to use from several threads). Raises
        :class:`InvalidRequestError` for a prompt that is neither."""
        if isinstance(prompt, str) and len(prompt) > _INLINE_TOKENIZE_CHARS:
            return await asyncio.to_thread(self.engine.tokenize, prompt)
        return self.engine.tokenize(prompt)

    async def tokenize_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """:meth:`apply_chat_template` in a worker thread (a Jinja render plus the
        tokenizer), so the event loop keeps streaming meanwhile."""
        return await asyncio.to_thread(self.apply_chat_template, messages)

    async def generate(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
        return_hidden: bool = False,
    ) -> AsyncIterator[RequestDelta]:
        """Yield deltas until the request finishes; the last one has ``finish_reason``.

        ``priority`` is vLLM's: lower is scheduled first (:mod:`engine.scheduler`).
        ``return_hidden``: the first delta carries the prompt's pooled hidden state
        (:meth:`engine.llm_engine.LLMEngine.make_request`).

        Raises :class:`engine.errors.InvalidRequestError` before yielding anything for
        bad input, and :class:`EngineDeadError` when the engine is dead or closed,
        before the first delta or in the middle of the stream. Leaving the loop early
        (break, cancel, disconnect) aborts the request.
        """
        self._raise_if_refusing()
        if isinstance(prompt, str) and len(prompt) > _INLINE_TOKENIZE_CHARS:
            prompt = await self.tokenize(prompt)
        req = self.engine.make_request(prompt, params, request_id, priority, return_hidden)
        rid = req.request_id
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._cv:
            # Checked again under the lock: death and close take the streams out under
            # it, so a stream registered here is always either served or failed.
            self._raise_if_refusing()
            if rid in self._streams:
                raise InvalidRequestError(f"request id {rid!r} is already running", "request_id")
            self._streams[rid] = stream
            self._pending_add.append(req)
            self._cv.notify()
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self._submit_abort(rid, None, None)
            with self._cv:
                if self._streams.get(rid) is stream:
                    del self._streams[rid]

    async def embed(self, prompt: Prompt, priority: int = 0) -> torch.Tensor:
        """The final hidden state at ``prompt``'s last token ([hidden_size], float32):
        one prefill, batched with whatever else runs, whose K/V stay in the prefix
        cache, so an answer to the same prompt then starts from a cache hit."""
        params = SamplingParams(max_tokens=1, temperature=0.0)
        hidden = None
        async for delta in self.generate(prompt, params, priority=priority, return_hidden=True):
            if delta.hidden is not None:
                hidden = delta.hidden
        if hidden is None:  # the request ended without its first token (aborted)
            raise EngineError("the embedding request ended before its prompt was computed")
        return hidden

    async def abort(self, request_id: str) -> bool:
        """Abort a request; returns once its slots are free (False if it was unknown,
        or the engine is dead or closed: its requests are gone with it)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bool] = loop.create_future()
        if not self._submit_abort(request_id, fut, loop):
            return False
        return await fut

    async def reset_prefix_cache(self) -> int:
        """Evict every cached prefix no running request holds; returns the tokens freed."""
        return await self._call(lambda engine: engine.reset_prefix_cache())

    async def cached_prefix_len(self, prompt: Prompt) -> int:
        """How many leading tokens of ``prompt`` the prefix cache holds now."""
        return await self._call(lambda engine: engine.cached_prefix_len(prompt))

    async def _call(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run ``fn(engine)`` on the step thread between two steps (the engine is not
        thread-safe) and return its result."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        with self._cv:
            self._raise_if_refusing()
            self._pending_calls.append((fn, fut, loop))
            self._cv.notify()
        return await fut

    def stats(self) -> EngineStats:
        """A snapshot taken after the latest step (frozen, so it is shared, not copied)."""
        with self._cv:
            return self._stats

    def on_death(self, callback: DeathCallback) -> None:
        """Call ``callback(error)`` once when the engine dies (not when it is closed),
        after every waiting request has been failed; at once if it is dead already.

        It runs in the thread that saw the death: the step loop's for an exception,
        the watchdog's for a hung step (while the step loop's thread is still stuck),
        so it must not wait on the step loop. :func:`engine.serve_loop.serve_app` uses
        it to end a server whose main thread is hung.
        """
        with self._cv:
            if self._dead is None:
                self._death_callbacks.append(callback)
                return
        callback(self._new_death_error())

    def run_step_loop(self) -> None:
        """Run the step loop in the calling thread until :meth:`close`, or until the loop
        dies (then :attr:`failure` says why); only for an engine made with
        ``step_thread=False``."""
        if self._thread is not None:
            raise RuntimeError("this engine's step loop already runs in its own thread")
        self._run()

    def close(self) -> None:
        """Stop the step loop after its current step; every request still waiting
        fails with :class:`EngineDeadError` ("engine closed"). Idempotent."""
        with self._cv:
            self._closed = True
            waiters = self._take_waiters()
            self._cv.notify_all()
        self._fail_waiters(waiters, lambda: EngineDeadError("engine closed"))
        thread = self._thread
        # A thread stuck in a step the watchdog gave up on would only cost the wait.
        if thread is not None and thread is not threading.current_thread() and self._dead is None:
            thread.join(timeout=10)

    async def __aenter__(self) -> AsyncEngine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    # -- refusing work, dying ----------------------------------------------------------
    def _raise_if_refusing(self) -> None:
        if self._dead is not None:
            raise self._new_death_error()
        if self._closed:
            raise EngineDeadError("engine closed")

    def _new_death_error(self) -> EngineDeadError:
        """A fresh error for one waiter: one exception object raised in many tasks
        would collect all their tracebacks."""
        assert self._death_error is not None
        return self._death_error()

    def _take_waiters(self) -> _Waiters:
        """Everyone waiting now, taken out of the engine (call with ``_cv`` held)."""
        waiters = _Waiters(streams=list(self._streams.values()))
        self._streams.clear()
        self._pending_add.clear()
        aborts, self._pending_abort = self._pending_abort, []
        waiters.aborts = [(f, lp) for _, f, lp in aborts if f is not None and lp is not None]
        waiters.calls = [(fut, loop) for _, fut, loop in self._pending_calls]
        self._pending_calls.clear()
        return waiters

    def _mark_dead(
        self, cause: BaseException, error: Callable[[], EngineDeadError]
    ) -> _Waiters | None:
        """Declare the engine dead of ``cause`` (call with ``_cv`` held); returns who
        must be told, or None when it was dead already (the first cause wins)."""
        if self._dead is not None:
            return None
        # the maker first: _raise_if_refusing reads _dead without the lock
        self._death_error = error
        self._dead = cause
        waiters = self._take_waiters()
        # and whoever waits on the turn the loop is in: it will not finish it for them
        waiters.aborts += self._turn.aborts
        waiters.calls += self._turn.calls
        self._turn = _Waiters()
        waiters.callbacks, self._death_callbacks = self._death_callbacks, []
        self._cv.notify_all()
        return waiters

    def _fail_waiters(self, waiters: _Waiters, error: Callable[[], EngineDeadError]) -> None:
        """Fail every waiter at once (outside the lock), then run the death callbacks."""
        for s in waiters.streams:
            _post(s.loop, s.queue.put_nowait, error())
        for fut, loop in waiters.aborts:
            _post(loop, _resolve, fut, False)
        for fut, loop in waiters.calls:
            _post(loop, _fail, fut, error())
        for callback in waiters.callbacks:
            try:
                callback(error())
            except Exception:
                logger.exception("an engine death callback failed")

    def _die(self, cause: BaseException, error: Callable[[], EngineDeadError]) -> bool:
        """Mark the engine dead and fail everyone; False if it was dead already."""
        with self._cv:
            waiters = self._mark_dead(cause, error)
        if waiters is None:
            return False
        self._fail_waiters(waiters, error)
        return True

    # -- the watchdog ------------------------------------------------------------------
    def _watch(self) -> None:
        """Poll the step loop's turn; kill the engine when one runs past the limit.

        Polling (every twentieth of the limit, at most a second) is cheap and needs no
        cooperation from the loop, which is the point: the loop may be stuck anywhere.
        It keeps watching after :meth:`close` until the loop's last turn ends, so a
        server told to stop during a hung step still learns that the step is hung.
        """
        limit = self.step_timeout
        assert limit is not None
        tick = min(max(limit / 20, 0.005), 1.0)
        while True:
            time.sleep(tick)
            with self._cv:
                if self._dead is not None:
                    return
                since = self._busy_since
                if since is None:
                    if self._closed:
                        return
                    continue
                elapsed = time.monotonic() - since
                if elapsed <= limit:
                    continue
                # Decided and marked under the lock: the loop cannot finish this turn
                # (and start another, which the verdict would wrongly hit) in between.
                what = self._busy_what
                message = (
                    f"engine step timed out: {what} ran for more than {limit:g} s "
                    f"(step_timeout); the engine is dead"
                )
                error = _errors(EngineStepTimeoutError, message, limit)
                waiters = self._mark_dead(error(), error)
            assert waiters is not None
            logger.error("%s (stuck for %.1f s so far)", message, elapsed)
            self._fail_waiters(waiters, error)
            return

    # -- the step thread ---------------------------------------------------------------
    def _submit_abort(
        self, rid: str, fut: asyncio.Future[bool] | None, loop: asyncio.AbstractEventLoop | None
    ) -> bool:
        """Queue an abort for the next turn; False (nothing queued) when no turn will
        come, as then the request is gone anyway."""
        with self._cv:
            if self._dead is not None or self._closed:
                return False
            self._pending_abort.append((rid, fut, loop))
            self._cv.notify()
            return True

    def _run(self) -> None:
        engine = self.engine
        try:
            while True:
                with self._cv:
                    self._busy_since = None
                    while not (
                        self._closed
                        or self._dead is not None
                        or self._pending_add
                        or self._pending_abort
                        or self._pending_calls
                        or engine.has_unfinished()
                    ):
                        self._cv.wait()
                    if self._closed or self._dead is not None:
                        return  # close() or the death already failed every waiter
                    adds, self._pending_add = self._pending_add, []
                    aborts, self._pending_abort = self._pending_abort, []
                    calls, self._pending_calls = self._pending_calls, []
                    self._turn = _Waiters(
                        aborts=[(f, lp) for _, f, lp in aborts if f is not None and lp is not None],
                        calls=[(fut, loop) for _, fut, loop in calls],
                    )
                    self._busy_since = time.monotonic()
                    self._busy_what = "admitting requests"
                for req in adds:
                    engine.add(req)
                out: list[RequestDelta] = []
                resolved = []
                self._busy_what = "aborting requests"
                for rid, fut, loop in aborts:
                    delta = engine.abort(rid)
                    if delta is not None:
                        out.append(delta)
                    if fut is not None and loop is not None:
                        resolved.append((fut, loop, delta is not None))
                # after this turn's aborts, so a reset sees the slots they unlocked
                answered = []
                self._busy_what = "a call run between steps"
                for fn, fut, loop in calls:
                    try:
                        answered.append((fut, loop, _resolve, fn(engine)))
                    except Exception as exc:  # the caller's error, not the loop's
                        answered.append((fut, loop, _fail, exc))
                if engine.has_unfinished():
                    self._busy_what = "a step"
                    out.extend(engine.step())
                # Publish stats before anyone hears of this step, so a caller that
                # sees its abort or last delta also sees the freed slots.
                with self._cv:
                    if self._dead is not None:
                        # The watchdog gave up on this turn while it ran and failed its
                        # waiters: a late result must not reach anyone.
                        return
                    self._stats = engine.stats()
                    self._turn = _Waiters()
                for fut, loop, found in resolved:
                    _post(loop, _resolve, fut, found)
                for fut, loop, settle, value in answered:
                    _post(loop, settle, fut, value)
                self._deliver(out)
        except BaseException as exc:  # surface to every waiting stream, never hang them
            if self._dead is None:  # logged before the callbacks run (they may exit)
                logger.exception("engine loop died")
            else:  # e.g. a hung step that failed once the watchdog had given up on it
                logger.warning("engine loop raised after the engine was dead", exc_info=exc)
            self._die(exc, _errors(EngineDeadError, f"engine loop died: {exc!r}", cause=exc))
        finally:
            with self._cv:
                self._busy_since = None

    def _deliver(self, deltas: list[RequestDelta]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestDelta]]] = {}
        with self._cv:
            for d in deltas:
                s = self._streams.get(d.request_id)
                if s is not None:
                    by_loop.setdefault(s.loop, []).append((s.queue, d))
        for loop, items in by_loop.items():
            _post(loop, _put_all, items)


def _errors(
    cls: type[EngineDeadError], message: str, *args: Any, cause: BaseException | None = None
) -> Callable[[], EngineDeadError]:
    """A maker of fresh ``cls(message, *args)`` errors, each raised from ``cause``."""

    def make() -> EngineDeadError:
        err = cls(message, *args)
        err.__cause__ = cause
        return err

    return make


def _post(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> None:
    """``fn(*args)`` on ``loop``, from any thread; nothing if that loop is closed (its
    caller is gone, and the step loop must not die of it)."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        if not loop.is_closed():
            raise


def _put_all(items: list[tuple[asyncio.Queue, RequestDelta]]) -> None:
    for q, d in items:
        q.put_nowait(d)


def _resolve(fut: asyncio.Future[Any], value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _fail(fut: asyncio.Future[Any], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
