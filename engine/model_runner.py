"""Turns a scheduled batch into one forward pass and one sampled token per finished row."""

from __future__ import annotations

import torch

from engine.attention import AttentionBackend
from engine.context import ForwardContext, set_context
from engine.kv_cache import KVPool, ReqToTokenTable
from engine.models import LlamaForCausalLM
from engine.prefix_groups import find_prefix_groups
from engine.request import Request
from engine.sampler import Sampler
from engine.scheduler import ScheduledBatch


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

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> tuple[list[Request], list[int]]:
        """Forward the batch; return the requests that got a token, and their tokens.

        A prefill chunk that does not finish its request's pending tokens produces no
        token: its logits would predict a token the request already has.
        """
        ids: list[int] = []
        positions: list[int] = []
        rows: list[int] = []
        q_lens: list[int] = []
        kv_lens: list[int] = []
        sample_at: list[int] = []
        sampled_reqs: list[Request] = []
        for req in batch.decodes:
            ids.append(req.output_ids[-1] if req.output_ids else req.prompt_ids[-1])
            positions.append(req.num_computed)
            rows.append(req.row)
            q_lens.append(1)
            kv_lens.append(req.num_computed + 1)
            sample_at.append(len(ids) - 1)
            sampled_reqs.append(req)
        for req, n in batch.prefills:
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
        )
        if self.shared_prefix_min_tokens is not None and len(batch.decodes) > 1:
            ctx.prefix_groups = find_prefix_groups(batch.decodes, self.shared_prefix_min_tokens)
        self.backend.plan(ctx)
        set_context(ctx)
        try:
            hidden = self.model(torch.tensor(ids, dtype=torch.int64, device=dev))
            if not sampled_reqs:
                return [], []
            logits = self.model.compute_logits(hidden[torch.tensor(sample_at, device=dev)])
        finally:
            set_context(None)
        return sampled_reqs, self.sampler(logits, sampled_reqs)
