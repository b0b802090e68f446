"""sotserve's batched inference engine.

``LLM`` for offline batches, ``AsyncEngine`` for streaming service; both run
continuous batching over a token-slot KV pool with our own Llama-family forward.

Exports are imported lazily, so the torch-free modules (``engine.protocol``,
``engine.serving``, ``engine.errors``) can be imported without loading torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "AsyncEngine": "engine.async_engine",
    "ContextLengthExceededError": "engine.errors",
    "EngineDeadError": "engine.errors",
    "EngineError": "engine.errors",
    "InvalidRequestError": "engine.errors",
    "ModelNotFoundError": "engine.errors",
    "LLM": "engine.llm",
    "RequestDelta": "engine.outputs",
    "RequestOutput": "engine.outputs",
    "SamplingParams": "engine.sampling_params",
    "EngineStats": "engine.stats",
}

__all__ = [
    "LLM",
    "AsyncEngine",
    "ContextLengthExceededError",
    "EngineDeadError",
    "EngineError",
    "EngineStats",
    "InvalidRequestError",
    "ModelNotFoundError",
    "RequestDelta",
    "RequestOutput",
    "SamplingParams",
]

if TYPE_CHECKING:
    from engine.async_engine import AsyncEngine
    from engine.errors import (
        ContextLengthExceededError,
        EngineDeadError,
        EngineError,
        InvalidRequestError,
        ModelNotFoundError,
    )
    from engine.llm import LLM
    from engine.outputs import RequestDelta, RequestOutput
    from engine.sampling_params import SamplingParams
    from engine.stats import EngineStats


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
