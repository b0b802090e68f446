"""Router for ``auto`` mode: sequential, sot (independent points) or graph (dependent).

Two deciders:
- :func:`route_by_rules`: a few regular expressions on the question, free and
  instant. Code, maths, Fermi estimates, letters and stories, role play and
  either-or debates are answered sequentially; explanations of a process or
  questions with a second, dependent part go to graph mode; everything else that
  asks for ways, tips, factors, differences or consequences goes to sot.
- :func:`route_by_model`: the prompting router of SoT-R: the model reads a
  few-shot prompt (``prompts/router.txt``) and answers A (independent points),
  B (dependent points) or C (not a list). An unclear reply falls back to the rules.
"""

from __future__ import annotations

import re

import prompts
from sotserve.backends.base import Backend, CompletionParams
from sotserve.schemas import ResolvedMode, RouteDecision, Usage

_F = re.IGNORECASE
_SEQUENTIAL: list[tuple[str, re.Pattern[str]]] = [
    (
        "code",
        re.compile(
            r"\b(implement|program|function|algorithm|regular expression|regex|script in|"
            r"code|python|c\+\+|java(script)? (function|program|code)|sql|data structure)\b",
            _F,
        ),
    ),
    (
        "math",
        re.compile(
            r"(\d\s*[-+*/^=]\s*\(?\d|\bsolve\b|\bequation\b|\bf\(x\)|\bcalculate\b|"
            r"\bfind the (value|length|area|probability)\b|\blength of the\b)",
            _F,
        ),
    ),
    ("reasoning", re.compile(r"\bstep[- ]by[- ]step\b|\bhow many\b", _F)),
    (
        "writing",
        re.compile(
            r"^(can you help me )?(write|draft|compose|structure|use an appropriate format)\b|"
            r"\b(write|draft|compose) (a|an|me)\b.*\b(email|letter|poem|story|script|post|"
            r"review|speech|song|essay|announcement)\b",
            _F,
        ),
    ),
    (
        "role play",
        re.compile(
            r"^(as an? |pretend|you are an? |if you were|imagine you are an? (?!time traveler))"
            r"|\bcharacter in\b|\bsoliloquy\b",
            _F,
        ),
    ),
    ("debate", re.compile(r"\b(or should|is it more important|do we have a moral)\b", _F)),
]
_GRAPH = re.compile(
    r"\b(explain the process|how does .* work|how do .* work|and how does|, and what is)\b", _F
)
_SOT = re.compile(
    r"\b(ways|tips|strategies|factors|differences|benefits|challenges|implications|"
    r"clues|advantages|steps|how can|what are|why might|why do|what if|explain the basics|"
    r"describe a scenario|consider)\b",
    _F,
)


def route_by_rules(question: str) -> RouteDecision:
    """Decide from the question's wording alone."""
    for name, pattern in _SEQUENTIAL:
        if pattern.search(question):
            return RouteDecision(mode="sequential", source="rules", reason=f"looks like {name}")
    if _GRAPH.search(question):
        return RouteDecision(mode="graph", source="rules", reason="parts build on each other")
    if _SOT.search(question):
        return RouteDecision(mode="sot", source="rules", reason="asks for several points")
    return RouteDecision(mode="sequential", source="rules", reason="no list-like wording")


_LETTER = re.compile(r"^\W*([ABC])\b")
_BY_LETTER: dict[str, tuple[ResolvedMode, str]] = {
    "A": ("sot", "model: independent points"),
    "B": ("graph", "model: points build on each other"),
    "C": ("sequential", "model: not a list"),
}


async def route_by_model(
    backend: Backend, renderer: prompts.ChatRenderer, question: str, usage: Usage
) -> RouteDecision:
    """Ask the model (greedy, two tokens); unclear replies fall back to the rules."""
    ids = renderer.render(prompts.load("router").messages(question=question))
    text = ""
    async for chunk in backend.complete(ids, CompletionParams(max_tokens=2, temperature=0.0)):
        text += chunk.text
        usage.completion_tokens += len(chunk.token_ids or ()) or 1
    usage.prompt_tokens += len(ids)
    usage.requests += 1
    m = _LETTER.match(text)
    if m is None:
        fallback = route_by_rules(question)
        fallback.reason += f" (model replied {text!r})"
        return fallback
    mode, reason = _BY_LETTER[m.group(1)]
    return RouteDecision(mode=mode, source="model", reason=reason)
