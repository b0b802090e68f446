"""Runs point expansions as parallel backend requests, each once its parents are done.

Points arrive one at a time (from the streaming skeleton parser) or all at once.
A point launches as soon as every point it depends on has finished, and its prompt
gets their expansions. When the plan is closed, references to points that never
appeared are dropped and cycles are broken, so every point eventually runs.

Budgets: each expansion may generate at most ``point_max_tokens``, and all of them
together at most what the answer's :class:`TokenBudget` has left. Each launch
reserves a fair share of what is left; unused tokens go back when it finishes.

Each point's text goes through a :class:`~sotserve.point_text.PointWriter`: it is
shown a sentence at a time and ends at a paragraph's end, at the next sentence end
once ``soft_tokens`` are written, and never mid-sentence; the request's own cap
(``params.max_tokens``) is the hard limit behind that. Once ``wrap_up_share`` of
the points has finished, the points still running end at their next sentence end:
the answer is as late as its last point, and a point left decoding alone runs at
batch 1, no faster than a sequential answer.

Everything a point does is reported on the planner's queue as :class:`PointText`,
:class:`PointFinished` or :class:`PointFailed`; :meth:`cancel` aborts every
in-flight request (the backend frees its KV slots).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass

from sotserve.backends.base import Backend, CompletionParams
from sotserve.point_text import PointWriter
from sotserve.schemas import PlanPoint

# Times a point that its writer cut before one whole sentence (or that said nothing but
# its title) is tried again, each time barring the token where it went wrong (see
# PointExecutor._run).
_RETRIES = 2
_WORD = re.compile(r"\w")

PromptBuilder = Callable[[PlanPoint, list[tuple[PlanPoint, str]]], "str | list[int]"]


@dataclass
class PointText:
    index: int
    text: str


@dataclass
class PointFinished:
    index: int
    text: str
    finish_reason: str | None
    completion_tokens: int
    prompt_tokens: int
    cached_tokens: int | None
    budget_cut: bool  # stopped by the answer's overall budget, not the point's own cap
    requests: int = 1  # a point retried after an empty start made more than one


@dataclass
class PointFailed:
    index: int
    error: BaseException


class TokenBudget:
    """Tokens the whole answer may still generate, shared by its requests."""

    def __init__(self, total: int) -> None:
        self.remaining = total

    def reserve(self, want: int, sharers: int = 1) -> int:
        """Take up to ``want`` tokens, leaving room for ``sharers - 1`` later requests."""
        share = self.remaining // max(sharers, 1)
        got = max(0, min(want, share))
        self.remaining -= got
        return got

    def refund(self, reserved: int, used: int) -> None:
        self.remaining += max(reserved - used, 0)


class PointExecutor:
    """Launches point requests on ``backend`` and reports on ``queue``."""

    def __init__(
        self,
        backend: Backend,
        build_prompt: PromptBuilder,
        params: CompletionParams,
        budget: TokenBudget,
        queue: asyncio.Queue[object],
        expected_points: int,
        soft_tokens: int | None = None,
        wrap_up_share: float = 1.0,
    ) -> None:
        self.backend = backend
        self.build_prompt = build_prompt
        self.params = params  # max_tokens here is the per-point (hard) cap
        self.soft_tokens = params.max_tokens if soft_tokens is None else soft_tokens
        self.wrap_up_share = wrap_up_share
        self.budget = budget
        self.queue = queue
        self.expected_points = expected_points  # for fair budget shares until closed
        self.points: dict[int, PlanPoint] = {}
        self.results: dict[int, str] = {}
        self._pending: dict[int, set[int]] = {}  # index -> parents not yet done
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._writers: dict[int, PointWriter] = {}  # the current attempt's, while running
        self._wrapping: set[int] = set()  # points told to end at their next sentence end
        self._ended = 0  # points whose task has finished (results lag: the planner's)
        self._closed = False

    @property
    def finished(self) -> bool:
        return self._closed and len(self.results) == len(self.points)

    def add(self, point: PlanPoint) -> None:
        if point.index in self.points:
            raise ValueError(f"point {point.index} was added twice")
        self.points[point.index] = point
        # parents that finished before this point was even parsed count as done
        self._pending[point.index] = set(point.depends_on) - {point.index} - self.results.keys()
        self._launch_ready()

    def close(self) -> list[PlanPoint]:
        """No more points: drop unknown references, break cycles; returns the final plan."""
        self._closed = True
        for parents in self._pending.values():
            parents.intersection_update(self.points)
        for child, parent in _back_edges(self._pending):
            self._pending[child].discard(parent)
        self.points = {
            i: p.model_copy(update={"depends_on": self._final_deps(p)})
            for i, p in self.points.items()
        }
        self._launch_ready()
        self._wrap_up_trailing()  # points may have ended before the plan closed
        return [self.points[i] for i in sorted(self.points)]

    def mark_done(self, index: int, text: str) -> None:
        """The planner heard ``PointFinished``: children of this point may launch."""
        self.results[index] = text
        for parents in self._pending.values():
            parents.discard(index)
        self._launch_ready()

    async def cancel(self) -> None:
        """Abort every in-flight expansion and wait until the aborts went through."""
        tasks = [t for t in self._tasks.values() if not t.done()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _final_deps(self, point: PlanPoint) -> list[int]:
        """Parents that survive close(): known points, minus edges that closed a cycle."""
        if point.index in self._pending:
            done = {d for d in point.depends_on if d in self.results}
            return sorted(self._pending[point.index] | done)
        return sorted(d for d in point.depends_on if d in self.points and d != point.index)

    def _launch_ready(self) -> None:
        for index in sorted(self._pending):
            if self._pending[index]:
                continue  # parents still running, or not even parsed yet
            point = self.points[index]
            del self._pending[index]
            parents = [
                (self.points[d], self.results[d])
                for d in sorted(point.depends_on)
                if d in self.results
            ]
            sharers = (
                len(self._pending) + 1
                if self._closed
                else max(self.expected_points - len(self._tasks), 1)
            )
            reserved = self.budget.reserve(self.params.max_tokens, sharers)
            self._tasks[index] = asyncio.create_task(
                self._run(point, parents, reserved), name=f"sotserve-point-{index}"
            )

    async def _run(
        self, point: PlanPoint, parents: list[tuple[PlanPoint, str]], reserved: int
    ) -> None:
        used = 0
        # summed over attempts (a retry is a request of its own, for the usage)
        prompt_tokens = 0
        cached_tokens: int | None = None
        requests = 0
        finish: str | None = "length"
        writer = PointWriter(point.title, self.soft_tokens)
        try:
            if reserved > 0:
                prompt = self.build_prompt(point, parents)
                n_prompt = len(prompt) if isinstance(prompt, list) else 0  # text: let it judge
                banned: dict[int, float] = {}
                kept: _Kept | None = None  # the start a retry continues, if any
                for attempt in range(1 + _RETRIES):
                    if reserved - used < 1:
                        break  # a retry only spends what is left of the reservation
                    ask = prompt if kept is None else [*prompt, *kept.token_ids]
                    n_ask = n_prompt + (0 if kept is None else len(kept.token_ids))
                    room = self.backend.room(n_ask, reserved - used)
                    floor = self.params.min_tokens - (0 if kept is None else len(kept.token_ids))
                    params = dataclasses.replace(
                        self.params, max_tokens=room, min_tokens=min(max(floor, 0), room),
                        logit_bias={**self.params.logit_bias, **banned},
                    )  # fmt: skip
                    writer = self._writers[point.index] = PointWriter(point.title, self.soft_tokens)
                    if point.index in self._wrapping:  # a retry of a trailing point
                        writer.wrap_up()
                    pieces: list[tuple[str, list[int] | None]] = []
                    if kept is not None:  # the fragment goes on where it was cut
                        await self._show(point.index, writer.feed(kept.text, len(kept.token_ids)))
                        pieces.append((kept.text, kept.token_ids))
                    requests += 1
                    prompt_tokens += n_ask
                    cached: int | None = None
                    finish = "length"
                    # aclosing: a cancel that lands on our own await, or the writer
                    # ending the point, must still close the backend stream (aborting
                    # the request).
                    stream = self.backend.complete(ask, params)
                    async with contextlib.aclosing(stream):
                        async for chunk in stream:
                            n = len(chunk.token_ids) if chunk.token_ids is not None else 1
                            used += n
                            pieces.append((chunk.text, chunk.token_ids))
                            if chunk.cached_tokens is not None:
                                cached = chunk.cached_tokens
                            if chunk.finish_reason is not None:
                                finish = chunk.finish_reason
                                if chunk.prompt_tokens:  # the backend's count wins
                                    prompt_tokens += chunk.prompt_tokens - n_ask
                            await self._show(point.index, writer.feed(chunk.text, n))
                            if writer.stopped:
                                finish = "stop"
                                break
                    if cached is not None:
                        cached_tokens = (cached_tokens or 0) + cached
                    retry = attempt < _RETRIES and reserved - used >= 1
                    if retry and (writer.unfinished or writer.says_nothing):
                        # Cut before one whole sentence (a list opened, a loop inside
                        # the first sentence), ended by the model mid-sentence, or
                        # nothing but the title: ask again, barring the token where it
                        # went wrong. The first retry continues a fragment (its tokens
                        # end the prompt, which is cached by now, so it costs only what
                        # it decodes); the next starts over, as does a point that said
                        # nothing. The last attempt keeps what it has.
                        steer = attempt == 0 and isinstance(prompt, list)
                        kept, wrong = _split_at_cut(pieces, writer, steer)
                        if wrong is None and writer.says_nothing:
                            # no token ids to bar (a text-only server): the likely
                            # culprit of an empty point is the model ending at once
                            wrong = getattr(self.backend.tokenizer, "eos_token_id", None)
                        if isinstance(wrong, int):
                            banned[wrong] = -100.0
                        continue
                    await self._show(point.index, writer.finish())
                    break
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # reported to the planner, which ends the answer
            await self.queue.put(PointFailed(point.index, exc))
            return
        finally:
            self.budget.refund(reserved, used)
            self._writers.pop(point.index, None)
            self._ended += 1
            self._wrap_up_trailing()
        cut = finish == "length" and reserved < self.params.max_tokens
        await self.queue.put(
            PointFinished(
                point.index, writer.text, finish, used, prompt_tokens, cached_tokens, cut, requests
            )
        )

    def _wrap_up_trailing(self) -> None:
        """Once the plan is closed and ``wrap_up_share`` of its points have ended, the
        points running now end at their next sentence end (points launched later, a
        graph's children, write in full)."""
        if not self._closed or self._ended < self.wrap_up_share * len(self.points):
            return
        for index, writer in self._writers.items():
            self._wrapping.add(index)
            writer.wrap_up()

    async def _show(self, index: int, text: str) -> None:
        if text:
            await self.queue.put(PointText(index, text))


@dataclass
class _Kept:
    """The start of a point that a retry continues: its text and token ids."""

    text: str
    token_ids: list[int]


def _split_at_cut(
    pieces: list[tuple[str, list[int] | None]], writer: PointWriter, steer: bool
) -> tuple[_Kept | None, int | None]:
    """Where a retry of a point starts, and the token to bar.

    ``pieces`` are the attempt's ``(text, token ids)`` chunks, the writer's ``kept``
    text their cut prefix. A fragment that holds a word is kept whole chunks at a
    time and the first token past it is barred, if ``steer``; otherwise (or when the
    backend gave no ids) the point starts over with its first token barred.
    """
    first = next((ids[0] for _, ids in pieces if ids), None)
    kept_len = len(writer.kept)
    if not steer or any(ids is None for _, ids in pieces) or not _WORD.search(writer.kept):
        return None, first
    text, ids, at = "", [], 0
    for piece_text, piece_ids in pieces:
        if at + len(piece_text) > kept_len:
            return _Kept(text, ids), piece_ids[0] if piece_ids else None
        text += piece_text
        ids += piece_ids or []
        at += len(piece_text)
    # the cut fell at the very end (the model ended or hit the cap): start over
    return None, first


def _back_edges(pending: dict[int, set[int]]) -> list[tuple[int, int]]:
    """Edges (child, parent) that close a cycle, found by DFS in index order."""
    state: dict[int, int] = {}  # 1 = on the stack, 2 = finished
    found: list[tuple[int, int]] = []

    def visit(node: int) -> None:
        state[node] = 1
        for parent in sorted(pending.get(node, ())):
            if state.get(parent) == 1:
                found.append((node, parent))
            elif parent not in state:
                visit(parent)
        state[node] = 2

    for node in sorted(pending):
        if node not in state:
            visit(node)
    return found
