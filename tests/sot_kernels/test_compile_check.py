"""Every Triton kernel compiles for a real GPU target (sm_90), without a GPU.

``sot_kernels.compile_check`` must run in its own process: the test session runs triton in
interpreter mode, and the compiler needs it off from the first import. So every test
here is a subprocess; nothing imports ``sot_kernels.compile_check`` in this process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[2]
KERNELS = [
    "_decode_split_kernel", "_extend_kernel", "_merge_kernel", "_merge_splits_kernel",
    "_rms_norm_kernel", "_rope_store_kv_kernel",
    "_shared_prefix_kernel", "_silu_and_mul_kernel", "_store_kv_kernel",
]  # fmt: skip


def _run(args: list[str], cwd: Path = REPO, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def test_every_kernel_compiles_for_sm90():
    proc = _run(
        ["-m", "sot_kernels.compile_check", "--archs", "90", "--dtypes", "bfloat16,float32"]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert summary.startswith("compiled ") and "for sm_90 (bfloat16, float32)" in summary
    for name in KERNELS:  # a kernel the recording missed would go unchecked
        assert name in summary


BAD_KERNEL = """
import torch
import triton
import triton.language as tl

from sot_kernels.compile_check import compile_launch, recording


@triton.jit
def dot_k(A, B, C, BLOCK_K: tl.constexpr):
    m = tl.arange(0, 16)
    k = tl.arange(0, BLOCK_K)
    a = tl.load(A + m[:, None] * BLOCK_K + k[None, :])
    b = tl.load(B + k[:, None] * 16 + m[None, :])
    tl.store(C + m[:, None] * 16 + m[None, :], tl.dot(a, b))


def launch(block_k):
    a = torch.ones(16, block_k, dtype=torch.bfloat16)
    b = torch.ones(block_k, 16, dtype=torch.bfloat16)
    dot_k[(1,)](a, b, torch.empty(16, 16), BLOCK_K=block_k)


with recording() as launches:
    launch(16)
    launch(8)
print("K=16 compiles:", compile_launch(launches[0], 90))
compile_launch(launches[1], 90)
"""


def test_a_kernel_that_cannot_compile_fails_the_check(tmp_path):
    # a bf16 tl.dot with K = 8: Triton's interpreter runs it, the compiler rejects it
    (tmp_path / "bad.py").write_text(BAD_KERNEL)
    proc = _run([str(tmp_path / "bad.py")], cwd=tmp_path)
    assert "K=16 compiles:" in proc.stdout, proc.stderr[-3000:]
    assert proc.returncode != 0
    assert "CompilationError" in proc.stderr


def test_importing_it_under_the_interpreter_is_refused():
    env = {**os.environ, "PYTHONPATH": str(REPO), "TRITON_INTERPRET": "1"}
    code = "import triton, sot_kernels.triton_attention; import sot_kernels.compile_check"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "run it as its own process" in proc.stderr
