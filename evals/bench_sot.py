"""Quick planner figures on vicuna80; ``python -m evals.latency`` is the full harness.

Sections (``--sections``, comma-separated):

- ``parse``: skeletons for all 80 questions, generated in one batch with the
  planner's own prompt; success = the parser finds at least two points.
- ``router``: accuracy of the rule router and the model router against the
  ``sot_suitable`` labels (sot = suitable; sequential and graph = not), and the
  trained router in every direction of ``evals.train_router --both`` (LIMA and
  vicuna80 each held apart from the other, with and without the project's made-up
  questions; needs ``lima_router.jsonl`` beside ``--data``).
- ``jump``: the skeleton request of the first ``--limit`` questions alone, greedy,
  cold cache, with and without the planner's jump-forward rules for the line numbers
  (``sotserve.skeleton_parser.line_number_jumps``), interleaved per question: the
  median time and engine steps of each, their ratio, and how many skeletons came out
  the same text.
- ``latency``: the ``sot_suitable`` questions one at a time, ``sot`` and
  ``sequential`` interleaved on the same engine, both with the same ``max_tokens``;
  the median end-to-end latency of each and their ratio, and the share of
  point-prompt tokens the prefix cache served.

Run: ``python -m evals.bench_sot [--sections parse,router,jump,latency] [--limit N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import prompts
from engine import LLM, AsyncEngine, SamplingParams
from evals.train_router import (
    DIRECTIONS,
    Features,
    load_sets,
    make_params,
    print_direction,
    score,
    train,
)
from sotserve.backends import LocalBackend
from sotserve.planner import Planner
from sotserve.router import route_by_rules
from sotserve.schemas import PointDone
from sotserve.skeleton_parser import SkeletonParser, line_number_jumps

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "vicuna80.jsonl"


def load_questions(path: Path = DATA) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def skeleton_prompt(renderer: prompts.ChatRenderer, question: str, graph: bool = False):
    """The planner's skeleton prompt ids and prefill for ``question``."""
    messages = prompts.load("graph" if graph else "skeleton").messages(question=question)
    _, prefill = prompts.split_prefill(messages)
    return renderer.render(messages), prefill


def parse_points(text: str, truncated: bool, max_points: int = 6) -> list[str]:
    parser = SkeletonParser(max_points=max_points)
    parser.feed(text)
    parser.close(truncated)
    return [p.title for p in parser.points]


def bench_parse(llm: LLM, questions: list[dict[str, Any]], dump: Path | None) -> None:
    renderer = prompts.ChatRenderer(llm.tokenizer)
    built = [skeleton_prompt(renderer, q["question"]) for q in questions]
    outs = llm.generate([ids for ids, _ in built], SamplingParams(max_tokens=96, temperature=0))
    by_cat: dict[str, list[bool]] = defaultdict(list)
    rows = []
    for q, (_, prefill), out in zip(questions, built, outs, strict=True):
        text = prefill + out.text
        points = parse_points(text, out.finish_reason == "length")
        by_cat[q["category"]].append(len(points) >= 2)
        rows.append({
            "question_id": q["question_id"], "skeleton": text,
            "finish_reason": out.finish_reason, "points": points,
        })  # fmt: skip
    ok = sum(sum(v) for v in by_cat.values())
    print(f"\n## skeleton parse success: {ok}/{len(questions)} = {ok / len(questions):.1%}")
    for cat, v in sorted(by_cat.items()):
        print(f"  {cat:15s} {sum(v)}/{len(v)}")
    if dump:
        dump.write_text(json.dumps(rows, indent=1) + "\n")
        print(f"  raw skeletons written to {dump}")


def bench_router(llm: LLM, questions: list[dict[str, Any]]) -> None:
    renderer = prompts.ChatRenderer(llm.tokenizer)
    ids = [
        renderer.render(prompts.load("router").messages(question=q["question"])) for q in questions
    ]
    outs = llm.generate(ids, SamplingParams(max_tokens=2, temperature=0))
    letters = {"A": "sot", "B": "graph", "C": "sequential"}
    deciders = {
        "rules": [route_by_rules(q["question"]).mode for q in questions],
        "model": [letters.get(o.text.strip()[:1], "?") for o in outs],
    }
    print("\n## router accuracy vs sot_suitable (sot = suitable; sequential, graph = not)")
    for name, modes in deciders.items():
        hits = sum((m == "sot") == q["sot_suitable"] for m, q in zip(modes, questions, strict=True))
        table = Counter((m, q["sot_suitable"]) for m, q in zip(modes, questions, strict=True))
        print(f"  {name:6s} {hits}/{len(questions)} = {hits / len(questions):.1%}   "
              + "  ".join(f"{m}|{'suit' if s else 'unsuit'}={n}"
                          for (m, s), n in sorted(table.items())))  # fmt: skip


def bench_trained_router(llm: LLM, data_dir: Path) -> None:
    """The trained router in every direction of ``evals.train_router --both``; each
    scored only on a set absent from its training sets."""
    print("\n## trained router (hidden state + logistic head), every direction")
    features = Features(llm)  # each set embedded once
    for train_name, test_name in DIRECTIONS:
        data, test = load_sets(train_name, data_dir), load_sets(test_name, data_dir)
        head = train(features(data), data.labels, seed=0)
        params = make_params(llm, data, head, seed=0)
        print_direction(data.name, test.name, score(params, test, features(test)))


def bench_jump(llm: LLM, questions: list[dict[str, Any]], max_tokens: int) -> dict[str, float]:
    """Skeletons with and without the line-number jump-forward rules (see the module
    docstring); returns the printed figures."""
    renderer = prompts.ChatRenderer(llm.tokenizer)
    rules = line_number_jumps(llm.tokenizer)
    eng = llm.engine
    runs: dict[str, dict[str, list[float]]] = {
        name: {"s": [], "steps": []} for name in ("plain", "jump")
    }
    same = 0
    for i, q in enumerate(questions):
        ids, _ = skeleton_prompt(renderer, q["question"])
        texts = {}
        order = ("plain", "jump") if i % 2 == 0 else ("jump", "plain")
        for name in order:
            eng.reset_prefix_cache()  # both cold: neither finds the other's prompt
            params = SamplingParams(max_tokens=max_tokens, temperature=0,
                                    jump_forward=rules if name == "jump" else {})  # fmt: skip
            steps, t = eng.stats().steps, time.perf_counter()
            texts[name] = llm.generate([ids], params)[0].text
            runs[name]["s"].append(time.perf_counter() - t)
            runs[name]["steps"].append(eng.stats().steps - steps)
        same += texts["plain"] == texts["jump"]
    med = {n: {k: statistics.median(v) for k, v in r.items()} for n, r in runs.items()}
    figures = {
        "questions": len(questions),
        "same_text": same,
        "plain_s": med["plain"]["s"],
        "jump_s": med["jump"]["s"],
        "plain_steps": med["plain"]["steps"],
        "jump_steps": med["jump"]["steps"],
        "speedup": med["plain"]["s"] / med["jump"]["s"],
    }
    print(f"\n## skeleton jump-forward on {len(questions)} questions "
          f"({len(rules)} rules, max_tokens={max_tokens}, greedy, cold cache, median)")  # fmt: skip
    for n in ("plain", "jump"):
        print(f"  {n:6s} {med[n]['s']:6.3f}s  {med[n]['steps']:5.1f} steps")
    print(f"  speed-up plain/jump: {figures['speedup']:.2f}x; same text {same}/{len(questions)}")
    return figures


async def bench_latency(questions: list[dict[str, Any]], max_tokens: int, limit: int) -> None:
    qs = [q for q in questions if q["sot_suitable"]][:limit]
    backend = LocalBackend(AsyncEngine())
    planner = Planner(backend, max_tokens=max_tokens)
    await planner.answer("Warm up the engine.", mode="sequential", max_tokens=8)
    times: dict[str, list[float]] = {"sot": [], "sequential": []}
    tokens: dict[str, list[int]] = {"sot": [], "sequential": []}
    ttft: dict[str, list[float]] = {"sot": [], "sequential": []}
    point_prompt = point_cached = 0
    for i, q in enumerate(qs):
        order = ("sot", "sequential") if i % 2 == 0 else ("sequential", "sot")
        for mode in order:
            t = time.perf_counter()
            done = None
            async for event in planner.stream(q["question"], mode=mode):
                if isinstance(event, PointDone):
                    point_prompt += event.prompt_tokens
                    point_cached += event.cached_tokens or 0
                if event.type == "done":
                    done = event
            assert done is not None
            times[mode].append(time.perf_counter() - t)
            tokens[mode].append(done.usage.completion_tokens)
            ttft[mode].append(done.timings.first_answer_token_s or 0.0)
        print(f"  q{q['question_id']:>2}: sot {times['sot'][-1]:5.1f}s  "
              f"sequential {times['sequential'][-1]:5.1f}s", flush=True)  # fmt: skip
    med = {m: statistics.median(v) for m, v in times.items()}
    print(f"\n## latency on {len(qs)} sot_suitable questions (max_tokens={max_tokens}, median)")
    for m in ("sot", "sequential"):
        print(f"  {m:10s} end-to-end {med[m]:6.2f}s  first answer text "
              f"{statistics.median(ttft[m]):5.2f}s  generated tokens "
              f"{statistics.median(tokens[m]):5.0f}")  # fmt: skip
    print(f"  speed-up sequential/sot: {med['sequential'] / med['sot']:.2f}x")
    if point_prompt:
        print(f"  point prompts served from the prefix cache: {point_cached}/{point_prompt} "
              f"= {point_cached / point_prompt:.1%}")  # fmt: skip
    await backend.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sections", default="parse,router,latency")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--limit", type=int, default=37, help="latency: first N suitable questions")
    ap.add_argument("--dump", type=Path, default=None, help="parse: write raw skeletons here")
    ap.add_argument("--data", type=Path, default=DATA, help="vicuna80.jsonl")
    args = ap.parse_args(argv)
    sections = set(args.sections.split(","))
    questions = load_questions(args.data)
    if sections & {"parse", "router", "jump"}:
        llm = LLM()
        if "parse" in sections:
            bench_parse(llm, questions, args.dump)
        if "router" in sections:
            bench_router(llm, questions)
            bench_trained_router(llm, args.data.parent)
        if "jump" in sections:
            # the rules alone: without speculative drafts, as a skeleton decodes beside
            # more than two other requests (drafts would also cover some forced tokens)
            bench_jump(LLM(speculative_tokens=0), questions[: args.limit], 96)
        del llm
    if "latency" in sections:
        asyncio.run(bench_latency(questions, args.max_tokens, args.limit))


if __name__ == "__main__":
    main()
