"""Prompt-lookup speculative decoding: drafts from n-grams a request already holds.

A request's next tokens often repeat its own text: code and names copied from the
prompt, and a small model's answers, which repeat phrases. When the last ``n`` tokens
(``max_n`` down to ``min_n``) occurred before, the tokens that followed them then are
a *draft*. The step that decodes the request computes the draft with it, as a short
chunk whose every row is sampled (vLLM's ``ngram`` method, llama.cpp's lookup
decoding, Saxena's prompt lookup).

Verification is exact for any sampling rule. The draft is a point mass ``q = δ(d)``,
and speculative sampling accepts ``d`` with probability ``min(1, p(d) / q(d)) = p(d)``,
resampling from ``p`` without ``d`` otherwise: the same as sampling ``x ~ p`` and
keeping the draft while ``x == d``. So each row is sampled as plain decoding would
sample it (penalties see the draft tokens before it as output), the leading rows
whose sample equals the draft are accepted, and the first sample that differs is the
step's last token. Every step keeps at least one token, and a step with no draft is
a plain decode.

On the CPU the rows of a short chunk cost little more than one (the quantized
matmuls read the weights once for all rows), so a draft pays for itself when part
of it is accepted. In a large batch every request's rows add up, and drafting stops
(``EngineConfig.speculative_max_batch``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.request import Request
from engine.sampling_params import SamplingParams


class NgramIndex:
    """Where each n-gram of a token sequence last occurred, kept up to date as the
    sequence grows (it only ever grows: a request's prompt and output)."""

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n = min_n
        self.max_n = max_n
        # n-gram -> the position right after its latest occurrence whose next token
        # is known (tuples of different n never collide)
        self._next: dict[tuple[int, ...], int] = {}
        self._indexed = 0  # positions < this have their preceding n-grams entered

    def lookup(self, tokens: list[int], limit: int) -> list[int]:
        """``limit`` tokens that followed the latest earlier occurrence of the sequence's
        longest repeated suffix (``max_n`` tokens down to ``min_n``), or none.

        The occurrence is ``period`` tokens back, and where what followed it runs
        into the present the draft goes on repeating with that period: in a loop
        ("a b a b", one token over and over) the latest occurrence has the shortest
        continuation, and the loop's own text is the best guess of what comes next.
        """
        end = len(tokens)
        for p in range(max(self._indexed, 1), end):
            for n in range(self.min_n, min(self.max_n, p) + 1):
                self._next[tuple(tokens[p - n : p])] = p
        self._indexed = end
        for n in range(min(self.max_n, end), self.min_n - 1, -1):
            start = self._next.get(tuple(tokens[end - n :]))
            if start is not None:
                draft = tokens[start : start + limit]
                period = end - start
                while len(draft) < limit:
                    draft.append(draft[len(draft) - period])
                return draft
        return []


def can_draft(params: SamplingParams, generator: torch.Generator | None) -> bool:
    """Whether a request's sampling allows drafts: not for a seeded random request,
    whose samples must be the ones plain decoding draws from its generator (rows
    after a rejection would use up draws).

    Jump-forward rules and drafts go together: a rule's tokens are appended after
    the step's last token as always; inside a draft, the token a rule would force is
    sampled and verified like any other (the rules hold tokens the model writes
    anyway: a skeleton's "." after a line number)."""
    return generator is None or params.greedy


@dataclass
class Draft:
    """A decode step that verifies ``tokens`` after the request's last one; the model
    runner sets ``accepted`` (how many of them its samples confirmed)."""

    req: Request
    tokens: list[int]
    accepted: int = 0


@dataclass(frozen=True)
class DraftRow:
    """What the sampler needs for row ``offset`` of a draft: the request as it would
    be had the draft's first ``offset`` tokens been sampled (output, penalties and
    ``min_tokens`` see them)."""

    request: Request
    output_ids: list[int] = field(repr=False)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def prompt_ids(self) -> list[int]:
        return self.request.prompt_ids

    @property
    def stop_ids(self) -> frozenset[int]:
        return self.request.stop_ids

    @property
    def generator(self) -> torch.Generator | None:
        return self.request.generator


def draft_rows(draft: Draft) -> list[DraftRow]:
    """One row per position the draft's chunk samples: after the last token, then
    after each draft token."""
    out = draft.req.output_ids
    return [DraftRow(draft.req, out + draft.tokens[:i]) for i in range(len(draft.tokens) + 1)]


def accepted_prefix(draft: list[int], sampled: list[int]) -> int:
    """How many leading draft tokens the samples confirm (``sampled[i]`` is the sample
    of the row that predicts ``draft[i]``)."""
    n = 0
    while n < len(draft) and sampled[n] == draft[n]:
        n += 1
    return n
