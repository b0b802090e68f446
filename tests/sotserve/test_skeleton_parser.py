"""The streaming skeleton parser, on hand-written and real SmolLM2 skeletons."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from sotserve.skeleton_parser import SkeletonParser, line_number_jumps, parse_line, title_preview

FIXTURES = Path(__file__).parent / "fixtures"


def parse(text: str, max_points: int = 6, truncated: bool = False):
    p = SkeletonParser(max_points=max_points)
    p.feed(text)
    p.close(truncated)
    return p.points


def stream(text: str, max_points: int = 6, truncated: bool = False):
    """Feed one character at a time; record after which character each point appeared."""
    p = SkeletonParser(max_points=max_points)
    seen = []
    for i, ch in enumerate(text):
        for point in p.feed(ch):
            seen.append((i, point))
    for point in p.close(truncated):
        seen.append((len(text), point))
    return p, seen


def titles(points):
    return [p.title for p in points]


@pytest.mark.parametrize(
    "text",
    [
        "1. Alpha\n2. Beta\n3. Gamma",
        "1) Alpha\n2) Beta\n3) Gamma\n",
        "Point 1: Alpha\nPoint 2: Beta\nPoint 3: Gamma",
        "**1. Alpha**\n**2. Beta**\n**3. Gamma**",
        "1. **Alpha**:\n2. **Beta**:\n3. **Gamma**:",
        "Here is the skeleton:\n\n1. Alpha\n\n2. Beta\n\n3. Gamma\n",
        "### Step 1: Alpha\n### Step 2: Beta\n### Step 3: Gamma",
    ],
)
def test_accepts_the_usual_numbering_styles(text):
    assert titles(parse(text)) == ["Alpha", "Beta", "Gamma"]


def test_a_point_is_ready_when_its_line_ends():
    text = "1. Alpha\n2. Beta\n3. Gamma"
    _, seen = stream(text)
    assert [(i, p.title) for i, p in seen] == [
        (text.index("\n"), "Alpha"),
        (text.index("\n", 9), "Beta"),
        (len(text), "Gamma"),  # the last line is complete when the text ends
    ]


def test_drops_empty_points_and_renumbers():
    pts = parse("1. Alpha\n2.\n3. 1. 2. 3.\n4. Beta")
    assert [(p.index, p.title) for p in pts] == [(1, "Alpha"), (2, "Beta")]


def test_a_repeated_title_ends_the_skeleton():
    # a small model that repeats a point is going round: the rest is more of the same
    p, _ = stream("1. Alpha\n2. Beta\n3. alpha!\n4. Gamma\n")
    assert titles(p.points) == ["Alpha", "Beta"] and p.finished


def test_caps_the_count_and_stops_reading():
    p, _ = stream("".join(f"{i}. Point number {i}\n" for i in range(1, 10)), max_points=4)
    assert len(p.points) == 4 and p.finished
    assert p.consumed_chars == len("".join(f"{i}. Point number {i}\n" for i in range(1, 5)))


def test_prose_or_a_restarted_list_ends_the_skeleton():
    assert titles(parse("1. Alpha\n2. Beta\nThe answer is 4.\n3. Gamma")) == ["Alpha", "Beta"]
    # The model starting a second list (copying its few-shot format) is not more points.
    assert titles(parse("1. Alpha\n2. Beta\n\nQuestion: x\n1. Other\n2. More")) == [
        "Alpha",
        "Beta",
    ]
    assert titles(parse("1. Alpha\n2. Beta\n1. Again")) == ["Alpha", "Beta"]


def test_indented_detail_under_a_point_is_ignored():
    assert titles(parse("1. Alpha\n   - detail\n* more\n2. Beta")) == ["Alpha", "Beta"]


def test_truncated_last_line_is_not_a_point():
    assert titles(parse("1. Alpha\n2. Beta\n3. Gam", truncated=True)) == ["Alpha", "Beta"]
    assert titles(parse("1. Alpha\n2. Beta\n3. Gam", truncated=False)) == ["Alpha", "Beta", "Gam"]


def test_fewer_than_two_points_is_visible_to_the_caller():
    assert len(parse("Sure! Here is my answer without a list.")) == 0
    assert len(parse("1. Only one\n1. Only one")) == 1


def test_dependencies_map_to_new_numbers_and_only_point_upwards():
    pts = parse(
        "1. Costs of renting\n"
        "2.\n"  # empty: dropped, so skeleton 3 becomes point 2
        "3. Costs of buying [depends on 1]\n"
        "4. Compare costs (depends on: 1 and 3)\n"
        "5. Decide [depends on 4, 6, 99]\n"  # 6 comes later, 99 never exists
        "6. Loop back [depends on 6, 5]"  # itself: dropped
    )
    assert [(p.index, p.title, p.depends_on) for p in pts] == [
        (1, "Costs of renting", []),
        (2, "Costs of buying", [1]),
        (3, "Compare costs", [1, 2]),
        (4, "Decide", [3]),
        (5, "Loop back", [4]),
    ]


def _real_skeletons():
    rows = json.loads((FIXTURES / "smollm2_skeletons.json").read_text())
    return {r["question_id"]: r for r in rows}


def test_real_smollm2_skeletons_stream_like_they_parse_whole():
    """Every recorded SmolLM2 skeleton: char-by-char parsing equals whole-text parsing,
    titles carry no numbering, and no two titles are the same."""
    rows = _real_skeletons()
    assert len(rows) == 80
    for row in rows.values():
        truncated = row["finish_reason"] == "length"
        whole = parse(row["skeleton"], truncated=truncated)
        p, _ = stream(row["skeleton"], truncated=truncated)
        assert p.points == whole
        assert len(whole) <= 6
        assert all(t and not re.match(r"\d+[.)]\s", t) for t in titles(whole))
        assert len({t.lower() for t in titles(whole)}) == len(whole)


# Hand-checked parses of messy real skeletons (question ids of vicuna80).
EXPECTED = {
    3: ["Syntax", "Performance", "Security", "Debugging", "Code style"],
    # repeated lines collapse
    33: [
        "Travel and exploration",
        "Personal comfort and convenience",
        "Personal branding and identity",
    ],
    43: ["Lightning strikes occur every day"],  # one point: the planner falls back
    73: ["Professionalism and integrity"],
    # cut off by max_tokens mid-line: the unfinished last line is not a point
    # going round: line 3 repeats line 2, which ends the list
    70: ["Length of the segment = 2 + 4 = 6", "Length of the segment = 2 + 10 = 12"],
}


@pytest.mark.parametrize("qid", sorted(EXPECTED))
def test_messy_real_skeletons(qid):
    row = _real_skeletons()[qid]
    assert (
        titles(parse(row["skeleton"], truncated=row["finish_reason"] == "length"))
        == (EXPECTED[qid])
    )


@pytest.mark.parametrize(
    ("line", "preview"),
    [
        ("1.", ""),
        ("1. Set", "Set"),  # the word may still grow ("Settle"): the text does too
        ("1. Str", "Str"),
        ("1. Set clear", "Set clear"),
        ("1. Set clear goals", "Set clear goals"),
        ("1. **Set clear goals", "Set clear goals"),  # bold markers are not the title
        ("1. Set clear goals**", "Set clear goals"),
        ("1. Sleep -", "Sleep"),  # a trailing joiner may be stripped from the title
        ("1. Sur", ""),  # may become "Sure! Here is...": prose, not a title
        ("1. I think", ""),
        ("1. Hereditary traits", "Hereditary traits"),
        ("1. Ask questions", "Ask questions"),
        ("1. Set clear: goals", ""),  # a colon would be stripped or read as markup
        ("1. Sorry, I can not", ""),  # prose, more often than a title
        ("1. 12 34 5", ""),  # no letter: not a title the parser keeps
        ("1. Self-care and rest now", "Self-care and rest now"),
    ],
)
def test_title_preview_is_what_the_finished_title_starts_with(line, preview):
    assert title_preview(line) == preview
    if preview:  # however the line ends, the parsed title continues the preview
        for end in ("", "s", " goals", " [depends on 1]", "**", " -", ": more", "."):
            raw = parse_line(line + end)
            assert raw is not None and raw.title.startswith(preview)


# -- jump-forward rules for the line numbers -------------------------------------------


def test_line_number_jumps_force_the_dot_after_each_number(tokenizer):
    rules = line_number_jumps(tokenizer)
    assert len(rules) == 8  # 2 to 9: "1" may begin "10."
    for key, forced in rules.items():
        assert len(key) == 2 and tokenizer.decode(list(key)) in {f"\n{k}" for k in range(2, 10)}
        assert tokenizer.decode(list(forced)) == "."


class _MergingTokenizer:
    """A tokenizer that writes "\\n3" as one token: no rule can key on its digit."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        pieces = re.findall(r"\n3|.", text, re.S)
        return [ord(p) if len(p) == 1 else 1000 for p in pieces]

    def decode(self, ids: list[int]) -> str:
        return "".join("\n3" if i == 1000 else chr(i) for i in ids)


def test_line_number_jumps_skip_numbers_the_tokenizer_merges():
    rules = line_number_jumps(_MergingTokenizer())
    assert (ord("\n"), ord("3")) not in rules and (1000,) not in rules
    assert rules[(ord("\n"), ord("4"))] == (ord("."),)
    assert len(rules) == 7


@pytest.mark.slow
def test_line_number_jumps_leave_real_skeletons_unchanged_in_fewer_steps(tokenizer):
    """On the embedded SmolLM2 the model writes the forced "." itself: these greedy
    skeletons are the same text with the rules, one engine step shorter per line from
    the second (the forced token and the one after it go in as decode rows, so they
    sum as decoding does). Speculative drafts are off here, so that the steps saved
    are the rules' alone."""
    from engine import LLM, SamplingParams
    from prompts import ChatRenderer
    from sotserve.prompt_heads import template_messages

    llm = LLM(device="cpu", speculative_tokens=0)
    renderer = ChatRenderer(llm.tokenizer)
    rules = line_number_jumps(llm.tokenizer)
    for question in (
        "How can I improve my time management skills?",
        "What are the most effective ways to deal with stress?",
        "What are the main differences between Python and JavaScript programming languages?",
    ):
        prompt = renderer.render(template_messages("skeleton", question=question))
        runs = []
        for jump in ({}, rules):
            before = llm.stats().steps
            out = llm.generate([prompt], SamplingParams(max_tokens=64, temperature=0.0,
                                                        jump_forward=jump))[0]  # fmt: skip
            runs.append((out.text, llm.stats().steps - before))
        (plain, plain_steps), (jumped, jumped_steps) = runs
        assert jumped == plain
        lines = sum(1 for k in range(2, 10) if f"\n{k}." in plain)
        assert lines >= 3
        assert jumped_steps == plain_steps - lines
