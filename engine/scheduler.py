"""Step scheduler: which requests run this step, with how many tokens each, and what
their sampled tokens do to them.

A step is ``schedule()``, the model runner's forward, then ``postprocess()``.

Every step has a token budget. Running decodes go in first, one token each, then
prefill chunks of partly prefilled and waiting requests fill the rest, so a long
prompt is split across steps and never stalls decoding. Waiting requests go in
order of their longest cached prefix; one whose uncached prefix another request is
prefilling right now waits, and then finds it in the cache.

Aging bounds the wait that this order alone leaves unbounded (a cold request behind
a steady stream of cache hits): a request that has waited ``max_wait_steps`` steps
(``EngineConfig``), counted from its arrival or its last preemption, is aged. Aged
requests go ahead of all others, longest waiting first, cached prefix or not, and do
not wait for a sibling's prefill either; nothing behind an aged request is admitted
before it, so it gets in as soon as a table row, slots and budget are free.

When the KV pool cannot give every decode its slot, a running request is preempted:
its KV goes to the prefix cache (or is freed) and it is recomputed later from its
prompt and the tokens it already produced. The victim is the one preempted the
fewest times so far, the newest among those. Always taking the newest hits the
request that was just readmitted again and again, each time throwing away the KV it
had just recomputed; this way a request is preempted again only once every running
request of its priority has been preempted at least as often.

Priorities (``Request.priority``, vLLM's convention: lower is more urgent, 0 by
default, may be negative) come before all of that:

* Prefill budget goes by priority: the partly prefilled and waiting requests of the
  most urgent priority first (partly prefilled ones before waiting ones, then by
  aging, cached prefix and arrival as above), then the next priority, and so on.
  Aging works within a priority only: an aged request never goes ahead of a more
  urgent one (priorities stay strict, as vLLM's), so the bound on its wait holds
  while no more urgent request waits.
* Preemption takes the least urgent running request (the least preempted, then the
  newest, among equals), so a request is only preempted for requests at least as
  urgent as itself.
* A waiting request more urgent than some running request does not wait for room:
  while it has no table row, or the pool cannot hold its first chunk beside the
  decodes, the least urgent running request (less urgent than it) is preempted.
* While a request decodes that is more urgent than some prefill of the step, the
  step's prefill tokens are capped at ``EngineConfig.urgent_prefill_tokens``, so the
  urgent request's step costs little more than a decode step. Prefills at least as
  urgent as the most urgent decode are not limited (they count towards the cap); the
  others share what is left of it. Without such a decode, prefill is not capped.

With every priority equal, all of this reduces to the rules above.

While at most ``EngineConfig.speculative_max_batch`` requests decode, each may carry
a draft (:mod:`engine.speculative`): tokens looked up from its own n-grams, computed
in its decode step and kept as far as the samples confirm them. A draft's slots
never cost a preemption, and those of rejected tokens go back at once.

After the forward, ``postprocess`` advances each request, caches prefill chunks,
appends and detokenizes the sampled tokens, and finishes the requests that hit a
stop rule or a length limit. Aborts end a request the same way, between steps.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field

import torch

from engine.attention.common import KEY_MULTIPLE
from engine.cache_manager import CacheManager
from engine.config import EngineConfig
from engine.outputs import RequestDelta
from engine.request import Request, RequestStatus
from engine.speculative import Draft, NgramIndex, can_draft
from engine.stats import Counters

# Waiting requests looked at per step; bounds the cost of prefix matching.
_ADMISSION_WINDOW = 64


@dataclass
class ScheduledBatch:
    """One step's work: ``decodes`` (1 token each), decodes with a draft to verify
    (``drafts``), then ``prefills`` as (request, n)."""

    decodes: list[Request] = field(default_factory=list)
    prefills: list[tuple[Request, int]] = field(default_factory=list)
    drafts: list[Draft] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.decodes or self.prefills or self.drafts)


@dataclass
class _Budget:
    """Prefill tokens a step has left: ``tokens`` in all, of which requests less urgent
    than ``urgent`` (the most urgent decode's priority) may take only ``capped``
    (``None``: no cap this step)."""

    tokens: int
    urgent: int = 0
    capped: int | None = None

    def room(self, req: Request) -> int:
        """Tokens ``req`` may get now."""
        if self.capped is not None and req.priority > self.urgent:
            return min(self.tokens, self.capped)
        return self.tokens

    def take(self, n: int) -> None:
        self.tokens -= n
        if self.capped is not None:
            self.capped = max(self.capped - n, 0)


def _priority(req: Request) -> int:
    return req.priority


def _victim_key(req: Request) -> tuple[int, int, int]:
    """Preemption takes the running request with the largest key: the least urgent, then
    the least often preempted, then the newest."""
    return (req.priority, -req.preemptions, req.arrival)


def _common_prefix_len(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Scheduler:
    """Owns the live requests (waiting queue and running set) and the engine's counters;
    KV ownership goes through ``cm``."""

    def __init__(self, config: EngineConfig, cm: CacheManager) -> None:
        self.config = config
        self.cm = cm
        self.requests: dict[str, Request] = {}  # every live request, waiting or running
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.counters = Counters()
        # prompt-lookup indexes of the requests that drafted, by request id
        self._ngrams: dict[str, NgramIndex] = {}

    # -- queue management --------------------------------------------------------
    def add(self, req: Request) -> None:
        """Queue a new request; the caller has checked that its id is not live."""
        self.requests[req.request_id] = req
        req.waiting_since = self.counters.steps
        self.counters.prompt_tokens += len(req.prompt_ids)
        self.waiting.append(req)

    def abort(self, request_id: str) -> RequestDelta | None:
        """Drop a live request and free its slots now; returns its final delta."""
        req = self.requests.get(request_id)
        if req is None:
            return None
        self._finish(req, "abort")
        return self._delta(req)

    def release(self, req: Request) -> None:
        """Take a request out of the queues and hand back its KV (finish, abort, preempt)."""
        self.cm.release(req)
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)

    def _preempt(self) -> Request:
        """Preempt the running request that ``_victim_key`` ranks last; it goes back to
        the front of the waiting queue."""
        victim = max(self.running, key=_victim_key)
        self.release(victim)
        victim.status = RequestStatus.WAITING
        victim.preemptions += 1
        victim.waiting_since = self.counters.steps
        self.waiting.appendleft(victim)
        self.counters.preemptions += 1
        return victim

    # -- the step ----------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        cm = self.cm

        # waiting requests less urgent than this are not admitted this step
        admit_up_to = self._make_room_for_urgent() if self.waiting and self.running else None

        decodes = [r for r in self.running if r.is_decoding]
        while decodes and cm.available < len(decodes):
            victim = self._preempt()
            if victim in decodes:
                decodes.remove(victim)
        if decodes:
            new = cm.allocate(len(decodes))
            assert new is not None  # guaranteed by the loop above
            rows = torch.tensor([r.row for r in decodes], device=new.device)
            cols = torch.tensor([r.num_computed for r in decodes], device=new.device)
            cm.table.table[rows, cols] = new
        batch.decodes = decodes
        self._draft(batch)

        drafted = sum(len(d.tokens) + 1 for d in batch.drafts)
        budget = _Budget(self.config.max_batched_tokens - len(batch.decodes) - drafted)
        cap = self.config.urgent_prefill_tokens
        if decodes and cap is not None:
            budget.urgent = min(r.priority for r in decodes)
            budget.capped = cap  # binds only prefills less urgent than budget.urgent

        # stable sorts: within a priority, running order and the waiting queue's order
        prefilling = sorted((r for r in self.running if not r.is_decoding), key=_priority)
        window = []
        if budget.tokens > 0:
            window = heapq.nsmallest(_ADMISSION_WINDOW, self.waiting, key=_priority)
            if admit_up_to is not None:
                window = [r for r in window if r.priority <= admit_up_to]
        prefix = {id(r): cm.match_len(r) for r in window}
        inflight = [(r.priority, r.token_slice(0, r.num_tokens)) for r in prefilling]
        admitting = bool(window)
        for level in sorted({r.priority for r in prefilling} | {r.priority for r in window}):
            for req in prefilling:
                if req.priority == level:
                    budget.take(self._add_prefill(batch, req, budget.room(req)))
            if admitting:
                level_window = [r for r in window if r.priority == level]
                admitting = self._admit(batch, budget, level_window, prefix, inflight)

        if not batch and self.running:
            # Partly prefilled requests hold every slot and none can go on: give the
            # others room by preempting one (least urgent, least preempted, newest).
            self._preempt()
            return self.schedule()
        return batch

    def _draft(self, batch: ScheduledBatch) -> None:
        """Move the decodes that find a draft (their n-grams occurred before) from
        ``batch.decodes`` to ``batch.drafts``, while the batch is small enough. A
        draft never outgrows the request's ``max_tokens`` (so nor the context). Its slots
        may evict cached prefixes (least recently used first: a long-running engine's
        cache holds every slot not in use) but never preempt a request."""
        cfg, cm = self.config, self.cm
        if not cfg.speculative_tokens or len(batch.decodes) > cfg.speculative_max_batch:
            return
        room = cfg.max_batched_tokens - len(batch.decodes)
        plain = []
        for req in batch.decodes:
            limit = min(
                cfg.speculative_tokens,
                room,
                cm.available,
                # the step keeps at most the draft and one more token (make_request
                # holds prompt + max_tokens within the context, so this bounds both)
                req.params.max_tokens - len(req.output_ids) - 1,
                # Every row of the draft keeps the padded key width its last token's
                # row has (engine.attention.common): a row padded wider would sum its
                # attention in another order than decoding it alone, and parted the
                # output at near-ties (measured: 1 answer of 1 at 512 tokens).
                -(req.num_tokens // -KEY_MULTIPLE) * KEY_MULTIPLE - req.num_tokens,
            )
            tokens = []
            if limit > 0 and can_draft(req.params, req.generator):
                index = self._ngrams.get(req.request_id)
                if index is None:
                    index = self._ngrams[req.request_id] = NgramIndex(cfg.ngram_min, cfg.ngram_max)
                tokens = index.lookup(req.token_slice(0, req.num_tokens), limit)
            if not tokens:
                plain.append(req)
                continue
            slots = cm.allocate(len(tokens))
            assert slots is not None  # at most ``available``
            # the draft's rows follow the last token's, whose slot is already there
            cm.table.write(req.row, req.num_computed + 1, slots)
            batch.drafts.append(Draft(req, tokens))
            room -= len(tokens)
        batch.decodes = plain

    def _make_room_for_urgent(self) -> int | None:
        """Preempt running requests less urgent than the most urgent waiting one while
        it could not be admitted: no table row free, or too few slots for its first
        chunk beside this step's decodes. (The estimate leaves out prefix slots that
        admission would lock; ``_admit`` checks again.)

        Returns that request's priority if anything was preempted (the room is kept
        for it: no less urgent request is admitted this step), else None."""
        best = min(self.waiting, key=_priority)
        cfg, cm = self.config, self.cm
        preempted = False
        while self.running:
            worst = max(self.running, key=_victim_key)
            if worst.priority <= best.priority:
                break
            decoding = [r for r in self.running if r.is_decoding]
            room = cfg.max_batched_tokens - len(decoding)
            if cfg.urgent_prefill_tokens is not None and any(
                r.priority < best.priority for r in decoding
            ):
                room = min(room, cfg.urgent_prefill_tokens)
            if room <= 0:
                break  # no budget for it this step: preempting would not admit it
            chunk = min(best.num_tokens - cm.match_len(best), room)
            has_row = len(self.running) < cfg.max_running and cm.table.num_free_rows > 0
            if has_row and cm.available >= len(decoding) + chunk:
                break
            self._preempt()
            preempted = True
        return best.priority if preempted else None

    def _admit(
        self,
        batch: ScheduledBatch,
        budget: _Budget,
        window: list[Request],
        prefix: dict[int, int],
        inflight: list[tuple[int, list[int]]],
    ) -> bool:
        """Admit waiting requests of one priority: aged ones (waited ``max_wait_steps``)
        longest waiting first, then the rest longest cached prefix first; False once
        admission has to stop for this step (no budget, row or slots)."""
        now, limit = self.counters.steps, self.config.max_wait_steps
        aged = {id(r) for r in window if limit is not None and now - r.waiting_since >= limit}

        def order(r: Request) -> tuple[int, int, int]:
            if id(r) in aged:
                return (0, r.waiting_since, r.arrival)
            return (1, -prefix[id(r)], r.arrival)

        window = sorted(window, key=order)
        for req in window:
            room = budget.room(req)
            if room <= 0:
                return False
            if len(self.running) >= self.config.max_running or not self.cm.table.num_free_rows:
                return False
            tokens = req.token_slice(0, req.num_tokens)
            if id(req) not in aged and any(
                p <= req.priority and _common_prefix_len(tokens, t) > prefix[id(req)]
                for p, t in inflight
            ):
                # A sibling at least as urgent is computing our prefix; next step it is
                # cached. (A less urgent one may be capped, so we do not wait for it. An
                # aged request does not wait: newer ones would be admitted past it.)
                continue
            cached = self.cm.admit(req)
            if self.cm.available < min(req.num_pending, room):
                # Its next chunk does not fit even after eviction: stop admitting.
                self.cm.release(req)
                return False
            self.waiting.remove(req)
            self.counters.cached_tokens += cached
            if req.cached_prompt_tokens is None:  # a preempted request keeps its first count
                req.cached_prompt_tokens = min(cached, len(req.prompt_ids))
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            budget.take(self._add_prefill(batch, req, room))
            inflight.append((req.priority, tokens))
        return True

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

    # -- after the forward -------------------------------------------------------
    def postprocess(
        self, batch: ScheduledBatch, reqs: list[Request], tokens: list[int]
    ) -> list[RequestDelta]:
        """Apply one step's forward: ``reqs[i]`` sampled ``tokens[i]``.

        Every scheduled request advances by the tokens it computed; prefill chunks
        go to the prefix cache at once. Each sampled token is appended and
        detokenized, and a request that hit a stop rule or a length limit is
        finished and its KV released. Returns a delta for every request that got a
        token (a prefill chunk that stops short of the prompt's end gets none).
        """
        c = self.counters
        c.steps += 1
        n_reqs = len(batch.decodes) + len(batch.prefills)
        c.batched_requests += n_reqs
        c.max_batch_size = max(c.max_batch_size, n_reqs)
        for req in batch.decodes:
            self._advance(req, 1)
        drafts = {id(d.req): d for d in batch.drafts}
        for d in batch.drafts:
            self._advance(d.req, 1)  # the last token's row; the draft's count as kept
        for req, n in batch.prefills:
            self._advance(req, n)
            # cache each chunk at once, so siblings waiting on this prefix can use it
            self.cm.commit(req)
        deltas = []
        for req, token in zip(reqs, tokens, strict=True):
            draft = drafts.get(id(req))
            if draft is None:
                self._append(req, token)
            else:
                self._keep_draft(draft, token)
            if req.finish_reason is None:
                # jump-forward: tokens the format fixes go in without a step of their
                # own; the next step computes them with the token after them
                for forced in req.params.forced_after(req.output_ids):
                    self._append(req, forced)
                    if req.finish_reason is not None:
                        break
            deltas.append(self._delta(req))
        return deltas

    def _keep_draft(self, draft: Draft, token: int) -> None:
        """Append a verified draft's accepted tokens and ``token`` (the sample after
        them), counting each accepted token's row as computed as it goes in; the
        slots of the rows not kept (rejected, or after a stop) are freed."""
        req = draft.req
        c = self.counters
        c.draft_tokens += len(draft.tokens)
        c.accepted_draft_tokens += draft.accepted
        # the draft's rows, right after the last token's (already counted)
        rows = self.cm.table.slots(req.row, req.num_computed + len(draft.tokens), req.num_computed)
        rows = rows.clone()  # a finish below frees the table row
        kept = 0
        for i, t in enumerate([*draft.tokens[: draft.accepted], token]):
            if i:
                self._advance(req, 1)  # row i computed the accepted token before t
                kept += 1
            self._append(req, t)
            if req.finish_reason is not None:
                break
        self.cm.slots.free(rows[kept:])

    def _advance(self, req: Request, n: int) -> None:
        """``req`` computed ``n`` more tokens: those of its prompt count as prefill, the
        rest as decode work (a decode's token; a chunk past the prompt, which holds
        jump-forward tokens; a decode may also finish a prompt a chunk left one short)."""
        c = self.counters
        prompt_part = min(n, max(0, len(req.prompt_ids) - req.num_computed))
        c.computed_prefill_tokens += prompt_part
        c.decode_tokens += n - prompt_part
        req.num_computed += n

    def _append(self, req: Request, token: int) -> None:
        """Add one output token (sampled or forced), and finish ``req`` if it stops."""
        self.counters.generated_tokens += 1
        req.output_ids.append(token)
        # vLLM: no stop string before min_tokens (the sampler masks stop ids)
        req.detok.add(token, check_stop=len(req.output_ids) > req.params.min_tokens)
        reason = self._finish_reason(req, token)
        if reason is not None:
            self._finish(req, reason)

    def _finish_reason(self, req: Request, token: int) -> str | None:
        """``"stop"`` (a stop id, or a stop string in the text), ``"length"``
        (``max_tokens`` or the context length reached), or None to go on."""
        if token in req.stop_ids or req.detok.stopped:
            return "stop"
        if (
            len(req.output_ids) >= req.params.max_tokens
            or req.num_tokens >= self.config.max_model_len
        ):
            return "length"
        return None

    def _finish(self, req: Request, reason: str) -> None:
        """End a live request for ``reason`` (a finish reason or ``"abort"``)."""
        req.finish_reason = reason
        req.status = RequestStatus.FINISHED
        self.release(req)
        del self.requests[req.request_id]
        self._ngrams.pop(req.request_id, None)
        if reason == "abort":
            self.counters.aborted_requests += 1
        else:
            self.counters.finished_requests += 1

    @staticmethod
    def _delta(req: Request) -> RequestDelta:
        """What ``req`` produced since its last delta; the last one (the request has
        finished) flushes held-back text. Every delta reports the prompt's cached
        tokens once it was admitted, so a caller that stops reading early knows them."""
        done = req.finish_reason is not None
        cached = req.cached_prompt_tokens
        return RequestDelta(
            req.request_id,
            req.pop_new_tokens(),
            req.detok.pop_delta(done),
            req.finish_reason,
            (cached or 0) if done else cached,
            req.pop_hidden(),
        )
