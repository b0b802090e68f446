"""The quantized engine end to end: quality against float32, and determinism.

These load the embedded SmolLM2 (its Q4_1 GGUF), so they are marked slow.
"""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from evals.quant_quality import TEXT, measure
from kernels.linear import Int4Linear, PackedLinear

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fast() -> LLM:
    """The engine's defaults: on the CPU, the GGUF's own Q4_1 kept as int4, float32
    activations."""
    return LLM(device="cpu", kv_slots=8192)


def test_the_default_keeps_the_gguf_quantized(fast):
    cfg = fast.engine.config
    assert cfg.quantization == "gguf" and cfg.dtype == torch.float32
    layer = fast.engine.model.model.layers[0]
    assert isinstance(layer.self_attn.qkv_proj, Int4Linear)
    assert isinstance(layer.mlp.down_proj, Int4Linear)
    # SmolLM2's tied head is Q8_0 in the file: no int kernel takes its per-block scales
    assert isinstance(fast.engine.model.lm_head, PackedLinear)
    assert fast.engine.model.lm_head.dtype == torch.bfloat16


def test_float32_is_still_the_dense_parity_path():
    llm = LLM(dtype="float32", device="cpu", kv_slots=256)
    assert llm.engine.config.quantization is None
    assert not any(isinstance(m, Int4Linear) for m in llm.engine.model.modules())


def test_q4_1_kept_as_int4_agrees_with_float32():
    """Teacher-forced over the shipped text: the int4 model's next-token argmax must
    match the float32 (de-quantized) model's at 97% of positions or more, with a
    perplexity within 1% of it."""
    reference, gguf = measure(None, ["float32", "gguf"], TEXT.read_text())
    assert reference.mode == "float32" and reference.top1_agreement == 1.0
    assert gguf.tokens > 2000
    assert gguf.top1_agreement >= 0.97, gguf
    assert gguf.perplexity <= reference.perplexity * 1.01, (gguf, reference)


PROMPTS = [
    "Explain why the sky is blue in two sentences.",
    "List three uses of a paperclip.",
    "Write a haiku about bread.",
    "What is a suspension bridge?",
    "Give me one tip for writing clear code, and explain it at some length please.",
]


def _run(llm: LLM, ids: list[list[int]], sp: SamplingParams, stagger: bool) -> list[list[int]]:
    """Greedy tokens of ``ids``, all at once, or the last one joining the others
    while they are mid-decode (a mixed step: decode rows and a prefill chunk)."""
    eng = llm.engine
    eng.reset_prefix_cache()
    if not stagger:
        return [o.token_ids for o in llm.generate(ids, sp)]
    reqs = [eng.make_request(p, sp) for p in ids[:-1]]
    for r in reqs:
        eng.add(r)
    for _ in range(7):
        eng.step()
    reqs.append(eng.make_request(ids[-1], sp))
    eng.add(reqs[-1])
    while eng.has_unfinished():
        eng.step()
    return [list(r.output_ids) for r in reqs]


@pytest.mark.parametrize("stagger", [False, True], ids=["together", "staggered"])
def test_greedy_output_is_deterministic(fast, stagger):
    """The same requests in the same arrival pattern give the same tokens every time.

    Not across batch compositions: decode rows always take the int4 kernel, which is
    batch-invariant (tests/kernels/test_linear.py), but SDPA's decode attention gives
    a request padded into a batch a result a few float32 ulps off its result alone, and
    the bfloat16 rounding of the next matmul's input turns that into ~1e-2 in the
    logits, enough to part outputs at a near-tie after a few dozen tokens.
    """
    ids = [fast.apply_chat_template([{"role": "user", "content": p}]) for p in PROMPTS]
    sp = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    first = _run(fast, ids, sp, stagger)
    assert all(len(t) == 32 for t in first)
    assert _run(fast, ids, sp, stagger) == first
