"""The arithmetic behind the benchmark's floor."""

from __future__ import annotations

from transformers import LlamaConfig, LlamaForCausalLM

from evals.bench_engine import copy_bandwidth, weight_bytes_per_step


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
