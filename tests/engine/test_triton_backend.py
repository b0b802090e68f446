"""The whole engine on the Triton attention backend gives the torch backend's tokens.

On a GPU both engines run on CUDA (the Triton kernels compiled). Without one the
kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before
triton is imported), on a tiny model so it stays quick.
"""

from __future__ import annotations

import pytest
from triton_env import DEVICE, require_triton

from engine import LLM, SamplingParams

require_triton()

PROMPTS = [
    list(range(100, 131)),  # 31 tokens
    list(range(200, 205)),
    [7],
]


@pytest.fixture(scope="module")
def engines(tiny_llama_dir):
    def make(backend, **kw):
        return LLM(
            str(tiny_llama_dir), dtype="float32", device=DEVICE, kv_slots=1024,
            attention_backend=backend, enforce_eager=True, **kw,
        )  # fmt: skip

    return make("torch"), make("triton")


def test_backends_are_the_ones_asked_for(tiny_llama_dir, engines):
    torch_llm, triton_llm = engines
    assert type(torch_llm.engine.backend).__name__ == "TorchAttentionBackend"
    assert type(triton_llm.engine.backend).__name__ == "TritonAttentionBackend"


def test_same_greedy_tokens_with_chunked_prefill_and_decodes(engines):
    # max_batched_tokens 16 splits the 31-token prompt into chunks that run next to
    # the other requests' decodes: extend with a prefix, decode, and both in one step
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    outs = []
    for llm in engines:
        llm.engine.scheduler.config.max_batched_tokens = 16
        outs.append([o.token_ids for o in llm.generate(PROMPTS, params)])
    assert outs[0] == outs[1]


def test_same_tokens_for_a_fan_out_group(engines):
    # requests sharing a cached 40-token prefix decode as one shared-prefix group
    prefix = list(range(300, 340))
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    outs = []
    for llm in engines:
        llm.engine.runner.shared_prefix_min_tokens = 16
        llm.generate([[*prefix, 1]], SamplingParams(max_tokens=1, temperature=0))
        outs.append([o.token_ids for o in llm.generate([[*prefix, t] for t in (5, 6, 8)], params)])
    assert outs[0] == outs[1]
