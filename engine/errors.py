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
    """The engine loop crashed, hung or was closed; no further requests can be served."""


DEFAULT_STEP_TIMEOUT_S = 300.0
"""The engine watchdog's default limit on one step (``AsyncEngine(step_timeout=)``,
``--step-timeout``). Generous on purpose: a decode step takes milliseconds, but the
first steps on a GPU compile Triton kernels and capture CUDA graphs (tens of seconds),
and a long prefill chunk under ``TRITON_INTERPRET`` is slow; none of that may be
mistaken for a hang. It lives here, with the error it leads to, because this module
imports no torch (the command-line options use it too)."""


class EngineStepTimeoutError(EngineDeadError):
    """One engine step (or a call run between steps) ran longer than the engine's
    ``step_timeout``: a stuck kernel or a deadlock, so the engine was marked dead and
    every request failed instead of waiting forever. ``timeout`` is the limit, in
    seconds (optional only so that the error can be unpickled, without it)."""

    def __init__(self, message: str, timeout: float | None = None) -> None:
        super().__init__(message)
        self.timeout = timeout
