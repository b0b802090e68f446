"""CPU linear layers with weights prepacked for oneDNN.

``F.linear`` on CPU hands the weight to MKL/oneDNN in its plain layout on every call.
Reordering it once into oneDNN's blocked layout (what inductor's ``freezing`` does)
roughly halves the time of the small-batch matmuls that dominate decoding here:
measured on this 2-core machine, float32 batch 1 went from 69 to 38 ms per
SmolLM2 step's worth of matrices, bfloat16 from 28 to 18 ms.
"""

from __future__ import annotations

import torch
from torch import nn

# Batch size the blocked layout is tuned for; it serves every batch size.
_BATCH_HINT = 16


def can_prepack(device: torch.device, dtype: torch.dtype) -> bool:
    return (
        device.type == "cpu"
        and dtype in (torch.float32, torch.bfloat16)
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


class PackedLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` held in oneDNN's blocked layout."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features = weight.shape[1]
        self.out_features = weight.shape[0]
        self.dtype = weight.dtype
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _BATCH_HINT)
        self.bias = None if bias is None else bias.detach().clone()

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> PackedLinear:
        return cls(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_contiguous():
            x = x.contiguous()
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def prepack_linears(module: nn.Module) -> int:
    """Swap every ``nn.Linear`` under ``module`` for a :class:`PackedLinear`; return the count."""
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, PackedLinear.from_linear(child))
            count += 1
        else:
            count += prepack_linears(child)
    return count


class Int4Linear(nn.Module):
    """``y = x W^T + b`` with ``W`` held as 4-bit codes, group-wise scales and zeros:
    ``W[n, k] = (q[n, k] - 8) * scale[n, k // g] + zero[n, k // g]``.

    The matmul is PyTorch's CPU weight-only int4 kernel
    (``aten._weight_int4pack_mm_for_cpu``, the one torchao's int4 CPU layout calls),
    which reads a quarter of bfloat16's bytes and wins while decoding few rows. It
    de-quantizes inside its inner loop for every row of ``x``, though, so its cost grows
    with the rows: past ``dense_max_rows`` (prefill chunks, large decode batches) a
    bfloat16 copy of the weights in oneDNN's layout is faster, and is used instead.
    ``dense_max_rows=None`` keeps no copy (half the memory, slow prefill).
    """

    def __init__(
        self,
        q: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor,
        group_size: int,
        bias: torch.Tensor | None,
        dtype: torch.dtype,
        dense_max_rows: int | None,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.group_size = group_size
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            q.to(torch.int32).contiguous(), 1
        )
        # [K // g, N, 2]: the kernel's layout of (scale, zero) pairs
        self.scales_and_zeros = torch.stack([scale, zero], -1).transpose(0, 1).contiguous()
        self.scales_and_zeros = self.scales_and_zeros.to(dtype)
        self.bias = None if bias is None else bias.detach().to(dtype).clone()
        self.dense_max_rows = dense_max_rows
        self.dense: PackedLinear | None = None
        if dense_max_rows is not None:
            n, k = q.shape
            g = q.view(n, k // group_size, group_size).float() - 8.0
            w = g * scale[..., None].float() + zero[..., None].float()
            self.dense = PackedLinear(w.view(n, k).to(dtype), self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense is not None and x.shape[0] > self.dense_max_rows:
            return self.dense(x)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.contiguous(), self.packed, self.group_size, self.scales_and_zeros
        )
        return y if self.bias is None else y + self.bias


class Int8Linear(nn.Module):
    """``y = x W^T + b`` with ``W[n, k] = q[n, k] * scale[n]``, int8 codes
    (``aten._weight_int8pack_mm``); a bfloat16 copy past ``dense_max_rows`` rows, as
    :class:`Int4Linear` does and for the same reason."""

    def __init__(
        self,
        q: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor | None,
        dtype: torch.dtype,
        dense_max_rows: int | None,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        # a fresh (64-byte aligned) copy: the kernel crashes on a misaligned weight,
        # such as one memory-mapped from a safetensors file
        self.q = q.clone(memory_format=torch.contiguous_format)
        self.scale = scale.to(dtype).clone()
        self.bias = None if bias is None else bias.detach().to(dtype).clone()
        self.dense_max_rows = dense_max_rows
        self.dense: PackedLinear | None = None
        if dense_max_rows is not None:
            w = q.float() * scale.float()[:, None]
            self.dense = PackedLinear(w.to(dtype), self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense is not None and x.shape[0] > self.dense_max_rows:
            return self.dense(x)
        y = torch.ops.aten._weight_int8pack_mm(x.contiguous(), self.q, self.scale)
        return y if self.bias is None else y + self.bias
