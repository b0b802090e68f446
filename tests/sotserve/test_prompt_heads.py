"""The fixed heads of the planner's prompts (sotserve.prompt_heads)."""

from __future__ import annotations

import prompts
from prompts import ChatRenderer
from sotserve.prompt_heads import common_prefix, prompt_heads, system_text, template_messages


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == [1, 2]
    assert common_prefix([1, 2], [1, 2, 3]) == [1, 2]
    assert common_prefix([7], [8]) == []


def test_each_prompt_starts_with_a_head_that_holds_none_of_the_question(tokenizer):
    renderer = ChatRenderer(tokenizer)
    heads = prompt_heads(renderer)
    assert len(heads) == len({tuple(h) for h in heads})
    for a in heads:  # none is a prefix of another: it would be cached with it
        assert not any(b is not a and b[: len(a)] == a for b in heads)
    question = "Why do cats purr when they are content?"
    prompts_by_kind = {
        "plain": renderer.render([{"role": "user", "content": question}]),
        **{
            name: renderer.render(prompts.load(name).messages(question=question))
            for name in ("skeleton", "graph", "router")
        },
    }
    for kind, ids in prompts_by_kind.items():
        head = max((h for h in heads if ids[: len(h)] == h), key=len, default=None)
        assert head is not None, kind
        assert "cats" not in tokenizer.decode(head)
        # the head runs right up to the question: what follows is the question's text
        assert tokenizer.decode(ids[len(head) :]).lstrip().startswith("Why do cats"), kind
    skeleton = prompts_by_kind["skeleton"]
    head = max((h for h in heads if skeleton[: len(h)] == h), key=len)
    assert len(head) > 0.7 * len(skeleton)  # the instructions and examples: most of it


def test_system_text_joins_system_and_developer_messages_in_order():
    messages = [
        {"role": "system", "content": " Be brief. "},
        {"role": "user", "content": "Hi"},
        {"role": "developer", "content": "No jokes."},
        {"role": "system", "content": "   "},
    ]
    assert system_text(messages) == "Be brief.\n\nNo jokes."
    assert system_text([{"role": "user", "content": "Hi"}]) == ""


def test_template_messages_put_the_requests_system_text_first_in_one_system_message():
    plain = prompts.load("skeleton").messages(question="Q?")
    assert template_messages("skeleton", question="Q?") == plain
    merged = template_messages("skeleton", "Be brief.", question="Q?")
    assert [m["role"] for m in merged] == [m["role"] for m in plain]
    assert merged[0] == {"role": "system", "content": f"Be brief.\n\n{plain[0]['content']}"}
    assert merged[1:] == plain[1:]
    # a template without a system section (a point's turn) gets one in front
    point = template_messages("point", "Be brief.", index=1, title="T")
    assert point == [{"role": "system", "content": "Be brief."},
                     *prompts.load("point").messages(index=1, title="T")]  # fmt: skip


def test_a_system_text_changes_the_prompt_but_not_the_warmed_heads(tokenizer):
    renderer = ChatRenderer(tokenizer)
    heads = prompt_heads(renderer)
    plain = renderer.render(template_messages("skeleton", question="Why?"))
    with_system = renderer.render(template_messages("skeleton", "Be brief.", question="Why?"))
    assert any(plain[: len(h)] == h for h in heads)
    # a request with a system text has heads of its own (cached by its first answer)
    assert not any(with_system[: len(h)] == h for h in heads if len(h) > 8)
    assert "Be brief." in tokenizer.decode(with_system)
