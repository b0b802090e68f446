"""Planner behaviour with a scripted backend (tests/scripted_backend.py): pipelining,
graph prompts, fallbacks and faults, which a real model cannot be made to show on cue.
The end-to-end tests with the real SmolLM2 are in test_planner_e2e.py."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest
from scripted_backend import ScriptedBackend, point_prompt_parents

from prompts import ChatRenderer
from sotserve.backends import (
    BackendOverloadedError,
    BackendRequestError,
    BackendUnavailableError,
)
from sotserve.planner import InvalidQuestionError, Planner, PlannerError, _parents_block
from sotserve.prompt_heads import common_prefix
from sotserve.schemas import (
    AnswerDelta,
    Done,
    ErrorEvent,
    PlanPoint,
    PlanReady,
    PointDelta,
    PointDone,
    PointStart,
    SkeletonDelta,
)

SKELETON = [" Alpha", "\n2.", " Beta", "\n3.", " Gamma", "\n"]


def script_for(skeleton=SKELETON, point_text=lambda c: [f" about {c.point}", "."]):
    def script(call):
        if call.kind == "skeleton":
            return skeleton
        if call.kind == "point":
            return point_text(call)
        return [" A plain", " answer."]

    return script


async def collect(planner, question, **kw):
    return [e async for e in planner.stream(question, **kw)]


async def test_sot_stream_events_and_merged_answer(tokenizer):
    backend = ScriptedBackend(tokenizer, script_for(), delay=0.01)
    events = await collect(Planner(backend), "Q?", mode="sot")
    types = [e.type for e in events]
    assert types[0] == "skeleton_delta" and types[-1] == "done"
    assert "".join(e.text for e in events if isinstance(e, SkeletonDelta)) == (
        "1. Alpha\n2. Beta\n3. Gamma\n"
    )
    plan = next(e for e in events if isinstance(e, PlanReady))
    assert plan.mode == "sot" and [p.title for p in plan.points] == ["Alpha", "Beta", "Gamma"]
    done = events[-1]
    assert isinstance(done, Done)
    expected = "1. **Alpha** about 1.\n\n2. **Beta** about 2.\n\n3. **Gamma** about 3."
    assert done.answer == expected
    assert "".join(e.text for e in events if isinstance(e, AnswerDelta)) == expected
    assert {e.index: e.text for e in events if isinstance(e, PointDone)} == {
        i: f"about {i}." for i in (1, 2, 3)
    }
    assert done.usage.requests == 4  # skeleton + 3 points
    t = done.timings
    assert 0 < t.skeleton_s <= t.total_s and 0 < t.first_answer_token_s <= t.total_s


async def test_point_parsed_after_earlier_points_finished_still_gets_its_header(tokenizer):
    # A slow skeleton: points 1 and 2 are done before line 3 is even written, so
    # point 3's header is due the moment it is parsed (found on SmolLM2 via HTTP).
    def delay(call):
        return 0.05 if call.kind == "skeleton" else 0.001

    backend = ScriptedBackend(tokenizer, script_for(), delay=delay)
    events = await collect(Planner(backend, pipeline=True), "Q?", mode="sot")
    done = events[-1]
    first_start3 = next(
        i for i, e in enumerate(events) if isinstance(e, PointStart) and e.point.index == 3
    )
    assert all(
        any(isinstance(e, PointDone) and e.index == i for e in events[:first_start3])
        for i in (1, 2)
    )
    expected = "1. **Alpha** about 1.\n\n2. **Beta** about 2.\n\n3. **Gamma** about 3."
    assert done.answer == expected
    assert "".join(e.text for e in events if isinstance(e, AnswerDelta)) == expected


async def test_point_events_come_in_order_per_point_and_answer_in_skeleton_order(tokenizer):
    # point 1 is slow, so points 2 and 3 finish first; the answer still starts with 1
    backend = ScriptedBackend(
        tokenizer, script_for(), delay=lambda c: 0.05 if c.point == 1 else 0.001
    )
    events = await collect(Planner(backend), "Q?", mode="sot")
    done_order = [e.index for e in events if isinstance(e, PointDone)]
    assert done_order[-1] == 1
    answer = "".join(e.text for e in events if isinstance(e, AnswerDelta))
    assert answer.index("Alpha") < answer.index("Beta") < answer.index("Gamma")
    # the live head (point 1) streams: its deltas reach the answer as they arrive
    first_point1 = next(
        i for i, e in enumerate(events) if isinstance(e, PointDelta) and e.index == 1
    )
    assert isinstance(events[first_point1 + 1], AnswerDelta)


async def test_pipeline_starts_points_before_the_skeleton_ends(tokenizer):
    for pipeline in (True, False):
        backend = ScriptedBackend(tokenizer, script_for(), delay=0.02)
        done = (await collect(Planner(backend, pipeline=pipeline), "Q?", mode="sot"))[-1]
        assert isinstance(done, Done) and len(done.points) == 3
        skeleton = next(c for c in backend.calls if c.kind == "skeleton")
        first_point = min(c.started for c in backend.calls if c.kind == "point")
        assert (first_point < skeleton.ended) is pipeline


async def test_the_answer_starts_with_skeleton_line_1(tokenizer):
    # the skeleton takes 0.05 s a piece, 6 pieces: point 1's header must not wait for it
    backend = ScriptedBackend(tokenizer, script_for(), delay=0.05)
    events = await collect(Planner(backend), "Q?", mode="sot")
    first_answer = next(i for i, e in enumerate(events) if isinstance(e, AnswerDelta))
    skeleton_pieces = [i for i, e in enumerate(events) if isinstance(e, SkeletonDelta)]
    # right after the skeleton's first token, as a sequential answer's first token
    alpha = next(i for i in skeleton_pieces if events[i].text == " Alpha")
    assert first_answer == alpha + 1  # the first piece after the prefilled "1."
    assert events[first_answer].text == "1. **Alpha"
    beta = next(i for i in skeleton_pieces if "Beta" in events[i].text)
    shown = "".join(e.text for e in events[:beta] if isinstance(e, AnswerDelta))
    assert shown.startswith("1. **Alpha**")  # the whole heading before line 2 is written


async def test_a_fallback_after_point_1_was_shown_continues_from_it(tokenizer):
    """One usable line, then prose: the answer already shows point 1, so sequential
    decoding continues the shown text (it is the reply's prefill) and nothing shown
    is taken back."""
    backend = ScriptedBackend(tokenizer, script_for([" Alpha", "\n", "That is all."]), delay=0.05)
    events = await collect(Planner(backend), "Q?", mode="sot")
    done = events[-1]
    assert isinstance(done, Done) and done.mode == "sequential" and done.fallback
    streamed = "".join(e.text for e in events if isinstance(e, AnswerDelta))
    assert streamed == done.answer
    assert done.answer.startswith("1. **Alpha**") and done.answer.endswith(" A plain answer.")
    chat = next(c for c in backend.calls if c.kind == "chat")
    shown = done.answer.removesuffix(" A plain answer.")
    assert chat.prompt.endswith("<|im_start|>assistant\n" + shown)
    # continuing a heading, the reply gets the fallback's repetition penalty
    assert chat.params.repetition_penalty == 1.15


async def test_a_fallback_continuing_a_heading_keeps_the_callers_penalties(tokenizer):
    def fallback_params(**options):
        backend = ScriptedBackend(tokenizer, script_for([" Alpha", "\n", "That is all."]))
        return backend, collect(Planner(backend, **options), "Q?", mode="sot")

    backend, answer = fallback_params(fallback_repetition_penalty=1.0)
    await answer
    assert next(c for c in backend.calls if c.kind == "chat").params.repetition_penalty == 1.0
    backend, answer = fallback_params(repetition_penalty=1.05)
    await answer
    assert next(c for c in backend.calls if c.kind == "chat").params.repetition_penalty == 1.05
    # a plain sequential answer shows nothing first: no penalty
    backend = ScriptedBackend(tokenizer, script_for())
    await collect(Planner(backend), "Q?", mode="sequential")
    assert next(c for c in backend.calls if c.kind == "chat").params.repetition_penalty == 1.0
    assert all(c.closed_early or c.ended for c in backend.calls)  # point 1 was stopped


async def test_point_prompts_continue_the_skeleton_tokens(tokenizer):
    backend = ScriptedBackend(tokenizer, script_for(), delay=0.0)
    await collect(Planner(backend, pipeline=False), "Q?", mode="sot")
    skeleton = next(c for c in backend.calls if c.kind == "skeleton")
    for call in (c for c in backend.calls if c.kind == "point"):
        assert call.prompt.startswith(skeleton.prompt + " Alpha\n2. Beta\n3. Gamma")
        title = ["Alpha", "Beta", "Gamma"][call.point - 1]
        assert call.prompt.endswith(
            "Now explain one point of the outline in two or three plain sentences. "
            f"Do not use a list or repeat other points.\n\nPoint {call.point}: {title}"
            f"<|im_end|>\n<|im_start|>assistant\n{call.point}. **{title}**"
        )


async def test_point_prompts_share_the_instruction(tokenizer):
    """Only a point's own line and reply opening follow the prefix every point of the
    answer shares, so the points after the first prefill a few tokens each."""
    backend = ScriptedBackend(tokenizer, script_for(), delay=0.0)
    await collect(Planner(backend, pipeline=False), "Q?", mode="sot")
    prompts = [c.prompt_ids for c in backend.calls if c.kind == "point"]
    assert len(prompts) == 3
    shared = common_prefix(common_prefix(prompts[0], prompts[1]), prompts[2])
    assert tokenizer.decode(shared).endswith("Do not use a list or repeat other points.\n\nPoint ")
    assert all(len(p) - len(shared) <= 16 for p in prompts)


async def test_graph_mode_runs_children_after_parents_with_their_text(tokenizer):
    skeleton = [" Costs of renting\n", "2. Costs of buying\n", "3. Compare [depends on 1, 2]\n",
                "4. Decide [depends on 3]"]  # fmt: skip
    backend = ScriptedBackend(
        tokenizer, script_for(skeleton, lambda c: [f" text of {c.point}"]), delay=0.01
    )
    events = await collect(Planner(backend), "Rent or buy?", mode="graph")
    plan = next(e for e in events if isinstance(e, PlanReady))
    assert [p.depends_on for p in plan.points] == [[], [], [1, 2], [3]]
    calls = {c.point: c for c in backend.calls if c.kind == "point"}
    assert calls[3].started >= max(calls[1].ended, calls[2].ended)
    assert calls[4].started >= calls[3].ended
    assert point_prompt_parents(calls[3].prompt) == (
        "1. Costs of renting: text of 1\n2. Costs of buying: text of 2"
    )
    assert point_prompt_parents(calls[4].prompt) == "3. Compare: text of 3"
    assert events[-1].answer.index("Costs of renting") < events[-1].answer.index("Decide")


@pytest.mark.parametrize("skeleton", [["Sorry, I can't make a list."], [" Only one point"]])
async def test_unparseable_skeleton_falls_back_to_sequential(tokenizer, skeleton):
    backend = ScriptedBackend(tokenizer, script_for(skeleton), delay=0.0)
    events = await collect(Planner(backend), "Q?", mode="sot")
    plan = next(e for e in events if isinstance(e, PlanReady))
    assert plan.mode == "sequential" and plan.fallback and "usable point" in plan.fallback
    done = events[-1]
    assert isinstance(done, Done) and done.mode == "sequential" and done.fallback
    # A line that reads as prose shows nothing before it is parsed; a lone point line
    # showed the start of its heading while it was written, and the sequential reply
    # continues that (nothing shown is taken back).
    shown = "" if "Sorry" in skeleton[0] else "1. **Only one point"
    assert done.answer == shown + " A plain answer."
    assert "".join(e.text for e in events if isinstance(e, AnswerDelta)) == done.answer
    assert not any(isinstance(e, PointStart) and e.point.index > 1 for e in events)
    assert all(c.closed_early or c.ended for c in backend.calls)  # nothing left running


@pytest.mark.parametrize("question", ["", "   ", [], [{"role": "user", "content": " "}],
                                      [{"role": "user"}], 42])  # fmt: skip
async def test_empty_or_malformed_question_is_a_typed_error(tokenizer, question):
    backend = ScriptedBackend(tokenizer, script_for())
    with pytest.raises(InvalidQuestionError):
        await collect(Planner(backend), question, mode="sot")
    assert backend.calls == []


async def test_backend_error_mid_stream_is_an_error_event_and_no_hang(tokenizer):
    def point_text(call):
        if call.point == 2:
            return [" half"], ConnectionError("backend went away")
        return [" fine"] * 200  # still running when point 2 fails

    backend = ScriptedBackend(tokenizer, script_for(point_text=point_text), delay=0.01)
    planner = Planner(backend, point_max_tokens=500)
    events = await asyncio.wait_for(collect(planner, "Q?", mode="sot"), 10)
    assert isinstance(events[-1], ErrorEvent)
    assert "backend went away" in events[-1].message
    assert not any(isinstance(e, Done) for e in events)
    assert all(c.ended is not None for c in backend.calls)  # every request was closed
    with pytest.raises(PlannerError, match="backend went away"):
        await planner.answer("Q?", mode="sot")


@pytest.mark.parametrize(
    ("error", "code", "error_code"),
    [
        (BackendOverloadedError("HTTP 429: busy"), "overloaded", None),
        (BackendUnavailableError("HTTP 500: broke", 502), "backend_unavailable", "bad_gateway"),
        (BackendUnavailableError("refused"), "backend_unavailable", "backend_unavailable"),
        # a remote server refusing what the planner built: our bug, not the caller's
        (BackendRequestError("HTTP 400: bad", "logit_bias", upstream=True), "backend_error",
         None),
        # unless the prompt was too long for it
        (BackendRequestError("HTTP 400: too long", None, "context_length_exceeded",
                             upstream=True), "invalid_request", "context_length_exceeded"),
        (BackendRequestError("engine: bad", "max_tokens"), "invalid_request", None),
    ],
)  # fmt: skip
async def test_backend_failures_end_the_answer_with_their_kind(tokenizer, error, code, error_code):
    def point_text(call):
        if call.point == 2:
            return [" half"], error
        return [" fine."]

    backend = ScriptedBackend(tokenizer, script_for(point_text=point_text), delay=0.0)
    events = await asyncio.wait_for(collect(Planner(backend), "Q?", mode="sot"), 10)
    last = events[-1]
    assert isinstance(last, ErrorEvent)
    assert (last.code, last.error_code) == (code, error_code)


async def test_closing_the_stream_aborts_every_request(tokenizer):
    backend = ScriptedBackend(
        tokenizer, script_for(point_text=lambda c: [" go"] * 1000), delay=0.01
    )
    stream = Planner(backend, point_max_tokens=2000).stream("Q?", mode="sot")
    async for event in stream:
        if isinstance(event, PointDelta):
            break
    await stream.aclose()
    points = [c for c in backend.calls if c.kind == "point"]
    assert points and all(c.closed_early and c.ended is not None for c in points)


async def test_max_tokens_caps_the_whole_answer(tokenizer):
    # distinct one-token words: a repeated one would be a loop, which the point writer
    # ends early
    vocab = (tokenizer.decode([t]) for t in range(2000, 20000))
    words = [w for w in vocab if w.startswith(" ") and w[1:].isalpha()][:100]
    backend = ScriptedBackend(tokenizer, script_for(point_text=lambda c: words), delay=0.0)
    done = await Planner(backend, max_tokens=30, point_max_tokens=20).answer("Q?", mode="sot")
    assert done.usage.completion_tokens <= 30
    assert done.finish_reason == "length"
    assert all(c.params.max_tokens <= 20 for c in backend.calls if c.kind == "point")


async def test_auto_mode_reports_the_route(tokenizer):
    backend = ScriptedBackend(tokenizer, script_for(), delay=0.0)
    planner = Planner(backend)
    done = await planner.answer("What are some tips for staying focused?", mode="auto")
    assert done.mode == "sot" and done.route.source == "rules"
    done = await planner.answer("Write a Python function that sorts a list.", mode="auto")
    assert done.mode == "sequential" and done.route.reason == "looks like code"


async def test_model_router_reads_the_letter_and_falls_back_on_junk(tokenizer):
    replies = iter([["B"], ["I think"]])
    backend = ScriptedBackend(
        tokenizer, lambda c: next(replies) if c.kind == "router" else script_for()(c)
    )
    planner = Planner(backend, router="model")
    done = await planner.answer("Anything at all?", mode="auto")
    assert done.route.source == "model" and done.mode == "graph"
    done = await planner.answer("What are some tips for sleeping well?", mode="auto")
    assert done.route.source == "rules" and "I think" in done.route.reason


async def test_requests_carry_the_answers_sampling_and_the_point_policy(tokenizer):
    backend = ScriptedBackend(tokenizer, script_for(), delay=0.0)
    planner = Planner(
        backend, frequency_penalty=0.5, repetition_penalty=1.2, logit_bias={7: 3.0},
        point_min_tokens=10, point_max_tokens=40,
    )  # fmt: skip
    await collect(planner, "Q?", mode="sot")
    skeleton = next(c for c in backend.calls if c.kind == "skeleton")
    points = [c for c in backend.calls if c.kind == "point"]
    assert len(points) == 3
    for call in [skeleton, *points]:
        assert call.params.frequency_penalty == 0.5 and call.params.repetition_penalty == 1.2
        assert call.params.logit_bias[7] == 3.0
    assert skeleton.params.priority < 0 and skeleton.params.min_tokens == 0
    texts = {t: tokenizer.decode([t]) for t in range(len(tokenizer))}
    barred = {t for t, text in texts.items() if "\n" in text or ":" in text}
    barred -= set(tokenizer.all_special_ids)
    for call in points:
        assert call.params.priority == 0 and call.params.min_tokens == 10
        assert call.params.max_tokens == 40 and call.params.stop == []
        # a point is one paragraph of prose: every token holding a line break or a
        # colon is banned, nothing else
        banned = {t for t, b in call.params.logit_bias.items() if b == -100.0}
        assert banned == barred
        assert any("\n" in texts[t] for t in banned) and any(":" in texts[t] for t in banned)


async def test_point_1s_heading_streams_while_its_skeleton_line_is_written(tokenizer):
    # The first answer token must not wait for the whole first line: the heading's
    # words show as the skeleton writes them, and the parsed heading continues them.
    skeleton = [" Set", " clear", " goals", "\n2.", " Beta", "\n3.", " Gamma", "\n"]
    backend = ScriptedBackend(tokenizer, script_for(skeleton), delay=0.02)
    events = await collect(Planner(backend), "Q?", mode="sot")
    answer = [(i, e.text) for i, e in enumerate(events) if isinstance(e, AnswerDelta)]
    pieces = [i for i, e in enumerate(events) if isinstance(e, SkeletonDelta)]
    at = {events[i].text: i for i in pieces}
    # each piece of the title shows as it arrives (a word may still grow: "Set" could
    # have become "Settle", and the text would have grown with it)
    assert answer[:3] == [(at[" Set"] + 1, "1. **Set"), (at[" clear"] + 1, " clear"),
                          (at[" goals"] + 1, " goals")]  # fmt: skip
    done = events[-1]
    assert isinstance(done, Done) and done.mode == "sot"
    assert done.answer.startswith("1. **Set clear goals** about 1.")
    assert "".join(text for _, text in answer) == done.answer


# -- system messages -----------------------------------------------------------------------
SYSTEM = "Speak like Captain Zed of the starship Oriole."


def system_chat(role="system", question="Q?"):
    return [{"role": role, "content": SYSTEM}, {"role": "user", "content": question}]


@pytest.mark.parametrize("role", ["system", "developer"])
@pytest.mark.parametrize("mode", ["sot", "graph"])
async def test_a_system_message_opens_the_skeleton_and_every_point_prompt(tokenizer, mode, role):
    backend = ScriptedBackend(tokenizer, script_for(), delay=0.0)
    done = (await collect(Planner(backend), system_chat(role), mode=mode))[-1]
    assert isinstance(done, Done) and done.mode == mode
    skeleton = next(c for c in backend.calls if c.kind == "skeleton")
    points = [c for c in backend.calls if c.kind == "point"]
    assert len(points) == 3
    for call in [skeleton, *points]:
        text = tokenizer.decode(call.prompt_ids)
        # one system turn: the request's text first, then the template's own
        assert text.startswith(
            f"<|im_start|>system\n{SYSTEM}\n\nYou are a helpful assistant who plans"
        )
        assert text.count("<|im_start|>system") == 1
    for call in points:  # still the skeleton request's own tokens, token for token
        assert call.prompt_ids[: len(skeleton.prompt_ids)] == skeleton.prompt_ids


async def test_every_system_message_of_the_chat_reaches_the_skeleton_in_order(tokenizer):
    messages = [
        {"role": "system", "content": "Rule one: be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "developer", "content": "Rule two: no jokes."},
        {"role": "user", "content": "Q?"},
    ]
    backend = ScriptedBackend(tokenizer, script_for(), delay=0.0)
    await collect(Planner(backend), messages, mode="sot")
    skeleton = next(c for c in backend.calls if c.kind == "skeleton")
    assert skeleton.prompt.startswith(
        "<|im_start|>system\nRule one: be brief.\n\nRule two: no jokes.\n\nYou are a helpful"
    )
    assert "user: Hi\nassistant: Hello!" in skeleton.prompt  # the turns stay in the question


async def test_a_system_message_holds_in_sequential_answers_and_fallbacks(tokenizer):
    backend = ScriptedBackend(tokenizer, script_for(["Sorry, no list."]), delay=0.0)
    planner = Planner(backend)
    done = await planner.answer(system_chat(), mode="sequential")
    assert done.mode == "sequential"
    done = await planner.answer(system_chat(), mode="sot")
    assert done.mode == "sequential" and done.fallback
    chats = [c for c in backend.calls if c.kind == "chat"]
    assert len(chats) == 2
    for call in chats:
        assert call.prompt.startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>")


async def test_the_model_router_reads_the_system_message(tokenizer):
    backend = ScriptedBackend(
        tokenizer, lambda c: ["A"] if c.kind == "router" else script_for()(c), delay=0.0
    )
    done = await Planner(backend, router="model").answer(system_chat(), mode="auto")
    assert done.route.source == "model" and done.mode == "sot"
    router = next(c for c in backend.calls if c.kind == "router")
    assert router.prompt.startswith(
        f"<|im_start|>system\n{SYSTEM}\n\nYou classify questions by the shape"
    )


# -- the context length --------------------------------------------------------------------
@dataclass
class ShortContextBackend(ScriptedBackend):
    """A scripted backend whose context is ``context`` tokens."""

    context: int = 8192

    @property
    def max_model_len(self) -> int:
        return self.context


LONG_QUESTION = "What are some tips for " + "really " * 300 + "good sleep?"  # auto: sot


def chat_tokens(tokenizer, question=LONG_QUESTION):
    return len(ChatRenderer(tokenizer).render([{"role": "user", "content": question}]))


@pytest.mark.parametrize("mode", ["sequential", "sot", "graph", "auto"])
async def test_a_chat_longer_than_the_context_is_the_first_event(tokenizer, mode):
    backend = ShortContextBackend(tokenizer, script_for(), context=chat_tokens(tokenizer))
    events = await collect(Planner(backend, router="model"), LONG_QUESTION, mode=mode)
    assert len(events) == 1 and isinstance(events[0], ErrorEvent)
    error = events[0]
    assert (error.code, error.param, error.error_code) == (
        "invalid_request", "messages", "context_length_exceeded"
    )  # fmt: skip
    assert backend.calls == []  # nothing was sent
    with pytest.raises(PlannerError) as info:
        await Planner(backend).answer(LONG_QUESTION, mode=mode)
    assert info.value.code == "invalid_request"


async def test_a_chat_that_just_fits_is_answered(tokenizer):
    n = chat_tokens(tokenizer)
    backend = ShortContextBackend(tokenizer, script_for(), context=n + 1)
    done = await Planner(backend).answer(LONG_QUESTION, mode="sequential")
    assert done.mode == "sequential" and done.answer == " A plain"  # one token of room
    assert backend.calls[0].params.max_tokens == 1


@pytest.mark.parametrize("mode", ["sot", "graph"])
async def test_a_question_too_long_for_a_skeleton_is_answered_sequentially(tokenizer, mode):
    # the chat fits; the skeleton prompt (instructions and examples) does not
    backend = ShortContextBackend(tokenizer, script_for(), context=chat_tokens(tokenizer) + 100)
    events = await collect(Planner(backend), LONG_QUESTION, mode=mode)
    assert isinstance(events[0], PlanReady)  # said before any request was made
    assert events[0].mode == "sequential" and "the skeleton prompt" in events[0].fallback
    done = events[-1]
    assert isinstance(done, Done) and done.mode == "sequential"
    assert done.fallback == events[0].fallback
    assert "exceed the context length" in done.fallback
    assert done.answer == " A plain answer."
    assert [c.kind for c in backend.calls] == ["chat"]
    assert not any(isinstance(e, ErrorEvent) for e in events)


async def test_auto_mode_routes_a_question_too_long_for_a_skeleton_to_sequential(tokenizer):
    backend = ShortContextBackend(tokenizer, script_for(), context=chat_tokens(tokenizer) + 100)
    done = await Planner(backend, router="model").answer(LONG_QUESTION, mode="auto")
    assert done.mode == "sequential" and done.fallback is None
    assert done.route.reason.startswith("too long for a skeleton: the skeleton prompt")
    assert [c.kind for c in backend.calls] == ["chat"]  # the router was not asked


@pytest.mark.parametrize("mode", ["sot", "graph"])
async def test_a_plan_whose_points_would_not_fit_is_answered_sequentially(tokenizer, mode):
    planner = Planner(ScriptedBackend(tokenizer, script_for()))
    need = planner.context_needed(LONG_QUESTION, mode)
    # one token short: the skeleton itself would fit, its points not
    backend = ShortContextBackend(tokenizer, script_for(), context=need - 1)
    done = await Planner(backend).answer(LONG_QUESTION, mode=mode)
    assert done.mode == "sequential" and done.fallback.startswith("a point prompt")
    assert [c.kind for c in backend.calls] == ["chat"]
    # with the context it needs, the plan goes ahead
    backend = ShortContextBackend(tokenizer, script_for(), context=need)
    done = await Planner(backend).answer(LONG_QUESTION, mode=mode)
    assert done.mode == mode and len(done.points) == 3 and done.fallback is None
    for call in backend.calls:
        assert len(call.prompt_ids) + call.params.max_tokens <= need


def distinct_words(tokenizer, n, start=2000):
    """``n`` different one-token words (a repeated word would read as a loop)."""
    vocab = (tokenizer.decode([t]) for t in range(start, 30000))
    return [w for w in vocab if w.startswith(" ") and w[1:].isalpha()][:n]


async def test_a_point_prompt_that_does_not_fit_falls_back_cleanly(tokenizer):
    # Two very long titles: the fit check counts each once (in the skeleton's reply),
    # but a point's turn repeats its own, so point 1's prompt does not fit after all.
    words = distinct_words(tokenizer, 30)
    skeleton = ["".join(words[:15]), "\n2." + "".join(words[15:]), "\n"]
    opts = {"skeleton_max_tokens": 40, "point_max_tokens": 16, "point_min_tokens": 16}
    need = Planner(ScriptedBackend(tokenizer, script_for())).context_needed("Q?", "sot", **opts)
    backend = ShortContextBackend(tokenizer, script_for(skeleton), context=need)
    events = await asyncio.wait_for(collect(Planner(backend, **opts), "Q?", mode="sot"), 10)
    assert not any(isinstance(e, ErrorEvent) for e in events)
    done = events[-1]
    assert isinstance(done, Done) and done.mode == "sequential"
    assert "point 1's prompt" in done.fallback and "context length" in done.fallback
    assert done.answer.startswith("1. **") and done.answer.endswith(" A plain answer.")
    assert not any(c.kind == "point" for c in backend.calls)  # none was sent
    assert all(c.ended is not None for c in backend.calls)


async def test_graph_parents_are_shortened_until_the_point_prompt_fits(tokenizer):
    words = distinct_words(tokenizer, 150)
    long_text = ["".join(words) + "."]  # one sentence of 150 tokens

    def point_text(call):
        return long_text if call.point == 1 else [" short."]

    skeleton = [" First\n", "2. Second [depends on 1]\n"]
    opts = {"point_max_tokens": 24, "point_min_tokens": 4}
    need = Planner(ScriptedBackend(tokenizer, script_for())).context_needed("Q?", "graph", **opts)
    context = need + 60  # room for a part of point 1's text in point 2's prompt, not all
    backend = ShortContextBackend(tokenizer, script_for(skeleton, point_text), context=context)
    done = await Planner(backend, **opts).answer("Q?", mode="graph")
    assert done.mode == "graph" and done.fallback is None
    calls = {c.point: c for c in backend.calls if c.kind == "point"}
    parents = point_prompt_parents(calls[2].prompt)
    assert parents.startswith("1. First:" + "".join(words[:5])) and parents.endswith("\u2026")
    assert len(parents) < len("1. First: " + long_text[0])
    assert len(calls[2].prompt_ids) + 24 <= context  # room for a whole point
    assert len(calls[2].prompt_ids) + 24 > context - 20  # and not much more cut than needed


def test_parents_are_cut_at_word_ends_down_to_their_titles():
    a, b = PlanPoint(index=1, title="Costs"), PlanPoint(index=2, title="Gains")
    parents = [(a, " Rent is high. "), (b, "Houses grow in value.")]
    assert _parents_block(parents) == "1. Costs: Rent is high.\n2. Gains: Houses grow in value."
    assert _parents_block(parents, 8) == "1. Costs: Rent is\u2026\n2. Gains: Houses\u2026"
    assert _parents_block(parents, 7) == "1. Costs: Rent is\u2026\n2. Gains: Houses\u2026"
    assert _parents_block(parents, 3) == "1. Costs\n2. Gains"  # no whole word: the title
    assert _parents_block(parents, 0) == "1. Costs\n2. Gains"
    assert _parents_block([]) == "(none)"


async def test_a_fallback_whose_shown_text_fills_the_context_ends_there(tokenizer):
    # Pipelined: point 1 (a short title) writes a long text while the skeleton is still
    # writing line 2, whose very long title leaves point 2 no room. The plan falls
    # back, but the answer shown so far already fills the context: it ends as cut.
    words = distinct_words(tokenizer, 430)
    skeleton = [" A", "\n2." + "".join(words[:30]), "\n"]
    text = ["".join(words[30:]) + "."]  # 400 tokens in one piece

    def delay(call):  # point 1 is done long before line 2 is
        return 0.2 if call.kind == "skeleton" else 0.0

    opts = {"skeleton_max_tokens": 40, "point_max_tokens": 16, "point_min_tokens": 16,
            "pipeline": True}  # fmt: skip
    need = Planner(ScriptedBackend(tokenizer, script_for())).context_needed("Q?", "sot", **opts)
    backend = ShortContextBackend(
        tokenizer, script_for(skeleton, lambda c: text), delay=delay, context=need
    )
    events = await asyncio.wait_for(collect(Planner(backend, **opts), "Q?", mode="sot"), 10)
    done = events[-1]
    assert isinstance(done, Done) and done.mode == "sequential"
    assert done.finish_reason == "length" and "point 2's prompt" in done.fallback
    assert done.answer.startswith("1. **A**" + "".join(words[30:40]))
    assert "".join(e.text for e in events if isinstance(e, AnswerDelta)) == done.answer
    assert not any(c.kind == "chat" for c in backend.calls)  # no room left to ask
