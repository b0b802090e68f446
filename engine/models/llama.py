"""Llama-family decoder (Llama, Mistral, Qwen2, Qwen3, SmolLM2) over a flat token batch.

One class covers the family; the differences are configuration: bias on the QKV
projection (Qwen2), per-head q/k RMSNorm (Qwen3), GQA, tied embeddings and the
RoPE variant (llama3 scaling and friends come from ``transformers``' own tables).
QKV and gate/up projections are fused into one matmul each.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from engine.attention import AttentionBackend
from engine.context import get_context
from engine.models.ops import TORCH_OPS, Ops
from engine.quantization import QuantizedWeight, concat_rows
from sot_kernels.linear import PackedLinear, kernel_rows, prepack_linears

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass
class ModelArgs:
    """The subset of a Hugging Face config this forward needs."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    qk_norm: bool
    max_position_embeddings: int
    sliding_window: int | None

    @classmethod
    def from_hf(cls, config: PretrainedConfig) -> ModelArgs:
        mt = config.model_type
        if mt not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type {mt!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported (silu only)")
        heads = config.num_attention_heads
        attention_bias = bool(getattr(config, "attention_bias", False))
        sliding = getattr(config, "sliding_window", None)
        if mt == "qwen2" and not getattr(config, "use_sliding_window", False):
            sliding = None
        return cls(
            model_type=mt,
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            rms_norm_eps=config.rms_norm_eps,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            qkv_bias=True if mt == "qwen2" else (attention_bias and mt != "mistral"),
            o_bias=attention_bias and mt in ("llama", "qwen3"),
            qk_norm=mt == "qwen3",
            max_position_embeddings=config.max_position_embeddings,
            sliding_window=sliding,
        )


def rope_inv_freq(config: PretrainedConfig, head_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and attention scaling, exactly as ``transformers`` computes them."""
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        base = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)), 1.0
    if rope_type not in ROPE_INIT_FUNCTIONS or rope_type == "dynamic":
        raise ValueError(f"rope_type {rope_type!r} is not supported")
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
    return inv_freq, float(scaling)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, ops: Ops = TORCH_OPS) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps)

    def forward_add(
        self, x: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ops.add_rms_norm(x, residual, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(
        self, args: ModelArgs, layer: int, backend: AttentionBackend, ops: Ops = TORCH_OPS
    ) -> None:
        super().__init__()
        self.layer = layer
        self.backend = backend
        self.num_heads, self.num_kv_heads, self.head_dim = (
            args.num_heads,
            args.num_kv_heads,
            args.head_dim,
        )
        self.q_size = args.num_heads * args.head_dim
        self.kv_size = args.num_kv_heads * args.head_dim
        self.scale = args.head_dim**-0.5
        self.qkv_proj = nn.Linear(
            args.hidden_size, self.q_size + 2 * self.kv_size, bias=args.qkv_bias
        )
        self.o_proj = nn.Linear(self.q_size, args.hidden_size, bias=args.o_bias)
        self.q_norm = RMSNorm(args.head_dim, args.rms_norm_eps, ops) if args.qk_norm else None
        self.k_norm = RMSNorm(args.head_dim, args.rms_norm_eps, ops) if args.qk_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx = get_context()
        qkv = self.qkv_proj(x)
        nq, nk, d = self.num_heads, self.num_kv_heads, self.head_dim
        # q and k are adjacent in the fused output: the backend rotates them together
        qk = qkv[:, : self.q_size + self.kv_size].view(-1, nq + nk, d)
        v = qkv[:, self.q_size + self.kv_size :].view(-1, nk, d)
        if self.q_norm is not None:
            qk = torch.cat([self.q_norm(qk[:, :nq]), self.k_norm(qk[:, nq:])], dim=1)
        out = self.backend.forward_rope(qk, v, ctx.cos, ctx.sin, self.layer, self.scale)
        return self.o_proj(out.reshape(-1, self.q_size))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs, ops: Ops = TORCH_OPS) -> None:
        super().__init__()
        self.ops = ops
        self.gate_up_proj = nn.Linear(args.hidden_size, 2 * args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.ops.silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(
        self, args: ModelArgs, layer: int, backend: AttentionBackend, ops: Ops = TORCH_OPS
    ) -> None:
        super().__init__()
        self.self_attn = Attention(args, layer, backend, ops)
        self.mlp = MLP(args, ops)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps, ops)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps, ops)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm.forward_add(x, residual)
        h = self.self_attn(h)
        h, residual = self.post_attention_layernorm.forward_add(h, residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, args: ModelArgs, backend: AttentionBackend, ops: Ops = TORCH_OPS) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(args, i, backend, ops) for i in range(args.num_layers)
        )
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps, ops)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            x, residual = layer(x, residual)
        return self.norm.forward_add(x, residual)[0]


class LlamaForCausalLM(nn.Module):
    """``forward(input_ids [T]) -> hidden [T, H]``; ``compute_logits`` on selected rows."""

    # HF checkpoint names -> (fused parameter, shard index)
    _FUSED: ClassVar[dict[str, tuple[str, int]]] = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }
    _FUSED_RE = re.compile(r"\.(q_proj|k_proj|v_proj|gate_proj|up_proj)\.")

    def __init__(self, args: ModelArgs, backend: AttentionBackend, ops: Ops = TORCH_OPS) -> None:
        super().__init__()
        self.args = args
        self.model = LlamaModel(args, backend, ops)
        self.lm_head: nn.Module | None = (
            None
            if args.tie_word_embeddings
            else nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        )
        # set when a tied head runs on a lower-precision copy of a float32 embedding
        self.refine_head = False

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # rows of generated tokens take the quantized kernels, prompt rows their
        # bfloat16 copies
        ctx = get_context()
        with kernel_rows(ctx.num_decodes):
            return self.model(input_ids)

    #: candidates re-scored in full precision when the head runs in lower precision
    REFINE_TOP_K = 8

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:
            return torch.nn.functional.linear(hidden, self.model.embed_tokens.weight).float()
        logits = self.lm_head(hidden).float()
        if self.refine_head:
            # The head ran on a bfloat16 (or quantized) copy of a float32 table, which
            # flips the argmax at near-ties (measured: top-1 agreement with float32 fell
            # to 97.2% from 98.3% on evals.quant_quality's text). Re-scoring the top
            # candidates against the float32 table, still held for the embedding
            # lookup, makes the choice the float32 head's at the cost of k dot products.
            top = logits.topk(self.REFINE_TOP_K, dim=-1).indices
            table = self.model.embed_tokens.weight
            exact = torch.einsum("mh,mkh->mk", hidden.float(), table[top].float())
            logits.scatter_(1, top, exact)
        return logits

    def prepack_cpu_weights(self, dtype: torch.dtype | None = None) -> None:
        """Hold every float projection, and the head, in oneDNN's blocked layout (CPU
        only), in ``dtype`` if given (else the model's)."""
        if self.lm_head is None:  # tied: the head gets its own packed copy of the table
            w = self.model.embed_tokens.weight
            self.lm_head = PackedLinear(w if dtype is None else w.to(dtype), None)
        prepack_linears(self, dtype)

    def _shard_sizes(self, fused: str) -> list[int]:
        a = self.args
        if fused == "qkv_proj":
            return [
                a.num_heads * a.head_dim,
                a.num_kv_heads * a.head_dim,
                a.num_kv_heads * a.head_dim,
            ]
        return [a.intermediate_size, a.intermediate_size]

    @torch.no_grad()
    def load_weights(
        self, weights: Iterable[tuple[str, torch.Tensor | QuantizedWeight]]
    ) -> dict[str, QuantizedWeight]:
        """Copy HF-named tensors into this module, fusing q/k/v and gate/up on the way.

        Quantized matrices are not copied: they are returned by module path (q/k/v and
        gate/up fused into one weight each), for the caller to swap those modules for
        quantized kernels. A quantized embedding is de-quantized for the lookup, and
        when the head is tied to it the head is returned as quantized too.
        """
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        shards: dict[str, dict[int, QuantizedWeight]] = {}
        quantized: dict[str, QuantizedWeight] = {}
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and self.lm_head is None:
                continue  # tied: the embedding is the head
            m = self._FUSED_RE.search(name)
            if m:
                fused, shard = self._FUSED[m.group(1)]
                target = name.replace(m.group(1), fused)
                if isinstance(tensor, torch.Tensor):
                    sizes = self._shard_sizes(fused)
                    param = params[target]
                    param.narrow(0, sum(sizes[:shard]), sizes[shard]).copy_(tensor)
                else:
                    shards.setdefault(target, {})[shard] = tensor
                loaded.add(f"{target}#{shard}")
                continue
            if name not in params:
                raise ValueError(f"unexpected weight {name!r} in checkpoint")
            if isinstance(tensor, torch.Tensor):
                params[name].copy_(tensor)
            else:
                if name == "model.embed_tokens.weight":
                    params[name].copy_(tensor.dequantize())
                    if self.lm_head is None:
                        quantized["lm_head.weight"] = tensor
                else:
                    quantized[name] = tensor
            loaded.add(name)
        for target, parts in shards.items():
            sizes = self._shard_sizes(target.split(".")[-2])
            fused_w = None
            if len(parts) == len(sizes):  # else some shards came as floats
                fused_w = concat_rows([parts[i] for i in range(len(sizes))])
            if fused_w is not None:
                quantized[target] = fused_w
                continue
            # shards of different layouts (or some float) cannot share one kernel
            for i, part in parts.items():
                params[target].narrow(0, sum(sizes[:i]), sizes[i]).copy_(part.dequantize())
        expected = set()
        for pname in params:
            fused = pname.split(".")[-2]
            if fused in ("qkv_proj", "gate_up_proj"):
                expected.update(f"{pname}#{i}" for i in range(len(self._shard_sizes(fused))))
            else:
                expected.add(pname)
        missing = expected - loaded
        if missing:
            raise ValueError(f"checkpoint is missing weights: {sorted(missing)[:5]}")
        return {name.removesuffix(".weight"): w for name, w in quantized.items()}
