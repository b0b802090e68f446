"""Model resolution and the GGUF conversion cache."""

from __future__ import annotations

import os

import pytest

from engine.errors import ModelNotFoundError
from engine.loader import ModelFiles, embedded_gguf_path, resolve_model


def test_embedded_model_is_converted_once(smollm2_dir):
    """A second resolve reuses the converted directory instead of converting again."""
    before = os.stat(smollm2_dir / "model.safetensors").st_mtime_ns
    again = resolve_model(None)
    assert again.path == smollm2_dir
    assert os.stat(again.path / "model.safetensors").st_mtime_ns == before
    # naming the GGUF file explicitly hits the same cache entry
    assert resolve_model(str(embedded_gguf_path())).path == smollm2_dir


def test_converted_model_is_a_plain_hf_directory(smollm2_dir):
    files = ModelFiles(smollm2_dir, "smollm2")
    config = files.config()
    assert config.model_type == "llama"
    assert not hasattr(config, "quantization_config")
    names = {name for name, _ in files.weights()}
    assert "model.embed_tokens.weight" in names
    assert "lm_head.weight" not in names  # tied to the embedding
    assert files.tokenizer().chat_template
    assert files.generation_config() is not None


def test_hf_directory_resolves_to_itself(tiny_llama_dir):
    assert resolve_model(str(tiny_llama_dir)).path == tiny_llama_dir


@pytest.mark.parametrize("name", ["/nonexistent/model", "./missing", "no-slash-name", "a/b/c"])
def test_unknown_names(name):
    with pytest.raises(ModelNotFoundError):
        resolve_model(name)


def test_file_that_is_not_gguf(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\0")
    with pytest.raises(ModelNotFoundError, match=r"not a \.gguf"):
        resolve_model(str(f))


def test_unknown_hub_id_offline():
    """With the hub unreachable (HF_HUB_OFFLINE=1 in tests) an uncached id is a typed error."""
    with pytest.raises(ModelNotFoundError, match="hub"):
        resolve_model("nobody-here/definitely-not-a-model")
