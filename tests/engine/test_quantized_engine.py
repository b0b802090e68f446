"""The quantized engine end to end: quality against float32, and determinism.

These load the embedded SmolLM2 (its Q4_1 GGUF), so they are marked slow.
"""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from evals.quant_quality import TEXT, measure
from sot_kernels.linear import Int4Linear, PackedLinear

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
    "Describe the water cycle for a ten year old, covering evaporation and rain.",
    "Why do cats purr?",
]


def _run(llm: LLM, ids: list[list[int]], sp: SamplingParams, stagger: int) -> list[list[int]]:
    """Greedy tokens of ``ids``: the last one joins after ``stagger`` steps of the
    others (0: all at once), so it is prefilled in a step next to their decodes."""
    eng = llm.engine
    eng.reset_prefix_cache()
    reqs = [eng.make_request(p, sp) for p in ids[:-1]]
    for r in reqs:
        eng.add(r)
    for _ in range(stagger):
        eng.step()
    reqs.append(eng.make_request(ids[-1], sp))
    eng.add(reqs[-1])
    while eng.has_unfinished():
        eng.step()
    return [list(r.output_ids) for r in reqs]


def test_greedy_output_does_not_depend_on_the_batch(fast):
    """Each prompt decoded alone, all seven together, a subset, and one joining the
    others mid-decode: every request gets the same tokens in every composition.

    What it takes (see sot_kernels.attention.decode_attention and engine.attention): the
    int4 kernel gives a row the same bits in any batch (tests/sot_kernels/test_linear.py),
    and decode attention pads keys and query rows so that neither a request's
    batch-mates nor the thread SDPA hands it to changes its rounding. Before that,
    a request alone and in a batch parted at a near-tie within 8 to 21 tokens.
    Requests that share a cached prefix of ``shared_prefix_min_tokens`` (256) take
    cascade attention instead, a different summation: these prompts share only the
    chat template's short system prompt.
    """
    ids = [fast.apply_chat_template([{"role": "user", "content": p}]) for p in PROMPTS]
    sp = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)
    alone = [_run(fast, [x], sp, 0)[0] for x in ids]
    assert all(len(t) == 48 for t in alone)
    assert _run(fast, ids, sp, 0) == alone
    subset = [4, 0, 6, 3]
    assert _run(fast, [ids[i] for i in subset], sp, 0) == [alone[i] for i in subset]
    order = [1, 5, 2, 3]  # the suspension bridge joins three others mid-decode
    assert _run(fast, [ids[i] for i in order], sp, 11) == [alone[i] for i in order]
