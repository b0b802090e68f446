"""Turns a scheduled batch into one forward pass and one sampled token per finished row.

``prepare`` flattens the batch and builds its :class:`ForwardContext`; ``run`` does
the forward, the logits of the rows to sample, and the sampling (every row of a
speculative draft, of which it keeps the confirmed part: :mod:`engine.speculative`).
Decode-only steps that fit a captured CUDA graph skip ``prepare`` and replay the
graph instead.
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
from engine.sampler import SampledRow, Sampler
from engine.scheduler import ScheduledBatch
from engine.speculative import accepted_prefix, draft_rows


class PreparedBatch(NamedTuple):
    """One eager step's model input, from :meth:`ModelRunner.prepare`."""

    input_ids: torch.Tensor  # [T] the new tokens of every request, decodes first
    ctx: ForwardContext  # per-step metadata, attention already planned
    sample_at: torch.Tensor  # [S] rows of the hidden states whose logits are sampled
    # what each of those S rows samples for: a request, or a row of a draft
    sampled_reqs: list[SampledRow]


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
        token: its logits would predict a token the request already has. A draft's
        request gets the sample after its accepted tokens, and ``Draft.accepted``
        says how many those are.
        """
        if (
            self.graphs is not None
            and not batch.prefills
            and not batch.drafts
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
                if isinstance(req, Request) and _wants_hidden(req):
                    req.hidden = rows[i].float().cpu()
            logits = self.model.compute_logits(rows)
        finally:
            set_context(None)
        tokens = self.sampler(logits, sampled_reqs)
        if not batch.drafts:
            return sampled_reqs, tokens  # type: ignore[return-value]  # no DraftRow
        return _verify(batch, sampled_reqs, tokens)

    def prepare(self, batch: ScheduledBatch) -> PreparedBatch:
        """The flat token batch of an eager step and its planned :class:`ForwardContext`.

        One-query rows come first: decodes, then the rows of drafts and of short
        chunks of generated tokens; then prefill chunks, a request of which is
        sampled (its row of ``sample_at``) only if this step computes its last
        pending token.
        """
        ids: list[int] = []
        positions: list[int] = []
        rows: list[int] = []
        q_lens: list[int] = []
        kv_lens: list[int] = []
        sample_at: list[int] = []
        sampled_reqs: list[SampledRow] = []

        def one_query(req: Request, token: int, pos: int) -> None:
            # a row of its own with the keys up to it, exactly as a decode has: the
            # same attention kernel, so the same sums as decoding that token alone
            ids.append(token)
            positions.append(pos)
            rows.append(req.row)
            q_lens.append(1)
            kv_lens.append(pos + 1)

        for req in batch.decodes:
            one_query(req, _last_token(req), req.num_computed)
            sample_at.append(len(ids) - 1)
            sampled_reqs.append(req)
        # Generated tokens computed several at a time (a draft after the last token,
        # jump-forward tokens with the one sampled before them) go in as decode rows
        # too: the same attention and matmul kernels as decoding them one per step
        # (for a few rows the quantized matmuls cost about what one row does), so
        # the same output. Every row of a draft is sampled; of a jump-forward chunk,
        # the last.
        for draft in batch.drafts:
            req, start = draft.req, draft.req.num_computed
            for i, token in enumerate([_last_token(req), *draft.tokens]):
                one_query(req, token, start + i)
                sample_at.append(len(ids) - 1)
            sampled_reqs.extend(draft_rows(draft))
        chunks = []
        for req, n in batch.prefills:
            if not _generated_chunk(req, n):
                chunks.append((req, n))
                continue
            start = req.num_computed
            for i, token in enumerate(req.token_slice(start, start + n)):
                one_query(req, token, start + i)
            if start + n == req.num_tokens:  # not a recomputation that stops short
                sample_at.append(len(ids) - 1)
                sampled_reqs.append(req)
        num_decodes = len(ids)
        for req, n in chunks:
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
            num_decodes=num_decodes,
            req_to_token=self.table.table,
            kv_pool=self.kv_pool,
            cos=self.rope_cos[pos].to(dtype),
            sin=self.rope_sin[pos].to(dtype),
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


def _verify(
    batch: ScheduledBatch, sampled: list[SampledRow], tokens: list[int]
) -> tuple[list[Request], list[int]]:
    """One token per request: a draft's rows collapse to the sample after the tokens
    they confirm (``Draft.accepted`` is set), other rows stay as they are."""
    reqs: list[Request] = []
    out: list[int] = []
    drafts = iter(batch.drafts)
    i = 0
    while i < len(sampled):
        row = sampled[i]
        if isinstance(row, Request):
            reqs.append(row)
            out.append(tokens[i])
            i += 1
            continue
        draft = next(drafts)
        n = len(draft.tokens) + 1
        draft.accepted = accepted_prefix(draft.tokens, tokens[i : i + n])
        reqs.append(draft.req)
        out.append(tokens[i + draft.accepted])
        i += n
    return reqs, out


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
