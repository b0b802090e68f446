"""Pairwise LLM judge in the style of FastChat's MT-bench ``pair-v2`` prompt.

A judge model sees a question and two answers, labelled assistant A and assistant B,
reasons briefly, and ends with ``[[A]]``, ``[[B]]`` or ``[[C]]`` (a tie).
:func:`judge_pair` asks it twice with the answers swapped, so a judge that prefers
whichever answer comes first cannot make either side win, and combines the two
verdicts by FastChat's rule (:func:`combine`).

Judges: :class:`HTTPJudge` for any OpenAI-compatible ``/v1/chat/completions`` server
(a sotserve server is asked for plain sequential decoding), :class:`LocalJudge` for an
in-process :class:`engine.AsyncEngine`.
"""

from __future__ import annotations

import asyncio
import re
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel

from sotserve.client import APIConnectionError, APIError, AsyncClient
from sotserve.openai_http import root_url

if TYPE_CHECKING:
    from engine.async_engine import AsyncEngine

Verdict = Literal["A", "B", "tie"]
Outcome = Literal["win", "tie", "loss", "invalid"]
OUTCOMES: tuple[Outcome, ...] = ("win", "tie", "loss", "invalid")

#: Tokens the judge may write (reasoning plus verdict).
JUDGE_MAX_TOKENS = 512

SYSTEM_PROMPT = (
    "You are a fair and impartial judge. You will be shown a question from a user and "
    "the answers that two AI assistants gave to it. Decide which assistant answered the "
    "question better: the better answer follows the user's instructions and addresses "
    "the question more helpfully, relevantly, accurately and thoroughly, with a "
    "suitable level of detail. Begin by comparing the two answers and explain your "
    "reasoning in a few sentences. Do not let the order in which the answers are shown "
    "sway your decision, do not prefer an answer just because it is longer, and do not "
    "favour either assistant because of its name. Be as objective as you can. After "
    'your explanation, state your final verdict in exactly this form: "[[A]]" if '
    "assistant A's answer is better, \"[[B]]\" if assistant B's answer is better, or "
    '"[[C]]" if the two are equally good (a tie).'
)

#: Asked once more when a reply states no verdict (small judges often ramble on):
#: the reply then stays in the conversation and only the verdict is wanted.
FOLLOWUP_PROMPT = (
    'State your final verdict now as exactly one of "[[A]]", "[[B]]" or "[[C]]", and nothing else.'
)
#: Tokens the judge may write when asked again.
FOLLOWUP_MAX_TOKENS = 8

USER_TEMPLATE = (
    "[User Question]\n{question}\n\n"
    "[The Start of Assistant A's Answer]\n{answer_a}\n[The End of Assistant A's Answer]\n\n"
    "[The Start of Assistant B's Answer]\n{answer_b}\n[The End of Assistant B's Answer]"
)


class JudgeError(Exception):
    """The judge could not be asked (server error, unreachable, prompt cannot fit)."""


def build_messages(question: str, answer_a: str, answer_b: str) -> list[dict[str, str]]:
    """The chat messages that ask the judge to compare ``answer_a`` with ``answer_b``."""
    user = USER_TEMPLATE.format(question=question, answer_a=answer_a, answer_b=answer_b)
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


# -- parsing the verdict ---------------------------------------------------------------

_LETTERS: dict[str, Verdict] = {"a": "A", "b": "B", "c": "tie", "tie": "tie"}
# Preferred: [[A]], [[ b ]], [[C]], [[tie]] (any case).
_DOUBLE = re.compile(r"\[\[\s*(A|B|C|tie)\s*\]\]", re.IGNORECASE)
# Tolerated: [A], [B], [C] (capitals only: "[a]" is more often a footnote), [tie].
_SINGLE = re.compile(r"(?<!\[)\[\s*(A|B|C|(?i:tie))\s*\](?!\])")
# Last resort: "Final verdict: A", "verdict is Assistant B", "Winner: tie". The letter
# must be a capital, so "the verdict is a tie" reads as a tie and not as "A".
_KEYWORD = re.compile(
    r"(?i:verdict|decision|winner)(?:\s+(?i:is))?\s*[:\-]?\s*[*\"'`]*\s*"
    r"(?:(?i:assistant)\s+)?(?:(?:(?i:a)\s+)?((?i:tie))|([ABC]))\b"
)
# Words that, between two different bracketed verdicts on one line, mark the second
# as the conclusion ("[[A]] has more detail, so my verdict is [[B]]").
_CONCLUSION = re.compile(
    r"\b(?:verdict|final|therefore|thus|hence|overall|conclusion|so|decision|winner)\b",
    re.IGNORECASE,
)
_AMBIGUOUS = "ambiguous"


def _bracket_verdict(text: str, pattern: re.Pattern[str]) -> tuple[str | None, int]:
    """The verdict of the last ``pattern`` match, :data:`_AMBIGUOUS`, or None; and the
    end of the last match (0 if none).

    The last match is ambiguous when an earlier match on its line names another
    verdict and no conclusion word stands between them (``[[A]] or [[B]]``, an echo of
    the instructions, "[[A]] is better than [[B]]").
    """
    matches = list(pattern.finditer(text))
    if not matches:
        return None, 0
    last = matches[-1]
    verdict = _LETTERS[last.group(1).lower()]
    line_start = text.rfind("\n", 0, last.start()) + 1
    for m in reversed(matches[:-1]):
        if m.start() < line_start:
            break
        if _LETTERS[m.group(1).lower()] != verdict:
            between = text[m.end() : last.start()]
            return (verdict if _CONCLUSION.search(between) else _AMBIGUOUS), last.end()
    return verdict, last.end()


def _keyword_verdict(text: str) -> Verdict | None:
    """The verdict named after "verdict"/"decision"/"winner", if every such mention
    names the same one."""
    found: set[Verdict] = set()
    for m in _KEYWORD.finditer(text):
        found.add("tie" if m.group(1) else _LETTERS[m.group(2).lower()])
    return found.pop() if len(found) == 1 else None


def parse_verdict(text: str) -> Verdict | None:
    """The judge's final verdict: ``"A"``, ``"B"``, ``"tie"``, or None if it gave none.

    The last ``[[A]]``/``[[B]]``/``[[C]]`` wins (any case, spaces inside allowed), so
    verdicts quoted in the reasoning do not count. Without double brackets the last
    single-bracket ``[A]``/``[B]``/``[C]`` is taken, and without those a "verdict: A"
    phrase if all such phrases agree. Conflicting markers at the end (``[[A]] or
    [[B]]``) give None unless a "verdict:"-style phrase after them settles it.
    """
    if not text:
        return None
    for pattern in (_DOUBLE, _SINGLE):
        verdict, end = _bracket_verdict(text, pattern)
        if verdict == _AMBIGUOUS:
            return _keyword_verdict(text[end:])
        if verdict is not None:
            return verdict  # type: ignore[return-value]
    return _keyword_verdict(text)


# -- judges ------------------------------------------------------------------------------


class Judge(ABC):
    """A model that answers chat messages; ``name`` says which, for reports."""

    name: str = "judge"
    #: Ask once more, for the verdict alone, when a reply states none.
    ask_again: bool = True

    @abstractmethod
    async def complete(self, messages: list[dict[str, str]], max_tokens: int | None = None) -> str:
        """The judge's reply to ``messages`` (greedy), at most ``max_tokens`` long
        (None: the judge's own limit); raises :class:`JudgeError`."""

    def fit_answers(
        self, question: str, answer_a: str, answer_b: str
    ) -> tuple[str, str, str | None]:
        """Shorten the answers if the prompt would not fit the judge's context.

        Returns ``(answer_a, answer_b, note)``; ``note`` says what was cut (None: nothing).
        The default trusts the judge's context to be large enough.
        """
        return answer_a, answer_b, None


class HTTPJudge(Judge):
    """A judge behind an OpenAI-compatible ``POST /v1/chat/completions``, asked
    through :class:`sotserve.client.AsyncClient`.

    ``base_url`` may end in ``/v1`` or not. A sotserve server (its ``/v1/models`` card
    says ``"owned_by": "sotserve"``) is sent ``"sot": {"mode": "sequential"}`` so the
    judge decodes plainly; no other server ever sees the ``sot`` field.
    """

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        api_key: str | None = None,
        timeout: float = 120.0,
        *,
        max_tokens: int = JUDGE_MAX_TOKENS,
    ) -> None:
        self.url = root_url(base_url)
        self.model = model
        self.api_key = api_key
        self.max_tokens = max_tokens
        self.timeout = timeout
        self._sotserve: bool | None = None
        self.name = f"{model or 'default model'} @ {self.url}/v1"

    def _client(self) -> AsyncClient:
        # One client (so one session) per call: judge calls are few and slow, and a
        # session must not outlive the event loop that made it.
        return AsyncClient(self.url, timeout=self.timeout, api_key=self.api_key, model=self.model)

    async def is_sotserve(self) -> bool:
        """Whether the server is sotserve's (asked once, from ``GET /v1/models``).

        A server without a usable ``/v1/models`` is taken for another server.
        """
        if self._sotserve is None:
            try:
                async with self._client() as client:
                    cards = await client.model_cards()
            except APIConnectionError as exc:
                raise JudgeError(f"cannot reach the judge: {exc}") from exc
            except APIError:  # an error status or a body that is no model list
                cards = []
            self._sotserve = any(c.get("owned_by") == "sotserve" for c in cards)
        return self._sotserve

    async def complete(self, messages: list[dict[str, str]], max_tokens: int | None = None) -> str:
        mode = "sequential" if await self.is_sotserve() else None
        try:
            async with self._client() as client:
                result = await client.chat(
                    messages, mode, temperature=0, max_tokens=max_tokens or self.max_tokens
                )
        except APIConnectionError as exc:
            raise JudgeError(f"cannot reach the judge: {exc}") from exc
        except APIError as exc:
            if exc.status is None:  # the answer was not a chat completion (names the URL)
                raise JudgeError(f"bad answer from the judge: {exc.message}") from exc
            raise JudgeError(
                f"the judge at {self.url}/v1/chat/completions answered HTTP {exc.status}: "
                f"{exc.message}"
            ) from exc
        return result.content


class LocalJudge(Judge):
    """A judge on an in-process :class:`engine.AsyncEngine`, decoding greedily.

    Answers too long for the engine's ``max_model_len`` (prompt plus ``max_tokens``
    reply) are cut in the middle, keeping their start and end (:meth:`fit_answers`).
    """

    #: Tokens kept free besides the reply, for re-tokenization at the cut points.
    MARGIN = 8

    def __init__(
        self, engine: AsyncEngine, max_tokens: int = JUDGE_MAX_TOKENS, name: str | None = None
    ) -> None:
        self.engine = engine
        self.max_tokens = max_tokens
        self.name = name or f"{engine.model_name} (in-process)"

    def _prompt_len(self, question: str, answer_a: str, answer_b: str) -> int:
        return len(self.engine.apply_chat_template(build_messages(question, answer_a, answer_b)))

    def _budget(self) -> int:
        """The longest prompt that leaves room for the reply."""
        return self.engine.max_model_len - self.max_tokens

    def fit_answers(
        self, question: str, answer_a: str, answer_b: str
    ) -> tuple[str, str, str | None]:
        budget = self._budget()
        if self._prompt_len(question, answer_a, answer_b) <= budget:
            return answer_a, answer_b, None
        tok = self.engine.tokenizer
        ids_a = tok.encode(answer_a, add_special_tokens=False)
        ids_b = tok.encode(answer_b, add_special_tokens=False)
        marker = len(tok.encode(_cut_marker(10**6), add_special_tokens=False))
        room = budget - self._prompt_len(question, "", "") - 2 * marker - self.MARGIN
        for _ in range(8):
            if room < 16:
                raise JudgeError(
                    f"the question alone nearly fills the judge's {self.engine.max_model_len}"
                    "-token context; no room for the answers"
                )
            keep_a, keep_b = split_budget(len(ids_a), len(ids_b), room)
            cut_a, cut_b = (
                _middle_out(tok, answer_a, ids_a, keep_a),
                _middle_out(tok, answer_b, ids_b, keep_b),
            )
            over = self._prompt_len(question, cut_a, cut_b) - budget
            if over <= 0:
                note = (
                    f"answers cut in the middle to fit the judge's {self.engine.max_model_len}"
                    f"-token context: A {len(ids_a)}->{min(keep_a, len(ids_a))} tokens, "
                    f"B {len(ids_b)}->{min(keep_b, len(ids_b))} tokens"
                )
                return cut_a, cut_b, note
            room -= over + self.MARGIN
        raise JudgeError("could not fit the answers into the judge's context")

    async def complete(self, messages: list[dict[str, str]], max_tokens: int | None = None) -> str:
        from engine.errors import EngineError
        from engine.sampling_params import SamplingParams

        try:
            ids = self.engine.apply_chat_template(messages)
            limit = self.engine.max_model_len
            if len(ids) >= limit:
                raise JudgeError(
                    f"the judge prompt has {len(ids)} tokens; the judge's context is {limit}"
                )
            params = SamplingParams(
                max_tokens=min(max_tokens or self.max_tokens, limit - len(ids)), temperature=0
            )
            parts = [d.text async for d in self.engine.generate(ids, params)]
        except EngineError as exc:
            raise JudgeError(f"the local judge failed: {exc}") from exc
        return "".join(parts)


def _cut_marker(omitted: int) -> str:
    return f"\n[... {omitted} tokens omitted ...]\n"


def split_budget(len_a: int, len_b: int, room: int) -> tuple[int, int]:
    """Tokens to keep of two answers sharing ``room``: a short answer keeps all it
    has, the long one gets the rest; two long ones get half each."""
    half = room // 2
    if len_a <= half:
        return len_a, room - len_a
    if len_b <= half:
        return room - len_b, len_b
    return half, room - half


def _middle_out(tok: Any, text: str, ids: list[int], keep: int) -> str:
    """``text`` cut to about ``keep`` tokens: two thirds from its start, one third from
    its end, and a marker saying how much is gone between."""
    if len(ids) <= keep:
        return text
    tail = keep // 3
    head = keep - tail
    end = tok.decode(ids[len(ids) - tail :]) if tail else ""
    return tok.decode(ids[:head]) + _cut_marker(len(ids) - keep) + end


# -- pairwise verdicts -------------------------------------------------------------------


class PairVerdict(BaseModel):
    """How ``answer`` fared against the baseline, asked in both orders.

    ``first``: the verdict with ``answer`` shown as assistant A; ``second``: with
    ``answer`` shown as assistant B (so ``second == "B"`` favours ``answer``).
    """

    outcome: Outcome
    first: Verdict | None
    second: Verdict | None
    first_text: str
    second_text: str
    truncated: bool = False  # the answers were cut to fit the judge's context
    note: str | None = None


def combine(first: Verdict | None, second: Verdict | None) -> Outcome:
    """FastChat's rule: both orders agree -> win/loss; a tie in either order, or
    disagreement -> tie; a verdict missing in either order -> invalid."""
    if first is None or second is None:
        return "invalid"
    if first == "A" and second == "B":
        return "win"
    if first == "B" and second == "A":
        return "loss"
    return "tie"


async def judge_pair(judge: Judge, question: str, answer: str, baseline_answer: str) -> PairVerdict:
    """Judge ``answer`` against ``baseline_answer`` in both orders (concurrently).

    A verdict the judge fails to state makes the outcome ``"invalid"``; a judge that
    cannot be asked at all raises :class:`JudgeError`.
    """
    ans_a, base_b, note1 = judge.fit_answers(question, answer, baseline_answer)
    base_a, ans_b, note2 = judge.fit_answers(question, baseline_answer, answer)
    tasks = [
        asyncio.ensure_future(_ask(judge, build_messages(question, ans_a, base_b))),
        asyncio.ensure_future(_ask(judge, build_messages(question, base_a, ans_b))),
    ]
    try:
        (first, text1), (second, text2) = await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:  # one order failed (or we were cancelled): drop the other
            t.cancel()
        raise
    notes = [n for n in (note1, note2) if n]
    return PairVerdict(
        outcome=combine(first, second),
        first=first,
        second=second,
        first_text=text1,
        second_text=text2,
        truncated=bool(notes),
        note="; ".join(dict.fromkeys(notes)) or None,
    )


async def _ask(judge: Judge, messages: list[dict[str, str]]) -> tuple[Verdict | None, str]:
    """One order's verdict and the judge's text; asks again for the verdict alone if
    the reply states none (the follow-up's text is kept after a marker)."""
    text = await judge.complete(messages)
    verdict = parse_verdict(text)
    if verdict is not None or not judge.ask_again:
        return verdict, text
    followup = [
        *messages,
        {"role": "assistant", "content": text},
        {"role": "user", "content": FOLLOWUP_PROMPT},
    ]
    try:
        again = await judge.complete(followup, max_tokens=FOLLOWUP_MAX_TOKENS)
    except JudgeError as exc:  # e.g. the conversation no longer fits: no verdict
        return None, f"{text}\n[asked again: {exc}]"
    return parse_verdict(again) or parse_letter(again), f"{text}\n[asked again]\n{again}"


def parse_letter(text: str) -> Verdict | None:
    """A reply that is just the letter: ``A``, ``[B]``, ``C.`` (C is a tie)."""
    m = re.fullmatch(r"\W*([ABC])\W*", text.strip())
    if m is None:
        return None
    return "tie" if m.group(1) == "C" else m.group(1)  # type: ignore[return-value]


def tally(verdicts: Iterable[PairVerdict]) -> dict[str, int]:
    """Counts of each outcome: ``{"win", "tie", "loss", "invalid"}``, zeros included."""
    counts = Counter(v.outcome for v in verdicts)
    return {o: counts.get(o, 0) for o in OUTCOMES}
