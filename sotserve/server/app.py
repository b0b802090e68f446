"""The sotserve HTTP app: chat, raw completions, models, health, metrics, web page.

``build_app(engine)`` mounts everything on one :class:`engine.AsyncEngine`; the
caller owns the engine. ``build_remote_app(replicas)`` serves the same chat API, web
page and metrics with the planner over remote OpenAI-compatible engines (vLLM,
SGLang, llama.cpp's server, another sotserve): no model is loaded here.
``serve(args)`` is ``sotserve serve``: it loads the engine, or checks the
``--backend`` engines, and serves until interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from engine import AsyncEngine
from engine.cli_args import add_engine_args, engine_kwargs
from engine.protocol import APIError, ModelCard, ModelList
from engine.serve_loop import serve_from_args
from engine.server import add_completion_routes
from engine.serving import (
    AdmissionGate,
    Security,
    ServerLimits,
    add_http_args,
    error_response,
    http_options,
    make_app,
    public_model_name,
    serve_http,
)
from sotserve.backends.base import BackendError
from sotserve.backends.http import HTTPBackend, load_tokenizer
from sotserve.backends.local import LocalBackend
from sotserve.backends.replicas import ReplicaSet
from sotserve.load_policy import DEFAULT_MAX_LOAD, DEFAULT_MAX_SEQUENTIAL, LoadPolicy
from sotserve.planner import Planner
from sotserve.server.chat import ChatHandler
from sotserve.server.limits import AdmittedBackend
from sotserve.server.metrics import CONTENT_TYPE, BackendCollector, Metrics

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"

METRICS_KEY = web.AppKey("metrics", Metrics)
PLANNER_KEY = web.AppKey("planner", Planner)
WARM_UP_KEY = web.AppKey("warm_up", asyncio.Task)


def _endpoint(request: web.Request) -> str:
    # The route's pattern, not the raw path, so unknown URLs cannot blow up the label set.
    info = request.match_info
    route = info.route if info is not None else None
    if route is None or route.resource is None or info.http_exception is not None:
        return "other"
    return route.resource.canonical


@web.middleware
async def metrics_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Count every request and time it, by endpoint and final status."""
    metrics = request.app[METRICS_KEY]
    t0 = time.perf_counter()
    status = 500
    try:
        resp = await handler(request)
        status = resp.status
        return resp
    except web.HTTPException as exc:
        status = exc.status
        raise
    except asyncio.CancelledError:
        status = 499  # the client hung up (nginx's "client closed request")
        raise
    finally:
        endpoint = _endpoint(request)
        if endpoint != "/metrics":  # scrapes would drown the interesting numbers
            metrics.requests.labels(endpoint, str(status)).inc()
            metrics.request_latency.labels(endpoint).observe(time.perf_counter() - t0)


def build_app(
    engine: AsyncEngine,
    model_name: str | None = None,
    limits: ServerLimits | None = None,
    warm_up: bool = False,
    security: Security | None = None,
    **plan_defaults: Any,
) -> web.Application:
    """An app serving ``engine``; ``plan_defaults`` are :class:`PlanOptions` defaults
    (a request's ``sot`` field overrides them). With ``warm_up`` the planner's fixed
    prompt heads are cached as the server starts (:meth:`Planner.warm_up`).
    ``security`` defaults to a loopback server's (:class:`Security`): no keys, so no
    admin routes.

    ``POST /reset_prefix_cache`` (an admin route) empties the engine's prefix cache
    and then caches those heads again, as any running server has them;
    ``?prompt_heads=false`` leaves the cache empty."""
    limits = limits or ServerLimits()
    app = make_app(limits, security or Security.for_bind("127.0.0.1"), metrics_middleware)
    metrics = Metrics(engine_stats=engine.stats)
    gate = _gate(limits, metrics)
    planner = Planner(AdmittedBackend(LocalBackend(engine)), **plan_defaults)
    app[METRICS_KEY] = metrics
    app[PLANNER_KEY] = planner
    # /v1/completions shares the chat's gate: both spend the same engine
    handlers = add_completion_routes(app, engine, model_name, limits, gate)

    async def rewarm(request: web.Request) -> dict[str, int]:
        return {"prompt_head_tokens": await _rewarm(app, planner, request)}

    handlers.after_reset = rewarm
    _mount_service(app, planner, handlers.model_names, limits, gate, metrics, warm_up)
    return app


def _gate(limits: ServerLimits, metrics: Metrics) -> AdmissionGate:
    gate = AdmissionGate(limits.max_concurrency, limits.max_queue, limits.queue_timeout_s)

    def gauges(g: AdmissionGate) -> None:
        metrics.in_flight.set(g.running)
        metrics.queued.set(g.waiting)

    gate.on_change = gauges
    return gate


def build_remote_app(
    replicas: ReplicaSet,
    model_name: str | None = None,
    limits: ServerLimits | None = None,
    warm_up: bool = True,
    security: Security | None = None,
    **plan_defaults: Any,
) -> web.Application:
    """An app whose planner runs on ``replicas`` (remote engines); the app starts
    their health checks (:meth:`ReplicaSet.start`: it fails if none answers) and
    closes them.

    ``GET /health`` is 200 while at least one replica is healthy (the body says which
    are), else 503; ``/metrics`` adds per-backend requests, errors, time and cached
    tokens; ``POST /reset_prefix_cache`` asks every replica to empty its cache
    (vLLM's ``/reset_prefix_cache``, SGLang's ``/flush_cache``) and then caches the
    prompt heads on each again."""
    limits = limits or ServerLimits()
    app = make_app(limits, security or Security.for_bind("127.0.0.1"), metrics_middleware)
    metrics = Metrics(backends=BackendCollector(replicas.replicas))
    gate = _gate(limits, metrics)
    planner = Planner(AdmittedBackend(replicas), **plan_defaults)
    name = model_name or public_model_name(replicas.model_name)
    app[METRICS_KEY] = metrics
    app[PLANNER_KEY] = planner
    created = int(time.time())

    async def start(app: web.Application) -> None:
        await replicas.start()

    async def stop(app: web.Application) -> None:
        await replicas.close()

    app.on_startup.append(start)
    app.on_cleanup.append(stop)

    async def health(request: web.Request) -> web.Response:
        states = {r.url: "ok" if r.healthy else "down" for r in replicas.replicas}
        if replicas.healthy:
            return web.json_response({"status": "ok", "backends": states})
        names = ", ".join(states)
        return error_response(APIError(503, f"no backend is healthy ({names})",
                              type="server_error", code="backend_unavailable"))  # fmt: skip

    async def models(request: web.Request) -> web.Response:
        card = ModelCard(id=name, created=created, root=name,
                         max_model_len=replicas.max_model_len)  # fmt: skip
        return web.json_response(ModelList(data=[card]).model_dump())

    async def reset_prefix_cache(request: web.Request) -> web.Response:
        done = await asyncio.gather(*(r.http.reset_prefix_cache() for r in replicas.replicas))
        reset = {r.url: ok for r, ok in zip(replicas.replicas, done, strict=True)}
        heads = await _rewarm(app, planner, request)
        status = 200 if any(done) else 501
        body = {"status": "ok" if any(done) else "unsupported", "backends": reset,
                "prompt_head_tokens": heads}  # fmt: skip
        return web.json_response(body, status=status)

    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/reset_prefix_cache", reset_prefix_cache)
    _mount_service(app, planner, (name, replicas.model_name), limits, gate, metrics, warm_up)
    return app


async def _rewarm(app: web.Application, planner: Planner, request: web.Request) -> int:
    """After a prefix-cache reset: cache the prompt heads again, unless the request
    says ``?prompt_heads=false``; returns the head tokens sent."""
    if WARM_UP_KEY in app:
        # a start-up warm-up still in flight would cache its heads after the reset
        # returned; let it end, so nothing runs once the caller hears back
        await asyncio.gather(app[WARM_UP_KEY], return_exceptions=True)
    if request.query.get("prompt_heads", "true").lower() in ("false", "0", "no"):
        return 0
    return await planner.warm_up()


def _mount_service(
    app: web.Application,
    planner: Planner,
    model_names: tuple[str, ...],
    limits: ServerLimits,
    gate: AdmissionGate,
    metrics: Metrics,
    warm_up: bool,
) -> None:
    """What both apps serve: chat, metrics, the web page, and the start-up warm-up."""
    if warm_up:

        async def start_warm_up(app: web.Application) -> None:
            # a task, not awaited: the engine's step loop starts after the app does
            app[WARM_UP_KEY] = asyncio.create_task(_warm_up(planner))

        async def stop_warm_up(app: web.Application) -> None:
            task = app[WARM_UP_KEY]
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

        app.on_startup.append(start_warm_up)
        app.on_cleanup.insert(0, stop_warm_up)  # before the backends close
    chat = ChatHandler(planner, model_names, limits, gate, metrics)
    app.router.add_post("/v1/chat/completions", chat.handle)

    async def metrics_page(request: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def index(request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC_DIR / "index.html")

    app.router.add_get("/metrics", metrics_page)
    app.router.add_get("/", index)
    app.router.add_static("/static", STATIC_DIR)


async def _warm_up(planner: Planner) -> None:
    try:
        tokens = await planner.warm_up()
    except Exception:  # only a cache left cold: the first answers pay for the heads
        logger.exception("caching the prompt heads failed")
    else:
        logger.info("cached %d tokens of fixed prompt heads", tokens)


def add_server_args(p: argparse.ArgumentParser) -> None:
    """``sotserve serve`` options (``--model/--load-format/--tokenizer/--dtype/--device``
    come from :func:`engine.serving.add_model_args`)."""
    add_http_args(p, what="engine requests (a skeleton answer runs one per point)")
    g = p.add_argument_group(
        "remote engines (instead of a local model)",
        "With --backend the planner runs on OpenAI-compatible /v1/completions servers "
        "(vLLM, SGLang, llama.cpp, sotserve); --model then names the model they serve "
        "and its tokenizer (default: the first server's model).",
    )
    g.add_argument(
        "--backend", action="append", default=[], metavar="URL",
        help="a server's base URL; repeat for replicas of one model",
    )  # fmt: skip
    g.add_argument("--backend-api-key", default=None, help="sent upstream as a bearer token")
    g.add_argument(
        "--backend-admin-api-key", default=None,
        help="sent upstream on cache resets (default: --backend-api-key)",
    )  # fmt: skip
    g.add_argument(
        "--backend-read-timeout", type=float, default=120.0,
        help="seconds without a chunk before a stream counts as stalled (default 120)",
    )  # fmt: skip
    add_engine_args(p)
    g = p.add_argument_group("answer defaults (a request's `sot` field overrides them)")
    g.add_argument("--mode", default="auto", choices=["sequential", "sot", "graph", "auto"])
    g.add_argument("--max-points", type=int, default=None)
    g.add_argument("--point-max-tokens", type=int, default=None)
    g.add_argument("--router", default=None, choices=["trained", "rules", "model"])
    g.add_argument(
        "--auto-max-load", type=int, default=None, metavar="N",
        help="auto answers sequentially once the engine has N requests running or "
        "waiting, or this service's answers in flight are expected to hold N "
        f"(default {DEFAULT_MAX_LOAD}, measured; 0: never for load)",
    )  # fmt: skip
    g.add_argument(
        "--auto-max-sequential", type=int, default=None, metavar="M",
        help="auto starts no skeleton while M of this service's answers in flight "
        f"decode sequentially (default {DEFAULT_MAX_SEQUENTIAL}, measured; 0: off)",
    )  # fmt: skip


def answer_defaults(args: argparse.Namespace) -> dict[str, Any]:
    """The planner options the answer-default flags set (those given), for
    :func:`build_app`; a load limit below 0 exits with the flag's name."""
    plan: dict[str, Any] = {
        k: v
        for k in ("mode", "max_points", "point_max_tokens", "router")
        if (v := getattr(args, k)) is not None
    }
    try:
        policy = LoadPolicy.overriding(args.auto_max_load, args.auto_max_sequential)
    except ValueError as exc:
        raise SystemExit(f"--auto-max-load / --auto-max-sequential: {exc}") from None
    if policy is not None:
        plan["load_policy"] = policy
    return plan


def serve(args: argparse.Namespace) -> None:
    """Load the engine and serve until interrupted."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    limits, security = http_options(args)
    plan = answer_defaults(args)
    if args.backend:
        _serve_remote(args, limits, security, plan)
        return

    def make(engine: AsyncEngine, limits: ServerLimits, security: Security) -> web.Application:
        return build_app(engine, args.served_model_name, limits, True, security, **plan)

    def announce(engine: AsyncEngine) -> str:
        return f"sotserve: serving {engine.model_name} at http://{args.host}:{args.port}/"

    serve_from_args(args, make, announce)


def remote_replicas(args: argparse.Namespace) -> ReplicaSet:
    """The ``--backend`` servers, checked: each must answer ``/v1/models`` (else
    :class:`BackendError` naming it). The model is ``--model`` or the first server's."""
    # --tokenizer names the remote model's tokenizer here
    local = {
        k: v for k, v in engine_kwargs(args).items() if k not in ("max_model_len", "tokenizer")
    }
    local.update({k: getattr(args, k) for k in ("dtype", "device") if getattr(args, k) != "auto"})
    if local:
        flags = ", ".join("--" + k.replace("_", "-") for k in local)
        raise ValueError(f"{flags}: not with --backend (the remote engines have their own)")

    async def first_model() -> str:
        # listing models needs no tokenizer, and which one to load is what it tells
        probe = HTTPBackend(args.backend[0], "probe", tokenizer=object())
        try:
            cards = await probe.models()
        finally:
            await probe.close()
        if not cards or not isinstance(cards[0].get("id"), str):
            raise BackendError(f"{probe.url}: /v1/models lists no model")
        return cards[0]["id"]

    model = args.model or asyncio.run(first_model())
    try:
        tokenizer = load_tokenizer(args.tokenizer or model)
    except Exception as exc:  # not a local directory, GGUF or cached hub id
        raise ValueError(
            f"cannot load the tokenizer of {args.tokenizer or model!r} ({exc}); "
            "pass --tokenizer with a local directory or GGUF file of the served model"
        ) from exc
    backends = [
        HTTPBackend(
            url,
            model,
            tokenizer,
            api_key=args.backend_api_key,
            admin_api_key=args.backend_admin_api_key,
            read_timeout=args.backend_read_timeout,
            max_model_len=args.max_model_len,
        )
        for url in args.backend
    ]
    replicas = ReplicaSet(backends)

    async def check() -> None:
        try:
            await asyncio.gather(*(b.models() for b in backends))
        finally:
            await asyncio.gather(*(b.close() for b in backends))

    asyncio.run(check())
    return replicas


def _serve_remote(
    args: argparse.Namespace, limits: ServerLimits, security: Security, plan: dict[str, Any]
) -> None:
    replicas = remote_replicas(args)
    app = build_remote_app(replicas, args.served_model_name, limits, True, security, **plan)
    urls = ", ".join(args.backend)
    ready = (
        f"sotserve: serving {replicas.model_name} from {urls} at http://{args.host}:{args.port}/"
    )
    serve_http(app, args.host, args.port, limits.body_timeout_s, lambda: print(ready, flush=True))
