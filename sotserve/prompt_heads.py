"""The fixed heads of the planner's prompts, and keeping them in the prefix cache.

Every prompt the planner sends starts with tokens that do not depend on the
question: the chat template's system turn for a plain answer, and for a skeleton
the instructions and the two worked examples (about 200 tokens, most of the
skeleton prompt). A server that has answered anything has those tokens in its
radix cache; one that has just started, or whose cache was emptied, has not, and
the first answer pays for them on its critical path (about 0.3 s of the skeleton's
prefill on 2 cores). :func:`warm_prompt_heads` prefills them with one-token
requests, so they are cached like any finished request's prompt: the server does
it at start-up and after ``/reset_prefix_cache``, and the eval harness's cold
cache means "nothing of the question is cached", as in a running server.

A head is found by rendering a prompt for two different questions and keeping the
token ids they share, so it follows the chat template and the template files
without knowing their layout.
"""

from __future__ import annotations

import prompts
from prompts import ChatRenderer, Message
from sotserve.backends.base import Backend, CompletionParams

# Two questions that share no leading word, so their renderings part where the
# question starts.
_PROBES = ("What is a probe?", "How would another one work?")
# Templates whose prompt starts with fixed text: the skeleton and graph requests and
# the model router.
_TEMPLATES = ("skeleton", "graph", "router")


def common_prefix(a: list[int], b: list[int]) -> list[int]:
    """The leading ids ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return a[:n]


def _head(renderer: ChatRenderer, first: list[Message], second: list[Message]) -> list[int]:
    return common_prefix(renderer.render(first), renderer.render(second))


def prompt_heads(renderer: ChatRenderer, min_tokens: int = 8) -> list[list[int]]:
    """The question-independent leading token ids of a plain chat prompt and of each
    planner template, longest first; heads shorter than ``min_tokens`` and heads that
    are a prefix of another (cached along with it) are left out."""
    a, b = _PROBES
    heads = [_head(renderer, [{"role": "user", "content": a}], [{"role": "user", "content": b}])]
    for name in _TEMPLATES:
        template = prompts.load(name)
        heads.append(_head(renderer, template.messages(question=a), template.messages(question=b)))
    heads.sort(key=len, reverse=True)
    kept: list[list[int]] = []
    for head in heads:
        if len(head) >= min_tokens and not any(k[: len(head)] == head for k in kept):
            kept.append(head)
    return kept


async def warm_prompt_heads(backend: Backend, heads: list[list[int]]) -> int:
    """Prefill each head with a one-token request so the backend (each of its
    replicas) caches it; returns the head tokens sent. The token sampled is thrown away."""
    sent = 0
    for member in backend.members():  # each replica has a cache of its own
        for head in heads:
            async for _ in member.complete(head, CompletionParams(max_tokens=1)):
                pass
            sent += len(head)
    return sent
