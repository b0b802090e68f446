"""``python -m evals.gpu_check`` in its CPU mode (tiny shapes), so the GPU check cannot
rot while no GPU is lent; and the replay of the recorded skeleton answers."""

from __future__ import annotations

import json

import pytest

from evals import gpu_check
from evals.gpu_check import load_fixture, replay_sequential, replay_sot


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    rc = gpu_check.main(
        ["--device", "cpu", "--out", str(out), "--test-args", "tests/engine/test_cli_args.py"]
    )
    return rc, out, json.loads((out / "gpu_check.json").read_text())


def test_the_cpu_mode_runs_every_section_and_writes_both_summaries(cpu_run):
    rc, out, report = cpu_run
    assert rc == 0, {k: s["error"] for k, s in report["sections"].items() if not s["ok"]}
    assert list(report["sections"]) == list(gpu_check.SECTIONS)
    assert report["ok"] and all(s["ok"] for s in report["sections"].values())
    md = (out / "gpu_check.md").read_text()
    for name in gpu_check.SECTIONS:
        assert f"## {name} (" in md
    assert "passed" in (out / gpu_check.TEST_LOG).read_text()


def test_decode_rows_cover_both_models_and_every_batch(cpu_run):
    decode = cpu_run[2]["sections"]["decode"]["data"]
    rows = decode["rows"]
    assert [(r["model"], r["batch"]) for r in rows] == [
        ("tiny-llama", 1), ("tiny-llama", 2), ("tiny-qwen2", 1), ("tiny-qwen2", 2),
    ]  # fmt: skip
    for r in rows:
        assert r["eager_ms"] > 0 and r["floor_ms"] > 0
        assert r["eager_x_floor"] == pytest.approx(r["eager_ms"] / r["floor_ms"])
    # more requests read more K/V
    assert rows[1]["bytes"] > rows[0]["bytes"]


def test_sot_rows_compare_with_sequential(cpu_run):
    sot = cpu_run[2]["sections"]["sot"]["data"]
    (row,) = sot["answers"]
    assert row["speedup_plain"] == pytest.approx(row["sequential_s"] / row["sot_s"])
    assert row["points"] >= 2 and row["sot_tokens"] > 0
    assert sot["cached_tokens"] > 0  # the points hit the skeleton's prefix in the cache


def test_a_failing_section_fails_the_run_and_the_others_still_report(tmp_path):
    rc = gpu_check.main(["--device", "cpu", "--out", str(tmp_path), "--sections", "sot,tests",
                         "--test-args", "tests/engine/no_such_test_file.py"])  # fmt: skip
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rc == 1 and not report["ok"]
    assert report["sections"]["sot"]["ok"]
    assert not report["sections"]["tests"]["ok"]
    assert "pytest exited" in report["sections"]["tests"]["error"]
    assert "FAILED" in (tmp_path / "gpu_check.md").read_text()


def test_the_fixture_holds_real_skeleton_answers():
    answers = load_fixture()
    assert len(answers) >= 3
    for a in answers:
        for run in ("sot", "sot_pipelined"):
            sk, points = a[run]["skeleton"], a[run]["points"]
            assert len(points) >= 2
            for p in points:
                # each point continues the skeleton request's prompt (its cache hit)
                assert sk["prompt_len"] <= p["shared_prefix_len"] < p["prompt_len"]
                assert p["after_skeleton_tokens"] <= sk["output_len"]
        # pipelined points start before the skeleton ends; the others after it
        assert (
            min(p["after_skeleton_tokens"] for p in a["sot_pipelined"]["points"])
            < (a["sot_pipelined"]["skeleton"]["output_len"])
        )
        assert all(p["after_skeleton_tokens"] == a["sot"]["skeleton"]["output_len"]
                   for p in a["sot"]["points"])  # fmt: skip


def test_scaling_keeps_every_point_within_its_prompt_and_the_skeleton():
    for a in load_fixture(scale=0.05):
        for run in ("sot", "sot_pipelined"):
            sk = a[run]["skeleton"]
            for p in a[run]["points"]:
                assert p["output_len"] >= 1 and p["shared_prefix_len"] < p["prompt_len"]
                assert p["shared_prefix_len"] <= sk["prompt_len"] + p["after_skeleton_tokens"]


def test_the_replay_makes_the_recorded_requests(tmp_path):
    from engine import LLM

    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(gpu_check.TINY_CONFIG))
    eng = LLM(str(config), load_format="dummy", device="cpu", kv_slots=2048).engine
    pattern = load_fixture(scale=0.1, answers=1)[0]["sot_pipelined"]
    before = eng.stats()
    assert replay_sot(eng, pattern, seed=0) > 0
    after = eng.stats()
    want = pattern["skeleton"]["output_len"] + sum(p["output_len"] for p in pattern["points"])
    assert after.generated_tokens - before.generated_tokens == want
    assert after.finished_requests - before.finished_requests == 1 + len(pattern["points"])
    assert after.cached_tokens > before.cached_tokens
    times = replay_sequential(eng, {"prompt_len": 5, "output_len": 7}, seed=0)
    assert len(times) == 7 and times == sorted(times)
