"""PointWriter: a point is one paragraph of whole sentences, shown only once whole."""

from __future__ import annotations

import pytest

from sotserve.point_text import PointWriter


def write(title, chunks, soft=1000):
    """Feed ``chunks`` (one token each) until the writer stops; return (shown, writer)."""
    w = PointWriter(title, soft)
    shown = []
    for c in chunks:
        shown.append(w.feed(c))
        if w.stopped:
            break
    shown.append(w.finish())
    text = "".join(shown)
    assert text == w.text  # what was streamed is exactly the final text
    return text, w


def test_only_whole_sentences_are_shown_while_streaming():
    w = PointWriter("Sleep", 1000)
    assert w.feed(" Sleep helps") == ""
    assert w.feed(" memory. It") == "Sleep helps memory."
    assert w.feed(" also") == ""
    # "3." could still become "3.5": not an end until a space follows
    assert w.feed(" helps in 3.") == ""
    assert w.feed("5 ways. Yes") == " It also helps in 3.5 ways."
    assert w.finish() == ""  # "Yes" never became a sentence, however the text ended
    assert not w.unfinished


def test_cut_at_the_cap_keeps_the_last_complete_sentence():
    text, w = write("Tasks", [" Plan your day.", " Then set dea"])
    assert text == "Plan your day."
    assert not w.stopped  # the backend's cap ended it, not the writer


def test_without_a_complete_sentence_the_fragment_is_kept_and_flagged():
    # ended without a full stop (by the model or a cap too small for one sentence):
    # the fragment says more than nothing, and the executor is told to ask again
    text, w = write("Relaxation", [" mindfulness,", " yoga, tai chi"])
    assert text == "mindfulness, yoga, tai chi"
    assert w.unfinished and not w.says_nothing


def test_a_point_of_only_its_title_says_nothing():
    _, w = write("Good sleep", [" Good", " sleep."])
    assert w.says_nothing and not w.unfinished
    _, w = write("Good sleep", [" Good", " sleep", " restores", " you."])
    assert not w.says_nothing


def test_abbreviations_are_not_sentence_ends():
    text, _ = write("Python", [" Python is good for scripts, e.g. glue", " code. It"])
    assert text == "Python is good for scripts, e.g. glue code."
    text, _ = write("Python", [" Great for tools, e.g. glue code. More"])
    assert text == "Great for tools, e.g. glue code."


@pytest.mark.parametrize(
    ("chunks", "reason", "expected"),
    [
        # a paragraph ends at its first line break, but a point may open with one
        ([" \n", "Sleep restores you.", "\n", "2. Eat"], "line", "Sleep restores you."),
        # its own numbered list, inline or as the next item
        ([" Habits matter.", " 1. Regular", " exercise; 2. Diet"], "list", "Habits matter."),
        ([" 2.", " Quantum"], "list", ""),
        ([" Yoga and tai chi help.", " 7. Seek support"], "list", "Yoga and tai chi help."),
        # the title said again as a heading restarts the point
        ([" Set boundaries:", " \n", "Set boundaries:", " more"], "title", ""),
        ([" Keep limits. Set boundaries: again"], "title", "Keep limits."),
        # a phrase repeated word for word is a loop
        ([" The same thing again and again.", " The same thing again and again."], "loop",
         "The same thing again and again."),
    ],
)  # fmt: skip
def test_the_writer_ends_the_point(chunks, reason, expected):
    text, w = write("Set boundaries", chunks)
    assert w.stopped and w.reason == reason
    assert text == expected


def test_a_repeated_heading_at_the_start_is_skipped_not_shown():
    text, w = write("Get enough sleep", [" **Get enough sleep**:", " Adults need eight hours."])
    assert text == "Adults need eight hours."
    assert not w.stopped


def test_past_the_soft_cap_the_point_ends_at_the_next_sentence_end():
    chunks = [" One", " two", " three.", " Four", " five", " six.", " Seven", " eight."]
    text, w = write("Count", chunks, soft=4)
    assert w.stopped and w.reason == "soft cap"
    assert text == "One two three. Four five six."
    # before the soft cap a sentence end does not stop it
    text, w = write("Count", chunks, soft=100)
    assert text == "One two three. Four five six. Seven eight." and not w.stopped


def test_wrap_up_ends_the_point_at_the_next_sentence_end_from_there():
    w = PointWriter("Count", 1000)
    assert w.feed(" One two three.") == ""  # a mark at the very end may still go on
    w.feed(" Four")
    w.wrap_up()  # the sentence already ended does not count: the next one does
    assert not w.stopped
    w.feed(" five.")
    w.feed(" Six")
    assert w.stopped and w.reason == "soft cap"
    assert w.text + w.finish() == "One two three. Four five."


@pytest.mark.parametrize("sep", [" -", " \u2013", ":"])
def test_a_separator_after_the_bold_title_is_not_shown(sep):
    # the reply opens "N. **Title**", so the model may go on "**Title** - text"
    text, _ = write("Sleep", [sep, " It", " helps", " you", " rest.", " More", " so."])
    assert text == "It helps you rest. More so."
    # a dash inside the text stays
    text, _ = write("Sleep", [" It", " helps", " -", " a", " lot."])
    assert text == "It helps - a lot."
