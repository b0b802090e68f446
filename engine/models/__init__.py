"""Model implementations, selected by the Hugging Face ``model_type``."""

from __future__ import annotations

import torch
from transformers import PretrainedConfig

from engine.attention import AttentionBackend
from engine.loader import ModelFiles
from engine.models.llama import LlamaForCausalLM, ModelArgs

__all__ = ["LlamaForCausalLM", "ModelArgs", "build_model"]


def build_model(
    files: ModelFiles,
    config: PretrainedConfig,
    backend: AttentionBackend,
    dtype: torch.dtype,
    device: torch.device,
) -> LlamaForCausalLM:
    """Instantiate the model on ``device`` without random init and load its weights."""
    args = ModelArgs.from_hf(config)
    with torch.device("meta"):
        model = LlamaForCausalLM(args, backend)
    model = model.to_empty(device=device).to(dtype)
    model.load_weights(files.weights())
    return model.eval().requires_grad_(False)
