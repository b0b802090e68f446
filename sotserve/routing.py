"""``auto``'s decision: the engine's load first, then the chosen router.

:class:`Router` is what :meth:`sotserve.planner.Planner.route` and every ``auto``
answer ask. In order:

1. The load (:mod:`sotserve.load_policy`): on a busy or saturated engine a skeleton's
   extra requests would slow everyone, so the answer is sequential and no router
   runs (its prefill would only add to the load).
2. The router the options name: ``trained`` (the default; the model's hidden state
   through the shipped head, :mod:`sotserve.trained_router`, where the parameters fit
   the backend's model, else the rules), ``model`` (the prompting router) or
   ``rules``.

Every router reads the question's two ends only (:func:`sotserve.router.two_ends`),
so a question of megabytes costs what one of a few thousand characters does.
"""

from __future__ import annotations

import asyncio

from prompts import ChatRenderer, Message
from sotserve.backends.base import Backend, BackendRequestError, EngineLoad
from sotserve.load_policy import LoadPolicy, PlannedLoad
from sotserve.prompt_heads import system_text
from sotserve.router import route_by_model, route_by_rules, two_ends
from sotserve.schemas import PlanOptions, RouteDecision, Usage
from sotserve.trained_router import (
    HEAD_CHARS,
    TAIL_CHARS,
    RouterParams,
    decide,
    load_for_backend,
    router_messages,
)


class Router:
    """Decides ``auto`` for one planner's backend (see the module docstring).

    ``params`` are the trained router's parameters; by default the shipped file that
    fits the backend's model is looked for on first use (one probe prefill).
    ``planned`` counts the requests of the planner's answers in flight (load the
    engine may not see yet).
    """

    def __init__(
        self,
        renderer: ChatRenderer,
        load_policy: LoadPolicy | None = None,
        params: RouterParams | None = None,
        planned: PlannedLoad | None = None,
    ) -> None:
        self.renderer = renderer
        self.load_policy = load_policy or LoadPolicy()
        self.planned = planned or PlannedLoad()
        self._params = params
        self._looked_up = params is not None
        self._lock: asyncio.Lock | None = None

    async def trained_params(self, backend: Backend) -> RouterParams | None:
        """The trained router's parameters for ``backend``'s model, or None."""
        if not self._looked_up:
            if self._lock is None:
                self._lock = asyncio.Lock()
            async with self._lock:
                if not self._looked_up:
                    self._params = await load_for_backend(backend, self.renderer)
                    self._looked_up = True
        return self._params

    async def decide(
        self,
        backend: Backend,
        messages: list[Message],
        question: str,
        opts: PlanOptions,
        usage: Usage,
        chat_ids: list[int] | None = None,
        counted: bool = False,
    ) -> RouteDecision:
        """``auto``'s mode for the chat ``messages``, whose question (last user turn and
        the conversation before it, :func:`sotserve.planner.question_text`) the rules
        and the prompting router read. ``chat_ids`` is the chat's rendered prompt where
        the caller has it: the trained router encodes that very prompt (when no
        message is cut), so a sequential answer then hits the cache; its head reads
        the rendered chat, and the graph check the question. ``counted``: the caller's own
        answer is in ``planned`` (as a single request, :meth:`PlannedLoad.start`), which
        is not load on it.

        A skeleton verdict is checked against the planned load once more when the
        router has answered: answers that arrived together all passed the first check
        while their routers ran, and the caller counts a skeleton's requests as soon as
        this returns (no await between), so the second check sees every skeleton
        decided before it."""
        load = await backend.load()
        busy = self._too_busy(backend, load, counted)
        if busy is not None:
            return RouteDecision(mode="sequential", source="load", reason=busy)
        decision = await self._ask(backend, messages, question, opts, usage, chat_ids)
        if decision.mode != "sequential":
            busy = self._too_busy(backend, load, counted)
            if busy is not None:
                return RouteDecision(
                    mode="sequential", source="load",
                    reason=f"{busy} (the router said {decision.mode}: {decision.reason})",
                )  # fmt: skip
        return decision

    def _too_busy(self, backend: Backend, load: EngineLoad, counted: bool) -> str | None:
        own = 1 if counted else 0
        return self.load_policy.too_busy(
            load, self.planned.on(backend) - own, self.planned.single_on(backend) - own
        )

    async def _ask(
        self,
        backend: Backend,
        messages: list[Message],
        question: str,
        opts: PlanOptions,
        usage: Usage,
        chat_ids: list[int] | None,
    ) -> RouteDecision:
        """The verdict of the router ``opts`` name (load aside)."""
        if opts.router == "rules":
            return route_by_rules(question)
        if opts.router == "model":
            short = two_ends(question, HEAD_CHARS, TAIL_CHARS)
            return await route_by_model(
                backend, self.renderer, short, usage, system=system_text(messages)
            )
        params = await self.trained_params(backend)
        if params is None:  # another model, or a backend without hidden states
            return route_by_rules(question)
        cut = router_messages(messages)
        ids = chat_ids if chat_ids is not None and cut == messages else self.renderer.render(cut)
        try:
            hidden = await backend.hidden_state(ids)
        except BackendRequestError as exc:  # a history past the context: the rules judge
            decision = route_by_rules(question)
            decision.reason += f" (the router prompt was refused: {exc})"
            return decision
        # a request of its own, whose one sampled token is thrown away: not part of
        # the answer's tokens (max_tokens caps those)
        usage.requests += 1
        usage.prompt_tokens += len(ids)
        if hidden is None:  # a backend that said it could, and then could not
            decision = route_by_rules(question)
            decision.reason += " (no hidden state)"
            return decision
        return decide(params, hidden, question)
