"""Latency (and quality) of skeleton decoding against sequential decoding.

``python -m evals.latency --dataset PATH.jsonl --modes sequential,sot,graph,auto --out DIR``

Every mode runs on the same engine, model, dtype, sampling and overall token limit.
After a warm-up, the modes of each question run back to back in an order that
rotates from question to question, so drift of the machine hits every mode alike.
By default the prefix cache is emptied before every run (``--cache cold``), and the
record says how many tokens of the question the cache held beforehand, so no mode
warms the cache for another; each mode keeps only the hits within its own answer.
With ``--concurrency C``, C questions are sent at once in one mode, then the same C
in the next mode.

Writes ``results.jsonl`` (a row per question, mode and repeat), ``summary.json``,
``report.md`` and PNG plots to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from evals.dataset import DatasetError, load_dataset, select
from evals.records import Question, RunRecord
from evals.runner import HTTPTarget, LocalTarget, Target, TargetError, run_one
from evals.summary import BASELINE, summarize

if TYPE_CHECKING:
    from engine import AsyncEngine

MODES = ("sequential", "sot", "graph", "auto")
DEFAULT_DATASET = Path(__file__).resolve().parents[2] / "shared" / "data" / "vicuna80.jsonl"
WARMUP_QUESTION = Question(
    question_id="warmup", category="warmup", question="How do I boil an egg?"
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m evals.latency", description=__doc__)
    p.add_argument("--dataset", type=Path, default=DEFAULT_DATASET, help="JSONL question set")
    p.add_argument("--modes", default="sequential,sot,graph,auto")
    p.add_argument("--out", type=Path, default=Path("out/eval"))
    p.add_argument("--backend", default="local", help="'local' or a server's base URL")
    p.add_argument("--model", default=None, help="local: model path/id; URL: model id")
    p.add_argument(
        "--tokenizer", default=None,
        help="URL: the served model's tokenizer (a local path, GGUF, or 'embedded') to "
        "count answer tokens; without it each streamed delta counts as one",
    )  # fmt: skip
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--speculative-tokens", type=int, default=None,
        help="local: the engine's prompt-lookup draft length (0: no drafts; default the "
        "engine's)",
    )  # fmt: skip
    p.add_argument(
        "--auto-max-load", type=int, default=None,
        help="local: auto's load limit in engine requests (sotserve serve --auto-max-load; "
        "0: never for load; default the service's)",
    )  # fmt: skip
    p.add_argument(
        "--auto-max-sequential", type=int, default=None,
        help="local: auto starts no skeleton beside this many sequential answers "
        "(sotserve serve --auto-max-sequential; 0: off; default the service's)",
    )  # fmt: skip
    p.add_argument(
        "--api-key", default=os.environ.get("SOTSERVE_API_KEY"),
        help="URL: the server's API key (default: $SOTSERVE_API_KEY)",
    )  # fmt: skip
    p.add_argument(
        "--admin-api-key", default=os.environ.get("SOTSERVE_ADMIN_API_KEY"),
        help="URL: the key of its admin routes, to reset its cache between runs "
        "(default: $SOTSERVE_ADMIN_API_KEY, else --api-key)",
    )  # fmt: skip
    p.add_argument("--limit", type=int, default=None, help="first N questions (after filters)")
    p.add_argument("--categories", default=None, help="comma-separated categories")
    p.add_argument("--per-category", type=int, default=None, help="first N of each category")
    p.add_argument("--suitable-only", action="store_true", help="only sot_suitable questions")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--max-tokens", type=int, default=256, help="the whole answer, every mode")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument(
        "--cache", choices=["cold", "cold-all", "warm"], default="cold",
        help="cold: empty the prefix cache before every run, then cache the service's "
        "fixed prompt heads (system turn, skeleton instructions and examples) again, as "
        "a running server has them: nothing of the question is cached (default); "
        "cold-all: nothing at all is cached; warm: never empty it",
    )  # fmt: skip
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per answer over HTTP")
    p.add_argument(
        "--plan-option", action="append", default=[], metavar="NAME=JSON",
        help="a planner option (sotserve.schemas.PlanOptions) for every mode, e.g. "
        "point_max_tokens=128; repeatable",
    )  # fmt: skip
    r = p.add_argument_group("router")
    r.add_argument(
        "--route-only", action="store_true",
        help="local: only route every labelled question (any JSONL with question and "
        "sot_suitable) and report the router's accuracy, precision, recall, confusion "
        "matrix and time per question (evals.route_eval)",
    )  # fmt: skip
    r.add_argument(
        "--route-baseline", type=int, default=10,
        help="--route-only: sequential answers timed for the router's share (default 10)",
    )  # fmt: skip
    j = p.add_argument_group("quality")
    j.add_argument(
        "--judge", choices=["self", "none"], default="self",
        help="self: the answering model judges (unless --judge-url); none: no judge",
    )  # fmt: skip
    j.add_argument("--judge-url", default=None, help="any OpenAI-compatible endpoint")
    j.add_argument("--judge-api-key", default=None, help="the --judge-url server's key")
    j.add_argument("--judge-model", default=None)
    j.add_argument("--judge-concurrency", type=int, default=8)
    j.add_argument("--judge-max-tokens", type=int, default=512, help="the judge's reply")
    args = p.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    plan_options = {}
    for item in args.plan_option:
        name, sep, value = item.partition("=")
        try:
            plan_options[name.strip()] = json.loads(value) if sep else None
        except json.JSONDecodeError:
            p.error(f'--plan-option {item!r}: the value must be JSON (e.g. 128, true, "x")')
        if not sep or not name.strip():
            p.error(f"--plan-option {item!r}: expected NAME=JSON")
    args.plan_option = plan_options
    bad = [m for m in args.modes if m not in MODES]
    if bad or not args.modes:
        p.error(f"--modes: unknown {bad}; choose from {', '.join(MODES)}")
    for flag in ("auto_max_load", "auto_max_sequential"):
        if getattr(args, flag) is not None and getattr(args, flag) < 0:
            p.error(f"--{flag.replace('_', '-')} must be at least 0")
    if args.repeats < 1 or args.concurrency < 1 or args.max_tokens < 1:
        p.error("--repeats, --concurrency and --max-tokens must be at least 1")
    return args


def make_target(args: argparse.Namespace, engine: AsyncEngine | None = None) -> Target:
    if args.backend == "local":
        return LocalTarget(
            args.model, args.dtype, args.device, engine, args.auto_max_load,
            args.auto_max_sequential,
        )  # fmt: skip
    if not args.backend.startswith(("http://", "https://")):
        raise TargetError(f"--backend must be 'local' or an http(s) URL, not {args.backend!r}")
    return HTTPTarget(
        args.backend, args.model, args.timeout, tokenizer=args.tokenizer,
        api_key=args.api_key, admin_api_key=args.admin_api_key,
    )  # fmt: skip


def rotated(modes: list[str], k: int) -> list[str]:
    """``modes`` starting at position ``k``: each mode goes first as often as the others."""
    k %= len(modes)
    return modes[k:] + modes[:k]


async def run_all(
    target: Target, questions: list[Question], args: argparse.Namespace, log: Any = print
) -> list[RunRecord]:
    """Every question in every mode, ``args.repeats`` times, interleaved."""
    options = {"max_tokens": args.max_tokens, "temperature": args.temperature, "seed": args.seed}
    options.update(args.plan_option)
    cold = args.cache in ("cold", "cold-all")
    heads = args.cache == "cold"
    # Warm-up: first calls pay for lazy initialisation (allocator, kernels, sockets).
    for mode in args.modes:
        await run_one(target, WARMUP_QUESTION, mode, {**options, "max_tokens": 32})
    if cold and not await target.reset_cache(heads):
        log(
            f"warning: {target.description} cannot empty its prefix cache (a sotserve "
            "server needs --admin-api-key for it); runs are warm"
        )
        cold = False

    records: list[RunRecord] = []
    c = args.concurrency
    batches = [questions[i : i + c] for i in range(0, len(questions), c)]
    total = len(questions) * len(args.modes) * args.repeats
    with tqdm(total=total, desc="answers", unit="ans", file=sys.stderr) as bar:
        for repeat in range(args.repeats):
            for b, batch in enumerate(batches):
                for mode in rotated(args.modes, b + repeat):
                    if cold:
                        await target.reset_cache(heads)
                    cached = [await target.question_cached(q.question) for q in batch]
                    runs = [
                        run_one(
                            target, q, mode, options, repeat=repeat, concurrency=c,
                            cache_reset=cold, question_cached=n,
                        )
                        for q, n in zip(batch, cached, strict=True)
                    ]  # fmt: skip
                    for record in await asyncio.gather(*runs):
                        records.append(record)
                        if not record.ok:
                            log(f"error: question {record.question_id} ({mode}): {record.error}")
                        bar.update(1)
    return records


async def judge_all(
    records: list[RunRecord], questions: list[Question], judge: Any, concurrency: int
) -> dict[str, dict[str, int]]:
    """Pairwise verdicts of each mode's answer against the sequential one."""
    from evals.judge import JudgeError, PairVerdict, judge_pair, tally

    text = {q.question_id: q.question for q in questions}
    baseline = {
        r.question_id: r.answer for r in records if r.mode == BASELINE and r.ok and r.repeat == 0
    }
    pairs = [
        r for r in records
        if r.mode != BASELINE and r.ok and r.repeat == 0 and r.question_id in baseline
    ]  # fmt: skip
    gate = asyncio.Semaphore(concurrency)

    async def one(r: RunRecord) -> Any:
        async with gate:
            qid = r.question_id
            try:
                verdict = await judge_pair(judge, text[qid], r.answer, baseline[qid])
            except JudgeError as exc:  # counted as invalid; the latency results stand
                verdict = PairVerdict(
                    outcome="invalid", first=None, second=None, first_text="",
                    second_text="", note=f"judge failed: {exc}",
                )  # fmt: skip
        r.checks["judge"] = verdict.outcome
        bar.update(1)
        return verdict

    with tqdm(total=len(pairs), desc="judging", unit="pair", file=sys.stderr) as bar:
        verdicts = await asyncio.gather(*(one(r) for r in pairs))
    by_mode: dict[str, list[Any]] = {}
    for r, v in zip(pairs, verdicts, strict=True):
        by_mode.setdefault(r.mode, []).append(v)
    return {mode: tally(vs) for mode, vs in by_mode.items()}


def make_judge(args: argparse.Namespace, target: Target) -> Any:
    """The judge the run uses, or None."""
    from evals.judge import HTTPJudge, LocalJudge

    n = args.judge_max_tokens
    if args.judge_url:
        return HTTPJudge(args.judge_url, args.judge_model, args.judge_api_key, max_tokens=n)
    if args.judge == "none":
        return None
    if isinstance(target, LocalTarget):  # the answering model judges itself
        return LocalJudge(target.engine, max_tokens=n)
    assert isinstance(target, HTTPTarget)
    return HTTPJudge(target.url, target.model, api_key=target.api_key, max_tokens=n)


async def main_async(args: argparse.Namespace, engine: AsyncEngine | None = None) -> int:
    """The whole run; ``engine``: the local target's engine, if made by the caller."""
    from evals.quality import auto_checks
    from evals.report import write_report

    if args.route_only:
        from evals.route_eval import print_route_only, route_only

        if engine is None:
            print("error: --route-only runs on the local engine only", file=sys.stderr)
            return 2
        result = await route_only(args, engine)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "router.json").write_text(json.dumps(result, indent=2) + "\n")
        print_route_only(result)
        print(f"wrote router.json to {args.out}")
        return 0
    try:
        dataset = load_dataset(args.dataset)
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for line, why in dataset.skipped:
        print(f"warning: {args.dataset}:{line}: skipped: {why}", file=sys.stderr)
    categories = args.categories.split(",") if args.categories else None
    questions = select(
        dataset.questions, categories, args.per_category, args.suitable_only, args.limit
    )
    if not questions:
        print("error: no question left after the filters", file=sys.stderr)
        return 2
    try:
        target = make_target(args, engine)
        if isinstance(target, HTTPTarget):
            await target.start()
            if not target.sotserve and args.modes != ["sequential"]:
                raise TargetError(
                    f"{target.url} is not a sotserve server; only --modes sequential works there"
                )
    except TargetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    log(f"{len(questions)} questions x {args.modes} on {target.description}")
    t0 = time.perf_counter()
    try:
        records = await run_all(target, questions, args, log)
        for r in records:
            r.checks.update(auto_checks(r))
        judge = make_judge(args, target) if BASELINE in args.modes else None
        judged = None
        if judge is not None:
            judged = await judge_all(records, questions, judge, args.judge_concurrency)
    finally:
        await target.close()

    summary = summarize(records, args.modes)
    summary["judge"] = None if judge is None else {"name": judge.name, "results": judged}
    summary["config"] = {
        "dataset": str(args.dataset), "questions": len(questions), "modes": args.modes,
        "backend": target.description, "max_tokens": args.max_tokens,
        "temperature": args.temperature, "seed": args.seed, "repeats": args.repeats,
        "concurrency": args.concurrency, "cache": args.cache, "limit": args.limit,
        "categories": categories, "per_category": args.per_category,
        "suitable_only": args.suitable_only, "skipped_lines": len(dataset.skipped),
        "speculative_tokens": args.speculative_tokens, "auto_max_load": args.auto_max_load,
        "auto_max_sequential": args.auto_max_sequential,
        "machine": f"{platform.machine()}, {platform.system()}, python {platform.python_version()}",
        "wall_s": round(time.perf_counter() - t0, 1),
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "results.jsonl").open("w") as f:
        for r in records:
            f.write(r.model_dump_json() + "\n")
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    paths = write_report(args.out, records, summary)
    print_headline(summary, args.modes)
    written = ", ".join(["results.jsonl", "summary.json", *(p.name for p in paths.values())])
    print(f"wrote {written} to {args.out}")
    return 0 if all(r.ok for r in records) else 1


def print_headline(summary: dict[str, Any], modes: list[str]) -> None:
    """One line per mode: the speed-ups over sequential."""

    def fmt(x: float | None, unit: str = "x") -> str:
        return "-" if x is None else f"{x:.2f}{unit}"

    for scope in ("overall", "sot_suitable"):
        stats = summary.get(scope)
        if not stats:
            continue
        for mode in modes:
            s = stats[mode]
            line = f"{scope:12s} {mode:10s} median latency {fmt(s['median_latency_s'], ' s')}"
            if mode != BASELINE:
                line += (
                    f", speed-up median {fmt(s['median_speedup'])} "
                    f"geomean {fmt(s['geomean_speedup'])} over {s['paired']} questions, "
                    f"equal-length {fmt(s.get('median_equal_length_speedup'))}"
                )
            rate = s.get("median_answer_tokens_per_s")
            if rate is not None:
                line += f", {rate:.1f} answer tokens/s"
            print(line)
    router = summary.get("router")
    if router:
        pr = ", ".join(
            f"{k} {'-' if router.get(k) is None else format(router[k], '.1%')}"
            for k in ("precision", "recall")
        )
        print(
            f"router accuracy {router['accuracy']:.1%} over {router['questions']} questions"
            f" ({pr} of a skeleton); confusion {json.dumps(router['confusion'])}"
        )
    judge = summary.get("judge")
    if judge:
        for mode, t in (judge["results"] or {}).items():
            print(f"judge ({judge['name']}): {mode} vs sequential {t}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.backend != "local":
            return asyncio.run(main_async(args))
        # As the servers run it: the engine's step loop on the main thread, the
        # harness's event loop beside it (a step loop in a thread of its own decodes
        # about half as fast on the CPU, which would skew every figure).
        from engine import AsyncEngine
        from engine.serve_loop import run_beside_step_loop

        options = {}
        if args.speculative_tokens is not None:
            options["speculative_tokens"] = args.speculative_tokens
        engine = AsyncEngine(
            args.model, dtype=args.dtype, device=args.device, step_thread=False, **options
        )
        return run_beside_step_loop(engine, lambda: main_async(args, engine))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
