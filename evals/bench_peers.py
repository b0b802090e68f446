"""Peer benchmark: sotserve against transformers and llama.cpp, all measured in one run.

    python -m evals.bench_peers [--sides sotserve-default,llama.cpp] [--batches 1,4,8,16]
        [--steps 32] [--repeats 3] [--threads N] [--json PATH] [--out PATH]

Sides (``--sides``, comma-separated; by default every side that is installed):

``sotserve-default``  ``LLM(prefix_cache=False)``: the engine's defaults. For the embedded
                      GGUF on the CPU that keeps its own Q4_1 blocks as int4; the
                      activation dtype is the engine's default for that (the report's
                      notes print the dtype and quantization each engine resolved).
``sotserve-bf16``     ``LLM(dtype="bfloat16", quantization=None, prefix_cache=False)``.
``sotserve-fp32``     ``LLM(dtype="float32", quantization=None, prefix_cache=False)``.
``transformers``      ``AutoModelForCausalLM`` in float32 on the converted directory,
                      ``generate`` with greedy decoding.
``llama.cpp``         ``llama_cpp.Llama`` on the same GGUF file, in a worker subprocess.

Every side runs on the CPU with the same thread count (``--threads``, by default
``torch.get_num_threads()``: ``torch.set_num_threads`` here, ``n_threads`` and
``n_threads_batch`` for llama.cpp). All sides get the same token ids, rendered here
through the model's chat template. Each side is loaded once; every measurement is
repeated ``--repeats`` times after one warm-up round, the sides taking turns (their
order rotates from one repeat to the next), and the median is reported.

Figures:

1. Decode tok/s at each of ``--batches`` (identical short chat prompts). The engine
   prefills the batch untimed, then ``--steps`` engine steps are timed one by one and the
   median step time is taken (``evals.bench_engine.time_decode_steps``); tok/s is batch /
   step time. transformers and llama.cpp: the median gap between consecutive generated
   tokens after the first, over ``--steps`` gaps (transformers: times taken by a
   stopping criterion, which ``generate`` calls once per step). llama.cpp's high-level API
   decodes one sequence, so it is measured at batch 1 only.
2. Time to first token of a ``--prompt-tokens`` prompt (a fixed text repeated until the
   chat-templated prompt has that many tokens), cold: no prefix cache on any side
   (llama.cpp's context is reset before every call, so it cannot reuse its KV).
3. Wall time of an ``--answer-tokens`` answer to the short chat prompt, prompt processing
   included, EOS ignored: the engine with ``ignore_eos``, transformers with
   ``min_new_tokens``; llama.cpp through ``Llama.generate``, which never stops on EOS by
   itself (``create_completion`` is what stops there), so the worker takes exactly that
   many tokens.

Ratios are against llama.cpp's batch-1 figures, written so that above 1 is faster than
llama.cpp: tok/s over llama.cpp's batch-1 tok/s (for a batch, aggregate tok/s), and
llama.cpp's time over the side's time for TTFT and the answer.

llama.cpp: llama-cpp-python 0.3.36 has been seen to crash (SIGSEGV) evaluating a
multi-token prompt with ``n_batch > 1`` on some machines. The worker starts with
``--llama-n-batch`` (512); if it dies, it is restarted with ``n_batch=1``, its samples so
far are dropped, and the report says so. With ``n_batch=1`` llama.cpp evaluates the
prompt one token at a time, so its TTFT (and the answer wall time, a little) is then
pessimistic for llama.cpp. Its stderr (``verbose=True``: load logs) goes to a log file
whose tail is shown if it dies.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import itertools
import json
import os
import select
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# No torch at import time: the llama.cpp worker runs this module and should load only
# llama_cpp (two OpenMP runtimes in one process could fight over the cores).

SOTSERVE_SIDES: dict[str, dict[str, Any]] = {
    "sotserve-default": {},
    "sotserve-bf16": {"dtype": "bfloat16", "quantization": None},
    "sotserve-fp32": {"dtype": "float32", "quantization": None},
}
SIDES = (*SOTSERVE_SIDES, "transformers", "llama.cpp")
BASELINE = "llama.cpp"
ANSWER_PROMPT = "Write a short story about a dragon who learns to paint."  # bench_engine's
FILLER = (
    "The quick brown fox jumps over the lazy dog while the river runs past the old mill, "
    "and the miller counts the sacks of grain before the winter comes. "
)
LLAMA_N_CTX = 2048


# ----------------------------------------------------------------------------- arithmetic


def median(samples: Sequence[float]) -> float | None:
    """The median of ``samples``; ``None`` when there are none."""
    return statistics.median(samples) if samples else None


def ratio(num: float | None, den: float | None) -> float | None:
    """``num / den``, or ``None`` when either is missing or ``den`` is not positive."""
    if num is None or den is None or den <= 0:
        return None
    return num / den


def summarize(samples: dict[str, list[float]], batches: Sequence[int]) -> dict[str, Any]:
    """Medians of one side's samples: decode step seconds per batch, TTFT and answer seconds.

    ``samples`` keys: ``decode:<batch>`` (seconds per step), ``ttft`` and ``answer``.
    """
    decode_tok_s, decode_step_ms = {}, {}
    for b in batches:
        step = median(samples.get(f"decode:{b}", []))
        decode_step_ms[str(b)] = None if step is None else step * 1e3
        decode_tok_s[str(b)] = ratio(b, step)
    ttft = median(samples.get("ttft", []))
    answer = median(samples.get("answer", []))
    return {
        "decode_tok_s": decode_tok_s,
        "decode_step_ms": decode_step_ms,
        "ttft_ms": None if ttft is None else ttft * 1e3,
        "answer_s": answer,
        "samples": {k: len(v) for k, v in samples.items()},
    }


def ratios_vs_baseline(fig: dict[str, Any], base: dict[str, Any] | None) -> dict[str, Any]:
    """One side's figures over llama.cpp's batch-1 figures (above 1: faster than llama.cpp).

    ``decode_vs_b1[b]`` is the side's batch-``b`` (aggregate) tok/s over llama.cpp's batch-1
    tok/s; ``ttft`` and ``answer`` are llama.cpp's time over the side's.
    """
    base_b1 = None if base is None else base["decode_tok_s"].get("1")
    return {
        "decode_vs_b1": {b: ratio(v, base_b1) for b, v in fig["decode_tok_s"].items()},
        "ttft": ratio(None if base is None else base["ttft_ms"], fig["ttft_ms"]),
        "answer": ratio(None if base is None else base["answer_s"], fig["answer_s"]),
    }


def load_note(load1: float, cpus: int) -> str | None:
    """A warning when the machine was busy before the benchmark started (its own work
    is not in the load average yet)."""
    if load1 < 0.5:
        return None
    return (
        f"the 1-minute load average was {load1:.1f} on {cpus} CPUs before the run: other "
        "work shared the cores, so the figures are noisy (the medians of step times less "
        "so than the wall times of TTFT and the answer)"
    )


# ----------------------------------------------------------------------------- output


def _fmt(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def render_markdown(report: dict[str, Any]) -> str:
    """The report as markdown: a setup line, a table of absolute figures, one of ratios
    against llama.cpp, then the notes."""
    cfg = report["config"]
    batches = [str(b) for b in cfg["batches"]]
    lines = [
        f"Model {cfg['model']}; {cfg['threads']} threads; decode: median of {cfg['steps']} "
        f"steps; TTFT: {cfg['prompt_tokens']}-token prompt, cold; answer: "
        f"{cfg['answer_tokens']} tokens, EOS ignored; median of {cfg['repeats']} repeats.",
        "",
    ]
    head = [
        "side",
        *[f"batch-{b} tok/s" for b in batches],
        "TTFT ms",
        f"{cfg['answer_tokens']}-token answer s",
    ]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, side in report["sides"].items():
        if side["status"] != "ok":
            cells = [f"{side['status']}: {side.get('error', '')}"] + [""] * (len(head) - 2)
        else:
            fig = side["figures"]
            cells = [_fmt(fig["decode_tok_s"].get(b), ".1f") for b in batches]
            cells += [_fmt(fig["ttft_ms"], ".1f"), _fmt(fig["answer_s"], ".2f")]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    lines.append("")
    base = report["sides"].get(BASELINE)
    if base is None or base["status"] != "ok":
        lines.append("No ratios: the llama.cpp side was not measured.")
    else:
        head = ["side"]
        for b in batches:
            head.append(
                "batch-1 decode / llama.cpp"
                if b == "1"
                else f"batch-{b} aggregate tok/s / llama.cpp batch-1"
            )
        head += ["TTFT speed-up vs llama.cpp", "answer speed-up vs llama.cpp"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name, side in report["sides"].items():
            if side["status"] != "ok":
                continue
            r = side["ratios"]
            cells = [_fmt(r["decode_vs_b1"].get(b), ".2f") for b in batches]
            cells += [_fmt(r["ttft"], ".2f"), _fmt(r["answer"], ".2f")]
            lines.append("| " + " | ".join([name, *cells]) + " |")
        lines += [
            "",
            "Ratios above 1 are faster than llama.cpp (TTFT and answer: llama.cpp's "
            "time / the side's time).",
        ]
    notes = list(report.get("notes", []))
    for name, side in report["sides"].items():
        notes += [f"{name}: {n}" for n in side.get("notes", [])]
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- sides


class SideFailed(RuntimeError):
    """A side that cannot go on (it crashed, or failed to load)."""


@dataclass
class Side:
    """One contender: how to warm it up and take each measurement (seconds)."""

    name: str
    batches: tuple[int, ...]  # the decode batches this side can run
    samples: dict[str, list[float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def decode(self, batch: int) -> float:
        raise NotImplementedError

    def ttft(self) -> float:
        raise NotImplementedError

    def answer(self) -> float:
        raise NotImplementedError

    def close(self) -> None:
        pass


class SotserveSide(Side):
    def __init__(self, name, model, device, config, prompts, steps, batches):
        from engine import LLM

        super().__init__(name, tuple(batches))
        self.llm = LLM(
            model, device=device, prefix_cache=False, max_running=max(max(batches), 1), **config
        )
        self.prompts, self.steps = prompts, steps
        cfg = self.llm.engine.config
        self.notes.append(
            f"LLM({_kwargs(config)}prefix_cache=False): dtype {cfg.dtype}, "
            f"quantization {cfg.quantization}"
        )

    def decode(self, batch: int) -> float:
        from evals.bench_engine import time_decode_steps

        return time_decode_steps(self.llm.engine, [self.prompts["short"]] * batch, self.steps)

    def ttft(self) -> float:
        from engine import SamplingParams

        eng = self.llm.engine
        req = eng.make_request(
            self.prompts["long"], SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        )
        t = time.perf_counter()
        eng.add(req)
        while not req.output_ids:
            eng.step()
        dt = time.perf_counter() - t
        while eng.has_unfinished():
            eng.step()
        return dt

    def answer(self) -> float:
        from engine import SamplingParams
        from evals.bench_engine import _time

        sp = SamplingParams(
            max_tokens=self.prompts["answer_tokens"], temperature=0.0, ignore_eos=True
        )
        return _time(lambda: self.llm.generate([self.prompts["short"]], sp))


def _kwargs(config: dict[str, Any]) -> str:
    return "".join(f"{k}={v!r}, " for k, v in config.items())


class TransformersSide(Side):
    def __init__(self, path, prompts, steps, batches):
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # generation-config chatter
        super().__init__("transformers", tuple(batches))
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.prompts, self.steps = prompts, steps
        gen = self.model.generation_config
        pad = gen.pad_token_id if gen.pad_token_id is not None else gen.eos_token_id
        self.pad = (pad[0] if isinstance(pad, list) else pad) or 0
        self.notes.append(
            "float32, generate(do_sample=False, min_new_tokens=max_new_tokens); "
            "a batch is identical prompts, so no padding"
        )

    def _generate(self, ids: list[int], batch: int, tokens: int, stopping=None) -> None:
        torch = self.torch
        x = torch.tensor([ids] * batch)
        with torch.inference_mode():
            self.model.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
                pad_token_id=self.pad,
                stopping_criteria=stopping,
            )

    def decode(self, batch: int) -> float:
        from transformers import StoppingCriteria, StoppingCriteriaList

        torch = self.torch
        stamps: list[float] = []

        class Stamp(StoppingCriteria):  # called once per generated token (every step)
            def __call__(self, input_ids, scores, **kwargs):
                stamps.append(time.perf_counter())
                return torch.zeros(input_ids.shape[0], dtype=torch.bool)

        self._generate(
            self.prompts["short"], batch, self.steps + 1, StoppingCriteriaList([Stamp()])
        )
        return token_gap(stamps)

    def ttft(self) -> float:
        t = time.perf_counter()
        self._generate(self.prompts["long"], 1, 1)
        return time.perf_counter() - t

    def answer(self) -> float:
        t = time.perf_counter()
        self._generate(self.prompts["short"], 1, self.prompts["answer_tokens"])
        return time.perf_counter() - t


def token_gap(stamps: Sequence[float]) -> float:
    """Median gap between consecutive token times (the first token's prefill excluded)."""
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    if not gaps:
        raise ValueError("need at least two token times")
    return statistics.median(gaps)


class WorkerCrashed(RuntimeError):
    """The llama.cpp worker died (or hung) while running with ``n_batch``."""

    def __init__(self, message: str, n_batch: int):
        super().__init__(message)
        self.n_batch = n_batch


class LlamaCppWorker:
    """A ``--worker llama.cpp`` subprocess speaking JSON lines over its stdin/stdout."""

    def __init__(
        self,
        gguf: Path,
        threads: int,
        n_batch: int,
        timeout: float = 900.0,
        cmd: list[str] | None = None,  # tests: another program in the worker's place
    ):
        self.n_batch, self.timeout = n_batch, timeout
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115 (lives as long as the worker)
            "w+", prefix=f"bench_peers_llama_nb{n_batch}_", suffix=".log", delete=False
        )
        root = Path(__file__).resolve().parents[1]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
        cmd = cmd or [sys.executable, "-m", "evals.bench_peers", "--worker", "llama.cpp",
                      "--gguf", str(gguf), "--threads", str(threads),
                      "--llama-n-batch", str(n_batch)]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            cwd=root,
            env=env,
        )
        self.hello = self._read()

    def _read(self) -> dict[str, Any]:
        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            if not ready:
                self.proc.kill()
            rc = self.proc.wait()
            raise WorkerCrashed(f"n_batch={self.n_batch}: {self._death(rc, ready)}", self.n_batch)
        msg = json.loads(line)
        if "error" in msg:
            raise SideFailed(f"llama.cpp worker: {msg['error']}")
        return msg

    def _death(self, rc: int, ready: bool) -> str:
        if not ready:
            how = f"no answer in {self.timeout:.0f} s"
        elif rc < 0:
            import signal

            try:
                how = f"killed by {signal.Signals(-rc).name}"
            except ValueError:
                how = f"killed by signal {-rc}"
        else:
            how = f"exited with status {rc}"
        self.log.flush()
        tail = Path(self.log.name).read_text(errors="replace").strip().splitlines()[-3:]
        return how + (f" (stderr: {' / '.join(tail)}; log {self.log.name})" if tail else "")

    def call(self, **cmd: Any) -> dict[str, Any]:
        try:
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # _read reports how it died
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(WorkerCrashed, SideFailed, OSError):
                self.call(op="quit")
            self.proc.wait(timeout=30)
        self.log.close()
        if self.proc.returncode == 0:  # a worker that died keeps its log for the report
            Path(self.log.name).unlink(missing_ok=True)


class LlamaCppSide(Side):
    """llama.cpp in a worker process, at batch 1; falls back to ``n_batch=1`` if it dies."""

    def __init__(self, gguf: Path, threads: int, n_batch: int, prompts, steps, start=None):
        super().__init__("llama.cpp", (1,))
        self.gguf, self.threads, self.prompts, self.steps = gguf, threads, prompts, steps
        self._start = start or LlamaCppWorker
        self.worker = None
        self._launch(n_batch)
        self.notes.append(
            "measured at batch 1 only: llama-cpp-python's high-level API decodes one sequence"
        )

    def _launch(self, n_batch: int) -> None:
        try:
            self.worker = self._start(self.gguf, self.threads, n_batch)
        except WorkerCrashed as e:
            self._fall_back(e)

    def _fall_back(self, err: WorkerCrashed) -> None:
        """Restart the worker with ``n_batch=1`` after it died with another n_batch."""
        if err.n_batch == 1:
            raise SideFailed(f"crashed with n_batch=1 too: {err}") from err
        self.notes.append(
            f"the worker with n_batch={err.n_batch} died ({err}); restarted "
            "with n_batch=1 and dropped its samples so far"
        )
        self.samples.clear()
        if self.worker is not None:
            self.worker.close()
            self.worker = None
        self._launch(1)

    def _call(self, **cmd: Any) -> dict[str, Any]:
        try:
            return self.worker.call(**cmd)
        except WorkerCrashed as e:
            self._fall_back(e)
            return self.worker.call(**cmd)  # a crash with n_batch=1 is final

    @property
    def n_batch(self) -> int:
        return self.worker.n_batch

    def decode(self, batch: int) -> float:
        assert batch == 1
        return self._call(op="decode", prompt=self.prompts["short"], steps=self.steps)["s"]

    def ttft(self) -> float:
        return self._call(op="ttft", prompt=self.prompts["long"])["s"]

    def answer(self) -> float:
        out = self._call(
            op="answer", prompt=self.prompts["short"], tokens=self.prompts["answer_tokens"]
        )
        self.eos_in_answer = out["eos"]
        return out["s"]

    def describe(self) -> list[str]:
        hello = self.worker.hello
        notes = [
            f"llama-cpp-python {hello['version']}, Llama(n_ctx={LLAMA_N_CTX}, "
            f"n_threads={self.threads}, n_threads_batch={self.threads}, "
            f"n_batch={self.n_batch}, verbose=True)"
        ]
        if self.n_batch == 1:
            notes.append(
                "n_batch=1 evaluates the prompt token by token: its TTFT figure is "
                "pessimistic for llama.cpp"
            )
        notes.append(
            "answer: Llama.generate does not stop at EOS, the worker takes exactly "
            "the answer's tokens (EOS came up "
            f"{getattr(self, 'eos_in_answer', '?')} times in them)"
        )
        return notes

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()


# ----------------------------------------------------------------------------- the worker


def llama_worker(gguf: str, threads: int, n_batch: int) -> int:
    """Serve measurements on llama.cpp over JSON lines (stdin: commands, stdout: results).

    Anything the C side prints goes to stderr: fd 1 is pointed there and the replies use a
    copy of the original stdout.
    """
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def reply(**msg: Any) -> None:
        out.write(json.dumps(msg) + "\n")
        out.flush()

    try:
        import llama_cpp
    except ImportError as e:
        reply(error=f"cannot import llama_cpp ({e}); pip install -e '.[peers]'")
        return 1
    t = time.perf_counter()
    llm = llama_cpp.Llama(
        gguf,
        n_ctx=LLAMA_N_CTX,
        n_threads=threads,
        n_threads_batch=threads,
        n_batch=n_batch,
        verbose=True,
    )
    load_s = time.perf_counter() - t
    eos = llm.token_eos()

    def tokens(prompt: list[int], count: int) -> tuple[list[float], list[int]]:
        """Generate ``count`` tokens greedily from a reset context: the start time then
        each token's arrival time, and the tokens."""
        llm.reset()  # no KV reuse from the last call: every prompt is evaluated cold
        stamps, got = [time.perf_counter()], []
        for tok in llm.generate(prompt, temp=0.0, repeat_penalty=1.0):
            stamps.append(time.perf_counter())
            got.append(tok)
            if len(got) >= count:
                break
        return stamps, got

    reply(ready=True, version=llama_cpp.__version__, n_batch=n_batch, load_s=load_s)
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "quit":
            break
        if op == "decode":
            stamps, _ = tokens(cmd["prompt"], cmd["steps"] + 1)
            reply(s=token_gap(stamps[1:]))
        elif op == "ttft":
            stamps, _ = tokens(cmd["prompt"], 1)
            reply(s=stamps[1] - stamps[0])
        elif op == "answer":
            stamps, got = tokens(cmd["prompt"], cmd["tokens"])
            reply(s=stamps[-1] - stamps[0], n=len(got), eos=got.count(eos))
        else:
            reply(error=f"unknown op {op!r}")
    return 0


# ----------------------------------------------------------------------------- driver


def parse_sides(text: str | None, installed: Sequence[str]) -> list[str]:
    """The sides named in ``text`` (comma-separated), or every installed one for ``None``.

    Raises ``ValueError`` for a name that is not a side or a side that is not installed.
    """
    if text is None:
        return [s for s in SIDES if s in installed]
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [n for n in names if n not in SIDES]
    if unknown:
        raise ValueError(f"unknown sides {unknown}; available: {', '.join(SIDES)}")
    missing = [n for n in names if n not in installed]
    if missing:
        raise ValueError(
            f"sides {missing} are not available here (llama.cpp needs llama-cpp-python, "
            "pip install -e '.[peers]', and a GGUF model)"
        )
    if not names:
        raise ValueError("no sides given")
    return list(dict.fromkeys(names))


def parse_batches(text: str) -> list[int]:
    try:
        batches = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"batches must be comma-separated integers, not {text!r}") from None
    if not batches or min(batches) < 1:
        raise ValueError(f"batches must be positive integers, not {text!r}")
    return list(dict.fromkeys(batches))


def build_prompt(render: Callable[[str], list[int]], tokens: int, text: str = FILLER) -> list[int]:
    """The shortest chat prompt of ``text`` repeated (word by word) with at least ``tokens``
    token ids; ``render`` turns the user message into the templated ids."""
    words = text.split()
    n = 1
    ids = render(words[0])
    while len(ids) < tokens:
        n += 1
        ids = render(" ".join(words[i % len(words)] for i in range(n)))
    return ids


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m evals.bench_peers",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--sides",
        default=None,
        help=f"comma-separated, from: {', '.join(SIDES)} (default: all installed)",
    )
    ap.add_argument(
        "--model",
        default=None,
        help="engine and transformers sides: a model directory or GGUF (default: "
        "the embedded SmolLM2); llama.cpp needs the GGUF it came from",
    )
    ap.add_argument("--batches", default="1,4,8,16", help="decode batch sizes")
    ap.add_argument("--steps", type=int, default=32, help="decode steps timed per measurement")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=300, help="TTFT prompt length")
    ap.add_argument("--answer-tokens", type=int, default=256)
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="threads for every side (default: torch.get_num_threads())",
    )
    ap.add_argument(
        "--device", default="cpu", help="engine sides' device (the peers run on the CPU)"
    )
    ap.add_argument(
        "--llama-n-batch",
        type=int,
        default=512,
        help="llama.cpp's first n_batch; it falls back to 1 if the worker dies",
    )
    ap.add_argument("--json", default=None, help="write the report as JSON here")
    ap.add_argument("--out", default=None, help="write the markdown table here")
    ap.add_argument("--worker", choices=["llama.cpp"], help=argparse.SUPPRESS)
    ap.add_argument("--gguf", default=None, help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns the report (also printed, and written with --json/--out)."""
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.worker:
        sys.exit(llama_worker(args.gguf, args.threads, args.llama_n_batch))
    try:
        batches = parse_batches(args.batches)
        parse_sides(args.sides, SIDES)  # unknown names, before loading anything
    except ValueError as e:
        ap.error(str(e))
    for opt in ("steps", "repeats", "prompt_tokens", "answer_tokens"):
        if getattr(args, opt) < 1:
            ap.error(f"--{opt.replace('_', '-')} must be at least 1")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from engine.llm import render_chat
    from engine.loader import resolve_model

    files = resolve_model(args.model)
    gguf = files.gguf
    installed = [*SOTSERVE_SIDES, "transformers"]
    if gguf is not None and importlib.util.find_spec("llama_cpp") is not None:
        installed.append("llama.cpp")
    try:
        sides_wanted = parse_sides(args.sides, installed)
    except ValueError as e:
        ap.error(str(e))
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)

    tok = files.tokenizer()

    def render(text: str) -> list[int]:
        return render_chat(tok, [{"role": "user", "content": text}])

    prompts = {
        "short": render(ANSWER_PROMPT),
        "long": build_prompt(render, args.prompt_tokens),
        "answer_tokens": args.answer_tokens,
    }
    config = {
        "model": files.name,
        "gguf": None if gguf is None else gguf.name,
        "threads": threads,
        "batches": batches,
        "steps": args.steps,
        "repeats": args.repeats,
        "prompt_tokens": len(prompts["long"]),
        "short_prompt_tokens": len(prompts["short"]),
        "answer_tokens": args.answer_tokens,
        "device": args.device,
        "torch": torch.__version__,
    }
    print(
        f"model {files.name}; threads {threads}; sides {', '.join(sides_wanted)}; "
        f"prompts: short {len(prompts['short'])}, long {len(prompts['long'])} tokens",
        flush=True,
    )

    report: dict[str, Any] = {"config": config, "sides": {}, "notes": []}
    load1 = os.getloadavg()[0]
    config["load_average_before"] = load1
    if note := load_note(load1, os.cpu_count() or 1):
        report["notes"].append(note)
    sides: list[Side] = []
    for name in sides_wanted:
        t = time.perf_counter()
        try:
            sides.append(_load(name, args, files, gguf, threads, prompts, batches))
        except (SideFailed, WorkerCrashed) as e:
            report["sides"][name] = {"status": "failed", "error": str(e), "notes": []}
            print(f"  {name}: failed to load: {e}", flush=True)
            continue
        print(f"  {name}: loaded in {time.perf_counter() - t:.1f} s", flush=True)

    try:
        failed = run_rounds(sides, batches, args.repeats)
    finally:
        for s in sides:
            s.close()
    for s in sides:
        if s.name in failed:
            report["sides"][s.name] = {
                "status": "failed",
                "error": failed[s.name],
                "notes": s.notes,
            }
            continue
        notes = s.notes + (s.describe() if isinstance(s, LlamaCppSide) else [])
        entry = {"status": "ok", "figures": summarize(s.samples, batches), "notes": notes}
        if isinstance(s, LlamaCppSide):
            entry["n_batch"] = s.n_batch
            config["llama_cpp"] = s.worker.hello["version"]
        report["sides"][s.name] = entry
    report["sides"] = {n: report["sides"][n] for n in sides_wanted if n in report["sides"]}
    base = report["sides"].get(BASELINE)
    base_fig = base["figures"] if base and base["status"] == "ok" else None
    for entry in report["sides"].values():
        if entry["status"] == "ok":
            entry["ratios"] = ratios_vs_baseline(entry["figures"], base_fig)
    if BASELINE not in sides_wanted:
        report["notes"].append("llama.cpp was not among the sides: no ratios")

    md = render_markdown(report)
    print()
    print(md, end="")
    if args.out:
        Path(args.out).write_text(md)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _load(name, args, files, gguf, threads, prompts, batches) -> Side:
    if name in SOTSERVE_SIDES:
        model = str(files.path) if args.model is not None else None
        return SotserveSide(
            name, model, args.device, SOTSERVE_SIDES[name], prompts, args.steps, batches
        )
    if name == "transformers":
        return TransformersSide(files.path, prompts, args.steps, batches)
    return LlamaCppSide(gguf, threads, args.llama_n_batch, prompts, args.steps)


def run_rounds(sides: Sequence[Side], batches: Sequence[int], repeats: int) -> dict[str, str]:
    """A warm-up round, then ``repeats`` rounds of every measurement; the sides take turns
    at each measurement and their order rotates each round. A side that fails is dropped;
    returns ``{name: error}`` for those."""
    failed: dict[str, str] = {}
    jobs: list[tuple[str, Callable[[Side], float], Callable[[Side], bool]]] = [
        (f"decode:{b}", lambda s, b=b: s.decode(b), lambda s, b=b: b in s.batches) for b in batches
    ]
    jobs += [
        ("ttft", lambda s: s.ttft(), lambda s: True),
        ("answer", lambda s: s.answer(), lambda s: True),
    ]
    for rnd in range(repeats + 1):  # round 0 warms up
        k = rnd % len(sides) if sides else 0
        order = list(sides[k:]) + list(sides[:k])
        label = "warm-up" if rnd == 0 else f"repeat {rnd}/{repeats}"
        t = time.perf_counter()
        for key, run, applies in jobs:
            for s in order:
                if s.name in failed or not applies(s):
                    continue
                try:
                    dt = run(s)
                except (SideFailed, WorkerCrashed) as e:
                    failed[s.name] = str(e)
                    print(f"  {s.name}: failed: {e}", flush=True)
                    continue
                if rnd:
                    s.samples.setdefault(key, []).append(dt)
        print(f"  {label} done in {time.perf_counter() - t:.1f} s", flush=True)
    return failed


if __name__ == "__main__":
    main()
