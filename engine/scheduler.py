"""Step scheduler: which requests run this step, and with how many tokens each.

Every step has a token budget. Running decodes go in first, one token each, then
prefill chunks of partly prefilled and waiting requests fill the rest, so a long
prompt is split across steps and never stalls decoding. Waiting requests go in
order of their longest cached prefix; one whose uncached prefix another request is
prefilling right now waits, and then finds it in the cache. When the KV pool
cannot give every decode its slot, the newest request is preempted: its KV goes to
the prefix cache (or is freed) and it is recomputed later from its prompt and the
tokens it already produced.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from engine.cache_manager import CacheManager
from engine.config import EngineConfig
from engine.request import Request, RequestStatus

# Waiting requests looked at per step; bounds the cost of prefix matching.
_ADMISSION_WINDOW = 64


@dataclass
class ScheduledBatch:
    """One step's work: ``decodes`` (1 token each) then ``prefills`` as (request, n)."""

    decodes: list[Request] = field(default_factory=list)
    prefills: list[tuple[Request, int]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.decodes or self.prefills)


def _common_prefix_len(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Scheduler:
    """Owns the waiting queue and the running set; KV ownership goes through ``cm``."""

    def __init__(self, config: EngineConfig, cm: CacheManager) -> None:
        self.config = config
        self.cm = cm
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.cached_tokens = 0

    # -- queue management --------------------------------------------------------
    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def release(self, req: Request) -> None:
        """Take a request out of the queues and hand back its KV (finish, abort, preempt)."""
        self.cm.release(req)
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)

    def _preempt_newest(self) -> Request:
        victim = max(self.running, key=lambda r: r.arrival)
        self.release(victim)
        victim.status = RequestStatus.WAITING
        self.waiting.appendleft(victim)
        self.num_preemptions += 1
        return victim

    # -- the step ----------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.config.max_batched_tokens
        cm = self.cm

        decodes = [r for r in self.running if r.is_decoding]
        while decodes and cm.available < len(decodes):
            victim = self._preempt_newest()
            if victim in decodes:
                decodes.remove(victim)
        if decodes:
            new = cm.allocate(len(decodes))
            assert new is not None  # guaranteed by the loop above
            rows = torch.tensor([r.row for r in decodes], device=new.device)
            cols = torch.tensor([r.num_computed for r in decodes], device=new.device)
            cm.table.table[rows, cols] = new
        batch.decodes = decodes
        budget -= len(decodes)

        prefilling = [r for r in self.running if not r.is_decoding]
        for req in prefilling:
            if budget <= 0:
                break
            budget -= self._add_prefill(batch, req, budget)

        if self.waiting and budget > 0:
            budget = self._admit(batch, budget, prefilling)

        if not batch and self.running:
            # Partly prefilled requests hold every slot and none can go on:
            # give the oldest room by preempting the newest.
            self._preempt_newest()
            return self.schedule()
        return batch

    def _admit(self, batch: ScheduledBatch, budget: int, prefilling: list[Request]) -> int:
        window = [self.waiting[i] for i in range(min(len(self.waiting), _ADMISSION_WINDOW))]
        prefix = {id(r): self.cm.match_len(r) for r in window}
        window.sort(key=lambda r: (-prefix[id(r)], r.arrival))
        inflight = [r.token_slice(0, r.num_tokens) for r in prefilling]
        for req in window:
            if budget <= 0:
                break
            if len(self.running) >= self.config.max_running or not self.cm.table.num_free_rows:
                break
            tokens = req.token_slice(0, req.num_tokens)
            if any(_common_prefix_len(tokens, t) > prefix[id(req)] for t in inflight):
                continue  # a sibling is computing our prefix; next step it is cached
            cached = self.cm.admit(req)
            if self.cm.available < min(req.num_pending, budget):
                # Its next chunk does not fit even after eviction: stop admitting.
                self.cm.release(req)
                break
            self.waiting.remove(req)
            self.cached_tokens += cached
            if req.cached_prompt_tokens is None:  # a preempted request keeps its first count
                req.cached_prompt_tokens = min(cached, len(req.prompt_ids))
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            budget -= self._add_prefill(batch, req, budget)
            inflight.append(tokens)
        return budget

    def _add_prefill(self, batch: ScheduledBatch, req: Request, budget: int) -> int:
        n = min(req.num_pending, budget, self.cm.available)
        if n <= 0:
            return 0
        slots = self.cm.allocate(n)
        if slots is None:
            return 0
        self.cm.table.write(req.row, req.num_computed, slots)
        batch.prefills.append((req, n))
        return n
