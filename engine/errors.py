"""Typed errors raised by the engine.

Every error a caller can provoke with bad input is an :class:`InvalidRequestError`
(a ``ValueError``), so servers can map it to HTTP 400 without string matching.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class InvalidRequestError(EngineError, ValueError):
    """The request itself is malformed; ``param`` names the offending field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ContextLengthExceededError(InvalidRequestError):
    """Prompt plus requested tokens do not fit the model's context window."""


class ModelNotFoundError(EngineError, LookupError):
    """The model name is neither a local path, a GGUF file, nor a cached hub id."""


class EngineDeadError(EngineError, RuntimeError):
    """The engine loop crashed; no further requests can be served."""
