"""CUDA graphs for decode steps: capture the forward once per batch-size bucket, replay
it every step.

A small model's decode step is a few hundred kernel launches of a few microseconds
each; launching them from Python costs more than running them. A CUDA graph records
the launches once and replays them with one call. A graph replays exactly what it
recorded: the same kernels, grids and buffer addresses. So

* every input lives in a **static buffer** that each step overwrites in place
  (token ids, positions, ``req_to_token`` rows, key counts);
* a step of ``n`` decodes runs the graph of the smallest **bucket** ``>= n``; the
  extra rows are padding (key count 0, K/V written to the pool's pad slot), so they
  read nothing and touch no request's data;
* the attention plan may depend on shapes only, never on values: the backend's
  :meth:`~engine.attention.AttentionBackend.plan_graph_decode` fixes the split-K grid
  from the bucket size and the context length instead of the longest request.

Prefill and mixed steps, batches past the largest bucket, and decode steps with
fan-out groups (whose shared-prefix plan depends on the step) run eagerly.
The graphs share one memory pool, captured largest first (nano-vllm's and
SGLang's recipe). Only the forward and the logits are captured; sampling runs
eagerly on the captured logits (it has per-request generators and host-side choices).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from engine.attention import AttentionBackend
from engine.context import ForwardContext, set_context
from engine.kv_cache import PAD_SLOT, KVPool, ReqToTokenTable
from engine.models import LlamaForCausalLM


def batch_buckets(max_batch: int) -> list[int]:
    """Batch sizes to capture: 1, 2, 4, 8, then every multiple of 8 up to ``max_batch``
    (which is always included). Padding wastes at most 7 rows past 8."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    sizes = {b for b in (1, 2, 4, 8) if b <= max_batch}
    sizes.update(range(16, max_batch + 1, 8))
    sizes.add(max_batch)
    return sorted(sizes)


class StepGraph(Protocol):
    """A recorded step: ``capture(fn)`` records what ``fn`` launches, ``replay()`` reruns it."""

    def capture(self, fn: Callable[[], None]) -> None: ...

    def replay(self) -> None: ...


class CudaStepGraph:
    """A ``torch.cuda.CUDAGraph`` allocating from a memory pool shared with the other
    buckets' graphs: they never replay at once, and captured largest first, each
    smaller one fits in the memory the largest already holds."""

    def __init__(self, pool: tuple[int, int]) -> None:
        self.graph = torch.cuda.CUDAGraph()
        self.pool = pool

    def capture(self, fn: Callable[[], None]) -> None:
        fn()  # warm-up outside the graph: compiles Triton kernels, sets up cuBLAS
        torch.cuda.synchronize()
        with torch.cuda.graph(self.graph, pool=self.pool):
            fn()

    def replay(self) -> None:
        self.graph.replay()


def cuda_graph_factory() -> Callable[[], StepGraph]:
    """Makes :class:`CudaStepGraph` objects that share one new memory pool."""
    pool = torch.cuda.graph_pool_handle()
    return lambda: CudaStepGraph(pool)


class DecodeGraphRunner:
    """Captured decode steps for batch sizes up to ``max_batch``.

    ``run(ids, positions, rows, kv_lens)`` fills the static buffers for the smallest
    bucket that holds the batch, replays that bucket's graph, and returns the logits
    of the real rows (float32, ``[n, vocab]``; a view of a static buffer, valid until
    the next replay).
    """

    def __init__(
        self,
        model: LlamaForCausalLM,
        backend: AttentionBackend,
        kv_pool: KVPool,
        table: ReqToTokenTable,
        rope_cos: torch.Tensor,
        rope_sin: torch.Tensor,
        max_batch: int,
        make_graph: Callable[[], StepGraph] | None = None,
    ) -> None:
        self.model, self.backend, self.kv_pool, self.table = model, backend, kv_pool, table
        self.rope_cos, self.rope_sin = rope_cos, rope_sin
        self.buckets = batch_buckets(max_batch)
        self.max_batch = self.buckets[-1]
        dev = table.table.device
        # rows of one int64 buffer: token ids, positions, req_to_token rows, key counts,
        # so one host->device copy per step fills all four
        self.inputs = torch.zeros((4, self.max_batch), dtype=torch.int64, device=dev)
        self._host = torch.zeros(
            (4, self.max_batch), dtype=torch.int64, pin_memory=dev.type == "cuda"
        )
        self.logits = torch.zeros(
            (self.max_batch, model.args.vocab_size), dtype=torch.float32, device=dev
        )
        make_graph = make_graph or cuda_graph_factory()
        self.graphs: dict[int, StepGraph] = {}
        self.replays = dict.fromkeys(self.buckets, 0)  # per bucket, for stats and tests
        with torch.inference_mode():
            for bs in reversed(self.buckets):  # largest first: the rest reuse its memory
                graph = make_graph()
                graph.capture(lambda bs=bs: self._forward(bs))
                self.graphs[bs] = graph

    def bucket(self, n: int) -> int | None:
        """The smallest captured batch size ``>= n``, or None when ``n`` is too large."""
        for bs in self.buckets:
            if bs >= n:
                return bs
        return None

    def _forward(self, bs: int) -> None:
        """What a graph records: the whole forward of ``bs`` decodes from the static inputs."""
        ids, pos, rows, kv_lens = self.inputs[:, :bs]
        table = self.table.table
        # padding rows (kv_len 0) write their K/V into the pad slot, never a real one
        out_slots = torch.where(kv_lens > 0, table[rows, pos], PAD_SLOT)
        dtype = self.kv_pool.k.dtype
        ctx = ForwardContext(
            positions=pos,
            out_slots=out_slots,
            # the host-side lists describe one step's values; a replayed graph must not
            # depend on them, so they stay empty and plan_graph_decode reads tensors only
            rows=[],
            q_lens=[],
            kv_lens=[],
            num_decodes=bs,
            req_to_token=table,
            kv_pool=self.kv_pool,
            cos=self.rope_cos[pos].to(dtype),
            sin=self.rope_sin[pos].to(dtype),
        )
        self.backend.plan_graph_decode(ctx, rows, kv_lens, max_kv_len=table.shape[1])
        set_context(ctx)
        try:
            hidden = self.model(ids)
            self.logits[:bs].copy_(self.model.compute_logits(hidden))
        finally:
            set_context(None)

    def run(
        self, ids: list[int], positions: list[int], rows: list[int], kv_lens: list[int]
    ) -> torch.Tensor:
        n = len(ids)
        bs = self.bucket(n)
        if bs is None:
            raise ValueError(f"batch of {n} decodes is past the largest graph ({self.max_batch})")
        # The whole buffer goes over every step (4 x max_batch int64s: a pinned,
        # contiguous, asynchronous copy). Padding columns must be rewritten anyway:
        # stale values from a larger earlier step would make a padding row write K/V
        # into a live request's slot. (Reusing the pinned buffer is safe: the previous
        # step's copy finished before sampling read that step's logits.)
        self._host.zero_()
        self._host[:, :n] = torch.tensor([ids, positions, rows, kv_lens], dtype=torch.int64)
        self.inputs.copy_(self._host, non_blocking=True)
        self.graphs[bs].replay()
        self.replays[bs] += 1
        return self.logits[:n]
