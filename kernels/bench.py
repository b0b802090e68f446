"""Attention kernel benchmarks: shared-prefix (cascade) decode, Triton decode and extend.

``python -m kernels.bench`` runs four sections (``--sections cpu,gpu,decode,extend``).
Head shapes default to SmolLM2-135M's (Hq=9, Hk=3, D=64) and every call covers
``--layers`` layers (30), each with its own K/V, as one model step would.

The first two time one decode step's attention over all layers for a
Skeleton-of-Thought fan-out: ``group`` requests share a ``--prefix``-token prefix
(question + skeleton) and each has a short private suffix (its point prompt and the
tokens decoded so far, including the new one); defaults are a 1,024-token prefix,
16-64-token suffixes and groups of 1, 2 and 8.

- ``cpu``: :func:`kernels.attention.decode_attention` over prefix + suffix per request
  (what the torch backend does today) against
  :func:`kernels.cascade.shared_prefix_decode_attention`.
- ``gpu`` (CUDA only, otherwise it prints "no CUDA"): the same two torch paths plus the
  Triton prefix kernel alone and Triton prefix + torch suffix + Triton merge, with
  the achieved bandwidth (bytes of K/V each path must read / time) as a fraction of
  ``--peak-gbps``. With the default sizes all layers' K/V fit in an H100's L2; use
  ``--prefix 32768`` for a DRAM-bound measurement.

The other two time the Triton kernels of :mod:`kernels.triton_attention` on
``--device`` (default cuda when there is one):

- ``decode``: :func:`~kernels.triton_attention.decode_attention_triton` for
  ``--decode-batches`` requests of ``--decode-lens`` keys each, against the torch
  reference :func:`kernels.attention.decode_attention` (timed in the same run), see
  :func:`run_decode`. Reports the bytes a call must move, the achieved GB/s and its
  fraction of ``--peak-gbps``.
- ``extend``: :func:`~kernels.triton_attention.extend_attention_triton` for prefill
  chunks of ``--extend-chunks`` new tokens after ``--extend-prefixes`` cached ones,
  ``--extend-batches`` requests per call, against
  ``torch.nn.functional.scaled_dot_product_attention`` on contiguous q/k/v, see
  :func:`run_extend`. Reports TFLOP/s of both.

Both check correctness (max|diff| of the last layer's output against the torch
reference computed in float32). On the CPU they need Triton's interpreter
(``TRITON_INTERPRET=1``, set before anything imports triton) and are then only
usable for tiny shapes (the interpreter runs every program in Python); without it
they print a one-line skip. In float32 the Triton kernels use exact fp32 dots (no
TF32, no tensor cores), so use ``--dtype bfloat16`` for a throughput comparison.

All paths run in the same process on the same data, interleaved (the order alternates
each repeat); the tables quote medians. Per-step metadata (padded indices, masks,
``req_to_token``) is built once outside the timed region, as a backend's ``plan``
does once per step.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels.attention import decode_attention, extend_attention
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


# ---------------------------------------------------------------------------------------
# Triton decode and extend (sections ``decode`` and ``extend``)
# ---------------------------------------------------------------------------------------


def decode_bytes(
    batch: int,
    kv_len: int,
    hq: int,
    hk: int,
    d: int,
    elem: int,
    table_elem: int = 8,
    layers: int = 1,
) -> int:
    """Bytes one decode call must move: per layer, K and V of all ``batch * kv_len``
    keys, the ``req_to_token`` entries naming their slots (``table_elem`` bytes each),
    q read and out written (``elem`` bytes per value).

    Split-K partial results and ``rows``/``kv_lens`` are not counted: they are
    intermediate or per-request scalars (under 1% of the K/V bytes for the default
    shapes).
    """
    keys = batch * kv_len
    per_layer = 2 * keys * hk * d * elem + keys * table_elem + 2 * batch * hq * d * elem
    return layers * per_layer


def extend_flops(batch: int, chunk: int, prefix: int, hq: int, d: int, layers: int = 1) -> int:
    """Useful FLOPs of extend attention: new token ``j`` of a ``chunk`` sees the
    ``prefix`` cached keys and ``j + 1`` new ones; each (query, key) pair costs
    ``2 * d`` for q.k and ``2 * d`` for p.v, per query head."""
    pairs = chunk * prefix + chunk * (chunk + 1) // 2
    return layers * batch * 4 * hq * d * pairs


def _scattered_pool(
    tokens: int, hk: int, d: int, layers: int, dtype: torch.dtype, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """K/V pools ``[layers, 1 + tokens, Hk, D]`` and the ``tokens`` slots to use, a
    random permutation of 1..tokens (slot 0 is the pool's padding slot), so no request
    reads contiguous rows, as in a pool that has served for a while."""
    device = g.device
    shape = (layers, 1 + tokens, hk, d)
    k = torch.randn(shape, generator=g, device=device, dtype=dtype)
    v = torch.randn(shape, generator=g, device=device, dtype=dtype)
    slots = torch.randperm(tokens, generator=g, device=device) + 1
    return k, v, slots


@dataclass
class DecodeBatch:
    """One decode step: ``batch`` requests of ``kv_len`` keys each over ``layers`` layers."""

    k: torch.Tensor  # [layers, slots, Hk, D]
    v: torch.Tensor
    q: torch.Tensor  # [layers, B, Hq, D]
    req_to_token: torch.Tensor  # [B, kv_len] int64, like engine.kv_cache's table
    rows: torch.Tensor  # [B]
    kv_lens: torch.Tensor  # [B]
    kv_len: int
    scale: float

    @property
    def layers(self) -> int:
        return self.k.shape[0]


def make_decode_batch(
    batch: int,
    kv_len: int,
    hq: int,
    hk: int,
    d: int,
    layers: int,
    dtype: torch.dtype,
    device: torch.device,
    seed: int = 0,
) -> DecodeBatch:
    """Random q/K/V, every request's slots scattered through the pool."""
    g = torch.Generator(device=device).manual_seed(seed)
    k, v, slots = _scattered_pool(batch * kv_len, hk, d, layers, dtype, g)
    q = torch.randn((layers, batch, hq, d), generator=g, device=device, dtype=dtype)
    return DecodeBatch(
        k=k,
        v=v,
        q=q,
        req_to_token=slots.view(batch, kv_len),
        rows=torch.arange(batch, device=device),
        kv_lens=torch.full((batch,), kv_len, device=device, dtype=torch.int64),
        kv_len=kv_len,
        scale=d**-0.5,
    )


def triton_decode_step(b: DecodeBatch) -> torch.Tensor:
    """:func:`decode_attention_triton` on every layer; returns the last layer's output."""
    from kernels.triton_attention import decode_attention_triton

    out = None
    for layer in range(b.layers):
        out = decode_attention_triton(
            b.q[layer], b.k[layer], b.v[layer], b.req_to_token, b.rows, b.kv_lens, b.scale,
            max_kv_len=b.kv_len,
        )  # fmt: skip
    return out


def torch_decode_step(b: DecodeBatch) -> torch.Tensor:
    """The torch reference on every layer (equal lengths: ``req_to_token`` is the
    ``kv_index`` and no mask is needed); returns the last layer's output."""
    out = None
    for layer in range(b.layers):
        out = decode_attention(b.q[layer], b.k[layer], b.v[layer], b.req_to_token, None, b.scale)
    return out


def _decode_reference(b: DecodeBatch) -> torch.Tensor:
    """The last layer in float32 through the torch reference."""
    q, k, v = b.q[-1].float(), b.k[-1].float(), b.v[-1].float()
    return decode_attention(q, k, v, b.req_to_token, None, b.scale)


@dataclass
class ExtendBatch:
    """Prefill chunks: ``batch`` requests, each ``chunk`` new tokens after ``prefix``
    cached ones, over ``layers`` layers; in the pool for Triton and contiguous for SDPA."""

    k: torch.Tensor  # [layers, slots, Hk, D]
    v: torch.Tensor
    q: torch.Tensor  # [layers, B * chunk, Hq, D], requests back to back
    req_to_token: torch.Tensor  # [B, prefix + chunk]
    rows: torch.Tensor  # [B]
    q_starts: torch.Tensor  # [B + 1]
    kv_lens: torch.Tensor  # [B]
    q_sdpa: torch.Tensor  # [layers, B, Hq, chunk, D] contiguous
    k_sdpa: torch.Tensor  # [layers, B, Hq, prefix + chunk, D]: K/V heads repeated
    v_sdpa: torch.Tensor
    chunk: int
    prefix: int
    scale: float

    @property
    def layers(self) -> int:
        return self.k.shape[0]


def make_extend_batch(
    batch: int,
    chunk: int,
    prefix: int,
    hq: int,
    hk: int,
    d: int,
    layers: int,
    dtype: torch.dtype,
    device: torch.device,
    seed: int = 0,
) -> ExtendBatch:
    """Random q/K/V (slots scattered through the pool) plus SDPA's contiguous copies."""
    g = torch.Generator(device=device).manual_seed(seed)
    kv_len = prefix + chunk
    k, v, slots = _scattered_pool(batch * kv_len, hk, d, layers, dtype, g)
    q = torch.randn((layers, batch * chunk, hq, d), generator=g, device=device, dtype=dtype)
    table = slots.view(batch, kv_len)

    def heads_first(x: torch.Tensor) -> torch.Tensor:
        # [layers, B, L, Hk, D] -> [layers, B, Hq, L, D]: query head h uses KV head
        # h // group, so each KV head is repeated group times in place
        x = x.repeat_interleave(hq // hk, dim=3)
        return x.permute(0, 1, 3, 2, 4).contiguous()

    return ExtendBatch(
        k=k,
        v=v,
        q=q,
        req_to_token=table,
        rows=torch.arange(batch, device=device),
        q_starts=torch.arange(batch + 1, device=device) * chunk,
        kv_lens=torch.full((batch,), kv_len, device=device, dtype=torch.int64),
        q_sdpa=q.view(layers, batch, chunk, hq, d).permute(0, 1, 3, 2, 4).contiguous(),
        k_sdpa=heads_first(k[:, table]),
        v_sdpa=heads_first(v[:, table]),
        chunk=chunk,
        prefix=prefix,
        scale=d**-0.5,
    )


def triton_extend_step(b: ExtendBatch) -> torch.Tensor:
    """:func:`extend_attention_triton` on every layer; returns the last layer's
    output ``[B * chunk, Hq, D]``."""
    from kernels.triton_attention import extend_attention_triton

    out = None
    for layer in range(b.layers):
        out = extend_attention_triton(
            b.q[layer], b.k[layer], b.v[layer], b.req_to_token, b.rows, b.q_starts,
            b.kv_lens, b.scale, max_q_len=b.chunk,
        )  # fmt: skip
    return out


def sdpa_extend_step(b: ExtendBatch) -> torch.Tensor:
    """SDPA on every layer: ``is_causal`` for a fresh prompt; after a cached prefix,
    ``causal_lower_right`` (query ``j`` sees keys ``<= prefix + j``; SDPA's own
    ``is_causal`` aligns the diagonal top-left, which is wrong when q is shorter than
    k). Returns the last layer's output ``[B, Hq, chunk, D]``."""
    from torch.nn.attention.bias import causal_lower_right

    mask = causal_lower_right(b.chunk, b.prefix + b.chunk) if b.prefix else None
    out = None
    for layer in range(b.layers):
        out = F.scaled_dot_product_attention(
            b.q_sdpa[layer], b.k_sdpa[layer], b.v_sdpa[layer],
            attn_mask=mask, is_causal=mask is None, scale=b.scale,
        )  # fmt: skip
    return out


def _extend_reference(b: ExtendBatch) -> torch.Tensor:
    """The last layer in float32 through :func:`kernels.attention.extend_attention`,
    request by request over its pool slots: ``[B * chunk, Hq, D]``."""
    k, v = b.k[-1].float(), b.v[-1].float()
    q = b.q[-1].float().view(b.rows.shape[0], b.chunk, *b.q.shape[2:])
    return torch.cat(
        [extend_attention(q[i], k, v, b.req_to_token[i], b.scale) for i in range(q.shape[0])]
    )


def _triton_device(args: argparse.Namespace, section: str) -> torch.device | None:
    """``--device`` if the Triton kernels can run there, else None after a skip line."""
    device = torch.device(args.device)
    if device.type == "cuda":
        if torch.cuda.is_available():
            return device
        print(f"{section}: no CUDA, skipped")
        return None
    if device.type != "cpu":
        print(f"{section}: Triton kernels need cuda or cpu, not {device.type}; skipped")
        return None
    try:
        import triton
    except ImportError:
        print(f"{section}: triton is not installed, skipped")
        return None
    if not triton.knobs.runtime.interpret:
        print(
            f"{section}: compiled Triton needs CUDA; on the CPU set TRITON_INTERPRET=1 "
            "(tiny shapes only), skipped"
        )
        return None
    return device


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu, Triton interpreter"


def _kernel_header(args: argparse.Namespace, section: str, device: torch.device) -> str:
    return (
        f"{section} ({_device_name(device)}): Hq={args.hq} Hk={args.hk} D={args.head_dim}, "
        f"{args.layers} layers per call, {args.dtype}, median of {args.repeats}"
    )


def run_decode(args: argparse.Namespace) -> list[dict]:
    """Triton decode attention against the torch reference, per (batch, kv length).

    Each call runs :func:`decode_attention_triton` on ``--layers`` layers, each with its
    own K/V pool, over ``batch`` requests of ``kv_len`` keys whose slots are a random
    permutation of the pool. One layer's K/V may fit in the L2 (50 MB on an H100),
    where it would be read from cache on the next repeat rather than from DRAM, so a
    bandwidth figure needs the K/V bytes of a whole call to exceed L2 by a good margin:
    rows whose bytes do not exceed ``--l2-mb`` are marked ``L2``. Small rows are also
    launch-bound (two launches per layer, no CUDA graph), so their GB/s measures
    overhead, not memory. The largest default row (32 requests x 8,192 keys, 30
    layers) allocates about 24 GB of K/V in float32.

    Reported per row: the bytes a call must move (:func:`decode_bytes`), milliseconds of
    Triton and of :func:`kernels.attention.decode_attention` (the torch reference,
    which gathers K/V rows first), their ratio (torch / Triton), Triton's GB/s and its
    fraction of ``--peak-gbps``, and max|diff| of Triton's last layer against the torch
    reference in float32.
    """
    device = _triton_device(args, "decode")
    if device is None:
        return []
    dtype = DTYPES[args.dtype]
    elem = torch.empty((), dtype=dtype).element_size()
    results, rows = [], []
    configs = [(b, n) for b in args.decode_batches for n in args.decode_lens]
    for i, (batch, kv_len) in enumerate(configs):
        b = make_decode_batch(
            batch, kv_len, args.hq, args.hk, args.head_dim, args.layers, dtype, device,
            seed=args.seed + i,
        )  # fmt: skip
        with torch.inference_mode():
            diff = _max_diff(triton_decode_step(b), _decode_reference(b))
            t = time_interleaved(
                {
                    "triton": lambda b=b: triton_decode_step(b),
                    "torch": lambda b=b: torch_decode_step(b),
                },
                args.repeats,
                args.warmup,
                device,
            )
        need = decode_bytes(
            batch, kv_len, args.hq, args.hk, args.head_dim, elem,
            b.req_to_token.element_size(), args.layers,
        )  # fmt: skip
        kv = 2 * args.layers * batch * kv_len * args.hk * args.head_dim * elem
        gbps = need / t["triton"] / 1e9
        res = {
            "batch": batch,
            "kv_len": kv_len,
            "bytes": need,
            "triton_ms": t["triton"] * 1e3,
            "torch_ms": t["torch"] * 1e3,
            "ratio": t["torch"] / t["triton"],
            "gbps": gbps,
            "of_peak": gbps / args.peak_gbps,
            "fits_l2": kv <= args.l2_mb * 1e6,
            "max_diff": diff,
        }
        results.append(res)
        rows.append(
            [
                str(batch),
                str(kv_len),
                f"{need / 1e6:.1f}",
                "L2" if res["fits_l2"] else "",
                f"{res['triton_ms']:.3f}",
                f"{res['torch_ms']:.3f}",
                f"{res['ratio']:.2f}x",
                f"{gbps:.0f}",
                f"{res['of_peak']:.1%}",
                f"{diff:.1e}",
            ]
        )
        del b
    print(_kernel_header(args, "decode", device))
    print(
        "MB = K/V + req_to_token + q + out per call; L2 = K/V fit in "
        f"--l2-mb {args.l2_mb:.0f}; ratio = torch / triton; peak {args.peak_gbps:.0f} GB/s"
    )
    headers = ["batch", "kv len", "MB", "L2", "triton ms", "torch ms", "ratio", "GB/s"]
    print(_table([*headers, "of peak", "max|diff|"], rows))
    return results


def run_extend(args: argparse.Namespace) -> list[dict]:
    """Triton extend attention against SDPA, per (batch, chunk, prefix).

    Each call runs ``--layers`` layers. Triton reads K/V through ``req_to_token`` from a
    pool with scattered slots; SDPA gets contiguous ``[B, Hq, L, D]`` q/k/v built once
    outside the timed region, with the K/V heads repeated to Hq (``repeat_interleave``)
    rather than ``enable_gqa=True``: not every SDPA backend accepts ``enable_gqa``
    (unsupported ones fall back to the slow math kernel) and the lower-right causal
    path below never passes it on. A fresh prompt (prefix 0) uses ``is_causal=True``;
    a chunk after a cached prefix uses ``torch.nn.attention.bias.causal_lower_right``,
    which SDPA serves with its flash or memory-efficient kernel without materializing
    a mask. SDPA does not count the repeat nor the gather into contiguous tensors.

    Reported per row: useful GFLOPs per call (:func:`extend_flops`), milliseconds of
    both, their ratio (SDPA / Triton), TFLOP/s of both, and max|diff| of each against
    :func:`kernels.attention.extend_attention` in float32 (last layer).
    """
    device = _triton_device(args, "extend")
    if device is None:
        return []
    dtype = DTYPES[args.dtype]
    results, rows = [], []
    configs = [
        (b, c, p)
        for b in args.extend_batches
        for c in args.extend_chunks
        for p in args.extend_prefixes
    ]
    for i, (batch, chunk, prefix) in enumerate(configs):
        b = make_extend_batch(
            batch, chunk, prefix, args.hq, args.hk, args.head_dim, args.layers, dtype, device,
            seed=args.seed + i,
        )  # fmt: skip
        with torch.inference_mode():
            ref = _extend_reference(b)
            diff = _max_diff(triton_extend_step(b), ref)
            sdpa_out = sdpa_extend_step(b).transpose(1, 2).reshape(ref.shape)
            sdpa_diff = _max_diff(sdpa_out, ref)
            t = time_interleaved(
                {
                    "triton": lambda b=b: triton_extend_step(b),
                    "sdpa": lambda b=b: sdpa_extend_step(b),
                },
                args.repeats,
                args.warmup,
                device,
            )
        flops = extend_flops(batch, chunk, prefix, args.hq, args.head_dim, args.layers)
        res = {
            "batch": batch,
            "chunk": chunk,
            "prefix": prefix,
            "flops": flops,
            "triton_ms": t["triton"] * 1e3,
            "sdpa_ms": t["sdpa"] * 1e3,
            "ratio": t["sdpa"] / t["triton"],
            "triton_tflops": flops / t["triton"] / 1e12,
            "sdpa_tflops": flops / t["sdpa"] / 1e12,
            "max_diff": diff,
            "sdpa_max_diff": sdpa_diff,
        }
        results.append(res)
        rows.append(
            [
                str(batch),
                str(chunk),
                str(prefix),
                f"{flops / 1e9:.2f}",
                f"{res['triton_ms']:.3f}",
                f"{res['sdpa_ms']:.3f}",
                f"{res['ratio']:.2f}x",
                f"{res['triton_tflops']:.2f}",
                f"{res['sdpa_tflops']:.2f}",
                f"{diff:.1e}",
                f"{sdpa_diff:.1e}",
            ]
        )
        del b
    print(_kernel_header(args, "extend", device))
    print("batch requests of chunk new tokens after prefix cached ones; ratio = sdpa / triton")
    headers = ["batch", "chunk", "prefix", "GFLOP", "triton ms", "sdpa ms", "ratio"]
    headers += ["triton TFLOP/s", "sdpa TFLOP/s", "triton diff", "sdpa diff"]
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


SECTIONS = ("cpu", "gpu", "decode", "extend")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m kernels.bench", description=__doc__.split("\n")[0])
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


if __name__ == "__main__":
    main()
