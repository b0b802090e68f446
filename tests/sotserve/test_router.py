"""The rules router (sotserve.router): its decisions, and that no input can stall it.

The rules used to be regular expressions with ``.*`` gaps (``how does .* work``),
which backtrack over the rest of the line at every place their first part matches:
a one-line question of ``"how does " * 50000`` held the event loop for seconds.
The time bounds below are stall bounds (the old rules took a minute on these
inputs, the new ones take milliseconds), not speed claims.
"""

from __future__ import annotations

import time

import pytest

from sotserve.router import RULES_WINDOW, decide_by_rules, route_by_rules, rules_text


@pytest.mark.parametrize(
    ("question", "mode", "reason"),
    [
        ("Write a Python function that sorts a list.", "sequential", "looks like code"),
        ("Solve for x: 3x + 2 = 11", "sequential", "looks like math"),
        ("What is 12 * (4 + 3)?", "sequential", "looks like math"),
        ("How many times does a heart beat in a lifetime?", "sequential", "looks like reasoning"),
        ("Write a short poem about autumn.", "sequential", "looks like writing"),
        ("Please write me a long and heartfelt email to my boss.", "sequential",
         "looks like writing"),
        ("Pretend to be a pirate captain.", "sequential", "looks like role play"),
        ("Is it more important to be kind or to be right?", "sequential", "looks like debate"),
        ("How does the immune system actually work?", "graph", "parts build on each other"),
        ("Explain the process of photosynthesis.", "graph", "parts build on each other"),
        ("What are some tips for saving money?", "sot", "asks for several points"),
        ("Who was the first emperor of Rome?", "sequential", "no list-like wording"),
        # the gap of "how does ... work" and "write a ... email" stays on one line
        ("How does it\nwork?", "sequential", "no list-like wording"),
        ("Please draft a plan.\nThen an email.", "sequential", "no list-like wording"),
        # a later line can still hold both parts
        ("Intro.\nSo how does the engine work?", "graph", "parts build on each other"),
    ],
)  # fmt: skip
def test_rules_decisions(question, mode, reason):
    decision = route_by_rules(question)
    assert (decision.mode, decision.source, decision.reason) == (mode, "rules", reason)


# One-line inputs that made the old ``.*`` rules backtrack (or that stress \b and
# the \s* runs of the maths rule): each is hundreds of thousands of characters.
ADVERSARIAL = {
    "how does, no work": "how does " * 50_000,
    "how do, no work": "How do " * 50_000,
    "write a, no email": "so write a " * 50_000,
    "draft me, no email": "then draft me " * 50_000,
    "digits and operators": "12345 + 678 * " * 30_000 + "x",
    "digit, spaces, operator, spaces": "1" + " " * 200_000 + "+" + " " * 200_000 + "x",
    "digits and spaces": "1 " * 200_000,
    "word boundaries": "a-" * 200_000,
    "parentheses": "f(" * 200_000,
    "works, not work": "how does it " + "works " * 70_000,
}


@pytest.mark.parametrize("name", ADVERSARIAL)
def test_route_by_rules_returns_promptly_on_adversarial_input(name):
    question = ADVERSARIAL[name]
    t0 = time.perf_counter()
    decision = route_by_rules(question)
    took = time.perf_counter() - t0
    assert took < 0.5, f"{name}: {took:.2f} s"
    assert decision.mode in ("sequential", "sot", "graph")


@pytest.mark.parametrize("name", ADVERSARIAL)
def test_every_rule_is_linear_on_the_whole_input(name):
    # decide_by_rules reads all of its text (no window): the rules themselves must not
    # backtrack. Half of the input is still ~200,000 characters, on which the old
    # ``how does .* work`` rule took about 10 s (the new rules: a tenth of a second).
    text = ADVERSARIAL[name][: len(ADVERSARIAL[name]) // 2]
    t0 = time.perf_counter()
    decide_by_rules(text)
    took = time.perf_counter() - t0
    assert took < 1.0, f"{name}: {took:.2f} s"


def test_the_old_gap_rules_still_match_across_any_distance_on_a_line():
    filler = "and then some more words " * 200  # 5,000 characters of gap
    assert decide_by_rules(f"How does {filler} work?").mode == "graph"
    assert decide_by_rules(f"Can you write a {filler} letter?").reason == "looks like writing"
    # "works" and "homework" are not "work"; the first "how does" opens the gap
    assert decide_by_rules("How does it works").mode == "sequential"
    assert decide_by_rules("how does homework").mode == "sequential"
    assert decide_by_rules("how does x how does y work").mode == "graph"


def test_a_long_question_is_routed_on_its_ends():
    pasted = "lorem ipsum dolor sit amet " * 2_000  # 54,000 characters of neither rule
    assert len(pasted) > 2 * RULES_WINDOW
    # the request after a pasted text is seen
    assert route_by_rules(f"{pasted}\n\nNow write a short poem about it.").reason == (
        "looks like writing"
    )
    assert route_by_rules(f"What are the benefits of this?\n{pasted}").mode == "sot"
    # the middle is not read, and the ends stay on lines of their own
    middle = pasted[: len(pasted) // 2] + " python " + pasted[len(pasted) // 2 :]
    assert route_by_rules(middle).reason == "no list-like wording"
    assert route_by_rules("how does " + pasted + " work").mode == "sequential"
    text = rules_text(pasted)
    assert len(text) <= 2 * RULES_WINDOW + 1 and text.count("\n") == 1


def test_the_window_cuts_at_whitespace_so_no_word_is_clipped_into_another():
    # "programming" straddles the head's end: clipped to "program" it would read as code
    head = "x" * (RULES_WINDOW - 8) + " "
    question = head + "programming languages " + "lorem " * (2 * RULES_WINDOW // 6)
    assert len(question) > 2 * RULES_WINDOW
    assert question[:RULES_WINDOW].endswith(" program")
    assert decide_by_rules(question).reason == "no list-like wording"
    assert "program" not in rules_text(question)
    assert route_by_rules(question).reason == "no list-like wording"


def test_a_short_question_is_read_whole():
    question = "x " * RULES_WINDOW  # exactly twice the window
    assert rules_text(question) is question
