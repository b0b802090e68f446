"""``python -m sot_kernels.bench``: every section's logic on tiny shapes.

The Triton sections (``decode``, ``extend``) run compiled on CUDA when there is a GPU
and under the Triton interpreter otherwise (tests/conftest.py sets
``TRITON_INTERPRET=1``), so the shapes are tiny: they check the script, not speed.
"""

from __future__ import annotations

import pytest
import torch
from triton_env import DEVICE, require_triton

from sot_kernels.bench.cli import main, parse_args
from sot_kernels.bench.decode import decode_bytes
from sot_kernels.bench.extend import (
    _extend_reference,
    extend_flops,
    make_extend_batch,
    sdpa_extend_step,
)

# Hq=4 over Hk=2 (a GQA group of 2), D=16, one layer, one timed repeat
TINY = [
    "--hq", "4", "--hk", "2", "--head-dim", "16", "--layers", "1",
    "--repeats", "1", "--warmup", "0", "--dtype", "float32",
]  # fmt: skip
TOL = 1e-4


def test_decode_bytes_formula():
    # per layer: K and V of 2 x 37 keys (2 heads x 16 dims, fp32), 74 int64 table
    # entries, q and out of 2 requests x 4 heads x 16 dims
    kv = 2 * (2 * 37) * 2 * 16 * 4
    assert kv == 18944
    per_layer = kv + 74 * 8 + 2 * (2 * 4 * 16 * 4)
    assert decode_bytes(2, 37, 4, 2, 16, 4, 8) == per_layer == 20560
    assert decode_bytes(2, 37, 4, 2, 16, 4, 8, layers=3) == 3 * 20560
    # bfloat16 values with an int32 table
    assert decode_bytes(1, 10, 9, 3, 64, 2, 4) == 2 * 10 * 3 * 64 * 2 + 40 + 2 * 9 * 64 * 2


def test_extend_flops_formula():
    # a fresh 3-token prompt: query j sees j + 1 keys -> 1 + 2 + 3 = 6 (q, k) pairs
    assert extend_flops(1, 3, 0, 1, 1) == 4 * 6
    # after 5 cached tokens each query also sees those: 3 * 5 + 6 = 21 pairs
    assert extend_flops(2, 3, 5, 4, 16, layers=2) == 2 * 2 * 4 * 4 * 16 * 21


def test_cpu_section(capsys):
    # fixed 3-token suffixes, so the K/V row counts are known
    res = main([*TINY, "--sections", "cpu", "--groups", "1,3", "--prefix", "20", "--suffix", "3,3"])
    rows = res["cpu"]
    assert [r["group"] for r in rows] == [1, 3]
    row_bytes = 2 * 1 * 2 * 16 * 4  # K and V of one pool row, one layer, fp32
    for r in rows:
        g = r["group"]
        assert r["max_diff"] < TOL
        assert r["plain_ms"] > 0 and r["cascade_ms"] > 0
        assert r["ratio"] == pytest.approx(r["plain_ms"] / r["cascade_ms"])
        assert r["plain_mb"] == pytest.approx(g * (20 + 3) * row_bytes / 1e6)
        assert r["cascade_mb"] == pytest.approx((20 + 3 * g) * row_bytes / 1e6)
    out = capsys.readouterr().out
    assert "plain ms" in out and "cascade ms" in out
    assert out.count("\n") >= 5  # header, note, table header, rule, 2 rows


def test_decode_section(capsys):
    require_triton()
    res = main(
        [
            *TINY, "--sections", "decode", "--device", str(DEVICE),
            "--decode-batches", "1,2", "--decode-lens", "5,37", "--peak-gbps", "100",
        ]
    )  # fmt: skip
    rows = res["decode"]
    assert [(r["batch"], r["kv_len"]) for r in rows] == [(1, 5), (1, 37), (2, 5), (2, 37)]
    for r in rows:
        assert r["max_diff"] < TOL
        assert r["bytes"] == decode_bytes(r["batch"], r["kv_len"], 4, 2, 16, 4, 8)
        assert r["triton_ms"] > 0 and r["torch_ms"] > 0
        assert r["gbps"] == pytest.approx(r["bytes"] / (r["triton_ms"] / 1e3) / 1e9)
        assert r["of_peak"] == pytest.approx(r["gbps"] / 100)
        assert r["ratio"] == pytest.approx(r["torch_ms"] / r["triton_ms"])
        assert r["fits_l2"]  # a few KB
    assert rows[-1]["bytes"] == 20560  # the hand-computed case above
    out = capsys.readouterr().out
    assert out.startswith("decode (")
    assert "GB/s" in out and "of peak" in out
    table = out.splitlines()[4:]  # after the header, the note, column names and rule
    assert len(table) == 4 and table[-1].split()[:2] == ["2", "37"]


def test_decode_flags_what_exceeds_l2():
    require_triton()
    args = [*TINY, "--sections", "decode", "--device", str(DEVICE), "--decode-batches", "1"]
    args += ["--decode-lens", "8,64", "--l2-mb", str(2 * 32 * 2 * 16 * 4 / 1e6)]
    rows = main(args)["decode"]
    assert [r["fits_l2"] for r in rows] == [True, False]  # K/V: 2 KiB, then 16 KiB


def test_extend_section(capsys):
    require_triton()
    res = main(
        [
            *TINY, "--sections", "extend", "--device", str(DEVICE), "--extend-batches", "1,2",
            "--extend-chunks", "5,17", "--extend-prefixes", "0,7",
        ]
    )  # fmt: skip
    rows = res["extend"]
    configs = [(r["batch"], r["chunk"], r["prefix"]) for r in rows]
    assert configs == [(b, c, p) for b in (1, 2) for c in (5, 17) for p in (0, 7)]
    for r in rows:
        assert r["max_diff"] < TOL and r["sdpa_max_diff"] < TOL
        assert r["flops"] == extend_flops(r["batch"], r["chunk"], r["prefix"], 4, 16)
        assert r["triton_tflops"] == pytest.approx(r["flops"] / (r["triton_ms"] / 1e3) / 1e12)
        assert r["sdpa_tflops"] == pytest.approx(r["flops"] / (r["sdpa_ms"] / 1e3) / 1e12)
        assert r["ratio"] == pytest.approx(r["sdpa_ms"] / r["triton_ms"])
    out = capsys.readouterr().out
    assert out.startswith("extend (")
    assert "sdpa TFLOP/s" in out and len(out.splitlines()) == 4 + len(rows)


def test_extend_inputs_agree_for_sdpa_and_triton():
    """SDPA's contiguous copies hold the pool rows Triton reads, heads repeated in
    place (query head h on KV head h // group), and the prefix mask is lower-right."""
    b = make_extend_batch(2, 3, 4, 6, 2, 16, 2, torch.float32, torch.device("cpu"))
    assert b.k_sdpa.shape == (2, 2, 6, 7, 16)
    table = b.req_to_token
    assert sorted(table.flatten().tolist()) == list(range(1, 15))  # slot 0 unused
    for layer, req, h, pos in [(0, 0, 0, 0), (1, 1, 5, 6), (1, 0, 2, 3), (0, 1, 3, 2)]:
        slot = table[req, pos]
        assert torch.equal(b.k_sdpa[layer, req, h, pos], b.k[layer, slot, h // 3])
        assert torch.equal(b.v_sdpa[layer, req, h, pos], b.v[layer, slot, h // 3])
    assert torch.equal(b.q_sdpa[1, 1, 4, 2], b.q[1, 3 + 2, 4])
    out = sdpa_extend_step(b).transpose(1, 2).reshape(-1, 6, 16)
    torch.testing.assert_close(out, _extend_reference(b))


def test_triton_sections_skip_on_cpu_without_interpreter(capsys, monkeypatch):
    require_triton()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    res = main([*TINY, "--sections", "decode,extend", "--device", "cpu"])
    assert res == {"decode": [], "extend": []}
    lines = [line for line in capsys.readouterr().out.splitlines() if line]
    assert len(lines) == 2
    assert lines[0].startswith("decode: ") and lines[1].startswith("extend: ")
    assert all("TRITON_INTERPRET=1" in line and line.endswith("skipped") for line in lines)


def test_defaults_cover_all_sections():
    args = parse_args([])
    assert args.sections == "cpu,gpu,decode,extend"
    assert args.device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert (args.hq, args.hk, args.head_dim) == (9, 3, 64)


def test_unknown_section_and_bad_options_exit():
    with pytest.raises(SystemExit) as e:
        main(["--sections", "cpu,bogus"])
    assert "bogus" in str(e.value.code) and "decode" in str(e.value.code)
    for bad in (["--decode-lens", "0"], ["--extend-prefixes", "-1"], ["--device", "nope"]):
        with pytest.raises(SystemExit) as e:
            parse_args(bad)
        assert e.value.code == 2
