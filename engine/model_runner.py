"""Turns a scheduled batch into one forward pass and one sampled token per finished row.

``prepare`` flattens the batch and builds its :class:`ForwardContext`; ``run`` does
the forward, the logits of the rows to sample, and the sampling. Decode-only steps
that fit a captured CUDA graph skip ``prepare`` and replay the graph instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from engine.attention import AttentionBackend
from engine.context import ForwardContext, set_context
from engine.cuda_graph import DecodeGraphRunner, StepGraph
from engine.kv_cache import KVPool, ReqToTokenTable
from engine.models import LlamaForCausalLM
from engine.prefix_groups import find_prefix_groups
from engine.request import Request
from engine.sampler import Sampler
from engine.scheduler import ScheduledBatch


class PreparedBatch(NamedTuple):
    """One eager step's model input, from :meth:`ModelRunner.prepare`."""

    input_ids: torch.Tensor  # [T] the new tokens of every request, decodes first
    ctx: ForwardContext  # per-step metadata, attention already planned
    sample_at: torch.Tensor  # [S] rows of the hidden states whose logits are sampled
    sampled_reqs: list[Request]  # the S requests those rows belong to, in order


class ModelRunner:
    """Builds the flat token batch and its :class:`ForwardContext`, runs the model, samples."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        backend: AttentionBackend,
        kv_pool: KVPool,
        table: ReqToTokenTable,
        rope_cos: torch.Tensor,
        rope_sin: torch.Tensor,
        device: torch.device,
        shared_prefix_min_tokens: int | None = None,
    ) -> None:
        self.model = model
        self.backend = backend
        self.kv_pool = kv_pool
        self.table = table
        self.rope_cos = rope_cos
        self.rope_sin = rope_sin
        self.device = device
        self.shared_prefix_min_tokens = shared_prefix_min_tokens
        self.sampler = Sampler()
        self.graphs: DecodeGraphRunner | None = None
        self.graph_steps = 0  # steps that replayed a captured graph

    def capture_decode_graphs(
        self, max_batch: int, make_graph: Callable[[], StepGraph] | None = None
    ) -> None:
        """Capture decode steps of up to ``max_batch`` requests (CUDA graphs, unless
        ``make_graph`` makes another kind); later decode-only steps replay them."""
        if not self.backend.supports_graphs:
            raise ValueError(f"{type(self.backend).__name__} does not support CUDA graphs")
        try:
            self.graphs = DecodeGraphRunner(
                self.model, self.backend, self.kv_pool, self.table, self.rope_cos,
                self.rope_sin, max_batch, make_graph,
            )  # fmt: skip
        except RuntimeError as exc:  # say how to get going anyway (SGLang does the same)
            raise RuntimeError(
                f"capturing the decode step as CUDA graphs failed: {exc}. "
                "Run without them with enforce_eager=True (--enforce-eager)."
            ) from exc

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> tuple[list[Request], list[int]]:
        """Forward the batch; return the requests that got a token, and their tokens.

        A prefill chunk that does not finish its request's pending tokens produces no
        token: its logits would predict a token the request already has.
        """
        if (
            self.graphs is not None
            and not batch.prefills
            and len(batch.decodes) <= self.graphs.max_batch
            # a captured graph hands back logits only, not the hidden states
            and not any(_wants_hidden(r) for r in batch.decodes)
        ):
            return self._run_graph(batch.decodes)
        input_ids, ctx, sample_at, sampled_reqs = self.prepare(batch)
        set_context(ctx)
        try:
            hidden = self.model(input_ids)
            if not sampled_reqs:
                return [], []
            rows = hidden[sample_at]
            for i, req in enumerate(sampled_reqs):
                if _wants_hidden(req):
                    req.hidden = rows[i].float().cpu()
            logits = self.model.compute_logits(rows)
        finally:
            set_context(None)
        return sampled_reqs, self.sampler(logits, sampled_reqs)

    def prepare(self, batch: ScheduledBatch) -> PreparedBatch:
        """The flat token batch of an eager step and its planned :class:`ForwardContext`.

        Decodes come first, one token each, then prefill chunks; a request is sampled
        (its row of ``sample_at``) only if this step computes its last pending token.
        """
        ids: list[int] = []
        positions: list[int] = []
        rows: list[int] = []
        q_lens: list[int] = []
        kv_lens: list[int] = []
        sample_at: list[int] = []
        sampled_reqs: list[Request] = []
        for req in batch.decodes:
            ids.append(_last_token(req))
            positions.append(req.num_computed)
            rows.append(req.row)
            q_lens.append(1)
            kv_lens.append(req.num_computed + 1)
            sample_at.append(len(ids) - 1)
            sampled_reqs.append(req)
        # chunks of generated tokens (jump-forward) first, so their rows follow the
        # decodes' and take the same kernels: for a few rows the quantized matmuls
        # cost about what one row does, the bfloat16 copy about three times that
        prefills = sorted(batch.prefills, key=lambda p: not _generated_chunk(*p))
        generated = len(ids) + sum(n for r, n in prefills if _generated_chunk(r, n))
        for req, n in prefills:
            start = req.num_computed
            ids.extend(req.token_slice(start, start + n))
            positions.extend(range(start, start + n))
            rows.append(req.row)
            q_lens.append(n)
            kv_lens.append(start + n)
            if start + n == req.num_tokens:
                sample_at.append(len(ids) - 1)
                sampled_reqs.append(req)

        dev = self.device
        pos = torch.tensor(positions, dtype=torch.int64, device=dev)
        token_rows = torch.repeat_interleave(
            torch.tensor(rows, device=dev), torch.tensor(q_lens, device=dev)
        )
        dtype = self.kv_pool.k.dtype
        ctx = ForwardContext(
            positions=pos,
            out_slots=self.table.table[token_rows, pos],
            rows=rows,
            q_lens=q_lens,
            kv_lens=kv_lens,
            num_decodes=len(batch.decodes),
            req_to_token=self.table.table,
            kv_pool=self.kv_pool,
            cos=self.rope_cos[pos].to(dtype),
            sin=self.rope_sin[pos].to(dtype),
            generated_rows=generated,
        )
        if self.shared_prefix_min_tokens is not None and len(batch.decodes) > 1:
            ctx.prefix_groups = find_prefix_groups(batch.decodes, self.shared_prefix_min_tokens)
        self.backend.plan(ctx)
        return PreparedBatch(
            torch.tensor(ids, dtype=torch.int64, device=dev),
            ctx,
            torch.tensor(sample_at, dtype=torch.int64, device=dev),
            sampled_reqs,
        )

    def _run_graph(self, decodes: list[Request]) -> tuple[list[Request], list[int]]:
        """A decode-only step through the captured graph of its bucket. Fan-out groups
        are not looked for: the graph's attention plan is fixed at capture."""
        logits = self.graphs.run(
            [_last_token(r) for r in decodes],
            [r.num_computed for r in decodes],
            [r.row for r in decodes],
            [r.num_computed + 1 for r in decodes],
        )
        self.graph_steps += 1
        return decodes, self.sampler(logits, decodes)


def _wants_hidden(req: Request) -> bool:
    """A pooling request whose prompt's last token is computed this step: the first
    time it is sampled (a preempted request recomputes, but keeps what it has)."""
    return req.return_hidden and req.hidden is None and not req.output_ids


# A chunk of generated tokens up to this long takes the quantized kernels; a longer
# one (a preempted request recomputing its output) is prefill work like any other.
_GENERATED_CHUNK_ROWS = 8


def _generated_chunk(req: Request, n: int) -> bool:
    """A short prefill chunk of output tokens only: what a jump-forward appended, with
    the token sampled before it."""
    return req.num_computed >= len(req.prompt_ids) and n <= _GENERATED_CHUNK_ROWS


def _last_token(req: Request) -> int:
    """The token a decode step feeds: the last one sampled, or the prompt's last one
    when a prefill chunk stopped one short of the prompt's end."""
    return req.output_ids[-1] if req.output_ids else req.prompt_ids[-1]
