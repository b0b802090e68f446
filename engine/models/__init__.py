"""Model implementations, selected by the Hugging Face ``model_type``."""

from __future__ import annotations

import torch
from transformers import PretrainedConfig

from engine.attention import AttentionBackend
from engine.loader import ModelFiles
from engine.models.llama import LlamaForCausalLM, ModelArgs
from kernels.linear import can_prepack

__all__ = ["LlamaForCausalLM", "ModelArgs", "build_model"]


def build_model(
    files: ModelFiles,
    config: PretrainedConfig,
    backend: AttentionBackend,
    dtype: torch.dtype,
    device: torch.device,
    prepack: bool = True,
) -> LlamaForCausalLM:
    """Instantiate the model on ``device`` without random init, load its weights, and
    on CPU prepack the projections for oneDNN unless ``prepack`` is False."""
    args = ModelArgs.from_hf(config)
    with torch.device("meta"):
        model = LlamaForCausalLM(args, backend)
    model = model.to_empty(device=device).to(dtype)
    model.load_weights(files.weights())
    model.eval().requires_grad_(False)
    if prepack and can_prepack(device, dtype):
        model.prepack_cpu_weights()
    return model
