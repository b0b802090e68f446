"""In-order merge of point expansions into one answer stream.

The answer is the points in skeleton order, each headed by its title. The point
at the head of the order streams live; later points are buffered and flushed the
moment every point before them is done. Points may still be arriving (pipelined
skeleton), so the merger only knows the last point once :meth:`close` is called.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def point_header(index: int, title: str) -> str:
    """How a point starts in the merged answer (its expansion follows on the same line)."""
    return f"{index}. **{title}**"


class PreviewMismatchError(ValueError):
    """Point 1's final heading does not continue the preview already shown."""


@dataclass
class _Slot:
    header: str
    text: str = ""
    done: bool = False


@dataclass
class InOrderMerger:
    """Feed point deltas in any order; get answer text in skeleton order."""

    _slots: dict[int, _Slot] = field(default_factory=dict)
    _head: int = 1  # the first point not yet fully emitted
    _emitted: int = 0  # chars of the head point already emitted (header included)
    _closed: bool = False
    held: bool = True  # emit nothing until release(): the plan may still be abandoned
    answer: str = ""

    def preview(self, title: str) -> str:
        """Show point 1's heading up to ``title``, the start of its title, while its
        skeleton line is still being written; returns the answer text now due. Once
        point 1 is added its heading must continue what was shown (see
        :meth:`add_point`). A preview that does not extend the shown text is ignored."""
        if self._slots or not title:
            return ""
        self.held = False
        text = f"1. **{title}"
        if not text.startswith(self.answer) or len(text) <= len(self.answer):
            return ""
        new = text[len(self.answer) :]
        self.answer = text
        self._emitted = len(text)
        return new

    def add_point(self, index: int, title: str) -> str:
        """Register point ``index`` (1-based, in order); returns the answer text now due.

        Raises :class:`PreviewMismatchError` if point 1's heading does not start with
        the preview shown (nothing of it is emitted then)."""
        header = point_header(index, title)
        if index == 1 and not header.startswith(self.answer):
            raise PreviewMismatchError(
                f"point 1's heading {header!r} does not continue the shown {self.answer!r}"
            )
        self._slots[index] = _Slot(header)
        return self._flush()

    def delta(self, index: int, text: str) -> str:
        self._slots[index].text += text
        return self._flush() if index == self._head else ""

    def done(self, index: int) -> str:
        """Point ``index`` finished: it and any finished points after it can flush."""
        self._slots[index].done = True
        return self._flush()

    def release(self) -> str:
        """Start emitting; returns the answer text due so far."""
        self.held = False
        return self._flush()

    def close(self) -> str:
        """No more points will be added (releases a held merger)."""
        self._closed = True
        self.held = False
        return self._flush()

    @property
    def complete(self) -> bool:
        return self._closed and self._head > len(self._slots)

    def _rendered(self, index: int) -> str:
        slot = self._slots[index]
        sep = "" if index == 1 else "\n\n"
        body = slot.text.strip() if slot.done else slot.text.lstrip()
        return f"{sep}{slot.header} {body}" if body else f"{sep}{slot.header}"

    def _flush(self) -> str:
        if self.held:
            return ""
        out: list[str] = []
        while self._head in self._slots:
            full = self._rendered(self._head)
            slot = self._slots[self._head]
            if not slot.done:
                # Live text of an unfinished point may still be trimmed at the end,
                # so hold back trailing whitespace until the point is done.
                full = full.rstrip()
            if len(full) > self._emitted:
                out.append(full[self._emitted :])
                self._emitted = len(full)
            if not slot.done:
                break
            self._head += 1
            self._emitted = 0
        text = "".join(out)
        self.answer += text
        return text
