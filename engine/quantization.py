"""Weight-only quantized matrices: what a GGUF block format or load-time quantization
produces, before it is packed for a matmul kernel (:mod:`sot_kernels.linear`).

Two layouts cover what the CPU kernels take:

- :class:`Int4Weight`: 4-bit codes ``q`` in 0..15 with a scale and a zero per group of
  ``group_size`` inputs, ``w = (q - 8) * scale + zero``. GGUF's Q4_0 (``d * (q - 8)``)
  and Q4_1 (``d * q + m``) blocks of 32 are exactly this with ``zero = 0`` and
  ``zero = m + 8 d``: no re-quantization, no loss.
  Q4_K's sub-blocks of 32 map the same way.
- :class:`Int8Weight`: int8 codes with one scale per output row, ``w = q * scale``,
  for load-time ``"int8"`` quantization of float weights.

Every other GGUF type is de-quantized to float (see :mod:`engine.gguf_weights` for
why Q8_0 is not kept as int8) and, if the engine asks for it, quantized again here
like a safetensors weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: quantization modes of the engine (``EngineConfig.quantization``)
QUANTIZATION_MODES = ("gguf", "int4", "int8")
GROUP_SIZE = 32  # GGUF's block size, and the int4 group size of load-time quantization


@dataclass
class Int4Weight:
    """``w[n, k] = (q[n, k] - 8) * scale[n, k // g] + zero[n, k // g]``."""

    q: torch.Tensor  # [N, K] uint8 codes 0..15
    scale: torch.Tensor  # [N, K // g] float32
    zero: torch.Tensor  # [N, K // g] float32
    group_size: int = GROUP_SIZE

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def dequantize(self) -> torch.Tensor:
        n, k = self.q.shape
        g = self.group_size
        q = self.q.view(n, k // g, g).float() - 8.0
        return (q * self.scale[..., None] + self.zero[..., None]).view(n, k)

    def take_rows(self, order: torch.Tensor) -> Int4Weight:
        """Output rows ``order`` (groups run along the inputs, so rows move whole)."""
        return Int4Weight(self.q[order], self.scale[order], self.zero[order], self.group_size)


@dataclass
class Int8Weight:
    """``w[n, k] = q[n, k] * scale[n]``."""

    q: torch.Tensor  # [N, K] int8
    scale: torch.Tensor  # [N] float32

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def dequantize(self) -> torch.Tensor:
        return self.q.float() * self.scale[:, None]

    def take_rows(self, order: torch.Tensor) -> Int8Weight:
        """Output rows ``order``."""
        return Int8Weight(self.q[order], self.scale[order])


QuantizedWeight = Int4Weight | Int8Weight


def concat_rows(parts: list[QuantizedWeight]) -> QuantizedWeight | None:
    """Stack shards along the output axis (fusing q/k/v or gate/up); ``None`` when the
    shards are not all of one layout and group size, so they cannot share a kernel."""
    first = parts[0]
    if isinstance(first, Int4Weight) and all(
        isinstance(p, Int4Weight) and p.group_size == first.group_size for p in parts
    ):
        return Int4Weight(
            torch.cat([p.q for p in parts]),
            torch.cat([p.scale for p in parts]),
            torch.cat([p.zero for p in parts]),
            first.group_size,
        )
    if all(isinstance(p, Int8Weight) for p in parts):
        return Int8Weight(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]))
    return None


# -- load-time quantization of float weights ------------------------------------------
def quantize_int4(w: torch.Tensor, group_size: int = GROUP_SIZE) -> Int4Weight:
    """Asymmetric round-to-nearest per group of ``group_size`` inputs (min/max range)."""
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"int4 needs the input size ({k}) to be a multiple of {group_size}")
    groups = w.float().view(n, k // group_size, group_size)
    lo, hi = groups.amin(-1), groups.amax(-1)
    scale = ((hi - lo) / 15.0).clamp(min=1e-10)
    q = torch.round((groups - lo[..., None]) / scale[..., None]).clamp(0, 15)
    return Int4Weight(q.to(torch.uint8).view(n, k), scale, lo + 8.0 * scale, group_size)


def quantize_int8(w: torch.Tensor) -> Int8Weight:
    """Symmetric round-to-nearest with one scale per output row."""
    w = w.float()
    scale = (w.abs().amax(-1) / 127.0).clamp(min=1e-10)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return Int8Weight(q, scale)


def quantize(w: torch.Tensor, mode: str) -> QuantizedWeight:
    """Quantize one float matrix for ``mode`` ``"int4"`` or ``"int8"``."""
    if mode == "int4":
        return quantize_int4(w)
    if mode == "int8":
        return quantize_int8(w)
    raise ValueError(f"unknown quantization {mode!r}; use one of {', '.join(QUANTIZATION_MODES)}")


# -- GGUF blocks --------------------------------------------------------------------
def _fp16(raw: torch.Tensor) -> torch.Tensor:
    """Little-endian float16 from a ``[..., 2]`` uint8 tensor, as float32."""
    return raw.contiguous().view(torch.float16).squeeze(-1).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """A block's 16 bytes -> its 32 codes: low nibbles are elements 0..15, high 16..31."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _blocks(raw: torch.Tensor, shape: tuple[int, int], block_bytes: int) -> torch.Tensor:
    n, k = shape
    if k % GROUP_SIZE:
        raise ValueError(f"a row of {k} values is not a whole number of 32-value blocks")
    expected = n * (k // GROUP_SIZE) * block_bytes
    if raw.numel() != expected:
        raise ValueError(f"tensor data has {raw.numel()} bytes, expected {expected}")
    return raw.reshape(n, k // GROUP_SIZE, block_bytes)


def int4_from_q4_0(raw: torch.Tensor, shape: tuple[int, int]) -> Int4Weight:
    """Q4_0 blocks (fp16 ``d``, 16 bytes of codes): ``w = d * (q - 8)``."""
    b = _blocks(raw, shape, 18)
    d = _fp16(b[..., 0:2])
    return Int4Weight(_nibbles(b[..., 2:]).reshape(shape), d, torch.zeros_like(d))


def int4_from_q4_1(raw: torch.Tensor, shape: tuple[int, int]) -> Int4Weight:
    """Q4_1 blocks (fp16 ``d``, fp16 ``m``, 16 bytes of codes): ``w = d * q + m``."""
    b = _blocks(raw, shape, 20)
    d, m = _fp16(b[..., 0:2]), _fp16(b[..., 2:4])
    return Int4Weight(_nibbles(b[..., 4:]).reshape(shape), d, m + 8.0 * d)


def int4_from_q4_k(raw: torch.Tensor, shape: tuple[int, int]) -> Int4Weight:
    """Q4_K super-blocks of 256 (fp16 ``d`` and ``dmin``, twelve bytes of 6-bit scales
    and mins for eight sub-blocks of 32, 128 bytes of codes): sub-block ``s`` holds
    ``w = d * sc[s] * q - dmin * m[s]``, an int4 group of 32 with
    ``scale = d * sc[s]`` and ``zero = 8 * scale - dmin * m[s]``."""
    n, k = shape
    if k % 256:
        raise ValueError(f"a row of {k} values is not a whole number of 256-value blocks")
    expected = n * (k // 256) * 144
    if raw.numel() != expected:
        raise ValueError(f"tensor data has {raw.numel()} bytes, expected {expected}")
    b = raw.reshape(n, k // 256, 144)
    d, dmin = _fp16(b[..., 0:2]), _fp16(b[..., 2:4])
    s = b[..., 4:16].to(torch.int32)
    # llama.cpp's get_scale_min_k4: sub-blocks 0..3 use the low 6 bits of bytes 0..3
    # (scales) and 4..7 (mins); 4..7 combine the nibbles of bytes 8..11 with the top
    # two bits of bytes 0..3 and 4..7
    sc = torch.cat([s[..., 0:4] & 63, (s[..., 8:12] & 0x0F) | ((s[..., 0:4] >> 6) << 4)], -1)
    mn = torch.cat([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], -1)
    # each 32 bytes of codes hold two sub-blocks: low nibbles first, then high ones
    qs = b[..., 16:].reshape(n, k // 256, 4, 32)
    q = torch.stack([qs & 0x0F, qs >> 4], dim=3).reshape(n, k)
    scale = (d[..., None] * sc.float()).reshape(n, k // 32)
    zero = 8.0 * scale - (dmin[..., None] * mn.float()).reshape(n, k // 32)
    return Int4Weight(q, scale, zero)


def dequantize_q8_0(raw: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Q8_0 blocks (fp16 ``d``, 32 int8 codes): ``w = d * q``, as float32."""
    b = _blocks(raw, shape, 34)
    d = _fp16(b[..., 0:2])
    q = b[..., 2:].contiguous().view(torch.int8).float()
    return (q * d[..., None]).reshape(shape)


# -- serialization: a flat dict of tensors, for the converted-model cache ------------
def to_tensors(name: str, w: torch.Tensor | QuantizedWeight) -> dict[str, torch.Tensor]:
    """``w`` as plain tensors under ``name``-derived keys (int4 codes two to a byte)."""
    if isinstance(w, torch.Tensor):
        return {name: w.contiguous()}
    if isinstance(w, Int4Weight):
        q = w.q
        return {
            f"{name}:int4.q": (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous(),
            f"{name}:int4.scale": w.scale.contiguous(),
            f"{name}:int4.zero": w.zero.contiguous(),
            f"{name}:int4.group": torch.tensor([w.group_size]),
        }
    return {f"{name}:int8.q": w.q.contiguous(), f"{name}:int8.scale": w.scale.contiguous()}


def from_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | QuantizedWeight]:
    """Invert :func:`to_tensors` over a whole dict."""
    out: dict[str, torch.Tensor | QuantizedWeight] = {}
    for key, t in tensors.items():
        name, _, part = key.partition(":")
        if not part:
            out[name] = t
        elif part == "int4.q":
            q = torch.stack([t & 0x0F, t >> 4], dim=-1).view(t.shape[0], -1)
            group = int(tensors[f"{name}:int4.group"][0])
            out[name] = Int4Weight(
                q, tensors[f"{name}:int4.scale"], tensors[f"{name}:int4.zero"], group
            )
        elif part == "int8.q":
            out[name] = Int8Weight(t, tensors[f"{name}:int8.scale"])
    return out


# -- kernels ------------------------------------------------------------------------
def quantized_linear(
    w: QuantizedWeight, bias: torch.Tensor | None, dense_copy: bool
) -> torch.nn.Module:
    """The CPU matmul module for a quantized weight (:mod:`sot_kernels.linear`), with a
    bfloat16 copy of the weight for prefill rows if ``dense_copy``."""
    from sot_kernels.linear import Int4Linear, Int8Linear

    if isinstance(w, Int4Weight):
        return Int4Linear(w.q, w.scale, w.zero, w.group_size, bias, dense_copy)
    return Int8Linear(w.q, w.scale, bias, dense_copy)
