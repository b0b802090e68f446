"""Shared-prefix (cascade) attention against plain per-request decode attention.

``python -m kernels.bench`` times one decode step's attention over all layers for a
Skeleton-of-Thought fan-out: ``group`` requests share a ``--prefix``-token prefix
(question + skeleton) and each has a short private suffix (its point prompt and the
tokens decoded so far, including the new one). Defaults are SmolLM2-135M's attention
shapes (Hq=9, Hk=3, D=64, 30 layers), a 1,024-token prefix, 16-64-token suffixes and
groups of 1, 2 and 8.

Sections (``--sections cpu,gpu``):

- ``cpu``: :func:`kernels.attention.decode_attention` over prefix + suffix per request
  (what the torch backend does today) against
  :func:`kernels.cascade.shared_prefix_decode_attention`.
- ``gpu`` (CUDA only, otherwise it prints "no CUDA"): the same two torch paths plus the
  Triton prefix kernel alone and Triton prefix + torch suffix + Triton merge, with
  the achieved bandwidth (bytes of K/V each path must read / time) as a fraction of
  ``--peak-gbps``. With the default sizes all layers' K/V fit in an H100's L2; use
  ``--prefix 32768`` for a DRAM-bound measurement.

Both paths run in the same process on the same data, interleaved (the order alternates
each repeat); the table quotes medians. Per-step metadata (padded indices, masks) is
built once outside the timed region, as a backend's ``plan`` does once per step.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from kernels.attention import decode_attention
from kernels.cascade import shared_prefix_decode_attention

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Fanout:
    """One decode step of ``group`` requests over a pool of ``layers`` layers."""

    k: torch.Tensor  # [layers, slots, Hk, D]
    v: torch.Tensor
    q: torch.Tensor  # [layers, group, Hq, D]
    prefix_slots: torch.Tensor  # [P]
    suffix_index: torch.Tensor  # [group, S] padded with slot 0
    suffix_lens: torch.Tensor | None  # [group], None when all equal
    plain_index: torch.Tensor  # [group, P + S]: prefix then suffix, padded
    plain_mask: torch.Tensor | None  # [group, 1, 1, P + S] additive
    lens: list[int]
    scale: float

    @property
    def layers(self) -> int:
        return self.k.shape[0]

    def kv_bytes(self, rows: int) -> int:
        """Bytes of K and V in ``rows`` pool rows over all layers."""
        return 2 * self.layers * rows * self.k.shape[2] * self.k.shape[3] * self.k.element_size()


def make_fanout(
    group: int,
    prefix: int,
    suffix: tuple[int, int],
    hq: int,
    hk: int,
    d: int,
    layers: int,
    dtype: torch.dtype,
    device: torch.device,
    seed: int = 0,
) -> Fanout:
    """Random K/V/q with the group's slots scattered through the pool (slot 0 = pad)."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(suffix[0], suffix[1] + 1, (group,), generator=g).tolist()
    s_max = max(lens)
    num_slots = 1 + prefix + sum(lens)
    perm = torch.randperm(num_slots - 1, generator=g) + 1
    prefix_slots = perm[:prefix]
    suffix_index = torch.zeros(group, s_max, dtype=torch.int64)
    taken = prefix
    for r, n in enumerate(lens):
        suffix_index[r, :n] = perm[taken : taken + n]
        taken += n
    plain_index = torch.cat([prefix_slots.expand(group, prefix), suffix_index], dim=1)
    ragged = min(lens) < s_max
    plain_mask = None
    if ragged:
        # additive, built once per step, as TorchAttentionBackend.plan does
        valid = torch.arange(prefix + s_max)[None, :] < (prefix + torch.tensor(lens))[:, None]
        plain_mask = torch.zeros(valid.shape, dtype=dtype).masked_fill(~valid, float("-inf"))
        plain_mask = plain_mask[:, None, None, :].to(device)
    k = torch.randn(layers, num_slots, hk, d, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(layers, num_slots, hk, d, generator=g).to(device=device, dtype=dtype)
    q = torch.randn(layers, group, hq, d, generator=g).to(device=device, dtype=dtype)
    return Fanout(
        k=k,
        v=v,
        q=q,
        prefix_slots=prefix_slots.to(device),
        suffix_index=suffix_index.to(device),
        suffix_lens=torch.tensor(lens, device=device) if ragged else None,
        plain_index=plain_index.to(device),
        plain_mask=plain_mask,
        lens=lens,
        scale=d**-0.5,
    )


def plain_step(f: Fanout) -> torch.Tensor:
    """Per-request decode attention over prefix + suffix, every layer."""
    out = None
    for layer in range(f.layers):
        out = decode_attention(
            f.q[layer], f.k[layer], f.v[layer], f.plain_index, f.plain_mask, f.scale
        )
    return out


def cascade_step(f: Fanout) -> torch.Tensor:
    """Shared prefix once for the group + private suffixes, merged, every layer."""
    out = None
    for layer in range(f.layers):
        out = shared_prefix_decode_attention(
            f.q[layer],
            f.k[layer],
            f.v[layer],
            f.prefix_slots,
            f.suffix_index,
            f.suffix_lens,
            f.scale,
        )
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int, device: torch.device
) -> dict[str, float]:
    """Median seconds per call of each function, run round-robin (order rotates)."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(repeats):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            _sync(device)
            t0 = time.perf_counter()
            fns[name]()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def _header(args: argparse.Namespace, device: str) -> str:
    return (
        f"{device}: Hq={args.hq} Hk={args.hk} D={args.head_dim}, {args.layers} layers, "
        f"{args.dtype}, prefix {args.prefix}, suffix {args.suffix[0]}-{args.suffix[1]}, "
        f"median of {args.repeats}"
    )


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def run_cpu(args: argparse.Namespace) -> list[dict]:
    device = torch.device("cpu")
    dtype = DTYPES[args.dtype]
    results, rows = [], []
    for group in args.groups:
        f = make_fanout(
            group, args.prefix, args.suffix, args.hq, args.hk, args.head_dim, args.layers,
            dtype, device, seed=args.seed + group,
        )  # fmt: skip
        with torch.inference_mode():
            diff = _max_diff(plain_step(f), cascade_step(f))
            t = time_interleaved(
                {"plain": lambda f=f: plain_step(f), "cascade": lambda f=f: cascade_step(f)},
                args.repeats,
                args.warmup,
                device,
            )
        plain_rows = group * f.plain_index.shape[1]
        cascade_rows = args.prefix + sum(f.lens)
        res = {
            "group": group,
            "plain_ms": t["plain"] * 1e3,
            "cascade_ms": t["cascade"] * 1e3,
            "ratio": t["plain"] / t["cascade"],
            "max_diff": diff,
            "plain_mb": f.kv_bytes(plain_rows) / 1e6,
            "cascade_mb": f.kv_bytes(cascade_rows) / 1e6,
        }
        results.append(res)
        rows.append(
            [
                str(group),
                f"{min(f.lens)}-{max(f.lens)}",
                f"{res['plain_mb']:.1f}",
                f"{res['cascade_mb']:.1f}",
                f"{res['plain_ms']:.2f}",
                f"{res['cascade_ms']:.2f}",
                f"{res['ratio']:.2f}x",
                f"{diff:.1e}",
            ]
        )
    print(_header(args, f"cpu ({torch.get_num_threads()} threads)"))
    print("one decode step's attention over all layers; ratio = plain / cascade time")
    headers = ["group", "suffix", "plain MB", "cascade MB", "plain ms", "cascade ms"]
    print(_table([*headers, "ratio", "max|diff|"], rows))
    return results


def run_gpu(args: argparse.Namespace) -> list[dict]:
    if not torch.cuda.is_available():
        print("gpu: no CUDA, skipped")
        return []
    from kernels.triton_cascade import (
        shared_prefix_attention_triton,
        shared_prefix_decode_attention_triton,
    )

    device = torch.device("cuda")
    dtype = DTYPES[args.dtype]
    peak = args.peak_gbps * 1e9
    results, rows = [], []
    for group in args.groups:
        f = make_fanout(
            group, args.prefix, args.suffix, args.hq, args.hk, args.head_dim, args.layers,
            dtype, device, seed=args.seed + group,
        )  # fmt: skip

        def triton_step(f: Fanout = f) -> torch.Tensor:
            out = None
            for layer in range(f.layers):
                out = shared_prefix_decode_attention_triton(
                    f.q[layer], f.k[layer], f.v[layer], f.prefix_slots,
                    f.suffix_index, f.suffix_lens, f.scale,
                )  # fmt: skip
            return out

        def triton_prefix(f: Fanout = f) -> torch.Tensor:
            out = None
            for layer in range(f.layers):
                out, _ = shared_prefix_attention_triton(
                    f.q[layer], f.k[layer], f.v[layer], f.prefix_slots, f.scale
                )
            return out

        with torch.inference_mode():
            ref = plain_step(f)
            diff = max(_max_diff(ref, cascade_step(f)), _max_diff(ref, triton_step(f)))
            t = time_interleaved(
                {
                    "plain": lambda f=f: plain_step(f),
                    "torch cascade": lambda f=f: cascade_step(f),
                    "triton cascade": triton_step,
                    "triton prefix only": triton_prefix,
                },
                args.repeats,
                args.warmup,
                device,
            )
        need = {
            "plain": f.kv_bytes(group * f.plain_index.shape[1]),
            "torch cascade": f.kv_bytes(args.prefix + sum(f.lens)),
            "triton cascade": f.kv_bytes(args.prefix + sum(f.lens)),
            "triton prefix only": f.kv_bytes(args.prefix),
        }
        for name, sec in t.items():
            gbps = need[name] / sec / 1e9
            results.append({"group": group, "path": name, "ms": sec * 1e3, "gbps": gbps})
            rows.append(
                [
                    str(group),
                    name,
                    f"{need[name] / 1e6:.1f}",
                    f"{sec * 1e3:.3f}",
                    f"{t['plain'] / sec:.2f}x",
                    f"{gbps:.0f}",
                    f"{need[name] / sec / peak:.1%}",
                    f"{diff:.1e}" if name == "plain" else "",
                ]
            )
    print(_header(args, f"gpu ({torch.cuda.get_device_name()})"))
    print(f"ratio = plain / path time; peak {args.peak_gbps:.0f} GB/s")
    headers = ["group", "path", "K/V MB", "ms", "ratio", "GB/s", "of peak", "max|diff|"]
    print(_table(headers, rows))
    return results


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(",")
    lo_i, hi_i = int(lo), int(hi or lo)
    if not 1 <= lo_i <= hi_i:
        raise argparse.ArgumentTypeError(f"bad suffix range {text!r}")
    return lo_i, hi_i


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m kernels.bench", description=__doc__.split("\n")[0])
    p.add_argument("--sections", default="cpu,gpu", help="comma list of cpu, gpu")
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
    args = p.parse_args(argv)
    if args.hq % args.hk:
        p.error("--hq must be a multiple of --hk")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, list[dict]]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    runners = {"cpu": run_cpu, "gpu": run_gpu}
    unknown = set(sections) - set(runners)
    if unknown:
        raise SystemExit(f"unknown sections {sorted(unknown)}; available: cpu, gpu")
    results = {}
    for i, name in enumerate(sections):
        if i:
            print()
        results[name] = runners[name](args)
    return results


if __name__ == "__main__":
    main()
