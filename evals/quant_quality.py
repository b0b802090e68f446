"""Quality of every weight mode against the float32 model, teacher-forced over a fixed text.

    python -m evals.quant_quality [--model PATH] [--modes float32,bfloat16,gguf,int8,int4]

Each mode's engine reads the same text (``evals/data/teacher_forced.txt``, about 2,700
tokens of SmolLM2's tokenizer) in one forward, and at every position we compare its
next-token prediction with the float32 model's: top-1 agreement (how often the argmax
is the same token) and perplexity of the text itself. Quantized modes run with no
bfloat16 copy for prefill rows (``quantized_prefill_dense=False``), so every row goes through
the int4/int8 kernels that decode steps use, not the copy that prefill uses.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEXT = Path(__file__).parent / "data" / "teacher_forced.txt"
#: (dtype, quantization) per mode
MODES: dict[str, tuple[str, str | None]] = {
    "float32": ("float32", None),
    "bfloat16": ("bfloat16", None),
    "gguf": ("float32", "gguf"),
    "gguf-bf16": ("bfloat16", "gguf"),
    "int8": ("float32", "int8"),
    "int4": ("float32", "int4"),
}


@dataclass
class ModeQuality:
    mode: str
    perplexity: float
    top1_agreement: float  # with the float32 model's argmax, over every position
    tokens: int


def teacher_forced_logits(engine, ids: list[int], chunk: int = 256) -> torch.Tensor:
    """float32 logits ``[len(ids), vocab]`` of one causal forward over ``ids``.

    The prompt is prefilled as one request through the engine's own model, KV pool
    and attention backend (so the same kernels run as in serving), and the logits of
    every position are computed ``chunk`` rows at a time.
    """
    from engine.context import ForwardContext, set_context

    n = len(ids)
    slots = engine.slots.alloc(n)
    row = engine.table.alloc_row()
    try:
        engine.table.write(row, 0, slots)
        runner = engine.runner
        pos = torch.arange(n)
        dtype = engine.kv_pool.k.dtype
        ctx = ForwardContext(
            positions=pos, out_slots=slots, rows=[row], q_lens=[n], kv_lens=[n],
            num_decodes=0, req_to_token=engine.table.table, kv_pool=engine.kv_pool,
            cos=runner.rope_cos[pos].to(dtype), sin=runner.rope_sin[pos].to(dtype),
        )  # fmt: skip
        engine.backend.plan(ctx)
        set_context(ctx)
        with torch.inference_mode():
            hidden = engine.model(torch.tensor(ids))
            return torch.cat(
                [engine.model.compute_logits(hidden[i : i + chunk]) for i in range(0, n, chunk)]
            )
    finally:
        set_context(None)
        engine.table.free_row(row)
        engine.slots.free(slots)


def perplexity(logits: torch.Tensor, ids: list[int]) -> float:
    """exp of the mean negative log-likelihood of ``ids[1:]`` under ``logits[:-1]``."""
    logp = torch.log_softmax(logits[:-1].float(), -1)
    nll = -logp.gather(1, torch.tensor(ids[1:])[:, None]).mean()
    return math.exp(float(nll))


def top1_agreement(logits: torch.Tensor, reference: torch.Tensor) -> float:
    return float((logits.argmax(-1) == reference.argmax(-1)).float().mean())


def measure(model: str | None, modes: list[str], text: str) -> list[ModeQuality]:
    """Load each mode in turn (one engine at a time) and score it against float32."""
    from engine import LLM

    unknown = set(modes) - set(MODES)
    if unknown:
        raise ValueError(f"unknown modes {sorted(unknown)}; available: {', '.join(MODES)}")
    reference: torch.Tensor | None = None
    ids: list[int] | None = None
    out = []
    for mode in ["float32", *[m for m in modes if m != "float32"]]:
        dtype, quantization = MODES[mode]
        llm = LLM(
            model, dtype=dtype, device="cpu", quantization=quantization,
            quantized_prefill_dense=False, prefix_cache=False,
        )  # fmt: skip
        if ids is None:
            ids = llm.tokenizer.encode(text, add_special_tokens=False)
        logits = teacher_forced_logits(llm.engine, ids)
        if reference is None:
            reference = logits
        if mode in modes:
            out.append(
                ModeQuality(
                    mode, perplexity(logits, ids), top1_agreement(logits, reference), len(ids)
                )
            )
        del llm
    return out


def main(argv: list[str] | None = None) -> list[ModeQuality]:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default=None, help="HF directory or .gguf (default: embedded)")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--text", type=Path, default=TEXT)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    results = measure(args.model, modes, args.text.read_text())
    print(f"teacher-forced over {results[0].tokens} tokens of {args.text.name}")
    print("| mode | perplexity | top-1 agreement with float32 |")
    print("| --- | --- | --- |")
    for r in results:
        print(f"| {r.mode} | {r.perplexity:.3f} | {r.top1_agreement:.2%} |")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    return results


if __name__ == "__main__":
    main()
