"""Compile every Triton kernel for real CUDA targets, on a machine without a GPU.

    python -m sot_kernels.compile_check [--archs 80,90] [--dtypes float32,bfloat16,float16]

The CPU tests run the kernels in Triton's interpreter, which executes them with NumPy
and never meets the compiler: a kernel can pass every interpreted test and still fail
to compile for a GPU (``tl.dot`` shape and dtype rules, casts, layouts). This tool
calls each kernel's Python wrapper on small CPU tensors with the launch intercepted,
turns every recorded launch into a signature (pointer dtypes, scalar widths and the
constexpr values the wrapper chose) and compiles it through Triton's whole pipeline,
TTIR -> TTGIR -> LLVM IR -> PTX -> cubin with the ptxas that ships with Triton, for each
``--archs`` target (80: A100, 90: H100/H200). Nothing runs: it proves the kernels
compile for those GPUs with the shapes the engine uses, not that their results are
right (the interpreted tests check results; a GPU run checks both).

Integer arguments compile unspecialized. At run time Triton also specializes integers
equal to 1 and marks multiples of 16 for vectorized access; those variants only
simplify the same code.

Shapes: SmolLM2-135M's heads (Hq=9, Hk=3, D=64) and a Llama-8B-like layout (Hq=32,
Hk=8, D=128), with and without the optional variants (log-sum-exp output, split
prefixes, a ragged batch).
"""

from __future__ import annotations

import os

# the interpreter replaces every @triton.jit function at import time: it must be off
# before anything imports triton
os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import argparse
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from sot_kernels import triton_attention, triton_cascade, triton_ops

if not isinstance(triton_attention._decode_split_kernel, JITFunction):
    raise RuntimeError(
        "sot_kernels.compile_check was imported after triton in interpreter mode; "
        "run it as its own process: python -m sot_kernels.compile_check"
    )

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TYPE_NAMES = {
    torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
    torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8",
    torch.uint8: "u8", torch.bool: "i1",
}  # fmt: skip
# (Hq, Hk, D)
HEAD_LAYOUTS = ((9, 3, 64), (32, 8, 128))
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


@dataclass(frozen=True)
class Launch:
    """One kernel launch reduced to what compilation depends on."""

    fn: JITFunction
    signature: tuple[tuple[str, str], ...]
    constexprs: tuple[tuple[int, object], ...]
    options: tuple[tuple[str, int], ...]

    @property
    def name(self) -> str:
        return self.fn.fn.__name__

    def describe(self) -> str:
        names = [n for n, _ in self.signature]
        consts = ", ".join(f"{names[i]}={v}" for i, v in self.constexprs)
        ptrs = ",".join(t[1:] for _, t in self.signature if t.startswith("*"))
        return f"{self.name}[{ptrs}]({consts})"


def _scalar_type(value: object) -> str:
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"cannot type a kernel argument {value!r}")


def _launch(fn: JITFunction, args: tuple, kwargs: dict) -> Launch:
    signature, constexprs = [], []
    for i, param in enumerate(fn.params):
        if i < len(args):
            value = args[i]
        elif param.name in kwargs:
            value = kwargs[param.name]
        elif param.has_default:
            value = param.default
        else:
            raise TypeError(f"{fn.fn.__name__}: no value for {param.name}")
        if param.is_constexpr or value is None:
            signature.append((param.name, "constexpr"))
            constexprs.append((i, value))
        elif isinstance(value, torch.Tensor):
            signature.append((param.name, "*" + TYPE_NAMES[value.dtype]))
        else:
            signature.append((param.name, _scalar_type(value)))
    options = tuple((k, int(kwargs[k])) for k in LAUNCH_OPTIONS if k in kwargs)
    return Launch(fn, tuple(signature), tuple(constexprs), options)


@contextmanager
def recording() -> Iterator[list[Launch]]:
    """Inside the block, ``kernel[grid](...)`` records the launch instead of running it."""
    launches: list[Launch] = []
    original = JITFunction.run

    def record(self: JITFunction, *args, grid, warmup, **kwargs):
        launches.append(_launch(self, args, kwargs))

    JITFunction.run = record
    try:
        yield launches
    finally:
        JITFunction.run = original


def _pool(slots: int, hk: int, d: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(slots, hk, d, dtype=dtype), torch.zeros(slots, hk, d, dtype=dtype)


def record_launches(dtype: torch.dtype, layouts: Sequence[tuple[int, int, int]]) -> list[Launch]:
    """Every launch the kernel wrappers make for ``dtype`` and each head layout.

    The tensors are tiny and on the CPU: only their dtypes and the wrappers' choices of
    block sizes and variants reach the compiler. Outputs are never computed.
    """
    with recording() as launches:
        for hq, hk, d in layouts:
            k_cache, v_cache = _pool(256, hk, d, dtype)
            table = torch.zeros(4, 32, dtype=torch.int64)
            rows, lens = torch.tensor([0, 1, 2]), torch.tensor([5, 17, 30])
            q = torch.zeros(3, hq, d, dtype=dtype)
            scale = d**-0.5
            for lse in (False, True):
                triton_attention.decode_attention_triton(
                    q, k_cache, v_cache, table, rows, lens, scale, 4, return_lse=lse
                )
            ext_q = torch.zeros(12, hq, d, dtype=dtype)
            starts = torch.tensor([0, 1, 5, 12])
            triton_attention.extend_attention_triton(
                ext_q, k_cache, v_cache, table, rows, starts, lens, scale, max_q_len=7
            )
            k_new = torch.zeros(3, hk, d, dtype=dtype)
            slots = torch.tensor([1, 2, 3])
            triton_attention.store_kv_triton(k_cache, v_cache, slots, k_new, k_new)
            prefix = torch.arange(1, 201)  # 4 splits of whole 64-key blocks
            for splits, out_dtype in ((1, None), (1, torch.float32), (4, None)):
                triton_cascade.shared_prefix_attention_triton(
                    q, k_cache, v_cache, prefix, scale, num_splits=splits, out_dtype=out_dtype
                )
            part = torch.zeros(3, hq, d, dtype=torch.float32)
            part_lse = torch.zeros(3, hq, dtype=torch.float32)
            triton_cascade.merge_attention_triton(part, part_lse, part, part_lse, out_dtype=dtype)
            triton_ops.rope_and_store_kv_triton(
                q, k_new, k_new, torch.zeros(3, d, dtype=dtype), torch.zeros(3, d, dtype=dtype),
                k_cache, v_cache, slots,
            )  # fmt: skip
            hidden = torch.zeros(3, hq * d, dtype=dtype)
            weight = torch.ones(hq * d, dtype=dtype)
            triton_ops.rms_norm_triton(hidden, weight, 1e-6)
            triton_ops.add_rms_norm_triton(hidden, hidden, weight, 1e-6)
            triton_ops.silu_and_mul_triton(torch.zeros(3, 2 * hq * d, dtype=dtype))
    return launches


def compile_launch(launch: Launch, arch: int) -> dict[str, object]:
    """Compile to a cubin for ``sm_<arch>``; returns the kernel's resource usage."""
    src = ASTSource(
        fn=launch.fn,
        signature=dict(launch.signature),
        constexprs={(i,): v for i, v in launch.constexprs},
    )
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(launch.options))
    if not kernel.asm.get("cubin"):
        raise RuntimeError(f"{launch.describe()}: no cubin for sm_{arch}")
    meta = kernel.metadata
    return {"shared": int(meta.shared), "num_warps": int(meta.num_warps)}


def check(archs: Sequence[int], dtypes: Sequence[str], verbose: bool = False) -> list[dict]:
    """Compile every distinct launch for every arch; a failure raises with its kernel."""
    results = []
    for name in dtypes:
        unique = list(dict.fromkeys(record_launches(DTYPES[name], HEAD_LAYOUTS)))
        for launch in unique:
            for arch in archs:
                t0 = time.perf_counter()
                try:
                    info = compile_launch(launch, arch)
                except Exception as exc:
                    raise RuntimeError(
                        f"{launch.describe()} does not compile for sm_{arch}: {exc}"
                    ) from exc
                seconds = time.perf_counter() - t0
                row = {"kernel": launch.name, "dtype": name, "arch": arch, **info,
                       "seconds": seconds, "launch": launch.describe()}  # fmt: skip
                results.append(row)
                if verbose:
                    print(f"  sm_{arch} {name:8s} {launch.describe()}  smem {info['shared']} B")
    return results


def main(argv: Sequence[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m sot_kernels.compile_check", description=__doc__)
    p.add_argument("--archs", default="80,90", help="CUDA compute capabilities, e.g. 80,90")
    p.add_argument("--dtypes", default="float32,bfloat16,float16")
    p.add_argument("-v", "--verbose", action="store_true", help="print every compiled launch")
    args = p.parse_args(argv)
    archs = [int(a) for a in args.archs.split(",") if a]
    dtypes = [d for d in args.dtypes.split(",") if d]
    unknown = set(dtypes) - set(DTYPES)
    if unknown:
        p.error(f"unknown dtypes {sorted(unknown)}; available: {', '.join(DTYPES)}")
    t0 = time.perf_counter()
    results = check(archs, dtypes, args.verbose)
    kernels = sorted({r["kernel"] for r in results})
    print(
        f"compiled {len(results)} launches of {len(kernels)} kernels for "
        f"{', '.join(f'sm_{a}' for a in archs)} ({', '.join(dtypes)}) "
        f"in {time.perf_counter() - t0:.1f} s: {', '.join(kernels)}"
    )
    return results


if __name__ == "__main__":
    main()
