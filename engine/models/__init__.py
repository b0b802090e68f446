"""Model implementations, selected by the Hugging Face ``model_type``."""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from engine.attention import AttentionBackend
from engine.gguf_weights import cached_gguf_weights
from engine.loader import ModelFiles
from engine.models.dummy import DEFAULT_STD, fill_dummy_weights
from engine.models.llama import LlamaForCausalLM, ModelArgs
from engine.models.ops import TORCH_OPS, Ops
from engine.quantization import quantize, quantized_linear
from sot_kernels.linear import can_prepack

__all__ = ["LlamaForCausalLM", "ModelArgs", "build_model"]


def build_model(
    files: ModelFiles,
    config: PretrainedConfig,
    backend: AttentionBackend,
    dtype: torch.dtype,
    device: torch.device,
    prepack: bool = True,
    quantization: str | None = None,
    prefill_dense: bool = True,
    ops: Ops = TORCH_OPS,
    dummy_seed: int = 0,
) -> LlamaForCausalLM:
    """Instantiate the model on ``device`` without random init and load its weights;
    a dummy model (``files.dummy``) gets seeded random ones instead
    (:func:`engine.models.dummy.fill_dummy_weights`, ``std`` the config's
    ``initializer_range``), drawn on ``device``. ``ops`` are the norm and activation
    kernels (:func:`engine.models.ops.create_ops`).

    ``quantization``: ``None`` (every matrix in ``dtype``), ``"gguf"`` (a GGUF model's
    Q4_0/Q4_1/Q4_K matrices as int4 straight from its blocks, the rest de-quantized), or
    ``"int4"``/``"int8"`` (every projection and the head quantized at load from its
    float values). Quantized matmuls run decode rows through their int kernels and,
    with ``prefill_dense``, prefill rows through a bfloat16 copy of their weights
    (:class:`sot_kernels.linear.QuantizedLinear`). On the CPU the remaining float
    projections are prepacked for oneDNN unless ``prepack`` is False.
    """
    args = ModelArgs.from_hf(config)
    with torch.device("meta"):
        model = LlamaForCausalLM(args, backend, ops)
    model = model.to_empty(device=device).to(dtype)
    if files.dummy:
        if quantization == "gguf":
            raise ValueError("quantization='gguf' needs a GGUF model, not a dummy one")
        std = getattr(config, "initializer_range", None) or DEFAULT_STD
        fill_dummy_weights(model, dummy_seed, std)
        quantized = {}
    elif quantization == "gguf":
        if files.gguf is None:
            raise ValueError("quantization='gguf' needs a GGUF model; use 'int4' or 'int8'")
        weights = cached_gguf_weights(files.gguf, files.path, args.num_heads, args.num_kv_heads)
        quantized = model.load_weights(weights.items())
    else:
        quantized = model.load_weights(files.weights())
    if quantization in ("int4", "int8"):
        for path, linear in _dense_linears(model):
            quantized[path] = quantize(linear.weight, quantization)
    for path, w in quantized.items():
        _set_module(model, path, quantized_linear(w, _bias(model, path), prefill_dense))
    model.eval().requires_grad_(False)
    if quantization is not None:
        # the float matrices left (a GGUF's Q8_0 head, say) go with the int kernels'
        # bfloat16, whatever the activations' dtype: float32 ones read twice the bytes
        model.prepack_cpu_weights(torch.bfloat16)
        model.refine_head = args.tie_word_embeddings and dtype == torch.float32
    elif prepack and can_prepack(device, dtype):
        model.prepack_cpu_weights()
    return model


def _dense_linears(model: LlamaForCausalLM) -> list[tuple[str, nn.Linear]]:
    """Every float projection, with the head (its own, or the tied embedding's table)."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if model.lm_head is None:
        with torch.device("meta"):  # only a holder for the table: no weight of its own
            head = nn.Linear(model.args.hidden_size, model.args.vocab_size, bias=False)
        head.weight = model.model.embed_tokens.weight
        found.append(("lm_head", head))
    return found


def _bias(model: nn.Module, path: str) -> torch.Tensor | None:
    if path == "lm_head" and model.lm_head is None:
        return None  # tied to the embedding: no bias
    return getattr(model.get_submodule(path), "bias", None)


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)
