"""Decode steps through captured graphs (engine.cuda_graph).

On a GPU these tests capture real CUDA graphs. Without one, ``torch.cuda.CUDAGraph``
cannot be built, so they swap in :class:`RerunGraph`, which "replays" by calling the
captured function again on the same static buffers, with the Triton kernels
interpreted. That still checks everything around the capture: bucket choice, padding
rows, the static input buffers being refilled every step (stale values included), the
plan depending on shapes only, and that the engine gives the same greedy tokens
through the graph path as without it. The capture itself (no host syncs inside the
forward) is only exercised on a GPU.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from triton_env import DEVICE, require_triton

from engine import LLM, SamplingParams
from engine.context import ForwardContext
from engine.cuda_graph import batch_buckets
from engine.kv_cache import PAD_SLOT
from sot_kernels.triton_attention import fixed_grid_num_splits

require_triton()


class RerunGraph:
    """Stand-in for a CUDA graph on the CPU: replay reruns the captured function."""

    def __init__(self) -> None:
        self.fn: Callable[[], None] | None = None

    def capture(self, fn: Callable[[], None]) -> None:
        fn()
        self.fn = fn

    def replay(self) -> None:
        assert self.fn is not None
        self.fn()


# real CUDA graphs where there is CUDA, the stand-in elsewhere
MAKE_GRAPH = None if DEVICE.type == "cuda" else RerunGraph


@pytest.mark.parametrize(
    ("max_batch", "expected"),
    [
        (1, [1]),
        (3, [1, 2, 3]),
        (8, [1, 2, 4, 8]),
        (20, [1, 2, 4, 8, 16, 20]),
        (40, [1, 2, 4, 8, 16, 24, 32, 40]),
    ],
)
def test_batch_buckets(max_batch, expected):
    assert batch_buckets(max_batch) == expected


def test_batch_buckets_rejects_zero():
    with pytest.raises(ValueError, match="max_batch"):
        batch_buckets(0)


def test_fixed_grid_splits_fill_the_gpu_but_not_past_the_context():
    # H100: 132 SMs; SmolLM2: 3 KV heads
    assert fixed_grid_num_splits(1, 3, 8192, 132) == 16  # capped by the context
    assert fixed_grid_num_splits(32, 3, 8192, 132) == 3  # ceil(264 / 96)
    assert fixed_grid_num_splits(128, 3, 8192, 132) == 1
    assert fixed_grid_num_splits(1, 3, 100, 132) == 1  # one split covers 100 keys


def _llm(tiny_llama_dir, backend: str) -> LLM:
    return LLM(
        str(tiny_llama_dir), dtype="float32", device=DEVICE, kv_slots=512, max_running=8,
        attention_backend=backend, enforce_eager=True,
    )  # fmt: skip


@pytest.fixture(scope="module")
def graph_llm(tiny_llama_dir):
    llm = _llm(tiny_llama_dir, "triton")
    llm.engine.runner.capture_decode_graphs(4, make_graph=MAKE_GRAPH)
    return llm


def test_graph_steps_give_the_eager_tokens(tiny_llama_dir, graph_llm):
    # five requests of different lengths: the decode batch shrinks 5 -> 4 -> 3 -> 2 -> 1
    # as they finish, so steps run eagerly (5 > the largest bucket, and the prefill
    # steps), in a full bucket (4) and padded into a larger one (3 -> 4)
    prompts = [list(range(100 + 10 * i, 105 + 11 * i)) for i in range(5)]
    params = [
        SamplingParams(max_tokens=2 + 2 * i, temperature=0, ignore_eos=True) for i in range(5)
    ]
    eager = _llm(tiny_llama_dir, "torch").generate(prompts, params)
    runner = graph_llm.engine.runner
    before = runner.graph_steps
    got = graph_llm.generate(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in eager]
    graphs = runner.graphs
    assert runner.graph_steps - before >= 5
    assert sorted(bs for bs, n in graphs.replays.items() if n) == [1, 2, 4]
    assert graph_llm.stats().graph_steps == runner.graph_steps


def test_penalties_on_graph_steps_give_the_eager_tokens(tiny_llama_dir, graph_llm):
    """The sampler runs after the replay, on the graph's logits buffer (in place):
    penalties and min_tokens there must give the eager tokens, step after step, and
    leave the plain request of the batch alone."""
    prompts = [list(range(200 + 7 * i, 209 + 9 * i)) for i in range(4)]
    kw = dict(max_tokens=10, temperature=0, ignore_eos=True)
    plain = [o.token_ids for o in graph_llm.generate(prompts, SamplingParams(**kw))]
    params = [
        SamplingParams(**kw, repetition_penalty=1.5, presence_penalty=1.0),
        SamplingParams(**kw),
        # its first greedy token is a stop id it may not emit before 6 tokens
        SamplingParams(**kw, frequency_penalty=2.0, min_tokens=6, stop_token_ids=[plain[2][0]]),
        SamplingParams(**{**kw, "temperature": 0.8}, seed=9, repetition_penalty=0.8),
    ]
    eager = _llm(tiny_llama_dir, "torch").generate(prompts, params)
    before = graph_llm.engine.runner.graph_steps
    got = [o.token_ids for o in graph_llm.generate(prompts, params)]
    assert got == [o.token_ids for o in eager]
    assert graph_llm.engine.runner.graph_steps - before >= 5
    assert got[1] == plain[1]
    assert got[2] != plain[2] and plain[2][0] not in got[2][:6]


def test_padding_rows_write_no_live_slot(graph_llm):
    # Token 0 of req_to_token rows 0-4 lives in slots 4-8. A step of four decodes (rows
    # 1-4) fills all four columns of bucket 4; the next step of three (rows 1-3) pads
    # column 3. A padding row must write its K/V to the pad slot: not to slot 8 (stale
    # values of column 3, row 4) nor to slot 4 (row 0, the padding row's own table row).
    eng = graph_llm.engine
    eng.reset_prefix_cache()  # the slots used here belong to no one
    graphs, table, pool = eng.runner.graphs, eng.table.table, eng.kv_pool
    saved = table[:5, 0].clone()
    table[:5, 0] = torch.tensor([4, 5, 6, 7, 8], device=table.device)
    try:
        with torch.inference_mode():
            graphs.run([5, 6, 7, 8], [0, 0, 0, 0], [1, 2, 3, 4], [1, 1, 1, 1])
            assert float(pool.k[:, 8].abs().sum()) > 0  # the real row 4 wrote slot 8
            pool.k[:, [4, 8]] = 0
            pool.v[:, [4, 8]] = 0
            logits = graphs.run([5, 6, 7], [0, 0, 0], [1, 2, 3], [1, 1, 1])
    finally:
        table[:5, 0] = saved
    assert logits.shape == (3, eng.vocab_size)
    assert graphs.inputs[:, 3].tolist() == [0, 0, 0, 0]
    for slot in (4, 8):
        assert float(pool.k[:, slot].abs().sum()) == 0 and float(pool.v[:, slot].abs().sum()) == 0
    assert PAD_SLOT not in range(4, 9)


def test_graph_plan_depends_on_shapes_only(graph_llm):
    eng = graph_llm.engine
    backend = eng.backend
    rows = torch.zeros(4, dtype=torch.int64, device=DEVICE)

    def plan(kv_lens: list[int]):
        ctx = ForwardContext(
            positions=rows, out_slots=rows, rows=[], q_lens=[], kv_lens=[], num_decodes=4,
            req_to_token=eng.table.table, kv_pool=eng.kv_pool,
        )  # fmt: skip
        lens = torch.tensor(kv_lens, device=DEVICE)
        backend.plan_graph_decode(ctx, rows, lens, max_kv_len=eng.table.table.shape[1])
        return ctx.attn, lens

    a, lens_a = plan([1, 1, 1, 1])
    b, lens_b = plan([300, 2, 0, 77])
    assert a.decode_splits == b.decode_splits and a.max_decode_len == b.max_decode_len
    # the kernels read the buffers handed in, so new values reach a replayed graph
    assert a.decode_rows is rows and a.decode_lens is lens_a and b.decode_lens is lens_b
    assert a.decode_which is None and not a.groups and a.extend_rows is None


def test_a_failed_capture_says_how_to_run_without_graphs(tiny_llama_dir):
    class FailingGraph(RerunGraph):
        def capture(self, fn: Callable[[], None]) -> None:
            raise RuntimeError("operation not permitted when stream is capturing")

    llm = _llm(tiny_llama_dir, "triton")
    with pytest.raises(RuntimeError, match=r"not permitted.*enforce_eager=True"):
        llm.engine.runner.capture_decode_graphs(2, make_graph=FailingGraph)
    assert llm.engine.runner.graphs is None


def test_torch_backend_has_no_graphs(tiny_llama_dir):
    llm = _llm(tiny_llama_dir, "torch")
    with pytest.raises(ValueError, match="does not support CUDA graphs"):
        llm.engine.runner.capture_decode_graphs(4, make_graph=RerunGraph)


@pytest.mark.parametrize("eager", [False, True])
def test_engine_captures_graphs_on_cuda_unless_eager(tiny_llama_dir, eager):
    llm = LLM(str(tiny_llama_dir), device=DEVICE, kv_slots=64, attention_backend="triton",
              enforce_eager=eager, cuda_graph_max_batch=8)  # fmt: skip
    graphs = llm.engine.runner.graphs
    if DEVICE.type == "cuda" and not eager:
        assert graphs is not None and graphs.buckets == [1, 2, 4, 8]
    else:
        assert graphs is None
