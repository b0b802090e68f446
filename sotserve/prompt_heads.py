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

The request's own system (and developer) messages open every template prompt
(:func:`template_messages`), so an operator's system prompt holds in every mode. A
request that has one has heads of its own, cached by its first answer; the heads
warmed here are those of requests without one.
"""

from __future__ import annotations

import prompts
from prompts import ChatRenderer, Message
from sotserve.backends.base import Backend, CompletionParams

# Roles whose messages are instructions from the operator, not turns of the chat;
# "developer" is OpenAI's newer name for "system".
SYSTEM_ROLES = frozenset({"system", "developer"})


def system_text(messages: list[Message]) -> str:
    """The request's system and developer messages, in order, a paragraph each ("" if
    there are none)."""
    texts = (m["content"].strip() for m in messages if m["role"] in SYSTEM_ROLES)
    return "\n\n".join(t for t in texts if t)


def template_messages(name: str, system: str = "", **values: object) -> list[Message]:
    """Template ``name`` with ``values`` filled, opened by the request's ``system`` text.

    The request's text and the template's own system section become one system
    message, the request's text first:

    - one message, because many chat templates take a single, leading system message
      (Mistral's and Llama 2's raise on a second one, or on one after a turn);
    - the request's text first, because it is the operator's policy for everything the
      model writes, as in a plain chat prompt (which then shares its opening tokens);
    - the template's text last, nearest the task, so its instruction (plan an outline,
      reply with one letter) is not overridden by a persona or a house style, and the
      user turns that follow still say exactly what to write.

    A template without a system section gets the request's text as a system message
    of its own, in front. Without ``system`` this is ``prompts.load(name).messages``.
    """
    messages = prompts.load(name).messages(**values)
    if not system:
        return messages
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": f"{system}\n\n{messages[0]['content']}"},
                *messages[1:]]  # fmt: skip
    return [{"role": "system", "content": system}, *messages]


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
        # built as the planner builds them (here: for requests without a system text)
        first, second = (template_messages(name, question=q) for q in _PROBES)
        heads.append(_head(renderer, first, second))
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
