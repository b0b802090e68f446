"""The trained router (SoT-R style): a logistic regression on the model's own hidden state.

SoT-R fine-tuned RoBERTa on LIMA to say whether a question suits a skeleton. Here the
encoder is the served model itself: the engine prefills the question's chat prompt,
exactly the prompt a sequential answer starts from (so that answer is then a
prefix-cache hit), and hands back the final hidden state at the prompt's last token
(the position that predicts the answer's first token, and so its shape). A linear
head on that vector says "skeleton" or not; ``evals.train_router`` fits it and writes
the parameter file this module loads (package data under ``router_params/``).

The parameters hold only for the model they were trained for. A file records that
model's hidden size, vocabulary size and the hidden state of a fixed probe prompt;
:func:`load_for_backend` loads it only when the backend's model reproduces the probe
(cosine similarity of at least :data:`PROBE_MIN_COSINE`), and backends that cannot
give hidden states (HTTP engines) get nothing: the rules decide there.

The three-way choice follows SoT's prompting router (A: independent points, B:
dependent points, C: not a list): the head decides list or not, and a list whose
parts build on each other (:func:`sotserve.router.parts_depend`) goes to graph mode.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import torch

from prompts import ChatRenderer, Message
from sotserve.backends.base import Backend
from sotserve.router import parts_depend, two_ends
from sotserve.schemas import RouteDecision

#: the parameter file format this module reads
PARAMS_VERSION = 1

# The router reads at most this much of each message (its first and last characters,
# sotserve.router.two_ends): a prefill of a few hundred tokens, whatever the
# question's length, so its time stays a small share of an answer's. Training reads
# the questions the same way.
HEAD_CHARS = 1200
TAIL_CHARS = 300

#: the prompt whose hidden state ties a parameter file to its model
PROBE_QUESTION = "What are some tips for staying focused while studying?"
# the same model in another weight format (float32 against int4 blocks) stays above
# this; another model of the same shape is near 0
PROBE_MIN_COSINE = 0.95

PARAMS_DIR = "router_params"


class RouterParamsError(ValueError):
    """A parameter file is malformed or of another format version."""


@dataclass(frozen=True)
class RouterParams:
    """A trained head and the model it belongs to (one JSON file).

    ``weights`` and ``bias`` act on the raw hidden state (the training's
    standardization is folded in); a question goes to a skeleton when
    ``sigmoid(weights . hidden + bias) >= threshold``.
    """

    version: int
    model: str  # the model it was trained for, by name (the probe is what binds it)
    hidden_size: int
    vocab_size: int
    probe: list[float]  # hidden state of PROBE_QUESTION's chat prompt on that model
    weights: list[float]
    bias: float
    threshold: float
    trained_on: str  # the data sets' file names, joined by "+"
    data_sha256: str  # of the training file's bytes (several: of their hashes, in order)
    examples: int
    seed: int
    l2: float

    @classmethod
    def from_json(cls, text: str) -> RouterParams:
        try:
            raw = json.loads(text)
            if raw.get("version") != PARAMS_VERSION:
                raise RouterParamsError(
                    f"router parameters of version {raw.get('version')!r}; "
                    f"this sotserve reads version {PARAMS_VERSION}"
                )
            params = cls(**raw)
        except (TypeError, AttributeError, ValueError) as exc:
            if isinstance(exc, RouterParamsError):
                raise
            raise RouterParamsError(f"malformed router parameters: {exc}") from exc
        if len(params.weights) != params.hidden_size or len(params.probe) != params.hidden_size:
            raise RouterParamsError("router parameters: weights and probe must have hidden_size")
        return params

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1) + "\n"

    def probability(self, hidden: torch.Tensor) -> float:
        """P(skeleton) for one hidden state [hidden_size]."""
        w = torch.tensor(self.weights, dtype=torch.float64)
        z = float(hidden.to(torch.float64) @ w) + self.bias
        return 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0


def params_file_name(model: str) -> str:
    """The package file of ``model``'s parameters: its name, lower-case, without the
    weight format (``SmolLM2-135M-Instruct.Q4_1`` and its float32 copy share one)."""
    base = Path(model).name.split(".")[0]
    return f"{base.lower()}.json"


def shipped_params() -> list[RouterParams]:
    """Every parameter file in the package."""
    folder = resources.files("sotserve") / PARAMS_DIR
    if not folder.is_dir():
        return []
    return [
        RouterParams.from_json(f.read_text(encoding="utf-8"))
        for f in sorted(folder.iterdir(), key=lambda f: f.name)
        if f.name.endswith(".json")
    ]


def router_messages(messages: list[Message]) -> list[Message]:
    """The chat the router encodes: ``messages`` with every content cut to its two ends
    (:data:`HEAD_CHARS`, :data:`TAIL_CHARS`). For a question of ordinary length this
    is the chat itself, so its prompt is the sequential answer's."""
    return [
        {"role": m["role"], "content": two_ends(m["content"], HEAD_CHARS, TAIL_CHARS)}
        for m in messages
    ]


def question_messages(question: str) -> list[Message]:
    """The chat of a lone question, as training reads it."""
    return router_messages([{"role": "user", "content": question}])


async def backend_hidden(backend: Backend, renderer: ChatRenderer, text: str) -> torch.Tensor:
    """The hidden state of a lone question's chat prompt on ``backend``."""
    hidden = await backend.hidden_state(renderer.render(question_messages(text)))
    if hidden is None:
        raise RouterParamsError(f"{backend.model_name} gives no hidden states")
    return hidden


def matches_model(params: RouterParams, probe: torch.Tensor, vocab_size: int) -> bool:
    """Whether ``probe`` (PROBE_QUESTION's hidden state on a model with ``vocab_size``
    tokens) says the model is the one ``params`` were trained for."""
    if probe.numel() != params.hidden_size or vocab_size != params.vocab_size:
        return False
    stored = torch.tensor(params.probe, dtype=torch.float64)
    cos = torch.nn.functional.cosine_similarity(probe.to(torch.float64), stored, dim=0)
    return float(cos) >= PROBE_MIN_COSINE


async def load_for_backend(
    backend: Backend, renderer: ChatRenderer, candidates: list[RouterParams] | None = None
) -> RouterParams | None:
    """The shipped parameters that fit ``backend``'s model, or None (the rules decide):
    none fits, or the backend gives no hidden states. Costs one probe prefill."""
    candidates = shipped_params() if candidates is None else candidates
    if not candidates or not backend.gives_hidden_states:
        return None
    vocab = len(backend.tokenizer)
    if not any(p.vocab_size == vocab for p in candidates):
        return None
    probe = await backend_hidden(backend, renderer, PROBE_QUESTION)
    return next((p for p in candidates if matches_model(p, probe, vocab)), None)


def decide(params: RouterParams, hidden: torch.Tensor, question: str) -> RouteDecision:
    """The head's decision for ``question``, whose chat prompt's hidden state is
    ``hidden``: sequential, or a skeleton (graph when its parts build on each other)."""
    p = params.probability(hidden)
    if p < params.threshold:
        return RouteDecision(mode="sequential", source="trained", reason=f"not a list (p={p:.2f})")
    if parts_depend(two_ends(question, HEAD_CHARS, TAIL_CHARS)):
        return RouteDecision(mode="graph", source="trained", reason=f"dependent points (p={p:.2f})")
    return RouteDecision(mode="sot", source="trained", reason=f"independent points (p={p:.2f})")
