"""Where the Triton kernel tests run: compiled on CUDA, otherwise in Triton's
interpreter, which ``tests/conftest.py`` selects before anything imports triton."""

from __future__ import annotations

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERPRETED = DEVICE.type == "cpu"


def require_triton() -> None:
    """Skip a test module when triton is missing; fail it when, without a GPU, triton
    was imported before ``TRITON_INTERPRET=1`` (its own ``tl.*`` helpers would then be
    built for the compiler and raise inside interpreted kernels)."""
    pytest.importorskip("triton")
    if INTERPRETED:
        import triton.language as tl

        if type(tl.zeros).__name__ != "InterpretedFunction":
            pytest.fail(
                "no CUDA, and triton was imported before TRITON_INTERPRET=1 was set "
                "(tests/conftest.py sets it first: run the tests with pytest from the repo)",
                pytrace=False,
            )
