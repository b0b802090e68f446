"""Section ``extend``: :func:`~sot_kernels.triton_attention.extend_attention_triton` against
``torch.nn.functional.scaled_dot_product_attention`` on contiguous q/k/v, in useful
TFLOP/s (:func:`extend_flops`)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sot_kernels.attention import extend_attention
from sot_kernels.bench.timing import DTYPES, _max_diff, _table, time_interleaved
from sot_kernels.bench.triton_common import _kernel_header, _scattered_pool, _triton_device


def extend_flops(batch: int, chunk: int, prefix: int, hq: int, d: int, layers: int = 1) -> int:
    """Useful FLOPs of extend attention: new token ``j`` of a ``chunk`` sees the
    ``prefix`` cached keys and ``j + 1`` new ones; each (query, key) pair costs
    ``2 * d`` for q.k and ``2 * d`` for p.v, per query head."""
    pairs = chunk * prefix + chunk * (chunk + 1) // 2
    return layers * batch * 4 * hq * d * pairs


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
    from sot_kernels.triton_attention import extend_attention_triton

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
    """The last layer in float32 through :func:`sot_kernels.attention.extend_attention`,
    request by request over its pool slots: ``[B * chunk, Hq, D]``."""
    k, v = b.k[-1].float(), b.v[-1].float()
    q = b.q[-1].float().view(b.rows.shape[0], b.chunk, *b.q.shape[2:])
    return torch.cat(
        [extend_attention(q[i], k, v, b.req_to_token[i], b.scale) for i in range(q.shape[0])]
    )


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
    :func:`sot_kernels.attention.extend_attention` in float32 (last layer).
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
