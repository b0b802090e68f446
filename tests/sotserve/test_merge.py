"""In-order merging of point streams."""

from __future__ import annotations

import pytest

from sotserve.merge import InOrderMerger, PreviewMismatchError


def test_head_point_streams_live_and_later_points_flush_in_order():
    m = InOrderMerger()
    out = [m.add_point(1, "A"), m.add_point(2, "B"), m.add_point(3, "C"), m.release()]
    assert "".join(out) == "1. **A**"
    assert m.delta(2, " two") == ""  # buffered behind point 1
    assert m.delta(3, " three") == ""
    assert m.done(3) == ""  # done, but 1 and 2 are not
    assert m.delta(1, " one") == " one"  # the head streams live
    assert m.delta(1, " more") == " more"
    assert m.done(1) == "\n\n2. **B** two"  # 2 is not done: it becomes the live head
    assert m.delta(2, " again") == " again"
    assert not m.complete
    assert m.done(2) == "\n\n3. **C** three"
    assert not m.complete  # more points may still come until close()
    assert m.close() == ""
    assert m.complete
    assert m.answer == "1. **A** one more\n\n2. **B** two again\n\n3. **C** three"


def test_held_until_released_and_whitespace_is_trimmed():
    m = InOrderMerger()
    m.add_point(1, "A")
    assert m.delta(1, "\n  text ") == ""  # held: the plan may still be abandoned
    assert m.release() == "1. **A** text"  # trailing space held back while live
    assert m.done(1) == ""
    assert m.add_point(2, "B") == "\n\n2. **B**"  # the head's title shows at once
    assert m.done(2) == ""
    assert m.close() == ""
    assert m.answer == "1. **A** text\n\n2. **B**"


def test_a_preview_of_point_1_is_continued_by_its_heading():
    m = InOrderMerger()
    assert m.preview("Set") == "1. **Set"
    assert m.preview("Set") == ""  # nothing new
    assert m.preview("Set clear") == " clear"
    assert m.preview("Other") == ""  # does not extend what is shown: ignored
    assert m.add_point(1, "Set clear goals") == " goals**"
    assert m.delta(1, " Start small.") == " Start small."
    assert m.answer == "1. **Set clear goals** Start small."
    assert m.preview("Set clear goals and more") == ""  # point 1 is known now


def test_a_heading_that_does_not_continue_the_preview_is_refused():
    m = InOrderMerger()
    m.preview("Set clear")
    with pytest.raises(PreviewMismatchError):
        m.add_point(1, "Something else")
    assert m.answer == "1. **Set clear"  # nothing more was emitted
