"""A broken engine never leaves a request waiting: a step that raises, or one that hangs
past ``step_timeout``, fails every stream and call at once and marks the engine dead;
a server over it exits non-zero, or with keep-alive answers 503 until told to stop."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import pytest
from live_server import free_port, served_process

from engine import AsyncEngine, SamplingParams
from engine.errors import EngineDeadError, EngineStepTimeoutError

LONG = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
TIMEOUT = 0.3  # the watchdog's limit in these tests: a hang is seen within a second


@pytest.fixture
def make_engine(tiny_llama_dir):
    """A fresh engine per call (these tests kill them); all closed afterwards."""
    made: list[AsyncEngine] = []

    def make(**kw: Any) -> AsyncEngine:
        kw = {"dtype": "float32", "device": "cpu", "kv_slots": 1024, **kw}
        made.append(AsyncEngine(str(tiny_llama_dir), **kw))
        return made[-1]

    yield make
    for eng in made:
        eng.close()


class StuckStep:
    """Makes ``engine.step`` hang (a stuck kernel) from call ``after + 1`` on, until
    :attr:`release` is set; :attr:`returned` is set once the hung call came back."""

    def __init__(self, eng: AsyncEngine, after: int = 0) -> None:
        self.release = threading.Event()
        self.returned = threading.Event()
        self.calls = 0
        step = eng.engine.step

        def stuck_step():
            self.calls += 1
            if self.calls > after:
                self.release.wait(60)
                try:
                    return step()
                finally:
                    self.returned.set()
            return step()

        eng.engine.step = stuck_step


async def _consume(eng: AsyncEngine, prompt: str) -> tuple[int, BaseException | None]:
    """Deltas received and the error the stream ended with (None if it finished)."""
    n = 0
    try:
        async for _ in eng.generate(prompt, LONG):
            n += 1
    except EngineDeadError as exc:
        return n, exc
    return n, None


async def _until(pred, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


# -- a hung step ----------------------------------------------------------------------------
async def test_hung_step_fails_every_stream_and_kills_the_engine(make_engine):
    eng = make_engine(step_timeout=TIMEOUT)
    stuck = StuckStep(eng, after=3)  # a few steps first, so the streams are mid-answer
    assert eng.is_alive
    t0 = time.monotonic()
    results = await asyncio.wait_for(
        asyncio.gather(*(_consume(eng, p) for p in ("one", "two", "three"))), 10
    )
    elapsed = time.monotonic() - t0
    for n, err in results:
        assert n >= 1, "the stream should have been mid-answer"
        assert isinstance(err, EngineStepTimeoutError)
        assert f"{TIMEOUT:g} s" in str(err) and "a step" in str(err)
    assert TIMEOUT < elapsed < 5
    assert not eng.is_alive
    assert isinstance(eng.failure, EngineStepTimeoutError)
    assert eng.failure.timeout == TIMEOUT

    # new work is refused at once, nothing queues behind the hung step
    with pytest.raises(EngineStepTimeoutError):
        await asyncio.wait_for(anext(eng.generate("new", LONG)), 1)
    with pytest.raises(EngineDeadError):
        await asyncio.wait_for(eng.reset_prefix_cache(), 1)
    assert await asyncio.wait_for(eng.abort("anything"), 1) is False

    # the hung step comes back late: nothing is resurrected or published
    stats = eng.stats()
    stuck.release.set()
    assert await asyncio.to_thread(stuck.returned.wait, 10)
    await asyncio.sleep(0.1)
    assert eng.stats() is stats
    assert not eng.is_alive
    with pytest.raises(EngineDeadError):
        await anext(eng.generate("after", LONG))


async def test_hung_call_between_steps_fails_it_and_the_streams(make_engine):
    eng = make_engine(step_timeout=TIMEOUT)
    release = threading.Event()

    def stuck_call(prompt):
        release.wait(60)
        return 0

    eng.engine.cached_prefix_len = stuck_call
    try:
        gen = eng.generate("running", LONG)
        await anext(gen)
        with pytest.raises(EngineStepTimeoutError, match="a call run between steps"):
            await asyncio.wait_for(eng.cached_prefix_len("x"), 5)
        # deltas delivered before the hang may still be queued: the stream ends with
        # the error once they are read (a busy machine queues several)
        with pytest.raises(EngineStepTimeoutError):
            async with asyncio.timeout(5):
                while True:
                    await anext(gen)
        assert not eng.is_alive
    finally:
        release.set()


async def test_steps_slower_than_nothing_but_under_the_limit_are_not_a_hang(make_engine):
    # the limit is per step: a request that takes longer than it in total is fine
    eng = make_engine(step_timeout=0.5)
    step = eng.engine.step

    def slow_step():
        time.sleep(0.02)
        return step()

    eng.engine.step = slow_step
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    t0 = time.monotonic()
    deltas = [d async for d in eng.generate("slow but fine", params)]
    assert time.monotonic() - t0 > 0.5
    assert deltas[-1].finish_reason == "length"
    assert eng.is_alive and eng.failure is None


# -- a step that raises -----------------------------------------------------------------------
async def test_step_exception_fails_every_stream_and_kills_the_engine(make_engine):
    eng = make_engine()
    step = eng.engine.step
    calls = 0

    def failing_step():
        nonlocal calls
        calls += 1
        if calls > 3:
            raise RuntimeError("simulated kernel failure")
        return step()

    eng.engine.step = failing_step
    results = await asyncio.wait_for(
        asyncio.gather(*(_consume(eng, p) for p in ("one", "two"))), 10
    )
    for n, err in results:
        assert n >= 1
        assert type(err) is EngineDeadError
        assert "simulated kernel failure" in str(err)
        assert isinstance(err.__cause__, RuntimeError)
    assert not eng.is_alive
    assert isinstance(eng.failure, RuntimeError)
    with pytest.raises(EngineDeadError):
        await anext(eng.generate("new", LONG))
    with pytest.raises(EngineDeadError):
        await eng.cached_prefix_len("x")


async def test_death_callbacks_run_once_and_not_on_close(make_engine):
    eng = make_engine()
    seen: list[tuple[EngineDeadError, str]] = []
    eng.on_death(lambda err: seen.append((err, threading.current_thread().name)))

    def failing_step():
        raise RuntimeError("boom")

    eng.engine.step = failing_step
    _, err = await asyncio.wait_for(_consume(eng, "x"), 10)
    assert isinstance(err, EngineDeadError)
    await _until(lambda: bool(seen))
    assert len(seen) == 1
    assert isinstance(seen[0][0], EngineDeadError) and "boom" in str(seen[0][0])
    assert seen[0][1] == "sotserve-engine"  # the thread that saw it
    late: list[EngineDeadError] = []
    eng.on_death(late.append)  # already dead: called at once
    assert len(late) == 1 and "boom" in str(late[0])

    closed = make_engine()
    closed.on_death(late.append)
    closed.close()
    assert len(late) == 1 and len(seen) == 1


async def test_watchdog_calls_back_from_its_own_thread(make_engine):
    eng = make_engine(step_timeout=TIMEOUT)
    stuck = StuckStep(eng)
    names: list[str] = []
    eng.on_death(lambda err: names.append(threading.current_thread().name))
    try:
        _, err = await asyncio.wait_for(_consume(eng, "x"), 10)
        assert isinstance(err, EngineStepTimeoutError)
        await _until(lambda: bool(names))
        # the step thread is still stuck: only the watchdog can have noticed
        assert names == ["sotserve-engine-watchdog"]
        assert not stuck.returned.is_set()
    finally:
        stuck.release.set()


# -- close, and the option itself ---------------------------------------------------------------
async def test_close_fails_what_waits_instead_of_leaving_it_hanging(make_engine):
    # no step loop runs here (step_thread=False and nobody calls run_step_loop), so
    # before close() these would wait for good
    eng = make_engine(step_thread=False)
    assert eng.is_alive
    stream = asyncio.ensure_future(_consume(eng, "waiting"))
    call = asyncio.ensure_future(eng.cached_prefix_len("x"))
    await asyncio.sleep(0.05)
    eng.close()
    assert not eng.is_alive
    n, err = await asyncio.wait_for(stream, 2)
    assert n == 0 and isinstance(err, EngineDeadError) and "closed" in str(err)
    with pytest.raises(EngineDeadError, match="closed"):
        await asyncio.wait_for(call, 2)
    assert await eng.abort("waiting") is False
    with pytest.raises(EngineDeadError, match="closed"):
        await anext(eng.generate("after", LONG))
    assert eng.failure is None  # closed, not dead


@pytest.mark.parametrize("bad", [0, -1.0, True, "5"])
def test_step_timeout_must_be_positive_and_is_checked_before_loading(bad):
    with pytest.raises(ValueError, match="step_timeout"):
        AsyncEngine("/no/such/model", step_timeout=bad)


def test_step_timeout_none_runs_no_watchdog(make_engine):
    before = {t.ident for t in threading.enumerate() if t.name == "sotserve-engine-watchdog"}
    eng = make_engine(step_timeout=None)
    after = {t.ident for t in threading.enumerate() if t.name == "sotserve-engine-watchdog"}
    assert eng.step_timeout is None
    assert after <= before


# -- serve_app in a real process ------------------------------------------------------------------
# A minimal app over serve_app, so these checks hold whatever the servers' handlers
# look like: /health is is_alive, /generate maps EngineDeadError to 503 as they do.
SCRIPT = r"""
import logging, sys, threading
from aiohttp import web
from engine import AsyncEngine, SamplingParams
from engine.errors import EngineDeadError
from engine.serve_loop import serve_app

model, port, mode, keep, log = sys.argv[1:6]
logging.basicConfig(filename=log, level=logging.INFO)
eng = AsyncEngine(
    model, dtype="float32", device="cpu", kv_slots=512, step_thread=False, step_timeout=0.5
)

def broken_step():
    if mode == "raise":
        raise RuntimeError("simulated step failure")
    threading.Event().wait()  # a stuck kernel: never returns

eng.engine.step = broken_step

async def health(request):
    return web.json_response({"alive": eng.is_alive}, status=200 if eng.is_alive else 503)

async def generate(request):
    try:
        async for _ in eng.generate("hi", SamplingParams(max_tokens=4, ignore_eos=True)):
            pass
    except EngineDeadError as exc:
        return web.json_response({"error": type(exc).__name__}, status=503)
    return web.json_response({"error": None})

app = web.Application()
app.router.add_get("/health", health)
app.router.add_post("/generate", generate)
try:
    serve_app(eng, app, "127.0.0.1", int(port), keep_alive_on_engine_death=keep == "1")
except EngineDeadError:
    logging.exception("serve_app raised")
    raise
"""

EXPECTED = {"raise": "EngineDeadError", "hang": "EngineStepTimeoutError"}


def _http(url: str, post: bool = False) -> tuple[int, Any]:
    req = urllib.request.Request(url, b"{}" if post else None, method="POST" if post else "GET")
    try:
        with urllib.request.urlopen(req, timeout=20) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _serve(tiny_llama_dir, tmp_path, mode: str, keep_alive: bool):
    port = free_port()
    log = tmp_path / "server.log"
    argv = [sys.executable, "-c", SCRIPT, str(tiny_llama_dir), str(port), mode,
            "1" if keep_alive else "0", str(log)]  # fmt: skip
    env = {"HF_HUB_OFFLINE": "1"}
    return served_process(argv, port, "/health", env, 120, "serve_app script"), log


@pytest.mark.parametrize("mode", ["raise", "hang"])
def test_dead_engine_ends_the_server_with_a_non_zero_status(tiny_llama_dir, tmp_path, mode):
    served, log = _serve(tiny_llama_dir, tmp_path, mode, keep_alive=False)
    with served as (url, proc):
        status, body = _http(f"{url}/generate", post=True)
        # the in-flight request fails with the reason, it is not left hanging
        assert (status, body["error"]) == (503, EXPECTED[mode])
        rc = proc.wait(timeout=30)
    assert rc == 1
    text = log.read_text()
    if mode == "raise":
        assert "simulated step failure" in text and "serve_app raised" in text
    else:  # the main thread never came back: the process ended itself
        assert "timed out" in text and "exiting with status 1" in text


@pytest.mark.parametrize("mode", ["raise", "hang"])
def test_keep_alive_answers_503_until_sigterm(tiny_llama_dir, tmp_path, mode):
    served, log = _serve(tiny_llama_dir, tmp_path, mode, keep_alive=True)
    with served as (url, proc):
        status, body = _http(f"{url}/generate", post=True)
        assert (status, body["error"]) == (503, EXPECTED[mode])
        assert _http(f"{url}/health") == (503, {"alive": False})
        t0 = time.monotonic()
        assert _http(f"{url}/generate", post=True)[0] == 503
        assert time.monotonic() - t0 < 2, "a request to a dead engine must fail fast"
        time.sleep(1)
        assert proc.poll() is None, "keep-alive: the server must not exit by itself"
        assert _http(f"{url}/health")[0] == 503
        # a hung main thread cannot run Python's signal handlers: still stops
        os.killpg(proc.pid, signal.SIGTERM)
        rc = proc.wait(timeout=30)
    assert rc == 1
    assert "keep_alive_on_engine_death" in log.read_text()
