"""``sotserve`` command line.

``sotserve ask "question"`` streams an answer from the engine in this process.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from engine import AsyncEngine, EngineError, SamplingParams
from sotserve.server.app import add_server_args
from sotserve.server.app import serve as _serve


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default=None, help="HF directory, hub id or .gguf (default: embedded SmolLM2)"
    )
    p.add_argument("--dtype", default="auto", help="float32 | bfloat16 | auto")
    p.add_argument("--device", default="auto", help="cpu | cuda | auto")


async def _ask(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    engine = AsyncEngine(args.model, dtype=args.dtype, device=args.device)
    t_loaded = time.perf_counter()
    try:
        ids = engine.apply_chat_template([{"role": "user", "content": args.question}])
        params = SamplingParams(
            max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed
        )
        first = None
        n_tokens = 0
        finish = None
        async for delta in engine.generate(ids, params):
            if first is None:
                first = time.perf_counter()
            n_tokens += len(delta.token_ids)
            finish = delta.finish_reason
            sys.stdout.write(delta.text)
            sys.stdout.flush()
        end = time.perf_counter()
        sys.stdout.write("\n")
        decode_s = end - (first or end)
        print(
            f"[load {t_loaded - t0:.1f}s | first token {(first or end) - t_loaded:.2f}s | "
            f"{n_tokens} tokens in {end - t_loaded:.2f}s "
            f"({(n_tokens - 1) / decode_s if decode_s > 0 else 0:.1f} tok/s decode) | "
            f"finish={finish}]",
            file=sys.stderr,
        )
    finally:
        engine.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sotserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    ask = sub.add_parser("ask", help="answer one question, streaming")
    ask.add_argument("question")
    ask.add_argument("--max-tokens", type=int, default=256)
    ask.add_argument("--temperature", type=float, default=0.0)
    ask.add_argument("--seed", type=int, default=None)
    _add_model_args(ask)
    serve = sub.add_parser("serve", help="serve the OpenAI-compatible API and the web page")
    _add_model_args(serve)
    add_server_args(serve)
    args = parser.parse_args(argv)
    if args.command == "serve":
        try:
            _serve(args)
        except EngineError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    try:
        return asyncio.run(_ask(args))
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
