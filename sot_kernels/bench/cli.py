"""The ``python -m sot_kernels.bench`` command line: options, and the sections run in order."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from sot_kernels.bench.cascade import run_cpu, run_gpu
from sot_kernels.bench.decode import run_decode
from sot_kernels.bench.extend import run_extend
from sot_kernels.bench.timing import DTYPES


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(",")
    lo_i, hi_i = int(lo), int(hi or lo)
    if not 1 <= lo_i <= hi_i:
        raise argparse.ArgumentTypeError(f"bad suffix range {text!r}")
    return lo_i, hi_i


SECTIONS = ("cpu", "gpu", "decode", "extend")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from sot_kernels import bench  # the package, imported by now: its docstring names the tool

    description = bench.__doc__.split("\n")[0]
    p = argparse.ArgumentParser(prog="python -m sot_kernels.bench", description=description)
    p.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}"
    )
    p.add_argument("--groups", type=_ints, default=[1, 2, 8], help="requests per fan-out")
    p.add_argument("--prefix", type=int, default=1024, help="shared prefix tokens")
    p.add_argument("--suffix", type=_range, default=(16, 64), help="private suffix MIN,MAX")
    p.add_argument("--hq", type=int, default=9)
    p.add_argument("--hk", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--peak-gbps", type=float, default=3350.0, help="GPU memory bandwidth")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where decode and extend run (cpu needs TRITON_INTERPRET=1)",
    )
    p.add_argument(
        "--decode-batches", type=_ints, default=[1, 8, 32], help="decode: requests per call"
    )
    p.add_argument(
        "--decode-lens", type=_ints, default=[1024, 8192], help="decode: keys per request"
    )
    p.add_argument(
        "--l2-mb", type=float, default=50.0, help="decode: GPU L2 size, to flag rows within it"
    )
    p.add_argument("--extend-batches", type=_ints, default=[1, 4], help="extend: requests per call")
    p.add_argument(
        "--extend-chunks", type=_ints, default=[512, 2048], help="extend: new tokens per request"
    )
    p.add_argument(
        "--extend-prefixes",
        type=_ints,
        default=[0, 2048],
        help="extend: cached tokens before each chunk",
    )
    args = p.parse_args(argv)
    if args.hq % args.hk:
        p.error("--hq must be a multiple of --hk")
    for name in ("decode_batches", "decode_lens", "extend_batches", "extend_chunks"):
        if not getattr(args, name) or min(getattr(args, name)) < 1:
            p.error(f"--{name.replace('_', '-')} needs positive integers")
    if not args.extend_prefixes or min(args.extend_prefixes) < 0:
        p.error("--extend-prefixes needs integers >= 0")
    try:
        torch.device(args.device)
    except RuntimeError as e:
        p.error(f"--device: {e}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, list[dict]]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    runners = {"cpu": run_cpu, "gpu": run_gpu, "decode": run_decode, "extend": run_extend}
    unknown = set(sections) - set(runners)
    if unknown:
        raise SystemExit(f"unknown sections {sorted(unknown)}; available: {', '.join(runners)}")
    results = {}
    for i, name in enumerate(sections):
        if i:
            print()
        results[name] = runners[name](args)
    return results
