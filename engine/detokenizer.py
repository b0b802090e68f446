"""Incremental detokenization with stop strings."""

from __future__ import annotations

from transformers.tokenization_utils_base import PreTrainedTokenizerBase

# Prompt tokens decoded along with the output so that tokenizers whose decoding
# depends on the previous token (SentencePiece's leading space) render correctly.
_CONTEXT_TOKENS = 4
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text, one token at a time.

    A token that ends in the middle of a UTF-8 character decodes to U+FFFD; such
    text is not released until the following tokens complete the character.
    """

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, prompt_ids: list[int], stop: list[str]
    ) -> None:
        self._tok = tokenizer
        context = prompt_ids[-_CONTEXT_TOKENS:]
        self._ids: list[int] = list(context)
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._stop = stop
        self._hold = max((len(s) for s in stop), default=1) - 1
        self.text = ""
        self._emitted = 0
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def add(self, token_id: int, check_stop: bool = True) -> None:
        """Append one token; sets ``stopped`` when a stop string appears.

        With ``check_stop=False`` (a request short of its ``min_tokens``) stop strings
        are not looked for, and text added so can never complete one later: a stop
        string must end in text added while checking (vLLM's rule).
        """
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        if len(full) <= len(prefix) or full.endswith(_REPLACEMENT):
            return  # incomplete character (or a special token): wait for more
        new = full[len(prefix) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        old = len(self.text)
        self.text += new
        if not check_stop:
            return
        # each stop string must end in the new text (earlier ones were looked for)
        found = (self.text.find(s, max(0, old - len(s) + 1)) for s in self._stop)
        hits = [i for i in found if i != -1]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True

    def pop_delta(self, finished: bool) -> str:
        """Text not yet released; holds back a possible stop-string prefix until done."""
        end = (
            len(self.text)
            if finished or self.stopped
            else max(self._emitted, len(self.text) - self._hold)
        )
        delta = self.text[self._emitted : end]
        self._emitted = end
        return delta
