"""Record the request pattern of real skeleton answers, for replay on other models.

    python -m evals.record_sot_pattern [--dataset ../shared/data/vicuna80.jsonl]
        [--questions 4] [--out evals/data/sot_pattern.json]

Random weights write no real skeleton, so the GPU check (:mod:`evals.gpu_check`)
replays the *shape* of real answers on a dummy model instead. This script answers a
few ``sot_suitable`` questions with the embedded SmolLM2 on the CPU, sequentially, in
``sot`` mode with the default options, and in ``sot`` mode pipelined, and writes for
each what the engine was asked:

* ``sequential``: the prompt length and the answer's length in tokens;
* ``sot`` and ``sot_pipelined``, each a ``skeleton`` (the skeleton request's prompt
  and output lengths) and ``points``: for each point request, its prompt length, how
  many leading tokens it shares with the skeleton request's prompt + output (the
  radix cache's hit), its output length, and ``after_skeleton_tokens``, how many
  skeleton tokens had been generated when it started (pipelined starts: a point
  starts once its skeleton line is complete).

Only lengths are kept (no text, no token ids), so the fixture is small and says
nothing about SmolLM2's words; the replay fills prompts with seeded random ids.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from sotserve.backends.base import CompletionChunk, CompletionParams
from sotserve.backends.local import LocalBackend

DEFAULT_DATASET = Path(__file__).resolve().parents[2] / "shared" / "data" / "vicuna80.jsonl"
DEFAULT_OUT = Path(__file__).with_name("data") / "sot_pattern.json"
#: (name in the fixture, planner mode, option overrides) of each answer recorded
RUNS: list[tuple[str, str, dict[str, Any]]] = [
    ("sequential", "sequential", {}),
    ("sot", "sot", {}),
    ("sot_pipelined", "sot", {"pipeline": True}),
]


@dataclass
class _Call:
    """One engine request as the planner made it."""

    prompt: list[int]
    output: list[int] = field(default_factory=list)
    #: how many tokens each earlier call of the same answer had output at this start
    seen_at_start: list[int] = field(default_factory=list)


class RecordingBackend(LocalBackend):
    """A :class:`LocalBackend` that notes every request's prompt ids and output ids,
    and what the answer's earlier requests had output when it started."""

    calls: list[_Call]

    def start_answer(self) -> None:
        self.calls = []

    async def complete(
        self, prompt: str | list[int], params: CompletionParams
    ) -> AsyncIterator[CompletionChunk]:
        ids = prompt if isinstance(prompt, list) else self.engine.tokenize(prompt)
        call = _Call(list(ids), seen_at_start=[len(c.output) for c in self.calls])
        self.calls.append(call)
        async for chunk in super().complete(prompt, params):
            call.output.extend(chunk.token_ids or [])
            yield chunk


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def pattern_of(calls: list[_Call]) -> dict[str, Any]:
    """The lengths of one sot answer's requests: the first is the skeleton."""
    skeleton, points = calls[0], calls[1:]
    context = skeleton.prompt + skeleton.output
    return {
        "skeleton": {"prompt_len": len(skeleton.prompt), "output_len": len(skeleton.output)},
        "points": [
            {
                "prompt_len": len(p.prompt),
                "shared_prefix_len": _common_prefix(p.prompt, context),
                "output_len": len(p.output),
                "after_skeleton_tokens": p.seen_at_start[0],
            }
            for p in points
        ],
    }


async def record(questions: list[dict[str, Any]], model: str | None) -> list[dict[str, Any]]:
    from engine import AsyncEngine
    from sotserve.planner import Planner

    engine = AsyncEngine(model, device="cpu")
    backend = RecordingBackend(engine)
    planner = Planner(backend)
    out = []
    try:
        for q in questions:
            entry: dict[str, Any] = {"question_id": q["question_id"], "category": q["category"]}
            for name, mode, opts in RUNS:
                backend.start_answer()
                async for _ in planner.stream(q["question"], mode, **opts):
                    pass
                if mode == "sequential":
                    seq = backend.calls[-1]
                    entry[name] = {"prompt_len": len(seq.prompt), "output_len": len(seq.output)}
                elif len(backend.calls) >= 3:  # a skeleton and at least two points
                    entry[name] = pattern_of(backend.calls)
            if all(name in entry for name, _, _ in RUNS):
                out.append(entry)
                print(json.dumps(entry), flush=True)
            else:
                print(f"question {q['question_id']}: fell back to sequential, skipped")
    finally:
        engine.close()
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    ap.add_argument("--questions", type=int, default=4, help="sot_suitable questions to answer")
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    rows = [json.loads(line) for line in args.dataset.read_text().splitlines() if line.strip()]
    # one question per category first, so a handful covers different kinds of answer
    picked, seen = [], set()
    for r in rows:
        if r.get("sot_suitable") and r["category"] not in seen:
            picked.append(r)
            seen.add(r["category"])
    picked = picked[: args.questions]
    answers = asyncio.run(record(picked, args.model))
    doc = {
        "about": "Request lengths of real skeleton answers (embedded SmolLM2-135M-Instruct, "
        f"CPU, sotserve's default sot options, and pipelined) to {len(answers)} "
        "sot_suitable vicuna80 questions, recorded by python -m evals.record_sot_pattern; "
        "replayed by evals.gpu_check with fixed lengths and ignore_eos.",
        "answers": answers,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out} ({len(answers)} answers)")


if __name__ == "__main__":
    main()
