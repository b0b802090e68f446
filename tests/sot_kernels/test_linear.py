"""The CPU matmul modules against a float reference, at every row count the engine uses."""

from __future__ import annotations

import pytest
import torch

from engine.quantization import quantize_int4, quantize_int8
from sot_kernels.linear import Int4Linear, Int8Linear, PackedLinear, kernel_rows

# decode batches of 1..16 rows, the fallback threshold's both sides, and prefill chunks
ROWS = [1, 2, 3, 4, 7, 8, 9, 16, 33, 64, 200]


def _reference(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # the kernels see bfloat16 inputs; compare against the float product of those
    y = x.to(torch.bfloat16).float() @ w.t()
    return y if bias is None else y + bias.to(torch.bfloat16).float()


def _close(y: torch.Tensor, ref: torch.Tensor) -> None:
    err = (y.float() - ref).abs().max() / ref.abs().max()
    assert err < 2e-2, f"relative error {err:.4f}"


@pytest.fixture(scope="module")
def weight():
    torch.manual_seed(0)
    return torch.randn(96, 128) * 0.1, torch.randn(96) * 0.1


def _int4(weight, dense_copy: bool) -> tuple[Int4Linear, torch.Tensor]:
    w, b = weight
    q = quantize_int4(w)
    return Int4Linear(q.q, q.scale, q.zero, q.group_size, b, dense_copy), q.dequantize()


def _int8(weight, dense_copy: bool) -> tuple[Int8Linear, torch.Tensor]:
    w, b = weight
    q = quantize_int8(w)
    return Int8Linear(q.q, q.scale, b, dense_copy), q.dequantize()


@pytest.mark.parametrize("make", [_int4, _int8], ids=["int4", "int8"])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("split", [None, 0, 1, 8])  # kernel rows: all, none, some
@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float32])
def test_quantized_linear_matches_its_float_weight(weight, make, rows, split, in_dtype):
    mod, w = make(weight, dense_copy=True)
    x = torch.randn(rows, 128).to(in_dtype)
    with kernel_rows(split):
        y = mod(x)
    assert y.dtype == in_dtype and y.shape == (rows, 96)
    _close(y, _reference(x, w, weight[1]))


@pytest.mark.parametrize("make", [_int4, _int8], ids=["int4", "int8"])
def test_kernel_rows_are_batch_invariant(weight, make):
    """A decode row gets the same bits whatever it is batched with: the int kernels
    compute every row alike, for any number of rows and any split."""
    mod, _ = make(weight, dense_copy=True)
    x = torch.randn(40, 128, dtype=torch.bfloat16)
    with kernel_rows(1):
        alone = mod(x[:1])
    for n, split in [(2, 2), (9, 9), (16, 3), (40, 1), (40, 17)]:
        with kernel_rows(split):
            assert torch.equal(mod(x[:n])[:1], alone)


def test_int8_linear_copies_a_misaligned_weight(weight):
    """``_weight_int8pack_mm`` crashes on a weight that is not 64-byte aligned, such as
    one memory-mapped from a file: the module must hold its own aligned copy."""
    w, _ = weight
    q = quantize_int8(w)
    buf = torch.empty(q.q.numel() + 1, dtype=torch.int8)
    misaligned = buf[1:].view(q.q.shape)
    misaligned.copy_(q.q)
    mod = Int8Linear(misaligned, q.scale, None, dense_copy=False)
    assert mod.q.data_ptr() % 64 == 0
    x = torch.randn(4, 128, dtype=torch.bfloat16)
    _close(mod(x), _reference(x, q.dequantize(), None))


def test_rows_past_the_kernel_rows_take_the_dense_copy(weight, monkeypatch):
    mod, _ = _int4(weight, dense_copy=True)
    dense_rows, kernel_calls = [], []
    monkeypatch.setattr(mod.dense, "forward", lambda x: dense_rows.append(x.shape[0]) or x[:, :96])
    real_kernel = mod.kernel
    monkeypatch.setattr(mod, "kernel", lambda x: kernel_calls.append(x.shape[0]) or real_kernel(x))
    x = torch.randn(10, 128, dtype=torch.bfloat16)
    mod(x)  # outside a step: every row the kernel
    with kernel_rows(3):
        mod(x)
    with kernel_rows(0):
        mod(x)
    assert kernel_calls == [10, 3] and dense_rows == [7, 10]


def test_without_a_dense_copy_every_row_takes_the_kernel(weight):
    mod, w = _int4(weight, dense_copy=False)
    assert mod.dense is None
    x = torch.randn(12, 128, dtype=torch.bfloat16)
    with kernel_rows(0):
        _close(mod(x), _reference(x, w, weight[1]))


@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float32])
def test_packed_linear_casts_to_its_weight_dtype(weight, in_dtype):
    w, b = weight
    mod = PackedLinear(w.to(torch.bfloat16), b)
    x = torch.randn(3, 128).to(in_dtype)
    y = mod(x)
    assert y.dtype == in_dtype
    _close(y, _reference(x, w.to(torch.bfloat16).float(), b))
