"""Compute kernels: torch implementations (CPU and reference) of the model's ops.

Each op here is plain PyTorch and matches ``transformers`` numerics in float32.
Triton versions for CUDA are tested against these.
"""
