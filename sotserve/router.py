"""Router for ``auto`` mode: sequential, sot (independent points) or graph (dependent).

Two deciders:
- :func:`route_by_rules`: a few patterns on the question's wording, free and instant
  (linear in the question's length, and reading at most its two ends, so no
  question can stall the event loop). Code, maths, Fermi estimates, letters and
  stories, role play and either-or debates are answered sequentially; explanations
  of a process or questions with a second, dependent part go to graph mode;
  everything else that asks for ways, tips, factors, differences or consequences
  goes to sot.
- :func:`route_by_model`: the prompting router of SoT-R: the model reads a
  few-shot prompt (``prompts/router.txt``) and answers A (independent points),
  B (dependent points) or C (not a list). An unclear reply falls back to the rules.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import prompts
from sotserve.backends.base import Backend, CompletionParams
from sotserve.prompt_heads import template_messages
from sotserve.schemas import ResolvedMode, RouteDecision, Usage

_F = re.IGNORECASE
Matcher = Callable[[str], bool]


def _search(pattern: str) -> Matcher:
    r"""A matcher for ``pattern`` anywhere in the question. Only for patterns without
    an unbounded gap: every one of them is an alternation of literal words (or
    ``\s*`` runs between fixed characters), which the engine scans in linear time."""
    compiled = re.compile(pattern, _F)
    return lambda text: compiled.search(text) is not None


@dataclass(frozen=True)
class _ThenOnLine:
    r"""``first.*then`` in linear time: ``then`` matches after ``first``, on its line.

    The regular expression ``first.*then`` tries ``.*`` at every place ``first``
    matches and backtracks over the rest of the line each time: quadratic in the
    line, so ``"how does " * 50000`` (no "work") stalled the event loop for
    seconds. The same set of questions matches when ``then`` is searched for once
    per line, after the line's first ``first`` (the earliest possible start of the
    gap: any later match of ``then`` is after it too). ``.`` matches anything but
    ``"\n"``, so a line ends at ``"\n"`` only; ``then``'s search stops there
    (``endpos``: a ``\b`` there is the same as at the real line end, ``"\n"`` being
    no word character) and the next line is tried from its start. Every character
    is looked at a bounded number of times, whatever the input.
    """

    first: re.Pattern[str]
    then: re.Pattern[str]

    @classmethod
    def of(cls, first: str, then: str) -> _ThenOnLine:
        return cls(re.compile(first, _F), re.compile(then, _F))

    def __call__(self, text: str) -> bool:
        pos = 0
        while (m := self.first.search(text, pos)) is not None:
            line_end = text.find("\n", m.end())
            if line_end < 0:
                line_end = len(text)
            # search() with pos looks at the character before pos for \b, as the
            # whole-string regex would
            if self.then.search(text, m.end(), line_end) is not None:
                return True
            pos = line_end + 1
        return False


def _any(*matchers: Matcher) -> Matcher:
    return lambda text: any(match(text) for match in matchers)


# The decisions are exactly those of the earlier rules (``\b(...).*\b(...)\b``
# regular expressions): evals and the router's measured figures stay valid. Each
# rule is linear in the question's length (see _ThenOnLine), so no question,
# however long or odd, can hold the event loop for long.
_SEQUENTIAL: list[tuple[str, Matcher]] = [
    (
        "code",
        _search(
            r"\b(implement|program|function|algorithm|regular expression|regex|script in|"
            r"code|python|c\+\+|java(script)? (function|program|code)|sql|data structure)\b"
        ),
    ),
    (
        "math",
        # \s* runs between fixed characters: a failed try backtracks over one run of
        # spaces only, so the scan stays linear
        _search(
            r"(\d\s*[-+*/^=]\s*\(?\d|\bsolve\b|\bequation\b|\bf\(x\)|\bcalculate\b|"
            r"\bfind the (value|length|area|probability)\b|\blength of the\b)"
        ),
    ),
    ("reasoning", _search(r"\bstep[- ]by[- ]step\b|\bhow many\b")),
    (
        "writing",
        _any(
            _search(
                r"^(can you help me )?(write|draft|compose|structure|use an appropriate format)\b"
            ),
            # "write a ... email" (was \b(write|draft|compose) (a|an|me)\b.*\b(email|...)\b)
            _ThenOnLine.of(
                r"\b(write|draft|compose) (a|an|me)\b",
                r"\b(email|letter|poem|story|script|post|review|speech|song|essay|"
                r"announcement)\b",
            ),
        ),
    ),
    (
        "role play",
        _search(
            r"^(as an? |pretend|you are an? |if you were|imagine you are an? (?!time traveler))"
            r"|\bcharacter in\b|\bsoliloquy\b"
        ),
    ),
    ("debate", _search(r"\b(or should|is it more important|do we have a moral)\b")),
]
_GRAPH: Matcher = _any(
    _search(r"\b(explain the process|and how does|, and what is)\b"),
    # "how does ... work" (was \bhow does .* work\b and \bhow do .* work\b)
    _ThenOnLine.of(r"\bhow (does|do) ", r" work\b"),
)
_SOT: Matcher = _search(
    r"\b(ways|tips|strategies|factors|differences|benefits|challenges|implications|"
    r"clues|advantages|steps|how can|what are|why might|why do|what if|explain the basics|"
    r"describe a scenario|consider)\b"
)


# A question longer than twice this is routed on its first and last this many
# characters: the wording that says what is asked (a request before or after a
# pasted text) is at either end, and the time the rules take is then bounded
# whatever the question's length. Every question of ../shared/data (7,840
# characters at most) is routed whole.
RULES_WINDOW = 8192


def rules_text(question: str) -> str:
    """What the rules read: the whole question, or its two ends (:func:`two_ends`)."""
    return two_ends(question, RULES_WINDOW, RULES_WINDOW)


def two_ends(question: str, head_chars: int, tail_chars: int) -> str:
    """The whole question when it has at most ``head_chars + tail_chars`` characters,
    else its first and last of those (cut at whitespace, so no word is clipped into
    another, such as "programming" into "program") on lines of their own (so no
    ``first ... then`` rule spans the cut). Constant time in the question's length
    past the cut: routers read this, never the whole of a huge question."""
    if len(question) <= head_chars + tail_chars:
        return question
    head = question[:head_chars]
    tail = question[-tail_chars:]
    cut = max(head.rfind(c) for c in " \t\n")
    if cut > 0:
        head = head[:cut]
    starts = [i for i in (tail.find(c) for c in " \t\n") if i >= 0]
    if starts:
        tail = tail[min(starts) + 1 :]
    return f"{head}\n{tail}"


def route_by_rules(question: str) -> RouteDecision:
    """Decide from the question's wording alone (see :func:`rules_text`)."""
    return decide_by_rules(rules_text(question))


def parts_depend(text: str) -> bool:
    """Whether ``text`` asks for parts that build on each other (a process, a second
    question on the first's answer): graph mode rather than independent points."""
    return _GRAPH(text)


def decide_by_rules(text: str) -> RouteDecision:
    """The rules' decision on all of ``text``, in time linear in its length."""
    for name, matches in _SEQUENTIAL:
        if matches(text):
            return RouteDecision(mode="sequential", source="rules", reason=f"looks like {name}")
    if parts_depend(text):
        return RouteDecision(mode="graph", source="rules", reason="parts build on each other")
    if _SOT(text):
        return RouteDecision(mode="sot", source="rules", reason="asks for several points")
    return RouteDecision(mode="sequential", source="rules", reason="no list-like wording")


_LETTER = re.compile(r"^\W*([ABC])\b")
_BY_LETTER: dict[str, tuple[ResolvedMode, str]] = {
    "A": ("sot", "model: independent points"),
    "B": ("graph", "model: points build on each other"),
    "C": ("sequential", "model: not a list"),
}


async def route_by_model(
    backend: Backend,
    renderer: prompts.ChatRenderer,
    question: str,
    usage: Usage,
    system: str = "",
) -> RouteDecision:
    """Ask the model (greedy, two tokens); unclear replies fall back to the rules.

    ``system`` is the request's system text, which opens the router's prompt as it
    opens the answer's (:func:`sotserve.prompt_heads.template_messages`): an
    operator's prompt can decide the answer's shape ("reply with code only"). A
    router prompt that does not fit the context is not sent: the rules decide.
    """
    ids = renderer.render(template_messages("router", system, question=question))
    limit = backend.max_model_len
    if limit is not None and len(ids) >= limit:
        fallback = route_by_rules(question)
        fallback.reason += f" (the router prompt has {len(ids)} tokens, the context {limit})"
        return fallback
    params = CompletionParams(max_tokens=backend.room(len(ids), 2), temperature=0.0)
    text = ""
    async for chunk in backend.complete(ids, params):
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
