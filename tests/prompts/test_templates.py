"""Prompt files and the chat renderer (with SmolLM2's real tokenizer and template)."""

from __future__ import annotations

import pytest

import prompts
from prompts import ChatRenderer


@pytest.mark.parametrize("name", ["skeleton", "graph", "point", "graph_point", "router"])
def test_every_template_loads_and_fills(name):
    values = {"question": "Q?", "index": 2, "title": "T", "parents": "1. A: a"}
    messages = prompts.load(name).messages(**values)
    assert messages and all(m["role"] in {"system", "user", "assistant"} for m in messages)
    text = "\n".join(m["content"] for m in messages)
    assert "$" not in text and not text.startswith("#")


def test_missing_value_is_an_error():
    with pytest.raises(KeyError):
        prompts.load("skeleton").messages()
    with pytest.raises(FileNotFoundError):
        prompts.load("nope")


def test_prefill_is_the_start_of_the_reply(tokenizer):
    r = ChatRenderer(tokenizer)
    messages = prompts.load("skeleton").messages(question="Why sleep?")
    text = r.render_text(messages)
    assert text.endswith("Question: Why sleep?<|im_end|>\n<|im_start|>assistant\n1.")
    assert r.render(messages) == tokenizer.encode(text, add_special_tokens=False)


def test_continuation_extends_the_reply_token_for_token(tokenizer):
    """history + reply ids + continuation == the template's rendering of the whole chat."""
    r = ChatRenderer(tokenizer)
    history = [{"role": "user", "content": "List two fruits."}]
    reply = "1. Apple\n2. Pear"
    more = prompts.load("point").messages(index=2, title="Pear")
    whole = r.render([*history, {"role": "assistant", "content": reply}, *more])
    pieces = r.render(history) + r.encode(reply) + r.continuation(history, more)
    assert pieces == whole
    assert r.continuation_text(history, more).startswith("<|im_end|>\n<|im_start|>user\n")
