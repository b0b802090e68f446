"""Attention kernel benchmarks: shared-prefix (cascade) decode, Triton decode and extend.

``python -m sot_kernels.bench`` runs four sections (``--sections cpu,gpu,decode,extend``).
Head shapes default to SmolLM2-135M's (Hq=9, Hk=3, D=64) and every call covers
``--layers`` layers (30), each with its own K/V, as one model step would.

The first two time one decode step's attention over all layers for a
Skeleton-of-Thought fan-out: ``group`` requests share a ``--prefix``-token prefix
(question + skeleton) and each has a short private suffix (its point prompt and the
tokens decoded so far, including the new one); defaults are a 1,024-token prefix,
16-64-token suffixes and groups of 1, 2 and 8.

- ``cpu``: :func:`sot_kernels.attention.decode_attention` over prefix + suffix per request
  (what the torch backend does today) against
  :func:`sot_kernels.cascade.shared_prefix_decode_attention`.
- ``gpu`` (CUDA only, otherwise it prints "no CUDA"): the same two torch paths plus the
  Triton prefix kernel alone and Triton prefix + torch suffix + Triton merge, with
  the achieved bandwidth (bytes of K/V each path must read / time) as a fraction of
  ``--peak-gbps``. With the default sizes all layers' K/V fit in an H100's L2; use
  ``--prefix 32768`` for a DRAM-bound measurement.

The other two time the Triton kernels of :mod:`sot_kernels.triton_attention` on
``--device`` (default cuda when there is one):

- ``decode``: :func:`~sot_kernels.triton_attention.decode_attention_triton` for
  ``--decode-batches`` requests of ``--decode-lens`` keys each, against the torch
  reference :func:`sot_kernels.attention.decode_attention` (timed in the same run), see
  :func:`sot_kernels.bench.decode.run_decode`. Reports the bytes a call must move, the
  achieved GB/s and its fraction of ``--peak-gbps``.
- ``extend``: :func:`~sot_kernels.triton_attention.extend_attention_triton` for prefill
  chunks of ``--extend-chunks`` new tokens after ``--extend-prefixes`` cached ones,
  ``--extend-batches`` requests per call, against
  ``torch.nn.functional.scaled_dot_product_attention`` on contiguous q/k/v, see
  :func:`sot_kernels.bench.extend.run_extend`. Reports TFLOP/s of both.

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

One module per job: :mod:`~sot_kernels.bench.cli` (options, section dispatch),
:mod:`~sot_kernels.bench.timing` (interleaved timing, max|diff|, tables),
:mod:`~sot_kernels.bench.cascade` (``cpu``, ``gpu``), :mod:`~sot_kernels.bench.decode`,
:mod:`~sot_kernels.bench.extend`, and :mod:`~sot_kernels.bench.triton_common` (the pool,
device check and header the two Triton sections share).
"""

from sot_kernels.bench.cascade import (
    Fanout,
    cascade_step,
    make_fanout,
    plain_step,
    run_cpu,
    run_gpu,
)
from sot_kernels.bench.cli import SECTIONS, main, parse_args
from sot_kernels.bench.decode import (
    DecodeBatch,
    decode_bytes,
    make_decode_batch,
    run_decode,
    torch_decode_step,
    triton_decode_step,
)
from sot_kernels.bench.extend import (
    ExtendBatch,
    extend_flops,
    make_extend_batch,
    run_extend,
    sdpa_extend_step,
    triton_extend_step,
)
from sot_kernels.bench.timing import DTYPES, time_interleaved

__all__ = [
    "DTYPES",
    "SECTIONS",
    "DecodeBatch",
    "ExtendBatch",
    "Fanout",
    "cascade_step",
    "decode_bytes",
    "extend_flops",
    "main",
    "make_decode_batch",
    "make_extend_batch",
    "make_fanout",
    "parse_args",
    "plain_step",
    "run_cpu",
    "run_decode",
    "run_extend",
    "run_gpu",
    "sdpa_extend_step",
    "time_interleaved",
    "torch_decode_step",
    "triton_decode_step",
    "triton_extend_step",
]
