"""Step scheduler: which requests run this step, and with how many tokens each.

Every step has a token budget. Running decodes go in first, one token each, then
prefill chunks of partly prefilled and waiting requests fill the rest, so a long
prompt is split across steps and never stalls decoding. When the KV pool cannot
give every decode its slot, the newest request is preempted: its slots are freed
and it is recomputed later from its prompt and the tokens it already produced.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from engine.config import EngineConfig
from engine.kv_cache import ReqToTokenTable, SlotAllocator
from engine.request import Request, RequestStatus


@dataclass
class ScheduledBatch:
    """One step's work: ``decodes`` (1 token each) then ``prefills`` as (request, n)."""

    decodes: list[Request] = field(default_factory=list)
    prefills: list[tuple[Request, int]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(n for _, n in self.prefills)

    def __bool__(self) -> bool:
        return bool(self.decodes or self.prefills)


class Scheduler:
    """Owns the waiting queue, the running set, and their KV slots and table rows."""

    def __init__(self, config: EngineConfig, slots: SlotAllocator, table: ReqToTokenTable) -> None:
        self.config = config
        self.slots = slots
        self.table = table
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    # -- queue management --------------------------------------------------------
    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def release(self, req: Request) -> None:
        """Free a request's slots and row (finished, aborted or preempted)."""
        if req.row is not None:
            self.slots.free(self.table.slots(req.row, req.num_computed).clone())
            self.table.free_row(req.row)
            req.row = None
        req.num_computed = 0
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)

    def _preempt_newest(self) -> Request:
        victim = max(self.running, key=lambda r: r.arrival)
        self.release(victim)
        victim.status = RequestStatus.WAITING
        self.waiting.appendleft(victim)  # oldest preempted first: keep arrival order
        self.num_preemptions += 1
        return victim

    # -- the step ----------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.config.max_batched_tokens
        decodes = [r for r in self.running if r.is_decoding]
        while len(decodes) > self.slots.num_free:
            victim = self._preempt_newest()
            if victim in decodes:
                decodes.remove(victim)
        if decodes:
            new = self.slots.alloc(len(decodes))
            rows = torch.tensor([r.row for r in decodes], device=new.device)
            cols = torch.tensor([r.num_computed for r in decodes], device=new.device)
            self.table.table[rows, cols] = new
        batch.decodes = decodes
        budget -= len(decodes)

        for req in [r for r in self.running if not r.is_decoding]:
            if budget <= 0:
                break
            budget -= self._add_prefill(batch, req, budget)

        while self.waiting and budget > 0:
            if len(self.running) >= self.config.max_running or not self.table.num_free_rows:
                break
            req = self.waiting[0]
            if min(req.num_pending, budget) > self.slots.num_free:
                break
            self.waiting.popleft()
            req.row = self.table.alloc_row()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            budget -= self._add_prefill(batch, req, budget)

        if not batch and self.running:
            # Partly prefilled requests hold every slot and none can go on:
            # give the oldest room by preempting the newest.
            self._preempt_newest()
            return self.schedule()
        return batch

    def _add_prefill(self, batch: ScheduledBatch, req: Request, budget: int) -> int:
        n = min(req.num_pending, budget, self.slots.num_free)
        if n <= 0:
            return 0
        self.table.write(req.row, req.num_computed, self.slots.alloc(n))
        batch.prefills.append((req, n))
        return n
