"""The fixed heads of the planner's prompts (sotserve.prompt_heads)."""

from __future__ import annotations

import prompts
from prompts import ChatRenderer
from sotserve.prompt_heads import common_prefix, prompt_heads


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
