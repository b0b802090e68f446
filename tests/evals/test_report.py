"""``evals.report``: report.md and its plots.

The records here are synthetic, built by hand with round latencies, so that the
report can be checked against figures worked out in the test, without running a
model.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest
from PIL import Image

from evals.plots import pick_timeline_record
from evals.records import AnswerTick, PointRecord, RunRecord, Span
from evals.report import write_report
from evals.summary import summarize

MODES = ["sequential", "sot", "graph", "auto"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# question_id: (category, sot_suitable, sequential latency, sot latency)
QUESTIONS = {
    1: ("generic", True, 10.0, 4.0),  # 2.5x
    2: ("generic", True, 9.0, 4.5),  # 2.0x
    3: ("knowledge", True, 12.0, 4.0),  # 3.0x
    4: ("knowledge", True, 8.0, 5.0),  # 1.6x
    5: ("math", False, 6.0, 7.5),  # 0.8x
    6: ("math", False, 5.0, 5.0),  # 1.0x
}
GRAPH_FACTOR = 1.25  # graph answers take 1.25x sot's time
# The router picks a skeleton mode for the suitable questions and for question 6.
ROUTES = {1: "sot", 2: "sot", 3: "graph", 4: "sot", 5: "sequential", 6: "sot"}
TITLES = ["Set clear goals", "Prioritise the hard work | first", "Review progress every week"]


SEQ_RATE = 20  # sequential answers: one token every 1/20 s, 20 * latency tokens
SOT_TOKENS, GRAPH_TOKENS = 30, 50  # a skeleton answer's points, three of them


def sequential_record(qid: int, latency: float, repeat: int = 0, **kw) -> RunRecord:
    category, suitable, *_ = QUESTIONS[qid]
    n = int(SEQ_RATE * latency)
    ticks = [AnswerTick(t_s=latency * k / n, tokens=1) for k in range(1, n + 1)]
    return RunRecord(
        question_id=qid,
        category=category,
        sot_suitable=suitable,
        mode=kw.pop("mode", "sequential"),
        resolved_mode="sequential",
        repeat=repeat,
        answer="A plain answer.",
        finish_reason="stop",
        latency_s=latency,
        ttft_s=0.3,
        generated_tokens=int(40 * latency),
        prompt_tokens=60,
        cached_tokens=0,
        requests=1,
        timeline=[Span(kind="answer", start_s=0.0, end_s=latency)],
        answer_ticks=ticks,
        answer_tokens_counted="tokenizer",
        checks={"empty_answer": False, "repetitive": False, "truncated": False},
        **kw,
    )


def skeleton_record(qid: int, mode: str, latency: float, **kw) -> RunRecord:
    """A skeleton answer: the skeleton takes 20% of the time, then three points run
    in parallel, the last finishing at ``latency``."""
    category, suitable, *_ = QUESTIONS[qid]
    skeleton = round(0.2 * latency, 3)
    ends = [latency * 0.8, latency, latency * 0.9]
    deps = [[], [1], []] if mode == "graph" else [[], [], []]
    per_point = GRAPH_TOKENS if mode == "graph" else SOT_TOKENS
    # the merger releases each point whole, in order, once the ones before it are done
    ticks = [AnswerTick(t_s=t, tokens=per_point) for t in (ends[0], latency, latency)]
    return RunRecord(
        question_id=qid,
        category=category,
        sot_suitable=suitable,
        mode=mode,
        resolved_mode=kw.pop("resolved_mode", mode),
        answer="1. Set clear goals ...",
        finish_reason="stop",
        latency_s=latency,
        ttft_s=skeleton + 0.2,
        skeleton_s=skeleton,
        generated_tokens=int(60 * latency),
        prompt_tokens=400,
        cached_tokens=300,
        requests=4,
        num_points=3,
        points=[
            PointRecord(index=i + 1, title=TITLES[i], depends_on=deps[i], completion_tokens=50)
            for i in range(3)
        ],
        timeline=[
            Span(kind="skeleton", start_s=0.0, end_s=skeleton),
            *(
                Span(kind="point", index=i + 1, start_s=skeleton + 0.05 * i, end_s=ends[i])
                for i in range(3)
            ),
        ],
        answer_ticks=ticks,
        answer_tokens_counted="tokenizer",
        checks={
            "empty_points": False,
            "duplicate_points": qid == 2 and mode == "graph",
            "truncated": qid == 5 and mode == "sot",
            "repetitive": False,
            "empty_answer": False,
        },
        **kw,
    )


def make_records() -> list[RunRecord]:
    records = []
    for qid, (_, _, seq, sot) in QUESTIONS.items():
        records.append(sequential_record(qid, seq))
        records.append(skeleton_record(qid, "sot", sot))
        records.append(skeleton_record(qid, "graph", sot * GRAPH_FACTOR))
        route = ROUTES[qid]
        if route == "sequential":
            records.append(sequential_record(qid, seq * 1.02, mode="auto", routed_mode=route))
        else:
            latency = (sot if route == "sot" else sot * GRAPH_FACTOR) * 1.02
            records.append(
                skeleton_record(qid, "auto", latency, resolved_mode=route, routed_mode=route)
            )
    # one failed graph run, which must not count
    records.append(
        RunRecord(
            question_id=1,
            category="generic",
            sot_suitable=True,
            mode="graph",
            repeat=1,
            ok=False,
            error="timeout",
        )
    )
    return records


CONFIG = {
    "dataset": "vicuna80",
    "modes": MODES,
    "backend": "local",
    "model": "HuggingFaceTB/SmolLM2-360M-Instruct",
    "dtype": "bfloat16",
    "device": "cuda",
    "max_tokens": 512,
    "seed": 0,
    "repeats": 1,
    "concurrency": 1,
    "limit": None,
    "categories": ["generic", "knowledge", "math"],
    "cache_policy": "reset",
    "machine": {"gpu": "NVIDIA H100", "torch": "2.5.1"},
}
JUDGE = {
    "name": "gpt-judge-v1",
    "results": {
        "sot": {"win": 3, "tie": 1, "loss": 2, "invalid": 0},
        "graph": {"win": 2, "tie": 2, "loss": 1, "invalid": 1},
    },
}


def make_summary(records: list[RunRecord], modes: list[str], judge: dict | None) -> dict:
    return summarize(records, modes) | {"config": CONFIG, "judge": judge}


def check_png(path: Path, min_size: tuple[int, int] = (600, 300)) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 5_000
    with Image.open(path) as image:
        width, height = image.size
    assert width >= min_size[0] and height >= min_size[1]


@pytest.fixture(scope="module")
def full_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Path], str]:
    out = tmp_path_factory.mktemp("report")
    records = make_records()
    paths = write_report(out, records, make_summary(records, MODES, JUDGE))
    return paths, paths["report"].read_text()


def test_report_files(full_report: tuple[dict[str, Path], str]) -> None:
    paths, text = full_report
    assert set(paths) == {"report", "latency", "speedup", "equal_length", "timeline"}
    assert paths["report"].name == "report.md"
    for key, name in [
        ("latency", "latency_by_mode.png"),
        ("speedup", "speedup_by_category.png"),
        ("equal_length", "equal_length_speedup.png"),
        ("timeline", "timeline.png"),
    ]:
        assert paths[key].name == name
        assert paths[key].parent == paths["report"].parent
        check_png(paths[key])
        assert f"]({name})" in text  # embedded by a relative link


def test_report_headline_numbers(full_report: tuple[dict[str, Path], str]) -> None:
    _, text = full_report
    ratios = {qid: seq / sot for qid, (_, _, seq, sot) in QUESTIONS.items()}
    # by hand: sorted 0.8, 1.0, 1.6, 2.0, 2.5, 3.0 -> median (1.6 + 2.0) / 2
    assert statistics.median(ratios.values()) == pytest.approx(1.8)
    assert "median speed-up **1.80x**" in text
    graph = statistics.median(r / GRAPH_FACTOR for r in ratios.values())  # 1.44
    assert f"{graph:.2f}x" == "1.44x" and "1.44x" in text
    # sequential median latency: median(10, 9, 12, 8, 6, 5) = 8.5
    assert "8.50 s" in text
    # per category: generic (2.5 + 2.0) / 2, knowledge (3.0 + 1.6) / 2, math (0.8 + 1.0) / 2
    assert "| generic | 9.50 s | 2.25x (n=2) |" in text
    assert "| knowledge | 10.00 s | 2.30x (n=2) |" in text
    assert "| math | 5.50 s | 0.90x (n=2) |" in text
    # sot_suitable questions only: median of 2.5, 2.0, 3.0, 1.6 = 2.25x
    suitable = text.split("`sot_suitable` questions")[1].split("## Speed-up by category")[0]
    assert "| Median speed-up | – | 2.25x |" in suitable
    assert "| Cache hit ratio | 0% | 75% |" in text  # 300 of 400 prompt tokens
    assert "| Runs (errors) | 6 (0) | 6 (0) | 7 (1) | 6 (0) |" in text


def test_report_equal_length_figures(full_report: tuple[dict[str, Path], str]) -> None:
    _, text = full_report
    # sequential reaches n tokens at n / 20 s (extrapolated at the same rate past its
    # end), so a sot answer's 90 tokens take it 4.5 s: 4.5 / sot latency (4, 4.5, 4, 5,
    # 7.5, 5) = 1.125, 1.0, 1.125, 0.9, 0.6, 0.9 -> median 0.95x, none extrapolated
    assert "| Median equal-length speed-up | – | 0.95x |" in text
    # graph's 150 tokens: 7.5 s over 1.25x sot's latency -> 1.5, 1.33, 1.5, 1.2, 0.8,
    # 1.2 -> median 1.27x; questions 5 and 6 (120 and 100 sequential tokens) extrapolated
    assert "| Median equal-length speed-up | – | 0.95x | 1.27x |" in text
    assert "| Equal-length paired (extrapolated) | – | 6 (0) | 6 (2) |" in text
    # tokens/s: sequential 20 on every question; sot 90 / latency -> median of
    # 12, 18, 18, 20, 22.5, 22.5 = 19.0
    assert "| Median answer tokens/s | 20.0 | 19.0 |" in text
    assert "equal-length speed-up 0.95x (0 of 6 extrapolated), 19.0 answer tokens/s" in text
    assert "Equal-length speed-up: the time the sequential answer" in text


def test_report_config_router_judge_checks(full_report: tuple[dict[str, Path], str]) -> None:
    _, text = full_report
    assert "| `model` | HuggingFaceTB/SmolLM2-360M-Instruct |" in text
    assert "| `machine.gpu` | NVIDIA H100 |" in text
    assert "| `limit` | – |" in text
    assert "| `modes` | sequential, sot, graph, auto |" in text
    # router: 5 of 6 right (question 6 is not suitable but went to sot)
    assert "Accuracy: **83%** on 6 labelled" in text
    assert "| suitable | 0 | 3 | 1 |" in text
    assert "| not suitable | 1 | 1 | 0 |" in text
    assert "gpt-judge-v1" in text
    assert "| sot | 3 | 1 | 2 | 0 | 50% |" in text
    assert "| graph | 2 | 2 | 1 | 1 | 40% |" in text
    assert "| truncated | 0 | 1 | 0 | 0 |" in text
    assert "| duplicate_points | 0 | 0 | 1 | 0 |" in text
    assert "Skipped" not in text


def test_timeline_pick_is_the_median_speedup() -> None:
    record, baseline = pick_timeline_record(make_records())
    # sot speed-ups 0.8 ... 3.0 have median 1.8; in log space 2.0x (question 2,
    # log(2.0 / 1.8) = 0.105) is closer to it than 1.6x (log(1.8 / 1.6) = 0.118)
    assert (record.mode, record.question_id) == ("sot", 2)
    assert baseline is not None
    assert (baseline.mode, baseline.question_id) == ("sequential", 2)


def test_only_sequential(tmp_path: Path) -> None:
    records = [sequential_record(qid, seq) for qid, (_, _, seq, _) in QUESTIONS.items()]
    paths = write_report(tmp_path, records, make_summary(records, ["sequential"], None))
    assert set(paths) == {"report", "latency", "equal_length"}  # tokens/s only
    check_png(paths["latency"])
    check_png(paths["equal_length"])
    assert not (tmp_path / "speedup_by_category.png").exists()
    text = paths["report"].read_text()
    assert "_Skipped: no non-sequential mode" in text
    assert "_Skipped: no sot or graph answer" in text
    assert "No judge was run." in text
    assert "the router was not evaluated" in text


def test_judge_none(tmp_path: Path) -> None:
    records = make_records()
    summary = make_summary(records, MODES, None)
    paths = write_report(tmp_path / "nested", records, summary)
    text = paths["report"].read_text()
    assert "No judge was run." in text
    assert "gpt-judge-v1" not in text
    assert set(paths) == {"report", "latency", "speedup", "equal_length", "timeline"}


def test_no_timeline_without_points(tmp_path: Path) -> None:
    """Skeleton runs that recorded no timeline skip that plot, not the others."""
    records = [
        r.model_copy(update={"timeline": []}) if r.mode != "sequential" else r
        for r in make_records()
    ]
    paths = write_report(tmp_path, records, make_summary(records, MODES, JUDGE))
    assert set(paths) == {"report", "latency", "speedup", "equal_length"}
    assert "_Skipped: no sot or graph answer" in paths["report"].read_text()
