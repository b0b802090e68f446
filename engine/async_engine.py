"""Asyncio front of the engine: the step loop runs in its own thread.

Callers ``async for`` over :meth:`AsyncEngine.generate`; concurrent calls batch
together because the step thread admits every pending request before each step.
Tensor work releases the GIL, so the event loop stays responsive while a step runs.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from engine.errors import EngineDeadError, InvalidRequestError
from engine.llm import render_chat
from engine.llm_engine import LLMEngine, Prompt
from engine.outputs import RequestDelta
from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.stats import EngineStats

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestDelta | BaseException]


class AsyncEngine:
    """Streams of token deltas from a continuously batched engine.

    Same loading arguments as :class:`engine.LLM`. The step loop runs in a thread of
    its own, unless ``step_thread=False``: then whoever owns the process's main thread
    calls :meth:`run_step_loop` there (the servers do, :func:`engine.serve_loop.serve_app`), and the
    event loop lives in another thread. That matters on the CPU: measured here, a
    SmolLM2 decode step took 15.9 ms on the main thread and 26-33 ms on any other
    (torch's OpenMP workers serve a non-main thread's parallel regions slowly).
    """

    def __init__(
        self,
        model: str | None = None,
        dtype: str | torch.dtype | None = "auto",
        device: str | torch.device | None = "auto",
        step_thread: bool = True,
        **config: Any,
    ) -> None:
        self.engine = LLMEngine(model, dtype=dtype, device=device, **config)
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
        self._dead: BaseException | None = None
        self._closed = False
        self._thread: threading.Thread | None = None
        if step_thread:
            self._thread = threading.Thread(target=self._run, name="sotserve-engine", daemon=True)
            self._thread.start()

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

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        return render_chat(self.engine.tokenizer, messages)

    async def generate(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
    ) -> AsyncIterator[RequestDelta]:
        """Yield deltas until the request finishes; the last one has ``finish_reason``.

        ``priority`` is vLLM's: lower is scheduled first (:mod:`engine.scheduler`).

        Raises :class:`engine.errors.InvalidRequestError` before yielding anything for
        bad input. Leaving the loop early (break, cancel, disconnect) aborts the request.
        """
        if self._dead is not None:
            raise EngineDeadError("engine loop has died") from self._dead
        req = self.engine.make_request(prompt, params, request_id, priority)
        rid = req.request_id
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._cv:
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
                self._streams.pop(rid, None)

    async def abort(self, request_id: str) -> bool:
        """Abort a request; returns once its slots are free (False if it was unknown)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bool] = loop.create_future()
        self._submit_abort(request_id, fut, loop)
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
        if self._dead is not None:
            raise EngineDeadError("engine loop has died") from self._dead
        if self._closed:
            raise EngineDeadError("engine closed")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        with self._cv:
            self._pending_calls.append((fn, fut, loop))
            self._cv.notify()
        return await fut

    def stats(self) -> EngineStats:
        """A snapshot taken after the latest step (frozen, so it is shared, not copied)."""
        with self._cv:
            return self._stats

    @property
    def failure(self) -> BaseException | None:
        """What killed the step loop, if it died."""
        return self._dead

    def run_step_loop(self) -> None:
        """Run the step loop in the calling thread until :meth:`close` (only for an
        engine made with ``step_thread=False``)."""
        if self._thread is not None:
            raise RuntimeError("this engine's step loop already runs in its own thread")
        self._run()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    async def __aenter__(self) -> AsyncEngine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    # -- the step thread ---------------------------------------------------------------
    def _submit_abort(
        self, rid: str, fut: asyncio.Future[bool] | None, loop: asyncio.AbstractEventLoop | None
    ) -> None:
        with self._cv:
            self._pending_abort.append((rid, fut, loop))
            self._cv.notify()

    def _run(self) -> None:
        engine = self.engine
        try:
            while True:
                with self._cv:
                    while not (
                        self._closed
                        or self._pending_add
                        or self._pending_abort
                        or self._pending_calls
                        or engine.has_unfinished()
                    ):
                        self._cv.wait()
                    if self._closed:
                        calls, self._pending_calls = self._pending_calls, []
                        for _, fut, loop in calls:
                            loop.call_soon_threadsafe(_fail, fut, EngineDeadError("engine closed"))
                        return
                    adds, self._pending_add = self._pending_add, []
                    aborts, self._pending_abort = self._pending_abort, []
                    calls, self._pending_calls = self._pending_calls, []
                for req in adds:
                    engine.add(req)
                out: list[RequestDelta] = []
                resolved = []
                for rid, fut, loop in aborts:
                    delta = engine.abort(rid)
                    if delta is not None:
                        out.append(delta)
                    if fut is not None and loop is not None:
                        resolved.append((fut, loop, delta is not None))
                # after this turn's aborts, so a reset sees the slots they unlocked
                answered = []
                for fn, fut, loop in calls:
                    try:
                        answered.append((fut, loop, _resolve, fn(engine)))
                    except Exception as exc:  # the caller's error, not the loop's
                        answered.append((fut, loop, _fail, exc))
                if engine.has_unfinished():
                    out.extend(engine.step())
                # Publish stats before anyone hears of this step, so a caller that
                # sees its abort or last delta also sees the freed slots.
                with self._cv:
                    self._stats = engine.stats()
                for fut, loop, found in resolved:
                    loop.call_soon_threadsafe(_resolve, fut, found)
                for fut, loop, settle, value in answered:
                    loop.call_soon_threadsafe(settle, fut, value)
                self._deliver(out)
        except BaseException as exc:  # surface to every waiting stream, never hang them
            logger.exception("engine loop died")
            self._dead = exc
            err = EngineDeadError(f"engine loop died: {exc!r}")
            with self._cv:
                streams = list(self._streams.values())
                pending = list(self._pending_abort)
                calls, self._pending_calls = self._pending_calls, []
            for s in streams:
                s.loop.call_soon_threadsafe(s.queue.put_nowait, err)
            for _, fut, loop in pending:
                if fut is not None and loop is not None:
                    loop.call_soon_threadsafe(_resolve, fut, False)
            for _, fut, loop in calls:
                loop.call_soon_threadsafe(_fail, fut, err)

    def _deliver(self, deltas: list[RequestDelta]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestDelta]]] = {}
        with self._cv:
            for d in deltas:
                s = self._streams.get(d.request_id)
                if s is not None:
                    by_loop.setdefault(s.loop, []).append((s.queue, d))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_put_all, items)


def _put_all(items: list[tuple[asyncio.Queue, RequestDelta]]) -> None:
    for q, d in items:
        q.put_nowait(d)


def _resolve(fut: asyncio.Future[Any], value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _fail(fut: asyncio.Future[Any], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
