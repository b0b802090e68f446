"""The pairwise judge: verdict parsing, both-order judging, the HTTP and local judges."""

from __future__ import annotations

import socket
from typing import Any

import pytest
from aiohttp import web

from evals.judge import (
    FOLLOWUP_MAX_TOKENS,
    FOLLOWUP_PROMPT,
    SYSTEM_PROMPT,
    HTTPJudge,
    Judge,
    JudgeError,
    LocalJudge,
    PairVerdict,
    build_messages,
    combine,
    judge_pair,
    parse_letter,
    parse_verdict,
    split_budget,
    tally,
)

QUESTION = "How can I improve my sleep?"
ANSWER = "1. **Schedule** Go to bed at the same time.\n2. **Screens** No phones in bed."
BASELINE = "Try to sleep more."

# -- parse_verdict -------------------------------------------------------------------------

REASONED_B = """Assistant A gives a one-line answer. Someone might argue for [[A]] because \
it is concise, but brevity is not a merit here. Assistant B lists concrete steps, each \
explained, and covers more ground than A; I would not pick [[A]].

[[B]]"""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Both are fine, but B is more specific.\n\n[[B]]", "B"),
        ("Assistant A is more accurate. Final verdict: [[A]]", "A"),
        ("Both answers are equally helpful. [[C]]", "tie"),
        (REASONED_B, "B"),  # [[A]] mentioned twice in the reasoning, the last one counts
        ("A is clearly better.\n[[a]]", "A"),  # lowercase
        ("My verdict: [[ B ]]", "B"),  # spaces inside
        ("**Final Verdict:** **[[A]]**", "A"),  # markdown around it
        ("They are equally good.\n[[tie]]", "tie"),
        ("Verdict: [B]", "B"),  # single brackets are tolerated
        ("Assistant B covers more, so the verdict is B.", "B"),  # keyword form
        ("Final verdict: Assistant A", "A"),
        ("After weighing both, the verdict is a tie.", "tie"),  # "a" is not assistant A
        # [[A]] in the reasoning, a conclusion word before the final [[B]] on one line
        ("[[A]] is shorter, therefore my verdict is [[B]]", "B"),
        # the double-bracket form wins over other forms
        ("Verdict: A. On reflection, no.\n[[B]]", "B"),
    ],
)
def test_parse_verdict(text, expected):
    assert parse_verdict(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   \n",
        "Assistant A is more detailed while Assistant B is more concise.",  # no verdict
        "Both answers have merits. My final verdict is [[",  # truncated at max_tokens
        "Assistant A's answer is more thorough and Assistant B's",  # truncated earlier
        "I cannot decide: [[A]] or [[B]]",  # conflicting
        'Output "[[A]]" if A is better, "[[B]]" if B is better, "[[C]]" for a tie.',  # echo
        "[[A]] is better than [[B]]",  # which one?
        "Verdict: A ... no wait, verdict: B",  # keyword form disagrees with itself
        "[[D]]",
        "Decision: After careful thought, both are long.",  # "After" is no "A"
    ],
)
def test_parse_verdict_none(text):
    assert parse_verdict(text) is None


def test_ambiguous_echo_then_keyword_verdict():
    text = 'I must answer "[[A]]", "[[B]]" or "[[C]]".\nAssistant A is better. Verdict: A'
    assert parse_verdict(text) == "A"


def test_prompt_shape():
    system, user = build_messages(QUESTION, "first", "second")
    assert system == {"role": "system", "content": SYSTEM_PROMPT}
    assert "[[A]]" in SYSTEM_PROMPT and "[[B]]" in SYSTEM_PROMPT and "[[C]]" in SYSTEM_PROMPT
    assert user["role"] == "user"
    assert user["content"] == (
        f"[User Question]\n{QUESTION}\n\n"
        "[The Start of Assistant A's Answer]\nfirst\n[The End of Assistant A's Answer]\n\n"
        "[The Start of Assistant B's Answer]\nsecond\n[The End of Assistant B's Answer]"
    )


# -- judge_pair with a scripted judge --------------------------------------------------------


async def test_a_reply_without_verdict_is_asked_again_for_the_verdict_alone():
    judge = ScriptedJudge("Both answers talk about sleep. Sleep is", "[[B]]", followup="A")
    v = await judge_pair(judge, QUESTION, ANSWER, BASELINE)
    # first order: rambling, then "A" when asked again -> the answer wins both orders
    assert (v.first, v.second, v.outcome) == ("A", "B", "win")
    [(messages, max_tokens)] = judge.followup_calls
    assert messages[-2] == {
        "role": "assistant",
        "content": "Both answers talk about sleep. Sleep is",
    }
    assert max_tokens == FOLLOWUP_MAX_TOKENS
    assert "[asked again]" in v.first_text


@pytest.mark.parametrize(
    ("text", "verdict"),
    [("A", "A"), ("[B]", "B"), (" C. ", "tie"), ("[[A]]", "A"), ("A or B", None), ("", None)],
)
def test_parse_letter(text, verdict):
    assert (parse_verdict(text) or parse_letter(text)) == verdict


class ScriptedJudge(Judge):
    """Replies from a script keyed by which answer is shown as assistant A.

    Scripted on purpose: a real model cannot be made to give chosen verdicts, and these
    tests are about how two verdicts combine, not about judging.
    """

    name = "scripted"

    def __init__(
        self, when_answer_first: str, when_baseline_first: str, followup: str = "Hmm."
    ) -> None:
        self.replies = {ANSWER: when_answer_first, BASELINE: when_baseline_first}
        self.followup = followup
        self.calls: list[list[dict[str, str]]] = []
        self.followup_calls: list[tuple[list[dict[str, str]], int | None]] = []

    async def complete(self, messages: list[dict[str, str]], max_tokens: int | None = None) -> str:
        if messages[-1]["content"] == FOLLOWUP_PROMPT:  # asked again for the verdict
            self.followup_calls.append((messages, max_tokens))
            return self.followup
        self.calls.append(messages)
        user = messages[-1]["content"]
        shown_first = user.split("[The Start of Assistant A's Answer]\n")[1].split("\n[The End")[0]
        return self.replies[shown_first]


@pytest.mark.parametrize(
    ("first", "second", "outcome"),
    [
        ("Answer A is better. [[A]]", "B wins. [[B]]", "win"),  # both orders favour answer
        ("[[B]]", "[[A]]", "loss"),  # both favour the baseline
        ("[[A]]", "[[A]]", "tie"),  # position bias: always the first one
        ("[[B]]", "[[B]]", "tie"),  # always the second one
        ("[[C]]", "[[B]]", "tie"),  # tie in one order
        ("[[C]]", "[[C]]", "tie"),
        ("[[A]]", "I am not sure.", "invalid"),  # second order unparseable
        ("", "[[B]]", "invalid"),
    ],
)
async def test_judge_pair_outcomes(first, second, outcome):
    judge = ScriptedJudge(first, second)
    verdict = await judge_pair(judge, QUESTION, ANSWER, BASELINE)
    assert verdict.outcome == outcome
    assert verdict.first == parse_verdict(first)
    assert verdict.second == parse_verdict(second)
    # a reply without a verdict is asked again; "Hmm." settles nothing
    asked_again = [parse_verdict(t) is None for t in (first, second)]
    assert len(judge.followup_calls) == sum(asked_again)
    for text, reply, again in zip(
        (verdict.first_text, verdict.second_text), (first, second), asked_again, strict=True
    ):
        assert text == (f"{reply}\n[asked again]\nHmm." if again else reply)
    assert verdict.truncated is False and verdict.note is None


async def test_judge_pair_asks_both_orders_with_swapped_answers():
    judge = ScriptedJudge("[[A]]", "[[B]]")
    await judge_pair(judge, QUESTION, ANSWER, BASELINE)
    users = sorted(call[-1]["content"] for call in judge.calls)
    assert len(users) == 2
    answer_first = build_messages(QUESTION, ANSWER, BASELINE)[1]["content"]
    baseline_first = build_messages(QUESTION, BASELINE, ANSWER)[1]["content"]
    assert users == sorted([answer_first, baseline_first])
    assert all(call[0]["content"] == SYSTEM_PROMPT for call in judge.calls)


async def test_judge_pair_propagates_judge_errors():
    class Broken(ScriptedJudge):
        async def complete(self, messages, max_tokens=None):
            raise JudgeError("judge is down")

    with pytest.raises(JudgeError, match="down"):
        await judge_pair(Broken("", ""), QUESTION, ANSWER, BASELINE)


def test_combine_and_tally():
    assert combine("A", "B") == "win" and combine("B", "A") == "loss"
    assert combine("tie", "A") == "tie" and combine(None, "B") == "invalid"
    verdicts = [
        PairVerdict(outcome=o, first=None, second=None, first_text="", second_text="")
        for o in ["win", "win", "invalid", "tie"]
    ]
    assert tally(verdicts) == {"win": 2, "tie": 1, "loss": 0, "invalid": 1}
    assert tally([]) == {"win": 0, "tie": 0, "loss": 0, "invalid": 0}


def test_split_budget():
    assert split_budget(10, 1000, 100) == (10, 90)
    assert split_budget(1000, 10, 100) == (90, 10)
    assert split_budget(1000, 1000, 100) == (50, 50)


# -- HTTPJudge against a fake OpenAI server ----------------------------------------------------


class FakeOpenAI:
    """A tiny OpenAI-compatible server on 127.0.0.1 that records request bodies."""

    def __init__(
        self,
        owned_by: str = "openai",
        status: int = 200,
        models_status: int = 200,
        reply: dict[str, Any] | None = None,
    ) -> None:
        self.owned_by = owned_by
        self.status = status
        self.models_status = models_status
        msg = {"role": "assistant", "content": "B is more helpful.\n[[B]]"}
        self.reply = reply or {
            "object": "chat.completion",
            "choices": [{"index": 0, "message": msg}],
        }
        self.bodies: list[dict[str, Any]] = []
        self.keys: list[tuple[str, str | None]] = []  # (path, Authorization) of each request
        self.app = web.Application()
        self.app.router.add_get("/v1/models", self.models)
        self.app.router.add_post("/v1/chat/completions", self.chat)

    async def models(self, request: web.Request) -> web.Response:
        self.keys.append((request.path, request.headers.get("Authorization")))
        if self.models_status != 200:
            return web.json_response({"error": {"message": "no"}}, status=self.models_status)
        card = {"id": "judge-model", "object": "model", "owned_by": self.owned_by}
        return web.json_response({"object": "list", "data": [card]})

    async def chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.bodies.append(body)
        self.keys.append((request.path, request.headers.get("Authorization")))
        if self.status != 200:
            err = {"message": "the model crashed", "type": "server_error"}
            return web.json_response({"error": err}, status=self.status)
        return web.json_response(self.reply)


@pytest.fixture
async def fake_server():
    servers = []

    async def start(**kw):
        fake = FakeOpenAI(**kw)
        runner = web.AppRunner(fake.app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        servers.append(runner)
        return fake, f"http://127.0.0.1:{port}"

    yield start
    for runner in servers:
        await runner.cleanup()


@pytest.mark.parametrize("suffix", ["", "/", "/v1", "/v1/"])
async def test_http_judge_plain_server_gets_no_sot_field(fake_server, suffix):
    fake, url = await fake_server(owned_by="openai")
    judge = HTTPJudge(url + suffix, "judge-model", api_key="sk-test")
    messages = build_messages(QUESTION, ANSWER, BASELINE)
    assert await judge.complete(messages) == "B is more helpful.\n[[B]]"
    (body,) = fake.bodies
    assert body == {
        "model": "judge-model",
        "messages": messages,
        "temperature": 0,
        "max_tokens": 512,
        "stream": False,
    }
    assert "sot" not in body
    assert judge.name == f"judge-model @ {url}/v1"
    # the key goes with every request, the model probe too
    assert fake.keys == [
        ("/v1/models", "Bearer sk-test"),
        ("/v1/chat/completions", "Bearer sk-test"),
    ]


async def test_http_judge_asks_a_sotserve_server_for_sequential_decoding(fake_server):
    fake, url = await fake_server(owned_by="sotserve")
    judge = HTTPJudge(url, "judge-model")
    verdict = await judge_pair(judge, QUESTION, ANSWER, BASELINE)
    assert verdict.first == verdict.second == "B"  # the fake always says B
    assert verdict.outcome == "tie"
    assert len(fake.bodies) == 2
    for body in fake.bodies:
        assert body["sot"] == {"mode": "sequential"}
        assert body["temperature"] == 0 and body["max_tokens"] == 512


async def test_http_judge_server_error(fake_server):
    _, url = await fake_server(status=500)
    judge = HTTPJudge(url, "judge-model")
    with pytest.raises(
        JudgeError, match=r"/v1/chat/completions answered HTTP 500: the model crashed"
    ):
        await judge.complete(build_messages(QUESTION, ANSWER, BASELINE))


async def test_http_judge_bad_answer(fake_server):
    _, url = await fake_server(reply={"object": "chat.completion"})  # no choices
    judge = HTTPJudge(url, "judge-model")
    with pytest.raises(JudgeError, match=r"bad answer from the judge: .*unexpected body"):
        await judge.complete(build_messages(QUESTION, ANSWER, BASELINE))


async def test_http_judge_takes_a_server_without_models_for_a_plain_one(fake_server):
    fake, url = await fake_server(models_status=404)
    judge = HTTPJudge(url + "/v1")
    assert await judge.is_sotserve() is False
    assert await judge.complete(build_messages(QUESTION, ANSWER, BASELINE))
    assert "sot" not in fake.bodies[0] and "model" not in fake.bodies[0]


async def test_http_judge_unreachable_names_the_url():
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    judge = HTTPJudge(f"http://127.0.0.1:{port}", "judge-model", timeout=5)
    with pytest.raises(JudgeError, match=rf"127\.0\.0\.1:{port}/v1"):
        await judge.complete(build_messages(QUESTION, ANSWER, BASELINE))


# -- LocalJudge --------------------------------------------------------------------------------


@pytest.fixture
def tiny_engine(tiny_llama_dir):
    from engine import AsyncEngine

    engine = AsyncEngine(str(tiny_llama_dir), kv_slots=512)  # max_model_len 512
    yield engine
    engine.close()


async def test_local_judge_cuts_long_answers_to_fit(tiny_engine):
    """A random-weight model says nothing useful; this is about fitting the context."""
    judge = LocalJudge(tiny_engine, max_tokens=16)
    assert tiny_engine.max_model_len == 512
    short = judge.fit_answers(QUESTION, ANSWER, BASELINE)
    assert short == (ANSWER, BASELINE, None)

    long_answer = "Sleep is important for health and mood. " * 150  # ~1200 tokens
    a, b, note = judge.fit_answers(QUESTION, long_answer, BASELINE)
    assert b == BASELINE and len(a) < len(long_answer) and "tokens omitted" in a
    assert a.startswith("Sleep is important") and note and "512-token context" in note
    prompt = tiny_engine.apply_chat_template(build_messages(QUESTION, a, b))
    assert len(prompt) + 16 <= 512

    verdict = await judge_pair(judge, QUESTION, long_answer, long_answer + " More.")
    assert isinstance(verdict, PairVerdict) and verdict.truncated and verdict.note
    assert verdict.first_text and verdict.second_text  # greedy text of 16 tokens each


async def test_local_judge_question_too_long(tiny_engine):
    judge = LocalJudge(tiny_engine, max_tokens=16)
    with pytest.raises(JudgeError, match="question alone"):
        judge.fit_answers("why " * 600, ANSWER, BASELINE)


@pytest.mark.slow
async def test_local_judge_on_the_embedded_model():
    from engine import AsyncEngine

    engine = AsyncEngine()  # the embedded SmolLM2-135M-Instruct
    try:
        judge = LocalJudge(engine)
        reply = await judge.complete(build_messages(QUESTION, ANSWER, BASELINE))
        assert reply.strip()
        verdict = await judge_pair(judge, QUESTION, ANSWER, BASELINE)
        assert verdict.outcome in ("win", "tie", "loss", "invalid")  # any outcome
        assert verdict.first_text.strip() and verdict.second_text.strip()
    finally:
        engine.close()


@pytest.mark.slow
async def test_http_judge_on_a_real_sotserve_server(sotserve_url):
    """The real server accepts the ``sot`` field the judge adds and answers plainly."""
    judge = HTTPJudge(sotserve_url)
    assert await judge.is_sotserve()
    reply = await judge.complete(build_messages(QUESTION, ANSWER, BASELINE))
    assert reply.strip()
