"""Engine benchmarks, each against a baseline measured in the same run.

    python -m evals.bench_engine [--sections decode,fanout] [--dtype float32] [--tokens 64]

``decode`` (CPU): for each of ``--batches`` both the engine and ``transformers.generate``
generate ``--tokens`` new tokens for the same chat prompt (EOS ignored), and a 1-token
run measures the prefill; the decode step time is ``(t(N+1 tokens) - t(1 token)) / N``.
Runs alternate between the two sides and the median of ``--repeats`` is reported. The
batch-1 step is also compared to its floor: the bytes of weights one decode step reads
divided by the copy bandwidth measured here (STREAM convention: read + written bytes
per second).

``floor`` (any device, ``--device``): the engine's decode step for ``--floor-batches``
(1 and 32) against the weight-read floor, with CUDA graphs and eagerly (on CUDA).

``fanout`` and ``cascade``: the prefix cache and the shared-prefix attention path, each
against the engine without it.

``speculative``: prompt-lookup speculative decoding (``engine.speculative``) against the
same engine without it, on chat answers to ``--dataset`` questions (greedy, EOS ends
them, ``--tokens`` at most), the engine as served (its default dtype and weights): one
question at a time, then ``--spec-batches`` questions at once. The two engines take
turns per question; the outputs must be the same tokens, and the figures are answer
tokens per second, engine steps, and the share of draft tokens accepted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPT = "Write a short story about a dragon who learns to paint."
DATASET = Path(__file__).resolve().parents[2] / "shared" / "data" / "vicuna80.jsonl"


def copy_bandwidth(
    nbytes: int = 512 * 2**20, repeats: int = 10, device: torch.device | str = "cpu"
) -> float:
    """Bytes per second moved by a large tensor copy (read + write, like STREAM Copy)."""
    device = torch.device(device)
    a = torch.ones(nbytes // 4, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        b.copy_(a)
        _sync(device)
        times.append(time.perf_counter() - t)
    return 2 * nbytes / min(times)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def weight_bytes_per_step(model: torch.nn.Module, batch: int) -> int:
    """Bytes of parameters one decode step reads, for a ``transformers`` model.

    Every matrix is read once; the embedding lookup reads ``batch`` rows, unless the
    head is tied to it and reads the whole table anyway (shared tensors are listed once).
    """
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    total = 0
    for name, p in model.named_parameters():
        nbytes = p.numel() * p.element_size()
        if "embed_tokens" in name and not tied:
            nbytes = batch * p.shape[1] * p.element_size()
        total += nbytes
    return total


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> dict[str, object]:
    """Run the chosen sections; returns what each returns (``floor``: a row per batch)."""
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--sections", default="decode,fanout",
        help="comma-separated: decode, floor, fanout, cascade, speculative",
    )  # fmt: skip
    ap.add_argument("--dataset", type=Path, default=DATASET, help="speculative section")
    ap.add_argument(
        "--limit", type=int, default=20, help="speculative section: the first N questions"
    )
    ap.add_argument(
        "--spec-batches", default="1,4,8",
        help="speculative section: questions decoded at once",
    )  # fmt: skip
    ap.add_argument("--device", default="auto", help="floor section: cpu | cuda | auto")
    ap.add_argument("--floor-batches", default="1,32", help="floor section: batch sizes")
    ap.add_argument("--context", type=int, default=256, help="floor section: prompt tokens")
    ap.add_argument(
        "--peak-gbps", type=float, default=None,
        help="floor section: the device's memory bandwidth (e.g. 3350 for an H100 SXM); "
        "the measured copy bandwidth is always reported",
    )  # fmt: skip
    args = ap.parse_args(argv)

    from engine.config import resolve_dtype
    from engine.loader import resolve_model

    dtype = resolve_dtype(args.dtype)
    files = resolve_model(args.model)
    sections = [x.strip() for x in args.sections.split(",") if x.strip()]
    runners = {"decode": bench_decode, "floor": bench_floor, "cascade": bench_cascade,
               "fanout": bench_fanout, "speculative": bench_speculative}  # fmt: skip
    unknown = set(sections) - set(runners)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}; available: {', '.join(runners)}")
    return {name: runners[name](args, files, dtype) for name in sections}


def bench_decode(args: argparse.Namespace, files, dtype: torch.dtype) -> None:
    """Decode step time against ``transformers.generate``, and the batch-1 floor."""
    from transformers import AutoModelForCausalLM

    from engine import LLM, SamplingParams

    # No prefix cache: transformers has none, and the comparison is about decoding.
    llm = LLM(str(files.path), dtype=dtype, device="cpu", prefix_cache=False)
    hf = AutoModelForCausalLM.from_pretrained(files.path, dtype=dtype).eval()
    ids = llm.apply_chat_template([{"role": "user", "content": PROMPT}])
    n = args.tokens
    print(
        f"model {files.name}  dtype {args.dtype}  threads {torch.get_num_threads()}  "
        f"prompt {len(ids)} tokens  new tokens {n}"
    )

    def ours(batch: int, tokens: int) -> float:
        sp = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
        return _time(lambda: llm.generate([ids] * batch, sp))

    def theirs(batch: int, tokens: int) -> float:
        x = torch.tensor([ids] * batch)
        mask = torch.ones_like(x)
        with torch.inference_mode():
            return _time(
                lambda: hf.generate(
                    x,
                    attention_mask=mask,
                    max_new_tokens=tokens,
                    min_new_tokens=tokens,
                    do_sample=False,
                    pad_token_id=0,
                )
            )

    results = {}
    for batch in [int(b) for b in args.batches.split(",")]:
        ours(batch, 4), theirs(batch, 4)  # warm-up
        steps = {"sotserve": [], "transformers": []}
        for _ in range(args.repeats):
            for name, fn in (("sotserve", ours), ("transformers", theirs)):
                steps[name].append((fn(batch, n + 1) - fn(batch, 1)) / n)
        med = {k: statistics.median(v) for k, v in steps.items()}
        results[batch] = med
        ours_s, hf_s = med["sotserve"], med["transformers"]
        print(
            f"batch {batch:3d}: decode step  sotserve {ours_s * 1e3:7.1f} ms "
            f"({batch / ours_s:7.1f} tok/s)  transformers {hf_s * 1e3:7.1f} ms "
            f"({batch / hf_s:7.1f} tok/s)  speed-up {hf_s / ours_s:.2f}x"
        )

    if 1 in results:
        bw = copy_bandwidth()
        wbytes = weight_bytes_per_step(hf, 1)  # same weights; ours are prepacked
        floor = wbytes / bw
        step = results[1]["sotserve"]
        print(
            f"batch-1 floor: {wbytes / 1e6:.0f} MB of weights / {bw / 1e9:.1f} GB/s copy bandwidth "
            f"= {floor * 1e3:.1f} ms; sotserve step {step * 1e3:.1f} ms "
            f"= {step / floor:.2f}x the floor"
        )


def floor_bytes(weight_bytes: int, kv_bytes_per_token: int, batch: int, context: int) -> int:
    """Bytes one decode step must read at least: the weights once, plus the K/V of every
    request's ``context`` tokens."""
    return weight_bytes + batch * context * kv_bytes_per_token


def time_decode_steps(engine, prompts: list[list[int]], steps: int) -> float:
    """Median seconds of one engine step while all ``prompts`` decode (prefill untimed)."""
    from engine import SamplingParams

    params = SamplingParams(max_tokens=steps + 2, temperature=0.0, ignore_eos=True)
    reqs = [engine.make_request(p, params) for p in prompts]
    for r in reqs:
        engine.add(r)
    while any(not r.output_ids for r in reqs):
        engine.step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        engine.step()  # sampling reads the tokens back: the step has finished on the device
        times.append(time.perf_counter() - t)
    while engine.has_unfinished():
        engine.step()
    return statistics.median(times)


def bench_floor(args: argparse.Namespace, files, dtype: torch.dtype) -> list[dict]:
    """The engine's decode step for each of ``--floor-batches`` against its floor: the
    bytes it must read (weights once, K/V of ``--context`` tokens per request) divided by
    the copy bandwidth measured on the device, and by ``--peak-gbps`` when given.

    On CUDA it runs twice in the same process, replaying CUDA graphs and eagerly
    (``enforce_eager``); elsewhere eagerly only. Each request's prompt is its own random
    ``--context`` tokens, so no prefix is shared.
    """
    from transformers import AutoModelForCausalLM

    from engine import LLM
    from engine.config import resolve_device
    from engine.kv_cache import KVPool
    from engine.models import ModelArgs

    device = resolve_device(args.device)
    batches = [int(b) for b in args.floor_batches.split(",")]
    config = files.config()
    with torch.device("meta"):  # shapes only: no weights are read or allocated
        meta = AutoModelForCausalLM.from_config(config, dtype=dtype)
    margs = ModelArgs.from_hf(config)
    kv_per_token = KVPool.bytes_per_slot(
        margs.num_layers, margs.num_kv_heads, margs.head_dim, dtype
    )
    bw = copy_bandwidth(device=device)
    peak = args.peak_gbps * 1e9 if args.peak_gbps else None
    modes = {"graphs": False, "eager": True} if device.type == "cuda" else {"eager": True}
    engines = {
        mode: LLM(str(files.path), dtype=dtype, device=device, prefix_cache=False,
                  max_running=max(batches), enforce_eager=eager)
        for mode, eager in modes.items()
    }  # fmt: skip
    vocab = margs.vocab_size
    head = f"floor: model {files.name}  {dtype}  device {device}  context {args.context} tokens"
    head += f"; copy bandwidth {bw / 1e9:.0f} GB/s"
    print(head + (f", peak {args.peak_gbps:.0f} GB/s" if peak else ""))
    results = []
    for batch in batches:
        g = torch.Generator().manual_seed(batch)
        prompts = [torch.randint(100, vocab, (args.context,), generator=g).tolist()
                   for _ in range(batch)]  # fmt: skip
        need = floor_bytes(weight_bytes_per_step(meta, batch), kv_per_token, batch, args.context)
        floor_s = need / bw
        line = f"  batch {batch:3d}: reads {need / 1e6:7.1f} MB, floor {floor_s * 1e3:6.3f} ms"
        if peak:
            line += f" ({need / peak * 1e3:6.3f} ms at peak)"
        res = {"batch": batch, "bytes": need, "floor_ms": floor_s * 1e3}
        for mode, llm in engines.items():
            time_decode_steps(llm.engine, prompts[:1], 2)  # warm-up
            step = time_decode_steps(llm.engine, prompts, args.tokens)
            res[f"{mode}_ms"] = step * 1e3
            res[f"{mode}_x_floor"] = step / floor_s
            line += f"; {mode} {step * 1e3:7.3f} ms = {step / floor_s:5.2f}x floor"
            if peak:
                line += f" ({need / step / peak:.0%} of peak)"
        print(line)
        results.append(res)
    return results


FANOUT_PREFIX, FANOUT_SUFFIX, FANOUT_REQUESTS = 256, 16, 8


def bench_fanout(args: argparse.Namespace, files, dtype: torch.dtype) -> None:
    """Eight requests sharing a 256-token prefix, each with its own 16-token suffix.

    Each repeat uses a new random prefix, so neither engine finds it cached from an
    earlier repeat; the runs with and without the prefix cache alternate.
    """
    from engine import LLM, SamplingParams

    engines = {
        "prefix cache": LLM(str(files.path), dtype=dtype, device="cpu"),
        "no cache": LLM(str(files.path), dtype=dtype, device="cpu", prefix_cache=False),
    }
    vocab = engines["no cache"].engine.vocab_size
    params = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
    times: dict[str, list[float]] = {name: [] for name in engines}
    computed: dict[str, list[int]] = {name: [] for name in engines}
    for rep in range(args.repeats + 1):  # the first round is a warm-up
        g = torch.Generator().manual_seed(rep)
        prefix = torch.randint(100, vocab, (FANOUT_PREFIX,), generator=g).tolist()
        prompts = [
            prefix + torch.randint(100, vocab, (FANOUT_SUFFIX,), generator=g).tolist()
            for _ in range(FANOUT_REQUESTS)
        ]
        for name, llm in engines.items():
            before = llm.stats().computed_prefill_tokens
            t = _time(lambda llm=llm, prompts=prompts: llm.generate(prompts, params))
            if rep:
                times[name].append(t)
                computed[name].append(llm.stats().computed_prefill_tokens - before)
    budget = FANOUT_PREFIX + FANOUT_REQUESTS * FANOUT_SUFFIX
    print(
        f"fan-out: {FANOUT_REQUESTS} requests x ({FANOUT_PREFIX} shared + {FANOUT_SUFFIX} own) "
        f"prompt tokens, {args.tokens} new tokens each"
    )
    for name in engines:
        print(
            f"  {name:12s}: computed prefill tokens {statistics.median(computed[name]):6.0f} "
            f"({statistics.median(computed[name]) / budget:.2f}x of {budget}), "
            f"wall {statistics.median(times[name]):.2f} s"
        )
    speed = statistics.median(times["no cache"]) / statistics.median(times["prefix cache"])
    print(f"  speed-up from the prefix cache: {speed:.2f}x")


CASCADE_PREFIX = 1024


def bench_cascade(args: argparse.Namespace, files, dtype: torch.dtype) -> None:
    """Decode step time of a fan-out of 8 requests sharing a 1,024-token prefix, with
    the shared-prefix (cascade) attention path and without it, in the same run.

    Both engines prefill the same prompts first (not timed); then ``--tokens`` decode
    steps of all 8 requests are timed. Each repeat draws a new prefix; the two engines
    alternate which goes first.
    """
    from engine import LLM, SamplingParams

    engines = {
        "shared-prefix path": LLM(str(files.path), dtype=dtype, device="cpu",
                                  shared_prefix_min_tokens=256),
        "plain attention": LLM(str(files.path), dtype=dtype, device="cpu",
                               shared_prefix_min_tokens=None),
    }  # fmt: skip
    vocab = engines["plain attention"].engine.vocab_size
    params = SamplingParams(max_tokens=args.tokens + 1, temperature=0.0, ignore_eos=True)
    steps: dict[str, list[float]] = {name: [] for name in engines}
    for rep in range(args.repeats + 1):  # the first round is a warm-up
        g = torch.Generator().manual_seed(1000 + rep)
        prefix = torch.randint(100, vocab, (CASCADE_PREFIX,), generator=g).tolist()
        prompts = [
            prefix + torch.randint(100, vocab, (FANOUT_SUFFIX,), generator=g).tolist()
            for _ in range(FANOUT_REQUESTS)
        ]
        order = list(engines.items()) if rep % 2 == 0 else list(engines.items())[::-1]
        for name, llm in order:
            eng = llm.engine
            reqs = [eng.make_request(p, params) for p in prompts]
            for r in reqs:
                eng.add(r)
            while any(not r.output_ids for r in reqs):  # prefill, untimed
                eng.step()
            t0 = time.perf_counter()
            for _ in range(args.tokens):
                eng.step()
            if rep:
                steps[name].append((time.perf_counter() - t0) / args.tokens)
            while eng.has_unfinished():
                eng.step()
    print(
        f"cascade: {FANOUT_REQUESTS} requests sharing a {CASCADE_PREFIX}-token prefix "
        f"(+{FANOUT_SUFFIX} own tokens), decode step time, median of {args.repeats}"
    )
    for name in engines:
        print(f"  {name:18s}: {statistics.median(steps[name]) * 1000:7.1f} ms per step")
    ratio = statistics.median(steps["plain attention"]) / statistics.median(
        steps["shared-prefix path"]
    )
    print(f"  speed-up of the decode step from the shared-prefix path: {ratio:.2f}x")


def bench_speculative(args: argparse.Namespace, files, dtype: torch.dtype) -> dict[int, float]:
    """Answer tokens per second with prompt-lookup drafts over without, per batch size
    of ``--spec-batches``; returns those ratios."""
    from engine import LLM, SamplingParams
    from evals.dataset import load_dataset, select
    from prompts import ChatRenderer

    engines = {
        "drafts": LLM(str(files.path)),
        "plain": LLM(str(files.path), speculative_tokens=0),
    }
    renderer = ChatRenderer(engines["plain"].tokenizer)
    questions = select(load_dataset(args.dataset).questions, limit=args.limit)
    prompts = [renderer.render([{"role": "user", "content": q.question}]) for q in questions]
    params = SamplingParams(max_tokens=args.tokens, temperature=0.0)
    for llm in engines.values():  # warm-up
        llm.generate(prompts[:1], SamplingParams(max_tokens=8, temperature=0.0))
    ratios: dict[int, float] = {}
    print(f"speculative: {len(prompts)} questions of {args.dataset.name}, <= {args.tokens} tokens")
    for batch in [int(b) for b in args.spec_batches.split(",")]:
        groups = [prompts[i : i + batch] for i in range(0, len(prompts), batch)]
        secs = dict.fromkeys(engines, 0.0)
        tokens = dict.fromkeys(engines, 0)
        outputs: dict[str, list[list[int]]] = {name: [] for name in engines}
        before = {name: llm.stats() for name, llm in engines.items()}
        for k, group in enumerate(groups):
            order = list(engines) if k % 2 == 0 else list(reversed(engines))
            for name in order:
                t = time.perf_counter()
                outs = engines[name].generate(group, params)
                secs[name] += time.perf_counter() - t
                tokens[name] += sum(len(o.token_ids) for o in outs)
                outputs[name].extend(o.token_ids for o in outs)
        same = sum(a == b for a, b in zip(outputs["drafts"], outputs["plain"], strict=True))
        print(f"  batch {batch}: same tokens in {same} of {len(prompts)} answers")
        for name, llm in engines.items():
            st, b0 = llm.stats(), before[name]
            drafted = st.draft_tokens - b0.draft_tokens
            accepted = st.accepted_draft_tokens - b0.accepted_draft_tokens
            share = f", {accepted}/{drafted} draft tokens accepted" if drafted else ""
            print(
                f"    {name:6s}: {tokens[name] / secs[name]:6.1f} tok/s, {tokens[name]} tokens "
                f"in {st.steps - b0.steps} steps{share}"
            )
        ratios[batch] = (tokens["drafts"] / secs["drafts"]) / (tokens["plain"] / secs["plain"])
        print(f"    speed-up from drafts: {ratios[batch]:.2f}x")
    return ratios


if __name__ == "__main__":
    main()
