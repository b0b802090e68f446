"""Backends: where point expansions run (in process, or any OpenAI-compatible server)."""

from sotserve.backends.base import (
    Backend,
    BackendError,
    BackendOverloadedError,
    BackendRequestError,
    BackendUnavailableError,
    CompletionChunk,
    CompletionParams,
)
from sotserve.backends.http import HTTPBackend
from sotserve.backends.local import LocalBackend

__all__ = [
    "Backend",
    "BackendError",
    "BackendOverloadedError",
    "BackendRequestError",
    "BackendUnavailableError",
    "CompletionChunk",
    "CompletionParams",
    "HTTPBackend",
    "LocalBackend",
]
