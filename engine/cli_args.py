"""Command-line options that configure the engine, shared by ``python -m engine.server``
and ``sotserve serve`` so both spell every option the same way."""

from __future__ import annotations

import argparse
from typing import Any

from engine.errors import DEFAULT_STEP_TIMEOUT_S


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Engine limits and execution options, as one argument group."""
    g = p.add_argument_group("engine")
    g.add_argument("--max-model-len", type=int, default=None, help="context length")
    g.add_argument("--max-batched-tokens", type=int, default=None, help="token budget per step")
    g.add_argument("--max-running", type=int, default=None, help="requests decoded at once")
    g.add_argument("--kv-slots", type=int, default=None, help="KV cache size in tokens")
    g.add_argument(
        "--quantization", default=None, choices=["auto", "none", "gguf", "int4", "int8"],
        help="weight-only quantized matmuls on the CPU: gguf keeps a GGUF model's own "
        "4-bit blocks, int4/int8 quantize at load; auto (default) is gguf for a GGUF "
        "model on the CPU unless --dtype float32/float16, else none",
    )  # fmt: skip
    g.add_argument(
        "--attention-backend", default=None, choices=["torch", "triton"],
        help="default: triton on CUDA, torch on the CPU",
    )  # fmt: skip
    g.add_argument(
        "--no-prefix-cache", dest="prefix_cache", action="store_false",
        help="do not share the KV of common prefixes",
    )  # fmt: skip
    g.add_argument(
        "--shared-prefix-min-tokens", type=int, default=None,
        help="decodes sharing a cached prefix this long attend to it once per group "
        "(default 256; 0 turns it off)",
    )  # fmt: skip
    g.add_argument(
        "--enforce-eager", action="store_true", help="never capture CUDA graphs for decode steps"
    )
    g.add_argument(
        "--cuda-graph-max-batch", type=int, default=None,
        help="largest decode batch replayed as a CUDA graph (default 64)",
    )  # fmt: skip
    g.add_argument(
        "--speculative-tokens", type=int, default=None,
        help="prompt-lookup speculative decoding: draft up to this many tokens from "
        "n-grams the request already holds, verified in its decode step (default 3; "
        "0 turns it off)",
    )  # fmt: skip
    g.add_argument(
        "--speculative-max-batch", type=int, default=None,
        help="draft only while at most this many requests decode (default 2)",
    )  # fmt: skip
    g.add_argument(
        "--step-timeout", type=_seconds, default=None, metavar="SECONDS",
        help="a watchdog marks the engine dead, failing every request and turning "
        "/health to 503, when one engine step runs longer than this (a stuck kernel, a "
        f"deadlock); default {DEFAULT_STEP_TIMEOUT_S:g}, 0 turns the watchdog off",
    )  # fmt: skip
    g.add_argument(
        "--keep-alive-on-engine-death", action="store_true",
        help="when the engine dies, keep serving (/health 503, every request fails fast) "
        "until SIGINT/SIGTERM instead of exiting non-zero for a supervisor to restart "
        "the server (vLLM's flag)",
    )  # fmt: skip


def _seconds(text: str) -> float:
    """A duration in seconds for argparse: a finite number, not negative."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be 0 (off) or a positive number: {text!r}")
    return value


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The options given on the command line, as keyword arguments of ``AsyncEngine``
    (``LLMEngine``'s, plus ``step_timeout``); an option left out keeps the engine's
    default, so an empty dict means no engine option was given."""
    kwargs: dict[str, Any] = {
        k: v
        for k in ("max_model_len", "max_batched_tokens", "max_running", "kv_slots",
                  "attention_backend", "cuda_graph_max_batch", "quantization",
                  "speculative_tokens", "speculative_max_batch")
        if (v := getattr(args, k)) is not None
    }  # fmt: skip
    # model options (engine.serving.add_model_args) that configure the engine
    if getattr(args, "load_format", "auto") != "auto":
        kwargs["load_format"] = args.load_format
    if getattr(args, "tokenizer", None) is not None:
        kwargs["tokenizer"] = args.tokenizer
    if not args.prefix_cache:
        kwargs["prefix_cache"] = False
    if args.shared_prefix_min_tokens is not None:
        kwargs["shared_prefix_min_tokens"] = args.shared_prefix_min_tokens or None
    if args.enforce_eager:
        kwargs["enforce_eager"] = True
    if args.step_timeout is not None:
        kwargs["step_timeout"] = args.step_timeout or None  # 0: no watchdog
    return kwargs


def serve_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The options of :func:`engine.serve_loop.serve_app` given on the command line:
    ``serve_app(engine, app, host, port, **serve_kwargs(args))``."""
    return {"keep_alive_on_engine_death": bool(args.keep_alive_on_engine_death)}
