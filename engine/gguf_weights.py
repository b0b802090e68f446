"""Read a GGUF file's tensors under Hugging Face names, keeping their quantization.

``transformers`` can load a GGUF file only by de-quantizing it to float. This reader
goes straight from the file's blocks to :mod:`engine.quantization`'s layouts, so a
Q4_1 model runs on int4 matmuls with the very codes, scales and minimums llama.cpp
uses. Types with no exact int layout are de-quantized by the ``gguf`` package.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, ReaderTensor
from gguf.quants import dequantize as gguf_dequantize

from engine.quantization import (
    QuantizedWeight,
    dequantize_q8_0,
    int4_from_q4_0,
    int4_from_q4_1,
    int4_from_q4_k,
)

T = GGMLQuantizationType
FLOAT_TYPES = (T.F32, T.F16, T.BF16)
#: types mapped onto the int4 layout exactly, by their block decoders
INT4_DECODERS = {T.Q4_0: int4_from_q4_0, T.Q4_1: int4_from_q4_1, T.Q4_K: int4_from_q4_k}


class GGUFError(ValueError):
    """The GGUF file is malformed, truncated, or holds a tensor type we cannot read."""


_LAYER = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def hf_name(gguf_name: str) -> str:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``."""
    m = _BLOCK_RE.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER:
        return f"model.layers.{m.group(1)}.{_LAYER[m.group(2)]}.{m.group(3)}"
    stem, _, kind = gguf_name.rpartition(".")
    if stem in _GLOBAL and kind in ("weight", "bias"):
        return f"{_GLOBAL[stem]}.{kind}"
    raise GGUFError(f"unexpected tensor {gguf_name!r} in a Llama-family GGUF file")


def open_gguf(path: Path) -> GGUFReader:
    try:
        return GGUFReader(path)
    except (ValueError, IndexError, KeyError, OSError) as exc:
        raise GGUFError(f"{path.name} is not a readable GGUF file: {exc}") from exc


def read_gguf_weights(
    path: Path, num_heads: int, num_kv_heads: int, keep_quantized: bool
) -> Iterator[tuple[str, torch.Tensor | QuantizedWeight]]:
    """Every tensor of ``path`` as ``(hf_name, float32 tensor | quantized weight)``.

    With ``keep_quantized``, Q4_0, Q4_1 and Q4_K matrices come out as
    :class:`Int4Weight`; everything else (and everything without it) as float32.

    Q8_0 and the 5- and 6-bit types have no exact int4 layout, and no CPU int8 kernel
    takes a scale per block of 32. Re-quantizing their rows to one scale each was
    measured on SmolLM2's Q8_0 head: top-1 agreement with float32 was 96.5% against
    97.2% for the head in bfloat16 (``evals.quant_quality``, before the head's top
    candidates were re-scored), and ``_weight_int8pack_mm`` was no faster than a
    bfloat16 matmul at one row and 2.6x slower at eight. So they are de-quantized and
    run as the model's float matrices.

    llama.cpp stores the q and k projections of its ``llama`` architecture with rows
    interleaved for its RoPE kernel; they are put back in Hugging Face order.
    """
    reader = open_gguf(path)
    arch = _architecture(reader)
    for t in reader.tensors:
        name = hf_name(t.name)
        value = _read(t, keep_quantized and name.endswith(".weight") and "norm" not in name)
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            heads = num_heads if ".q_proj." in name else num_kv_heads
            order = _unpermute(value.shape[0], heads)
            value = value[order] if isinstance(value, torch.Tensor) else value.take_rows(order)
        yield name, value


def _architecture(reader: GGUFReader) -> str:
    field = reader.fields.get("general.architecture")
    if field is None:
        raise GGUFError("GGUF file has no general.architecture")
    return bytes(field.parts[field.data[0]]).decode()


def _shape(t: ReaderTensor) -> tuple[int, ...]:
    # GGUF lists dimensions fastest-first; torch wants them slowest-first
    return tuple(int(d) for d in reversed(t.shape.tolist()))


def _read(t: ReaderTensor, keep_quantized: bool) -> torch.Tensor | QuantizedWeight:
    shape = _shape(t)
    try:
        raw = torch.from_numpy(np.array(t.data))  # a copy: the file is mapped read-only
    except (ValueError, TypeError) as exc:  # a truncated file maps short arrays
        raise GGUFError(f"tensor {t.name!r} cannot be read: {exc}") from exc
    qtype = t.tensor_type
    if qtype in FLOAT_TYPES:
        if raw.numel() != int(np.prod(shape)):
            raise GGUFError(f"tensor {t.name!r} is truncated")
        return raw.float().reshape(shape)
    if len(shape) != 2:
        raise GGUFError(f"quantized tensor {t.name!r} has shape {shape}, expected a matrix")
    raw = raw.view(torch.uint8)
    try:
        if qtype in INT4_DECODERS:
            w = INT4_DECODERS[qtype](raw, shape)
            return w if keep_quantized else w.dequantize()
        if qtype == T.Q8_0:
            return dequantize_q8_0(raw, shape)
        return _dequantize_other(t, shape)
    except ValueError as exc:
        raise GGUFError(f"tensor {t.name!r} ({qtype.name}): {exc}") from exc


def _dequantize_other(t: ReaderTensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Any other type the ``gguf`` package can de-quantize (K-quants, IQ types), as float32."""
    try:
        dense = gguf_dequantize(t.data, t.tensor_type)
    except NotImplementedError as exc:
        raise GGUFError(
            f"tensor {t.name!r} has GGUF type {t.tensor_type.name}, which cannot be read"
        ) from exc
    if dense.size != int(np.prod(shape)):
        raise ValueError(
            f"data de-quantizes to {dense.size} values, expected {int(np.prod(shape))}"
        )
    return torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float32)).reshape(shape)


def _unpermute(rows: int, heads: int) -> torch.Tensor:
    """Row order that undoes llama.cpp's q/k permutation (``convert_hf_to_gguf.permute``):
    within each head, rows ``(i, j)`` of a ``[half, 2]`` grid go back to ``(j, i)``."""
    return torch.arange(rows).view(heads, rows // heads // 2, 2).transpose(1, 2).reshape(-1)


# not *.safetensors: ModelFiles.weights() reads those as the float checkpoint
_CACHE_FILE = "gguf-quantized-v1.weights"  # bump when the layout changes


def cached_gguf_weights(
    gguf: Path, cache_dir: Path, num_heads: int, num_kv_heads: int
) -> dict[str, torch.Tensor | QuantizedWeight]:
    """:func:`read_gguf_weights` with ``keep_quantized``, cached in ``cache_dir``.

    Parsing a GGUF file's metadata (a tokenizer of 49k strings) takes seconds; the
    cache holds just the tensors, so later starts read them in well under one.
    """
    from safetensors.torch import load_file, save_file

    from engine.quantization import from_tensors, to_tensors

    target = cache_dir / _CACHE_FILE
    if target.exists():
        return from_tensors(load_file(target))
    weights = dict(read_gguf_weights(gguf, num_heads, num_kv_heads, keep_quantized=True))
    flat: dict[str, torch.Tensor] = {}
    for name, w in weights.items():
        flat.update(to_tensors(name, w))
    # a private temporary name, renamed atomically: a crash never leaves a half-written
    # cache, and two processes converting at once (a server and a test) cannot clash
    fd, tmp = tempfile.mkstemp(prefix=".gguf-", dir=cache_dir)
    os.close(fd)
    try:
        save_file(flat, tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return weights
