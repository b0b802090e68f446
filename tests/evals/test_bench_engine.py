"""The arithmetic behind the engine benchmark's floors, and its floor section on a tiny model."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from evals.bench_engine import copy_bandwidth, floor_bytes, main, weight_bytes_per_step


def _model(tied: bool) -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=100,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(cfg)


def test_weight_bytes_tied_head_reads_the_table_once():
    m = _model(tied=True)
    table = 100 * 8 * 4
    layer = sum(p.numel() for n, p in m.named_parameters() if "layers" in n or "norm" in n) * 4
    assert weight_bytes_per_step(m, batch=1) == table + layer
    assert weight_bytes_per_step(m, batch=16) == table + layer


def test_weight_bytes_untied_embedding_reads_batch_rows():
    m = _model(tied=False)
    head = 100 * 8 * 4
    layer = sum(p.numel() for n, p in m.named_parameters() if "layers" in n or "norm" in n) * 4
    assert weight_bytes_per_step(m, batch=1) == head + layer + 1 * 8 * 4
    assert weight_bytes_per_step(m, batch=4) == head + layer + 4 * 8 * 4


def test_copy_bandwidth_is_plausible():
    bw = copy_bandwidth(nbytes=8 * 2**20, repeats=3)
    assert 1e8 < bw < 1e13  # bytes/s: between 0.1 GB/s and 10 TB/s


def test_floor_bytes_adds_every_requests_kv():
    assert floor_bytes(1000, kv_bytes_per_token=10, batch=1, context=5) == 1050
    assert floor_bytes(1000, kv_bytes_per_token=10, batch=32, context=5) == 2600


def test_floor_section_on_a_tiny_model(tiny_llama_dir, capsys):
    out = main(
        ["--model", str(tiny_llama_dir), "--sections", "floor", "--device", "cpu",
         "--tokens", "3", "--floor-batches", "1,2", "--context", "8"]
    )  # fmt: skip
    rows = out["floor"]
    assert [r["batch"] for r in rows] == [1, 2]
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    cfg = hf.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 4
    for r in rows:
        expected = weight_bytes_per_step(hf, r["batch"]) + r["batch"] * 8 * kv
        assert r["bytes"] == expected
        assert "graphs_ms" not in r  # no CUDA graphs on the CPU
        assert r["eager_ms"] > 0
        assert r["eager_x_floor"] == pytest.approx(r["eager_ms"] / r["floor_ms"])
    printed = capsys.readouterr().out
    assert "batch   1: reads" in printed and "x floor" in printed


def test_unknown_section_is_an_error(tiny_llama_dir):
    with pytest.raises(SystemExit):
        main(["--model", str(tiny_llama_dir), "--sections", "decode,bogus"])
