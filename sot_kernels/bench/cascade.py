"""Sections ``cpu`` and ``gpu``: one decode step's attention for a shared-prefix fan-out.

``group`` requests share a ``--prefix``-token prefix and each has a short private
suffix; :func:`plain_step` attends each request over prefix + suffix, :func:`cascade_step`
reads the prefix once for the group (see :mod:`sot_kernels.cascade`). ``gpu`` adds the
Triton cascade kernels of :mod:`sot_kernels.triton_cascade`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from sot_kernels.attention import decode_attention
from sot_kernels.bench.timing import DTYPES, _max_diff, _table, time_interleaved
from sot_kernels.cascade import shared_prefix_decode_attention


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


def _header(args: argparse.Namespace, device: str) -> str:
    return (
        f"{device}: Hq={args.hq} Hk={args.hk} D={args.head_dim}, {args.layers} layers, "
        f"{args.dtype}, prefix {args.prefix}, suffix {args.suffix[0]}-{args.suffix[1]}, "
        f"median of {args.repeats}"
    )


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
    from sot_kernels.triton_cascade import (
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
