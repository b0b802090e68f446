"""Section ``decode``: :func:`~sot_kernels.triton_attention.decode_attention_triton` against
the torch reference :func:`sot_kernels.attention.decode_attention`, with the bytes a call
must move (:func:`decode_bytes`) and the achieved bandwidth."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from sot_kernels.attention import decode_attention
from sot_kernels.bench.timing import DTYPES, _max_diff, _table, time_interleaved
from sot_kernels.bench.triton_common import _kernel_header, _scattered_pool, _triton_device


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
    from sot_kernels.triton_attention import decode_attention_triton

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
    Triton and of :func:`sot_kernels.attention.decode_attention` (the torch reference,
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
