"""Train the router's head (:mod:`sotserve.trained_router`) and check it on the other set.

    python -m evals.train_router                      # the shipped file: LIMA + made-up
    python -m evals.train_router --train vicuna80+made-up --out /tmp/v.json  # the other way
    python -m evals.train_router --both               # every direction, no file written

Training sets: LIMA's 1,030 and vicuna80's 80 labelled questions (``../shared/data``,
or ``--data-dir``), and 640 questions written for this project
(``evals/data/router_questions.jsonl``, not drawn from any dataset) in the styles
vicuna80 lacks: Stack Exchange posts, pasted texts with an instruction, how-tos, one-line
facts. Sets join with "+"; a direction trains on sets that hold neither of the two it is
scored on, so LIMA and vicuna80 stay held apart from each other.

Features: the embedded model's final hidden state at the last token of each
question's chat prompt, computed by our engine (``LLM.embed``), one question at a
time in file order from an empty prefix cache, so the same data and seed give the
same parameters. The head is an L2-regularized logistic regression (float64, L-BFGS,
on standardized features); its L2 strength is chosen by k-fold cross-validation on the
training set alone (the lowest out-of-fold log-loss, which also leaves its
probabilities calibrated), and its threshold follows from what a wrong skeleton costs
against a wrong sequential answer (``--skeleton-cost``, :data:`SKELETON_COST`). The
set it was not trained on is only ever scored.

The public data stays outside the product: the script reads it and ships only the
parameters derived from it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from engine import LLM
from evals.summary import router_metrics
from prompts import ChatRenderer
from sotserve import trained_router as tr

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
SETS = {"lima": "lima_router.jsonl", "vicuna80": "vicuna80.jsonl"}
# Questions written for this project (not drawn from any dataset), shipped with it: the
# styles LIMA has and vicuna80 lacks (Stack Exchange posts, pasted texts, how-tos,
# one-line facts), so that neither held-out set is needed to train on them.
MADE_UP = Path(__file__).resolve().parent / "data" / "router_questions.jsonl"
# what the shipped parameters are trained on
SHIPPED_TRAIN = "lima+made-up"
# --both: (trained on, scored on); each scored set is absent from its training sets
DIRECTIONS = (
    ("lima+made-up", "vicuna80"),
    ("vicuna80+made-up", "lima"),
    ("lima", "vicuna80"),
    ("vicuna80", "lima"),
    ("made-up", "vicuna80"),
    ("made-up", "lima"),
)
PACKAGE_FILE = Path(tr.__file__).parent / tr.PARAMS_DIR
L2_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
FOLDS = 5
# A skeleton given to a question that does not suit one costs the answer its shape and
# quality (math, code, a story cut into points); a sequential answer to one that does
# costs only time. Weighing the first 1.5 times the second puts the threshold at 0.6.
# It acts on probabilities: the head's out-of-fold probabilities on its training
# sets are calibrated (README), and no threshold is fitted to a training set, so none
# follows that set's mix of questions to another.
SKELETON_COST = 1.5


@dataclass
class Labelled:
    """A labelled question set: the questions, their ``sot_suitable`` labels, and the
    SHA-256 of the file they came from."""

    name: str
    questions: list[str]
    labels: list[bool]
    sha256: str
    parts: tuple[Labelled, ...] = ()  # the sets it joins, if several


def load_labelled(path: Path) -> Labelled:
    """Every line with a ``question`` and a boolean ``sot_suitable`` (LIMA's and
    vicuna80's formats both)."""
    raw = path.read_bytes()
    questions, labels = [], []
    for line in raw.decode("utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if isinstance(row.get("question"), str) and isinstance(row.get("sot_suitable"), bool):
            questions.append(row["question"])
            labels.append(row["sot_suitable"])
    if not questions:
        raise SystemExit(f"{path}: no labelled question (question, sot_suitable)")
    return Labelled(path.name, questions, labels, hashlib.sha256(raw).hexdigest())


def resolve(name_or_path: str, data_dir: Path) -> Path:
    if name_or_path == "made-up":
        return MADE_UP
    return data_dir / SETS[name_or_path] if name_or_path in SETS else Path(name_or_path)


def load_sets(names: str, data_dir: Path) -> Labelled:
    """The sets named in ``names`` ("lima", "vicuna80", "made-up" or JSONL paths,
    joined by "+") as one, in that order (:func:`join_sets`)."""
    return join_sets([load_labelled(resolve(n, data_dir)) for n in names.split("+")])


def join_sets(parts: list[Labelled]) -> Labelled:
    """``parts`` as one set, in order; its hash covers every part's bytes."""
    if len(parts) == 1:
        return parts[0]
    digest = hashlib.sha256("".join(p.sha256 for p in parts).encode()).hexdigest()
    return Labelled(
        "+".join(p.name for p in parts),
        [q for p in parts for q in p.questions],
        [y for p in parts for y in p.labels],
        digest,
        tuple(parts),
    )


def embed_questions(llm: LLM, questions: list[str]) -> torch.Tensor:
    """[N, hidden] hidden states of the questions' router prompts, one at a time
    (a fixed order of fixed-size steps: the figures do not depend on batching), from
    an empty prefix cache: a prompt prefilled after a cached prefix gets hidden states
    that differ in the last digits (other matmul shapes), so without the reset a set's
    features would depend on which sets were embedded before it."""
    renderer = ChatRenderer(llm.tokenizer)
    llm.reset_prefix_cache()
    rows = []
    for q in questions:
        ids = renderer.render(tr.question_messages(q))
        rows.append(llm.embed([ids])[0])
    return torch.stack(rows).to(torch.float64)


class Features:
    """Hidden states of labelled sets (:func:`embed_questions`): each set's computed
    once, however sets are joined, and kept as ``<sha256>.pt`` in ``folder`` if one is
    given (reused from there by a later run on the same file)."""

    def __init__(self, llm: LLM, folder: Path | None = None) -> None:
        self.llm = llm
        self.folder = folder
        self._sets: dict[str, torch.Tensor] = {}

    def __call__(self, data: Labelled) -> torch.Tensor:
        if data.parts:
            return torch.cat([self(p) for p in data.parts])
        if data.sha256 in self._sets:
            return self._sets[data.sha256]
        path = self.folder / f"{data.sha256[:16]}.pt" if self.folder else None
        if path is not None and path.exists():
            x = torch.load(path)
        else:
            t0 = time.perf_counter()
            x = embed_questions(self.llm, data.questions)
            dt = time.perf_counter() - t0
            print(f"{data.name}: {len(data.questions)} hidden states in {dt:.1f} s "
                  f"({1e3 * dt / len(data.questions):.1f} ms a question)", flush=True)  # fmt: skip
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(x, path)
        self._sets[data.sha256] = x
        return x


def fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float) -> tuple[torch.Tensor, float]:
    """Weights and bias minimizing mean log-loss + ``l2/2 * |w|^2`` (x standardized)."""
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=500, tolerance_grad=1e-10,
                            tolerance_change=1e-12, history_size=20,
                            line_search_fn="strong_wolfe")  # fmt: skip

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y)
        loss = loss + 0.5 * l2 * (w @ w)
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), float(b.detach())


def standardize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mean = x.mean(0)
    std = x.std(0).clamp_min(1e-6)
    return (x - mean) / std, mean, std


def cost_threshold(skeleton_cost: float) -> float:
    """The P(skeleton) above which a skeleton costs less in expectation, when giving one
    to a question that does not suit it costs ``skeleton_cost`` times what answering a
    suitable question sequentially does: ``p * 1 >= (1 - p) * cost``."""
    if not skeleton_cost > 0:
        raise ValueError(f"skeleton cost must be positive, not {skeleton_cost}")
    return round(skeleton_cost / (1.0 + skeleton_cost), 4)


@dataclass
class Head:
    """A fitted head: ``sigmoid(weights . h + bias) >= threshold`` says "skeleton"."""

    weights: torch.Tensor  # on raw hidden states (the standardization folded in)
    bias: float
    threshold: float
    l2: float
    out_of_fold: torch.Tensor  # each training example's P(skeleton) from the other folds


def train(
    x: torch.Tensor, labels: list[bool], seed: int, skeleton_cost: float = SKELETON_COST
) -> Head:
    """The head on ``x``: l2 by cross-validation, the threshold from ``skeleton_cost``
    (:func:`cost_threshold`)."""
    y = torch.tensor(labels, dtype=torch.float64)
    n = len(labels)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    folds = [order[i::FOLDS] for i in range(FOLDS)]
    best: tuple[float, float, torch.Tensor] | None = None  # (log-loss, l2, out-of-fold)
    for l2 in L2_GRID:
        oof = torch.empty(n, dtype=torch.float64)
        for k in range(FOLDS):
            test = folds[k]
            fit = torch.cat([folds[j] for j in range(FOLDS) if j != k])
            xs, mean, std = standardize(x[fit])
            w, b = fit_logistic(xs, y[fit], l2)
            oof[test] = torch.sigmoid(((x[test] - mean) / std) @ w + b)
        loss = float(torch.nn.functional.binary_cross_entropy(oof.clamp(1e-9, 1 - 1e-9), y))
        if best is None or loss < best[0]:
            best = (loss, l2, oof)
    assert best is not None
    _, l2, oof = best
    xs, mean, std = standardize(x)
    w, b = fit_logistic(xs, y, l2)
    # fold the standardization in: w . (h - mean) / std + b = (w / std) . h + b'
    raw_w = w / std
    return Head(raw_w, b - float(raw_w @ mean), cost_threshold(skeleton_cost), l2, oof)


class Band(NamedTuple):
    """Training examples whose predicted P(skeleton) lies in [lo, hi)."""

    lo: float
    hi: float
    observed: float  # the share of them labelled suitable
    count: int


def calibration(prob: torch.Tensor, labels: list[bool], bins: int = 5) -> list[Band]:
    """How often the label is "suitable" in each band of predicted probability: near
    each band's middle when the probabilities are calibrated, which a threshold read
    as a cost ratio (:func:`cost_threshold`) needs."""
    y = torch.tensor(labels, dtype=torch.float64)
    bands = []
    for i in range(bins):
        lo, hi = i / bins, (i + 1) / bins
        inside = (prob >= lo) & ((prob < hi) if i < bins - 1 else (prob <= hi))
        if inside.any():
            bands.append(Band(lo, hi, float(y[inside].mean()), int(inside.sum())))
    return bands


def format_bands(bands: list[Band]) -> str:
    return ", ".join(f"{b.lo:.1f}-{b.hi:.1f}: {b.observed:.2f} of {b.count}" for b in bands)


def _round(value: float) -> float:
    # seven significant digits: the file reads the same from run to run
    return float(f"{value:.7g}")


def make_params(llm: LLM, data: Labelled, head: Head, seed: int) -> tr.RouterParams:
    """The parameter file of ``head``, trained on ``data`` with ``seed``, for ``llm``'s model."""
    (probe,) = embed_questions(llm, [tr.PROBE_QUESTION]).to(torch.float32)
    return tr.RouterParams(
        version=tr.PARAMS_VERSION,
        model=llm.engine.model_name.split(".")[0],
        hidden_size=int(head.weights.shape[0]),
        vocab_size=len(llm.tokenizer),
        probe=[_round(v) for v in probe.tolist()],
        weights=[_round(v) for v in head.weights.tolist()],
        bias=_round(head.bias),
        threshold=head.threshold,
        trained_on=data.name,
        data_sha256=data.sha256,
        examples=len(data.labels),
        seed=seed,
        l2=head.l2,
    )


def score(params: tr.RouterParams, data: Labelled, x: torch.Tensor) -> dict[str, object]:
    """Router metrics of ``params`` on ``data`` (``x``: its hidden states)."""
    picks = [
        "sot" if params.probability(h) >= params.threshold else "sequential"
        for h in x.to(torch.float32)
    ]
    return router_metrics(list(zip(data.labels, picks, strict=True)))


def print_direction(train_name: str, test_name: str, metrics: dict[str, object]) -> None:
    print(
        f"trained on {train_name}, scored on {test_name}: accuracy {metrics['accuracy']:.3f}, "
        f"precision {metrics['precision'] or 0:.3f}, recall {metrics['recall'] or 0:.3f} "
        f"over {metrics['questions']} questions; confusion {json.dumps(metrics['confusion'])}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--train", default=SHIPPED_TRAIN,
        help="lima, vicuna80, made-up or a JSONL path, or several joined by '+'",
    )  # fmt: skip
    ap.add_argument("--check", default=None, help="the set to score on (default: the other)")
    ap.add_argument("--data-dir", type=Path, default=DATA_DIR)
    ap.add_argument(
        "--out", type=Path, default=None,
        help=f"parameter file (default: the package's, when training on {SHIPPED_TRAIN})",
    )  # fmt: skip
    ap.add_argument(
        "--both", action="store_true",
        help="train and score every direction (LIMA and vicuna80 each held apart)",
    )  # fmt: skip
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--skeleton-cost", type=float, default=SKELETON_COST,
        help="cost of a skeleton for an unsuitable question, against a sequential answer "
        "to a suitable one; the threshold is cost / (1 + cost)",
    )  # fmt: skip
    ap.add_argument(
        "--features", type=Path, default=None,
        help="cache of hidden states (a .pt file per set under this folder)",
    )  # fmt: skip
    args = ap.parse_args(argv)

    llm = LLM()
    features = Features(llm, args.features)

    pairs = list(DIRECTIONS) if args.both else [
        (args.train, args.check or ("vicuna80" if "lima" in args.train.split("+") else "lima"))
    ]  # fmt: skip
    for train_name, test_name in pairs:
        data = load_sets(train_name, args.data_dir)
        test = load_sets(test_name, args.data_dir)
        head = train(features(data), data.labels, args.seed, args.skeleton_cost)
        params = make_params(llm, data, head, args.seed)
        bands = format_bands(calibration(head.out_of_fold, data.labels))
        print(f"{data.name}: l2 {params.l2}, threshold {params.threshold}; out-of-fold "
              f"share suitable by P(skeleton): {bands}", flush=True)  # fmt: skip
        print_direction(data.name, test.name, score(params, test, features(test)))
        out = args.out
        if out is None and not args.both and train_name == SHIPPED_TRAIN:
            out = PACKAGE_FILE / tr.params_file_name(params.model)
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(params.to_json())
            print(f"wrote {out}")


if __name__ == "__main__":
    main()
