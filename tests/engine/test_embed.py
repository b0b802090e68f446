"""Pooled hidden states (``return_hidden``): the final hidden state at a prompt's last
token, as ``transformers`` computes it, however the prompt's prefill is chunked."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, AsyncEngine, SamplingParams

PROMPTS = [[101, 102, 103, 104, 105], list(range(200, 219)), [7, 8]]


def _hf_last_hidden(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_hidden_states=True)
    return out.hidden_states[-1][0, -1]  # after the final norm, as the engine's


@pytest.mark.parametrize("budget", [None, 4])
def test_embed_matches_transformers_last_token_hidden_state(tiny_model_dirs, budget):
    path, hf = tiny_model_dirs["llama"]
    extra = {} if budget is None else {"max_batched_tokens": budget}
    llm = LLM(str(path), dtype="float32", device="cpu", **extra)
    hidden = llm.embed(PROMPTS)
    assert [h.shape for h in hidden] == [torch.Size([hf.config.hidden_size])] * 3
    for ids, h in zip(PROMPTS, hidden, strict=True):
        torch.testing.assert_close(h, _hf_last_hidden(hf, ids), atol=1e-4, rtol=1e-4)
    # the prompts stay in the prefix cache, and a repeat gives the same vector
    again = llm.embed([PROMPTS[1]])[0]
    torch.testing.assert_close(again, hidden[1], atol=1e-4, rtol=1e-4)


def test_only_pooling_requests_carry_a_hidden_state(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), dtype="float32", device="cpu")
    eng = llm.engine
    pooled = eng.make_request(PROMPTS[0], SamplingParams(max_tokens=3, ignore_eos=True),
                              return_hidden=True)  # fmt: skip
    plain = eng.make_request(PROMPTS[1], SamplingParams(max_tokens=3, ignore_eos=True))
    eng.add(pooled)
    eng.add(plain)
    deltas = []
    while eng.has_unfinished():
        deltas.extend(eng.step())
    by_id = [(d.request_id, d.hidden is not None) for d in deltas]
    # once, on the first delta of the pooling request
    assert [rid for rid, has in by_id if has] == [pooled.request_id]
    assert by_id.index((pooled.request_id, True)) == next(
        i for i, (rid, _) in enumerate(by_id) if rid == pooled.request_id
    )
    assert plain.hidden is None


async def test_async_embed(tiny_model_dirs):
    path, hf = tiny_model_dirs["llama"]
    async with AsyncEngine(str(path), dtype="float32", device="cpu") as engine:
        h = await engine.embed(PROMPTS[0])
        assert engine.stats().running == 0
    torch.testing.assert_close(h, _hf_last_hidden(hf, PROMPTS[0]), atol=1e-4, rtol=1e-4)
