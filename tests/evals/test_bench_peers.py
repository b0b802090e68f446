"""The peer benchmark's arithmetic, output, arguments and llama.cpp fallback, and short
end-to-end runs (a tiny model for the engine; the embedded GGUF for llama.cpp)."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import ClassVar

import pytest

from evals import bench_peers as bp
from evals.bench_peers import (
    LlamaCppSide,
    LlamaCppWorker,
    SideFailed,
    WorkerCrashed,
    build_prompt,
    load_note,
    main,
    median,
    parse_batches,
    parse_sides,
    ratio,
    ratios_vs_baseline,
    render_markdown,
    summarize,
    token_gap,
)


def test_median_and_ratio():
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([1.0, 2.0, 3.0, 10.0]) == 2.5
    assert median([]) is None
    assert ratio(6.0, 3.0) == 2.0
    assert ratio(None, 3.0) is None and ratio(1.0, None) is None and ratio(1.0, 0.0) is None


def test_token_gap_skips_the_first_token():
    # prompt start, first token after 0.5 s (prefill), then gaps of 0.1, 0.1, 0.3
    assert token_gap([0.5, 0.6, 0.7, 1.0]) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        token_gap([1.0])


def test_summarize_takes_medians_and_tok_s():
    samples = {"decode:1": [0.02, 0.01, 0.03], "decode:8": [0.04], "ttft": [0.2, 0.1, 0.3],
               "answer": [2.0, 4.0]}  # fmt: skip
    fig = summarize(samples, [1, 8, 16])
    assert fig["decode_step_ms"] == {"1": pytest.approx(20.0), "8": pytest.approx(40.0),
                                     "16": None}  # fmt: skip
    assert fig["decode_tok_s"] == {"1": pytest.approx(50.0), "8": pytest.approx(200.0),
                                   "16": None}  # fmt: skip
    assert fig["ttft_ms"] == pytest.approx(200.0)
    assert fig["answer_s"] == pytest.approx(3.0)
    assert fig["samples"] == {"decode:1": 3, "decode:8": 1, "ttft": 3, "answer": 2}


def test_ratios_against_llama_cpp_batch_1():
    base = summarize({"decode:1": [0.01], "ttft": [0.2], "answer": [3.0]}, [1, 8])
    ours = summarize({"decode:1": [0.02], "decode:8": [0.04], "ttft": [0.1], "answer": [6.0]},
                     [1, 8])  # fmt: skip
    r = ratios_vs_baseline(ours, base)
    assert r["decode_vs_b1"]["1"] == pytest.approx(0.5)  # 50 tok/s vs 100
    assert r["decode_vs_b1"]["8"] == pytest.approx(2.0)  # 200 aggregate tok/s vs 100
    assert r["ttft"] == pytest.approx(2.0)  # twice as fast to the first token
    assert r["answer"] == pytest.approx(0.5)
    assert ratios_vs_baseline(base, base)["decode_vs_b1"] == {"1": 1.0, "8": None}
    none = ratios_vs_baseline(ours, None)
    assert none == {"decode_vs_b1": {"1": None, "8": None}, "ttft": None, "answer": None}


def _report(with_llama: bool = True) -> dict:
    cfg = {"model": "m", "threads": 2, "batches": [1, 8], "steps": 4, "repeats": 1,
           "prompt_tokens": 300, "answer_tokens": 256}  # fmt: skip
    sides = {}
    base = summarize({"decode:1": [0.01], "ttft": [0.2], "answer": [3.0]}, [1, 8])
    ours = summarize({"decode:1": [0.02], "decode:8": [0.04], "ttft": [0.1], "answer": [6.0]},
                     [1, 8])  # fmt: skip
    sides["sotserve-fp32"] = {"status": "ok", "figures": ours, "notes": ["fp32 note"]}
    if with_llama:
        sides["llama.cpp"] = {"status": "ok", "figures": base, "notes": ["batch 1 only"]}
    sides["transformers"] = {"status": "failed", "error": "boom", "notes": []}
    for s in sides.values():
        if s["status"] == "ok":
            s["ratios"] = ratios_vs_baseline(s["figures"], base if with_llama else None)
    return {"config": cfg, "sides": sides, "notes": ["top note"]}


def test_markdown_tables():
    md = render_markdown(_report())
    lines = md.splitlines()
    head = "| side | batch-1 tok/s | batch-8 tok/s | TTFT ms | 256-token answer s |"
    assert head in lines
    assert "| sotserve-fp32 | 50.0 | 200.0 | 100.0 | 6.00 |" in lines
    assert "| llama.cpp | 100.0 | — | 200.0 | 3.00 |" in lines
    assert any(line.startswith("| transformers | failed: boom") for line in lines)
    ratio_head = [line for line in lines if "batch-1 decode / llama.cpp" in line]
    assert ratio_head and "batch-8 aggregate tok/s / llama.cpp batch-1" in ratio_head[0]
    assert "| sotserve-fp32 | 0.50 | 2.00 | 2.00 | 0.50 |" in lines
    assert "| llama.cpp | 1.00 | — | 1.00 | 1.00 |" in lines
    assert "- top note" in lines and "- llama.cpp: batch 1 only" in lines
    tables = md.split("\n\n")
    for table in (tables[1], tables[2]):  # every row has as many cells as the header
        rows = table.splitlines()
        assert len({row.count("|") for row in rows}) == 1, rows


def test_markdown_without_llama_cpp_has_no_ratios():
    md = render_markdown(_report(with_llama=False))
    assert "No ratios" in md and "/ llama.cpp" not in md


def test_parse_sides():
    installed = ["sotserve-default", "sotserve-bf16", "sotserve-fp32", "transformers"]
    assert parse_sides(None, installed) == installed
    assert parse_sides(None, [*installed, "llama.cpp"])[-1] == "llama.cpp"
    assert parse_sides(" transformers, sotserve-fp32,transformers", installed) == [
        "transformers", "sotserve-fp32"]  # fmt: skip
    with pytest.raises(ValueError, match=r"unknown sides \['vllm'\]; available: sotserve-def"):
        parse_sides("sotserve-fp32,vllm", installed)
    with pytest.raises(ValueError, match=r"not available here.*peers"):
        parse_sides("llama.cpp", installed)
    with pytest.raises(ValueError, match="no sides"):
        parse_sides(" , ", installed)


def test_parse_batches():
    assert parse_batches("1,4, 8,4") == [1, 4, 8]
    for bad in ("1,x", "0", ""):
        with pytest.raises(ValueError):
            parse_batches(bad)


def test_cli_errors_are_clear(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--sides", "sotserve-fp32,bogus"])
    assert e.value.code == 2
    assert "unknown sides ['bogus']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--batches", "1,zero"])
    assert "comma-separated integers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--steps", "0"])
    assert "--steps must be at least 1" in capsys.readouterr().err


def test_load_note_flags_a_busy_machine():
    assert load_note(0.2, 2) is None
    assert "load average was 3.5 on 2 CPUs" in load_note(3.5, 2)


def test_build_prompt_reaches_the_length():
    def render(text):  # a template adding 5 ids around one id per word
        return [0, 0, 0, *range(len(text.split())), 0, 0]

    ids = build_prompt(render, 300)
    assert len(ids) == 300
    assert len(build_prompt(render, 3)) == 6  # at least one word


@pytest.fixture(autouse=True)
def _logs_in_tmp_path(tmp_path, monkeypatch):
    """Worker logs (kept when a worker dies) go to the test's directory."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


SEGV = "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"
HELLO = "import json; print(json.dumps({'ready': True, 'version': 'x'}), flush=True); "


def test_worker_that_segfaults_at_load_is_reported():
    with pytest.raises(WorkerCrashed, match="n_batch=512: killed by SIGSEGV") as e:
        LlamaCppWorker("x.gguf", 1, 512, cmd=[sys.executable, "-c", SEGV])
    assert e.value.n_batch == 512


def test_worker_that_dies_on_a_command_is_reported():
    die = HELLO + "import sys; sys.stdin.readline(); sys.stderr.write('oops'); " + SEGV
    w = LlamaCppWorker("x.gguf", 1, 1, cmd=[sys.executable, "-c", die])
    assert w.hello["ready"]
    with pytest.raises(WorkerCrashed, match=r"n_batch=1: killed by SIGSEGV \(stderr: oops"):
        w.call(op="ttft", prompt=[1])
    w.close()


def test_worker_that_hangs_times_out():
    hang = HELLO + "import time; time.sleep(60)"
    w = LlamaCppWorker("x.gguf", 1, 512, timeout=0.5, cmd=[sys.executable, "-c", hang])
    with pytest.raises(WorkerCrashed, match="no answer in"):
        w.call(op="decode", prompt=[1], steps=2)
    w.close()


def test_worker_answers_and_quits():
    echo = HELLO + (
        "import sys\n"
        "for line in sys.stdin:\n"
        "    cmd = json.loads(line)\n"
        "    if cmd['op'] == 'quit': break\n"
        "    print(json.dumps({'s': 0.25}), flush=True)\n"
    )
    w = LlamaCppWorker("x.gguf", 1, 512, cmd=[sys.executable, "-c", echo])
    assert w.call(op="ttft", prompt=[1]) == {"s": 0.25}
    log = w.log.name
    w.close()
    assert w.proc.returncode == 0
    assert not Path(log).exists()  # a clean worker leaves no log behind


class _FakeWorker:
    """Stands in for LlamaCppWorker: crashes on the ops listed for its n_batch."""

    started: ClassVar[list[int]] = []
    crash_on: ClassVar[dict[int, set[str]]] = {}

    def __init__(self, gguf, threads, n_batch):
        self.n_batch, self.hello = n_batch, {"version": "fake"}
        _FakeWorker.started.append(n_batch)
        if "start" in self.crash_on.get(n_batch, ()):
            raise WorkerCrashed(f"n_batch={n_batch}: killed by SIGSEGV", n_batch)

    def call(self, op, **kw):
        if op in self.crash_on.get(self.n_batch, ()):
            raise WorkerCrashed(f"n_batch={self.n_batch}: killed by SIGSEGV", self.n_batch)
        return {"s": 0.5 if self.n_batch == 1 else 0.1, "eos": 0, "n": 4}

    def close(self):
        pass


PROMPTS = {"short": [1, 2], "long": [1, 2, 3], "answer_tokens": 4}


def _side(crash_on):
    _FakeWorker.started, _FakeWorker.crash_on = [], crash_on
    return LlamaCppSide("x.gguf", 2, 512, PROMPTS, 3, start=_FakeWorker)


def test_llama_cpp_falls_back_to_n_batch_1_and_drops_its_samples():
    side = _side({512: {"ttft"}})
    side.samples["decode:1"] = [0.1]  # measured with n_batch=512 before the crash
    assert side.ttft() == 0.5  # retried on the n_batch=1 worker
    assert _FakeWorker.started == [512, 1] and side.n_batch == 1
    assert side.samples == {}
    assert any("n_batch=512 died" in n for n in side.notes)
    assert any("pessimistic" in n for n in side.describe())


def test_llama_cpp_fallback_when_loading_crashes():
    side = _side({512: {"start"}})
    assert side.n_batch == 1 and side.decode(1) == 0.5


def test_llama_cpp_keeps_n_batch_512_when_it_works():
    side = _side({})
    assert side.decode(1) == 0.1 and side.n_batch == 512
    assert not any("pessimistic" in n for n in side.describe())


def test_llama_cpp_crash_with_n_batch_1_fails_the_side():
    side = _side({512: {"answer"}, 1: {"answer"}})
    with pytest.raises(WorkerCrashed):
        side.answer()
    with pytest.raises(SideFailed, match="n_batch=1 too"):
        _side({512: {"start"}, 1: {"start"}})


def test_run_rounds_interleaves_and_drops_a_failed_side():
    calls = []

    class Fake(bp.Side):
        def decode(self, batch):
            calls.append((self.name, f"decode:{batch}"))
            if self.name == "bad":
                raise SideFailed("nope")
            return 0.01 * batch

        def ttft(self):
            calls.append((self.name, "ttft"))
            return 0.1

        def answer(self):
            calls.append((self.name, "answer"))
            return 1.0

    a, b, bad = Fake("a", (1, 2)), Fake("b", (1,)), Fake("bad", (1,))
    failed = bp.run_rounds([a, b, bad], [1, 2], repeats=2)
    assert failed == {"bad": "nope"}
    assert a.samples == {"decode:1": [0.01] * 2, "decode:2": [0.02] * 2, "ttft": [0.1] * 2,
                         "answer": [1.0] * 2}  # fmt: skip
    assert "decode:2" not in b.samples  # b only runs batch 1
    assert calls[:3] == [("a", "decode:1"), ("b", "decode:1"), ("bad", "decode:1")]
    round1 = calls[8:]  # round 0: 3 + 1 decodes, 2 ttft, 2 answers
    assert round1[:2] == [("b", "decode:1"), ("a", "decode:1")]  # order rotates


def test_end_to_end_on_a_tiny_model(tiny_llama_dir, tmp_path, capsys):
    out_json, out_md = tmp_path / "r.json", tmp_path / "r.md"
    report = main(["--model", str(tiny_llama_dir), "--sides", "sotserve-fp32",
                   "--batches", "1,2", "--steps", "2", "--repeats", "1", "--prompt-tokens",
                   "20", "--answer-tokens", "4", "--json", str(out_json), "--out",
                   str(out_md)])  # fmt: skip
    data = json.loads(out_json.read_text())
    assert data == json.loads(json.dumps(report))
    assert set(data) == {"config", "sides", "notes"}
    assert "load_average_before" in data["config"]
    cfg = data["config"]
    assert cfg["batches"] == [1, 2] and cfg["steps"] == 2 and cfg["answer_tokens"] == 4
    assert cfg["prompt_tokens"] >= 20
    assert list(data["sides"]) == ["sotserve-fp32"]
    side = data["sides"]["sotserve-fp32"]
    assert side["status"] == "ok"
    fig = side["figures"]
    assert set(fig) == {"decode_tok_s", "decode_step_ms", "ttft_ms", "answer_s", "samples"}
    assert set(fig["decode_tok_s"]) == {"1", "2"}
    assert all(v > 0 for v in fig["decode_tok_s"].values())
    assert fig["ttft_ms"] > 0 and fig["answer_s"] > 0
    assert side["ratios"]["decode_vs_b1"] == {"1": None, "2": None}  # no llama.cpp here
    assert any("float32" in n for n in side["notes"])
    md = out_md.read_text()
    assert "| sotserve-fp32 |" in md and "No ratios" in md
    assert md in capsys.readouterr().out


@pytest.mark.slow
def test_llama_cpp_end_to_end_on_the_embedded_gguf(tmp_path):
    pytest.importorskip("llama_cpp")
    report = main(["--sides", "llama.cpp", "--batches", "1,4", "--steps", "3", "--repeats",
                   "1", "--prompt-tokens", "40", "--answer-tokens", "8", "--json",
                   str(tmp_path / "r.json")])  # fmt: skip
    side = report["sides"]["llama.cpp"]
    assert side["status"] == "ok", side
    assert side["n_batch"] in (512, 1)
    fig = side["figures"]
    assert fig["decode_tok_s"]["1"] > 0 and fig["decode_tok_s"]["4"] is None  # batch 1 only
    assert fig["ttft_ms"] > 0 and fig["answer_s"] > 0
    assert side["ratios"]["decode_vs_b1"]["1"] == pytest.approx(1.0)
    assert report["config"]["llama_cpp"]
