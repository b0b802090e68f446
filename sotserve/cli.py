"""``sotserve`` command line.

``sotserve ask "question"`` answers one question with the Skeleton-of-Thought
planner, on the engine in this process or on a running server (``--url``), and
draws the skeleton and the points live in a terminal. ``sotserve route "question"``
says how ``auto`` would answer it. ``sotserve serve`` serves the OpenAI-compatible
API and the web page.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError
from rich.console import Console
from rich.live import Live

from sotserve.live_view import REFRESH_PER_SECOND, LiveView, PlainView
from sotserve.schemas import Done, ErrorEvent, Event, PlanOptions, PointDone

# The engine (and torch) load only where the model runs: `ask --url` starts quickly.
if TYPE_CHECKING:
    from engine import AsyncEngine

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130
# The server's --api-key reads the same variable, so one shell serves and asks.
API_KEY_ENV = "SOTSERVE_API_KEY"


class CLIError(Exception):
    """A failure reported as ``error: <message>`` with exit status 2."""


def _add_ask_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("question")
    p.add_argument(
        "--mode", default=None, choices=["auto", "sequential", "sot", "graph"],
        help="how to answer (default: auto; with --url, the server's default)",
    )  # fmt: skip
    p.add_argument(
        "--url", default=None, help="a sotserve server's base URL, e.g. http://host:8000"
    )
    p.add_argument(
        "--api-key", default=None,
        help="with --url: the server's API key, sent as Authorization: Bearer "
        f"(default: ${API_KEY_ENV})",
    )  # fmt: skip
    p.add_argument(
        "--json", action="store_true", help="print one JSON object at the end, no live view"
    )
    p.add_argument("--max-tokens", type=int, default=None, help="tokens of the whole answer")
    p.add_argument("--max-points", type=int, default=None, help="points of the skeleton")
    p.add_argument("--point-max-tokens", type=int, default=None, help="tokens of each point")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument(
        "--pipeline", action=argparse.BooleanOptionalAction, default=None,
        help="start each point as soon as its skeleton line completes (default: after "
        "the whole skeleton, which is faster on a small CPU)",
    )  # fmt: skip
    p.add_argument(
        "--timeout", type=float, default=None,
        help="seconds to wait for the answer (with --url: the client's timeout)",
    )  # fmt: skip
    g = p.add_argument_group("in process only (without --url)")
    g.add_argument(
        "--model", default=None, help="HF directory, hub id or .gguf (default: embedded SmolLM2)"
    )
    g.add_argument("--dtype", default=None, help="float32 | bfloat16 | auto (default auto)")
    g.add_argument("--device", default=None, help="cpu | cuda | auto (default auto)")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The answer options the command line sets; the rest keep their defaults."""
    values = {
        "max_tokens": args.max_tokens,
        "max_points": args.max_points,
        "point_max_tokens": args.point_max_tokens,
        "temperature": args.temperature,
        "seed": args.seed,
        "pipeline": args.pipeline,
    }
    return {k: v for k, v in values.items() if v is not None}


def _options_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    name = str(err["loc"][0]) if err["loc"] else "options"
    return f"--{name.replace('_', '-')}: {err['msg']}"


# -- event sources ------------------------------------------------------------------------
async def _local_events(
    engine: AsyncEngine, question: str, mode: str | None, overrides: dict[str, Any]
) -> AsyncIterator[Event]:
    from sotserve.backends.local import LocalBackend
    from sotserve.planner import Planner, PlannerError

    planner = Planner(LocalBackend(engine))
    try:
        async with contextlib.aclosing(planner.stream(question, mode, **overrides)) as events:
            async for event in events:
                yield event
    except PlannerError as exc:
        raise CLIError(str(exc)) from None
    except ValidationError as exc:
        raise CLIError(_options_error(exc)) from None


async def _remote_events(
    url: str,
    api_key: str | None,
    timeout: float | None,
    question: str,
    mode: str | None,
    overrides: dict[str, Any],
) -> AsyncIterator[Event]:
    from sotserve import client

    kwargs = {} if timeout is None else {"timeout": timeout}
    try:
        async with (
            client.AsyncClient(url, api_key=api_key, **kwargs) as c,
            contextlib.aclosing(c.stream(question, mode, **overrides)) as stream,
        ):
            async for event in stream:
                yield event
    except client.SotserveError as exc:
        raise CLIError(_client_error(exc, url)) from None


def _client_error(exc: Exception, url: str) -> str:
    from sotserve import client

    text = str(exc)
    if isinstance(exc, client.APITimeoutError):
        return f"{url} did not answer in time: {text}"
    if isinstance(exc, client.APIConnectionError):
        return text if url in text else f"cannot connect to {url}: {text}"
    if isinstance(exc, client.APIError):
        message = exc.message or text
        return f"{url} answered {exc.status}: {message}" if exc.status else f"{url}: {message}"
    return text


# -- presenting the events ------------------------------------------------------------------
async def _consume(events: AsyncIterator[Event], update: Callable[[Event], None]) -> Done:
    async for event in events:
        if isinstance(event, ErrorEvent):
            raise CLIError(event.message)
        update(event)
        if isinstance(event, Done):
            return event
    raise CLIError("the answer ended without a result")


class _JSONResult:
    """Collects the finished points; ``result(done)`` is what ``--json`` prints."""

    def __init__(self) -> None:
        self.points: dict[int, PointDone] = {}

    def update(self, event: Event) -> None:
        if isinstance(event, PointDone):
            self.points[event.index] = event

    def result(self, done: Done) -> dict[str, Any]:
        points = [
            {
                "index": p.index,
                "title": p.title,
                "depends_on": p.depends_on,
                "text": self.points[p.index].text if p.index in self.points else "",
            }
            for p in done.points
        ]
        return {
            "answer": done.answer,
            "mode": done.mode,
            "points": points,
            "timings": done.timings.model_dump(mode="json"),
            "usage": done.usage.model_dump(mode="json"),
            "route": done.route.model_dump(mode="json") if done.route else None,
            "fallback": done.fallback,
            "finish_reason": done.finish_reason,
        }


def _interactive(console: Console) -> bool:
    # stdout itself, not rich's guess: FORCE_COLOR must not turn a pipe into a live view
    return console.is_terminal and sys.stdout.isatty()


async def _refresh(live: Live) -> None:
    # One thread draws and updates: the view is never read while an event changes it.
    while True:
        live.refresh()
        await asyncio.sleep(1 / REFRESH_PER_SECOND)


async def _present(
    events: AsyncIterator[Event], args: argparse.Namespace, console: Console
) -> None:
    async with contextlib.aclosing(events):  # type: ignore[type-var]
        if args.json:
            collector = _JSONResult()
            done = await _consume(events, collector.update)
            print(json.dumps(collector.result(done), ensure_ascii=False), flush=True)
        elif _interactive(console):
            view = LiveView(args.question)
            with Live(view, console=console, auto_refresh=False) as live:
                refresher = asyncio.create_task(_refresh(live))
                try:
                    await _consume(events, view.update)
                finally:
                    refresher.cancel()
        else:
            await _consume(events, PlainView().update)


async def _with_timeout(coro: Any, timeout: float | None) -> None:
    if timeout is None:
        await coro
        return
    try:
        async with asyncio.timeout(timeout):
            await coro
    except TimeoutError:
        raise CLIError(f"no answer within {timeout:g} s") from None


def _ask(args: argparse.Namespace) -> int:
    overrides = _overrides(args)
    console = Console()
    if args.url is not None:
        api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
        source = _remote_events(
            args.url, api_key, args.timeout, args.question, args.mode, overrides
        )
        asyncio.run(_present(source, args, console))
        return 0
    # Check what needs no model before spending seconds on loading it.
    try:
        PlanOptions(**overrides, **({"mode": args.mode} if args.mode else {}))
    except ValidationError as exc:
        raise CLIError(_options_error(exc)) from None
    if not args.question.strip():
        raise CLIError("the question is empty")
    from engine import AsyncEngine, EngineError

    name = args.model or "the embedded SmolLM2-135M-Instruct"
    status = (
        console.status(f"loading {name}…")
        if _interactive(console) and not args.json
        else contextlib.nullcontext()
    )
    try:
        with status:
            engine = AsyncEngine(
                args.model, dtype=args.dtype or "auto", device=args.device or "auto"
            )
    except EngineError as exc:
        raise CLIError(str(exc)) from None
    try:
        source = _local_events(engine, args.question, args.mode, overrides)
        asyncio.run(_with_timeout(_present(source, args, console), args.timeout))
    finally:
        engine.close()
    return 0


ROUTE_HELP = "say how auto would answer a question (mode, source, reason), without answering"


def _add_route_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("question")
    p.add_argument(
        "--router", default=None, choices=["trained", "rules", "model"],
        help="who decides (default: trained, the rules where it does not fit the model)",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--model", default=None, help="HF directory, hub id or .gguf (default: embedded SmolLM2)"
    )
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | auto (default auto)")
    p.add_argument("--device", default=None, help="cpu | cuda | auto (default auto)")


def _route(args: argparse.Namespace) -> int:
    # an empty question is refused before seconds go to loading the model
    if not args.question.strip():
        raise CLIError("the question is empty")
    import time

    from engine import AsyncEngine, EngineError
    from sotserve.backends.local import LocalBackend
    from sotserve.planner import Planner, PlannerError

    try:
        engine = AsyncEngine(args.model, dtype=args.dtype or "auto", device=args.device or "auto")
    except EngineError as exc:
        raise CLIError(str(exc)) from None

    async def decide() -> tuple[Any, float]:
        planner = Planner(LocalBackend(engine))
        overrides = {"router": args.router} if args.router else {}
        await planner.router.trained_params(planner.backend)  # the one-off probe, untimed
        t0 = time.perf_counter()
        decision = await planner.route(args.question, **overrides)
        return decision, time.perf_counter() - t0

    try:
        decision, seconds = asyncio.run(decide())
    except PlannerError as exc:
        raise CLIError(str(exc)) from None
    finally:
        engine.close()
    if args.json:
        print(json.dumps({**decision.model_dump(), "seconds": round(seconds, 4)}))
    else:
        print(f"mode:   {decision.mode}\nsource: {decision.source}\nreason: {decision.reason}")
        print(f"({seconds * 1e3:.0f} ms)", file=sys.stderr)
    return 0


SERVE_HELP = "serve the OpenAI-compatible API and the web page"


def _serve_command(argv: list[str]) -> int:
    from engine import EngineError
    from engine.serving import add_model_args
    from sotserve.backends.base import BackendError
    from sotserve.server.app import add_server_args, serve

    parser = argparse.ArgumentParser(prog="sotserve serve", description=SERVE_HELP)
    add_model_args(parser)
    add_server_args(parser)
    args = parser.parse_args(argv)
    try:
        serve(args)
    except (EngineError, BackendError, ValueError) as exc:  # a bad option, model or backend
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sotserve", description=__doc__.replace("``", ""))
    sub = parser.add_subparsers(dest="command", required=True)
    ask = sub.add_parser(
        "ask",
        help="answer one question, drawing the skeleton and the points live",
        description="Answer one question. In a terminal the skeleton and the points are "
        "drawn live; piped, the answer streams to stdout and the timings go to stderr.",
    )
    _add_ask_args(ask)
    _add_route_args(sub.add_parser("route", help=ROUTE_HELP, description=ROUTE_HELP))
    # `serve` has its own parser (below): its options come with the server, which
    # imports the engine, and `ask` should not wait for torch to load.
    sub.add_parser("serve", add_help=False, help=SERVE_HELP)
    args, rest = parser.parse_known_args(argv)
    if args.command == "serve":
        return _serve_command(rest)
    if rest:
        ask.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "route":
        try:
            return _route(args)
        except CLIError as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            return EXIT_ERROR
    if args.url is not None:
        local = [f"--{k}" for k in ("model", "dtype", "device") if getattr(args, k) is not None]
        if local:
            ask.error(f"{', '.join(local)}: not with --url (the server has its own model)")
    elif args.api_key is not None:
        ask.error("--api-key: only with --url (the engine in this process needs no key)")
    try:
        return _ask(args)
    except CLIError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # stdout was closed early (`| head`): stop quietly, and keep Python from
        # complaining again when it flushes stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
