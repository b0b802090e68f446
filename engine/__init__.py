"""sotserve's batched inference engine.

``LLM`` for offline batches, ``AsyncEngine`` for streaming service; both run
continuous batching over a token-slot KV pool with our own Llama-family forward.
"""

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
