"""CPU linear layers: float weights prepacked for oneDNN (:class:`PackedLinear`), and
weight-only int4/int8 ones on PyTorch's CPU kernels (:class:`QuantizedLinear`).

``F.linear`` on CPU hands the weight to MKL/oneDNN in its plain layout on every call.
Reordering it once into oneDNN's blocked layout (what inductor's ``freezing`` does)
roughly halves the time of the small-batch matmuls that dominate decoding here:
measured on this 2-core machine, float32 batch 1 went from 69 to 38 ms per
SmolLM2 step's worth of matrices, bfloat16 from 28 to 18 ms.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

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
    """``y = x W^T + b`` with ``W`` held in oneDNN's blocked layout.

    ``x`` of another dtype than ``W`` (a float32 model with bfloat16 matrices) is cast
    to ``W``'s dtype for the matmul and the result cast back.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features = weight.shape[1]
        self.out_features = weight.shape[0]
        self.dtype = weight.dtype
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _BATCH_HINT)
        self.bias = None if bias is None else bias.detach().to(weight.dtype).clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xk = x.to(self.dtype).contiguous()
        y = torch.ops.mkldnn._linear_pointwise(xk, self.packed, self.bias, "none", [], "")
        return y.to(x.dtype)


def prepack_linears(module: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Swap every ``nn.Linear`` under ``module`` for a :class:`PackedLinear` (with its
    weight in ``dtype``, if given); return the count."""
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            w = child.weight if dtype is None else child.weight.to(dtype)
            setattr(module, name, PackedLinear(w, child.bias))
            count += 1
        else:
            count += prepack_linears(child, dtype)
    return count


# Rows of the current forward that go through the quantized kernels; the rest use the
# bfloat16 copy. The model sets it per step (engine.models.llama), like the forward
# context: the linear modules are called deep inside layers that know nothing of it.
_KERNEL_ROWS: int | None = None


@contextmanager
def kernel_rows(n: int | None) -> Iterator[None]:
    """Within the block, quantized linears run their first ``n`` rows through their
    int kernel and the rest through their bfloat16 copy (``None``: every row the kernel).

    The engine passes the step's decode rows. The int4 kernel gives a row the same bits
    whatever else is in the batch, and oneDNN's bfloat16 matmul does for two or more
    rows, so the matmuls do not make a request's output depend on its batch (nor does
    decode attention: :func:`sot_kernels.attention.decode_attention`).
    """
    global _KERNEL_ROWS
    previous, _KERNEL_ROWS = _KERNEL_ROWS, n
    try:
        yield
    finally:
        _KERNEL_ROWS = previous


class QuantizedLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` held quantized, and optionally a bfloat16 copy.

    PyTorch's CPU weight-only kernels (the ones torchao's CPU layouts call) read a
    quarter (int4) of bfloat16's bytes, which wins while decoding few rows; but they
    de-quantize inside their inner loop for every row of ``x``, so their cost grows
    with the rows, and a prefill chunk of hundreds of rows is many times faster on a
    bfloat16 copy in oneDNN's layout. Measured over one SmolLM2 step's 121 matrices
    (distinct weights, 2 cores): int4 6.0 ms against bfloat16 21 ms for one row, 17.9
    against 19.0 for eight, 31 against 21 for sixteen. With
    ``dense_copy`` rows past :func:`kernel_rows` use that copy; without it (half the
    memory, slow prefill) every row runs the kernel. Inputs of any float dtype are
    cast to bfloat16 for the kernels and the result cast back.
    """

    def __init__(self, dense: torch.Tensor | None, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.dtype = torch.bfloat16
        self.bias = None if bias is None else bias.detach().to(self.dtype).clone()
        self.dense = None if dense is None else PackedLinear(dense.to(self.dtype), self.bias)

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        """``x W^T`` (no bias) through the int kernel; ``x`` is bfloat16 and contiguous."""
        raise NotImplementedError

    def _quantized(self, x: torch.Tensor) -> torch.Tensor:
        y = self.kernel(x.contiguous())
        return y if self.bias is None else y + self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xk = x.to(self.dtype)
        n = x.shape[0]
        split = n if self.dense is None or _KERNEL_ROWS is None else min(_KERNEL_ROWS, n)
        if split == n:
            y = self._quantized(xk)
        elif split == 0:
            y = self.dense(xk)
        else:
            y = torch.cat([self._quantized(xk[:split]), self.dense(xk[split:])])
        return y.to(x.dtype)


class Int4Linear(QuantizedLinear):
    """``W[n, k] = (q[n, k] - 8) * scale[n, k // g] + zero[n, k // g]``, through
    ``aten._weight_int4pack_mm_for_cpu``."""

    def __init__(
        self,
        q: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor,
        group_size: int,
        bias: torch.Tensor | None,
        dense_copy: bool,
    ) -> None:
        n, k = q.shape
        dense = None
        if dense_copy:
            g = q.view(n, k // group_size, group_size).float() - 8.0
            dense = (g * scale[..., None].float() + zero[..., None].float()).view(n, k)
        super().__init__(dense, bias)
        self.out_features, self.in_features = n, k
        self.group_size = group_size
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            q.to(torch.int32).contiguous(), 1
        )
        # [K // g, N, 2]: the kernel's layout of (scale, zero) pairs
        sz = torch.stack([scale, zero], -1).transpose(0, 1).contiguous()
        self.scales_and_zeros = sz.to(self.dtype)

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            x, self.packed, self.group_size, self.scales_and_zeros
        )


class Int8Linear(QuantizedLinear):
    """``W[n, k] = q[n, k] * scale[n]``, through ``aten._weight_int8pack_mm``."""

    def __init__(
        self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, dense_copy: bool
    ) -> None:
        super().__init__(q.float() * scale.float()[:, None] if dense_copy else None, bias)
        self.out_features, self.in_features = q.shape
        # a fresh (64-byte aligned) copy: the kernel crashes on a misaligned weight,
        # such as one memory-mapped from a safetensors file
        self.q = q.clone(memory_format=torch.contiguous_format)
        self.scale = scale.to(self.dtype).clone()

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, self.q, self.scale)
