"""The latency harness: datasets, speed-up arithmetic, and whole runs end to end."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from aiohttp import web
from live_server import ADMIN_KEY, REPO, free_port

from evals.dataset import DatasetError, load_dataset, select
from evals.latency import main_async, parse_args, rotated
from evals.records import AnswerTick, RunRecord
from evals.runner import answer_ticks
from evals.summary import (
    equal_length_speedup,
    equal_length_speedups,
    geomean,
    router_stats,
    speedups,
    summarize,
    time_to_tokens,
)

# -- dataset ---------------------------------------------------------------------------------
ROWS = [
    {"question_id": 1, "category": "generic", "question": "How do I sleep better?",
     "sot_suitable": True},
    {"question_id": 2, "category": "generic", "question": "How can I save money?",
     "sot_suitable": True},
    {"question_id": 3, "category": "math", "question": "What is 12 times 13?",
     "sot_suitable": False},
]  # fmt: skip


def write_dataset(path: Path, rows: list, bad_lines: dict[int, str] | None = None) -> Path:
    lines = [json.dumps(r) for r in rows]
    for at, text in sorted((bad_lines or {}).items()):
        lines.insert(at - 1, text)
    path.write_text("\n".join(lines) + "\n")
    return path


def test_malformed_lines_are_reported_by_line_number_and_the_rest_kept(tmp_path):
    path = write_dataset(
        tmp_path / "q.jsonl",
        [*ROWS, {"question_id": 1, "category": "x", "question": "dup"}],
        {2: "{not json", 4: json.dumps({"question_id": 9, "question": "no category"}),
         6: json.dumps({"question_id": 10, "category": "c", "question": "  "})},
    )  # fmt: skip
    ds = load_dataset(path)
    assert [q.question_id for q in ds.questions] == [1, 2, 3]
    assert ds.questions[0].sot_suitable is True and ds.questions[2].sot_suitable is False
    reasons = dict(ds.skipped)
    assert sorted(reasons) == [2, 4, 6, 7]
    assert "not valid JSON" in reasons[2]
    assert "missing category" in reasons[4]
    assert "non-empty" in reasons[6]
    assert "duplicate question_id 1" in reasons[7]


def test_missing_or_empty_dataset_is_an_error(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(tmp_path / "nope.jsonl")
    (tmp_path / "bad.jsonl").write_text("[1]\n\n")
    with pytest.raises(DatasetError, match="no valid question"):
        load_dataset(tmp_path / "bad.jsonl")


def test_select_filters_in_dataset_order(tmp_path):
    qs = load_dataset(write_dataset(tmp_path / "q.jsonl", ROWS)).questions
    assert [q.question_id for q in select(qs, ["math"])] == [3]
    assert [q.question_id for q in select(qs, per_category=1)] == [1, 3]
    assert [q.question_id for q in select(qs, suitable_only=True, limit=1)] == [1]


def test_modes_rotate_so_each_goes_first_equally():
    modes = ["sequential", "sot", "graph"]
    firsts = [rotated(modes, k)[0] for k in range(6)]
    assert sorted(firsts) == sorted(modes * 2)


# -- arithmetic ------------------------------------------------------------------------------
def rec(qid, mode, latency, ttft=None, repeat=0, ok=True, **kw) -> RunRecord:
    return RunRecord(
        question_id=qid, category=kw.pop("category", "generic"), mode=mode,
        latency_s=latency if ok else None, ttft_s=ttft, repeat=repeat, ok=ok, **kw,
    )  # fmt: skip


def test_speedups_are_paired_per_question_and_median_over_repeats():
    # synthetic records with chosen times, so the arithmetic can be checked by hand
    records = [
        rec(1, "sequential", 6.0, 0.1), rec(1, "sot", 2.0, 0.5, repeat=0),
        rec(1, "sot", 4.0, 0.5, repeat=1),  # median over repeats: 3.0 -> 6/3 = 2x
        rec(2, "sequential", 4.0, 0.1), rec(2, "sot", 1.0, 0.4),  # 4x
        rec(3, "sequential", 3.0, 0.1), rec(3, "sot", 3.0, 0.2),  # 1x
        rec(4, "sequential", 5.0), rec(4, "sot", None, ok=False),  # failed: not paired
        rec(5, "sot", 1.0),  # no baseline: not paired
    ]  # fmt: skip
    sp = speedups(records, "sot")
    assert sp == {1: 2.0, 2: 4.0, 3: 1.0}
    stats = summarize(records, ["sequential", "sot"])["overall"]["sot"]
    assert stats["paired"] == 3 and stats["errors"] == 1
    assert stats["median_speedup"] == 2.0
    assert stats["geomean_speedup"] == pytest.approx(2.0)  # (2 * 4 * 1) ** (1/3)
    assert (stats["min_speedup"], stats["max_speedup"]) == (1.0, 4.0)
    assert stats["median_ttft_speedup"] == pytest.approx(0.25)  # 0.1/0.5, 0.1/0.4, 0.1/0.2
    assert geomean([2.0, 8.0]) == pytest.approx(4.0) and geomean([]) is None
    seq = summarize(records, ["sequential"])["overall"]["sequential"]
    assert math.isclose(seq["median_latency_s"], 4.5)  # 3, 4, 5, 6


def ticks(*pairs: tuple[float, int]) -> list[AnswerTick]:
    return [AnswerTick(t_s=t, tokens=n) for t, n in pairs]


# sequential: first token at 0.5 s, then one token every 0.1 s: 10 tokens by 1.4 s
SEQ = ticks(*((0.5 + 0.1 * k, 1) for k in range(10)))


def test_equal_length_speedup_within_the_sequential_answer():
    assert time_to_tokens(SEQ, 4) == (pytest.approx(0.8), False)
    # exactly as long: the time of sequential's last token
    assert time_to_tokens(SEQ, 10) == (pytest.approx(1.4), False)
    fig, extrapolated = equal_length_speedup(SEQ, 10, 0.7)
    assert fig == pytest.approx(2.0) and not extrapolated
    # a delta of several tokens counts each of them at its arrival
    bursty = ticks((0.2, 1), (1.0, 5), (2.0, 4))
    assert time_to_tokens(bursty, 2) == (1.0, False) and time_to_tokens(bursty, 6) == (1.0, False)
    assert time_to_tokens(bursty, 7) == (2.0, False)


def test_equal_length_speedup_extrapolates_a_shorter_sequential_answer():
    # 14 tokens: 4 past the last, at sequential's own 0.1 s per token after the first
    t, extrapolated = time_to_tokens(SEQ, 14)
    assert t == pytest.approx(1.4 + 4 * 0.1) and extrapolated
    fig, extrapolated = equal_length_speedup(SEQ, 14, 0.9)
    assert fig == pytest.approx(1.8 / 0.9) and extrapolated
    # the rate counts the tokens after the first tick: (2.0 - 0.2) s over 9 tokens
    t, _ = time_to_tokens(ticks((0.2, 1), (1.0, 5), (2.0, 4)), 12)
    assert t == pytest.approx(2.0 + 2 * 1.8 / 9)
    # no rate to go on, no tokens, no latency: no figure
    assert time_to_tokens(ticks((0.3, 3)), 5) is None
    assert time_to_tokens(SEQ, 0) is None and time_to_tokens([], 3) is None
    assert equal_length_speedup(SEQ, 5, 0.0) is None


def test_equal_length_speedups_per_question_and_in_the_summary():
    seq = dict(answer_ticks=SEQ)
    records = [
        rec(1, "sequential", 1.4, **seq),
        rec(1, "sot", 0.4, answer_ticks=ticks((0.3, 2), (0.4, 2))),  # 4 tokens: 0.8 / 0.4
        rec(2, "sequential", 1.4, **seq),
        rec(2, "sot", 0.6, answer_ticks=ticks((0.6, 12))),  # 12: (1.4 + 0.2) / 0.6
        rec(3, "sequential", 1.4),  # no timeline (an old record): not paired
        rec(3, "sot", 0.5, answer_ticks=ticks((0.5, 3))),
    ]
    eq = equal_length_speedups(records, "sot")
    assert eq.keys() == {1, 2}
    assert eq[1] == (pytest.approx(2.0), False)
    assert eq[2] == (pytest.approx(1.6 / 0.6), True)
    overall = summarize(records, ["sequential", "sot"])["overall"]
    sot = overall["sot"]
    assert sot["median_equal_length_speedup"] == pytest.approx((2.0 + 1.6 / 0.6) / 2)
    assert (sot["equal_length_paired"], sot["equal_length_extrapolated"]) == (2, 1)
    assert sot["median_speedup"] == pytest.approx(2.8)  # the plain one, beside it
    # answer tokens / latency: 4 / 0.4, 12 / 0.6, 3 / 0.5
    assert sot["median_answer_tokens_per_s"] == pytest.approx(10.0)
    assert overall["sequential"]["median_answer_tokens_per_s"] == pytest.approx(10 / 1.4)
    assert "median_equal_length_speedup" not in overall["sequential"]


def test_answer_ticks_count_tokens_with_the_tokenizer_or_one_a_delta():
    deltas = [(0.1, "ab"), (0.2, "c"), (0.5, "defg")]
    # a toy tokenizer: a token every two characters, rounded up
    got, how = answer_ticks(deltas, lambda text: (len(text) + 1) // 2)
    assert how == "tokenizer"
    assert [(t.t_s, t.tokens) for t in got] == [(0.1, 1), (0.2, 1), (0.5, 2)]
    got, how = answer_ticks(deltas, lambda text: None)
    assert how == "deltas" and [t.tokens for t in got] == [1, 1, 1]
    # a count that falls (a later piece merged with an earlier token) adds nothing
    counts = iter([2, 1, 3])
    got, _ = answer_ticks(deltas, lambda text: next(counts))
    assert [t.tokens for t in got] == [2, 0, 1]


def test_router_confusion_against_labels():
    records = [
        rec(1, "auto", 1.0, sot_suitable=True, routed_mode="sot", resolved_mode="sot"),
        # routed to sot, fell back to sequential: the router's pick still counts
        rec(2, "auto", 1.0, sot_suitable=True, routed_mode="sot", resolved_mode="sequential"),
        rec(3, "auto", 1.0, sot_suitable=True, routed_mode="sequential"),
        rec(4, "auto", 1.0, sot_suitable=False, routed_mode="sequential"),
        rec(5, "auto", 1.0, sot_suitable=False, routed_mode="graph"),
        rec(6, "auto", 1.0, sot_suitable=None, routed_mode="sot"),  # unlabelled: not counted
    ]
    r = router_stats(records)
    assert r["questions"] == 5 and r["accuracy"] == pytest.approx(3 / 5)
    assert r["confusion"]["suitable"] == {"sequential": 1, "sot": 2, "graph": 0}
    assert r["confusion"]["not_suitable"] == {"sequential": 1, "sot": 0, "graph": 1}


# -- whole runs -------------------------------------------------------------------------------
@pytest.mark.slow
def test_end_to_end_on_the_embedded_model(tmp_path):
    data = write_dataset(tmp_path / "three.jsonl", ROWS, {2: "oops, not json"})
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "evals.latency", "--dataset", str(data), "--out", str(out),
         "--modes", "sequential,sot,graph,auto", "--max-tokens", "96",
         "--judge-max-tokens", "24"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{data}:2: skipped: not valid JSON" in proc.stderr

    records = [RunRecord.model_validate_json(line) for line in (out / "results.jsonl").open()]
    assert len(records) == 3 * 4 and all(r.ok for r in records)
    assert {(r.question_id, r.mode) for r in records} == {
        (q["question_id"], m) for q in ROWS for m in ("sequential", "sot", "graph", "auto")
    }
    for r in records:
        # emptied before every run, and measured to be so
        assert r.cache_reset and r.question_cached_tokens == 0
        assert r.latency_s > 0 and 0 < r.ttft_s <= r.latency_s
        assert 0 < r.generated_tokens <= 96 and r.requests >= 1
        assert {"truncated", "repetitive", "empty_points"} <= r.checks.keys()
        if r.resolved_mode in ("sot", "graph"):
            kinds = [s.kind for s in r.timeline]
            assert kinds[0] == "skeleton" and kinds.count("point") == r.num_points >= 2
            assert r.skeleton_s is not None and r.cached_tokens > 0
            assert all(0 <= s.start_s <= s.end_s <= r.latency_s + 1e-6 for s in r.timeline)
        else:
            assert [s.kind for s in r.timeline] == ["answer"]
        # the token timeline: counted by the model's tokenizer, in time order, within
        # the answer, and as many tokens as the answer text has
        assert r.answer_tokens_counted == "tokenizer" and r.answer_ticks
        times = [t.t_s for t in r.answer_ticks]
        assert times == sorted(times) and r.ttft_s == times[0] <= times[-1] <= r.latency_s
        if r.mode == "sequential":  # one request: its completion, re-tokenized (+ EOS)
            assert abs(r.answer_tokens - r.generated_tokens) <= max(2, r.generated_tokens // 20)

    summary = json.loads((out / "summary.json").read_text())
    for mode in ("sot", "graph", "auto"):
        sp = speedups(records, mode)
        got = summary["overall"][mode]
        assert got["paired"] == 3
        assert got["median_speedup"] == pytest.approx(sorted(sp.values())[1])
        assert got["geomean_speedup"] == pytest.approx(geomean(sp.values()))
        eq = equal_length_speedups(records, mode)
        assert got["equal_length_paired"] == len(eq) == 3
        assert got["median_equal_length_speedup"] == pytest.approx(
            sorted(f for f, _ in eq.values())[1]
        )
        assert 0 <= got["equal_length_extrapolated"] <= 3
        assert got["median_answer_tokens_per_s"] > 0
    assert summary["overall"]["sequential"]["median_answer_tokens_per_s"] > 0
    assert summary["router"]["questions"] == 3
    assert summary["config"]["max_tokens"] == 96 and summary["config"]["cache"] == "cold"
    judge = summary["judge"]
    assert "SmolLM2" in judge["name"] and "in-process" in judge["name"]
    for mode in ("sot", "graph", "auto"):
        assert sum(judge["results"][mode].values()) == 3  # one verdict per question

    report = (out / "report.md").read_text()
    assert judge["name"] in report
    assert "Median equal-length speed-up" in report
    pngs = ("latency_by_mode.png", "speedup_by_category.png", "equal_length_speedup.png")
    for png in (*pngs, "timeline.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        assert png in report


def test_unreachable_backend_and_missing_dataset_fail_clearly(tmp_path):
    data = write_dataset(tmp_path / "q.jsonl", ROWS)
    url = f"http://127.0.0.1:{free_port()}"
    proc = subprocess.run(
        [sys.executable, "-m", "evals.latency", "--dataset", str(data), "--backend", url,
         "--out", str(tmp_path / "o")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and f"cannot reach an OpenAI-compatible server at {url}" in (
        proc.stderr
    )
    proc = subprocess.run(
        [sys.executable, "-m", "evals.latency", "--dataset", str(tmp_path / "none.jsonl")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    assert not (tmp_path / "o").exists()


async def test_sequential_against_a_plain_openai_server(tmp_path, aiohttp_plain_server):
    data = write_dataset(tmp_path / "q.jsonl", ROWS[:2])
    out = tmp_path / "out"
    args = parse_args(
        ["--dataset", str(data), "--backend", aiohttp_plain_server, "--modes", "sequential",
         "--out", str(out), "--judge", "none"]
    )  # fmt: skip
    assert await main_async(args) == 0
    records = [RunRecord.model_validate_json(line) for line in (out / "results.jsonl").open()]
    assert [r.question_id for r in records] == [1, 2]
    for r in records:
        assert r.ok and r.answer == "Plain answer." and r.resolved_mode == "sequential"
        assert r.generated_tokens == 3 and r.prompt_tokens == 12
        assert not r.cache_reset  # a plain server cannot be asked to empty its cache
        # no tokenizer over HTTP: a delta is a token (the plain server sends three)
        assert r.answer_tokens_counted == "deltas" and r.answer_tokens == 3
    # skeleton modes need a sotserve server
    args = parse_args(
        ["--dataset", str(data), "--backend", aiohttp_plain_server, "--modes", "sequential,sot",
         "--out", str(tmp_path / "o2")]
    )  # fmt: skip
    assert await main_async(args) == 2


@pytest.fixture
async def aiohttp_plain_server():
    """A fake plain OpenAI chat server (what vLLM or SGLang answer), because no such
    server can run here: streamed content, a usage chunk, no ``sot`` field, and no
    cache-reset endpoint."""

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": "plain-model", "owned_by": "vllm"}]})

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        assert "sot" not in body and body["model"] == "plain-model"
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i, text in enumerate(["Plain", " answer", "."]):
            finish = "stop" if i == 2 else None
            chunk = {"choices": [{"index": 0, "delta": {"content": text},
                                  "finish_reason": finish}]}  # fmt: skip
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        usage = {"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 3}}
        await resp.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())
        return resp

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    yield f"http://{host}:{port}"
    await runner.cleanup()


@pytest.mark.slow
async def test_against_a_sotserve_server_over_http(tmp_path, sotserve_url):
    data = write_dataset(tmp_path / "q.jsonl", ROWS[:1])
    out = tmp_path / "out"
    args = parse_args(
        ["--dataset", str(data), "--backend", sotserve_url, "--modes", "sequential,sot",
         "--out", str(out), "--judge", "none", "--max-tokens", "80",
         "--admin-api-key", ADMIN_KEY]
    )  # fmt: skip
    assert await main_async(args) == 0
    records = [RunRecord.model_validate_json(line) for line in (out / "results.jsonl").open()]
    assert {r.mode for r in records} == {"sequential", "sot"}
    sot = next(r for r in records if r.mode == "sot")
    # the server emptied its cache before the run, then the points hit the skeleton's prefix
    assert sot.cache_reset and sot.num_points >= 2 and sot.cached_tokens > 0
    assert "sotserve server" in json.loads((out / "summary.json").read_text())["config"]["backend"]
    # without a tokenizer each streamed delta counts one token, which undercounts the
    # skeleton answer's buffered points
    assert sot.answer_tokens_counted == "deltas"


@pytest.mark.slow
async def test_over_http_a_tokenizer_counts_the_answers_tokens(tmp_path, sotserve_url, tokenizer):
    data = write_dataset(tmp_path / "q.jsonl", ROWS[:1])
    out = tmp_path / "out"
    args = parse_args(
        ["--dataset", str(data), "--backend", sotserve_url, "--modes", "sot", "--out",
         str(out), "--judge", "none", "--max-tokens", "80", "--tokenizer", "embedded"]
    )  # fmt: skip
    assert await main_async(args) == 0
    (sot,) = [RunRecord.model_validate_json(line) for line in (out / "results.jsonl").open()]
    assert sot.answer_tokens_counted == "tokenizer"
    want = len(tokenizer.encode(sot.answer, add_special_tokens=False))
    assert abs(sot.answer_tokens - want) <= 2, (sot.answer_tokens, want)


async def test_auto_max_load_sets_the_planners_load_limit(tiny_llama_dir, tmp_path):
    from engine import AsyncEngine
    from evals.runner import LocalTarget
    from sotserve.load_policy import DEFAULT_MAX_LOAD, DEFAULT_MAX_SEQUENTIAL

    data = write_dataset(tmp_path / "q.jsonl", ROWS)
    assert parse_args(["--dataset", str(data)]).auto_max_load is None
    with pytest.raises(SystemExit):
        parse_args(["--dataset", str(data), "--auto-max-load", "-1"])
    async with AsyncEngine(str(tiny_llama_dir), dtype="float32", device="cpu") as engine:
        default = LocalTarget(None, engine=engine).planner.router.load_policy
        assert default.max_load == DEFAULT_MAX_LOAD
        target = LocalTarget(None, engine=engine, auto_max_load=7)
        assert target.planner.router.load_policy.max_load == 7
        assert target.planner.router.load_policy.max_sequential == DEFAULT_MAX_SEQUENTIAL
        both = LocalTarget(None, engine=engine, auto_max_load=7, auto_max_sequential=2)
        assert (both.planner.router.load_policy.max_load,
                both.planner.router.load_policy.max_sequential) == (7, 2)  # fmt: skip
    with pytest.raises(SystemExit):
        parse_args(["--dataset", str(data), "--auto-max-sequential", "-1"])
