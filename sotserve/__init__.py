"""sotserve: Skeleton-of-Thought serving on a batched engine.

``sotserve.Planner(backend, **options)`` answers questions; ``LocalBackend`` runs
the engine in this process, ``HTTPBackend`` talks to any OpenAI-compatible
``/v1/completions`` server; ``sotserve.client.AsyncClient`` talks to a sotserve
server.

Exports are imported lazily: the client and the schemas must not pull in torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Backend": "sotserve.backends",
    "BackendError": "sotserve.backends",
    "HTTPBackend": "sotserve.backends",
    "LocalBackend": "sotserve.backends",
    "InvalidQuestionError": "sotserve.planner",
    "Planner": "sotserve.planner",
    "PlannerError": "sotserve.planner",
    "Done": "sotserve.schemas",
    "Event": "sotserve.schemas",
    "PlanOptions": "sotserve.schemas",
}

__all__ = [
    "Backend",
    "BackendError",
    "Done",
    "Event",
    "HTTPBackend",
    "InvalidQuestionError",
    "LocalBackend",
    "PlanOptions",
    "Planner",
    "PlannerError",
]

if TYPE_CHECKING:
    from sotserve.backends import Backend, BackendError, HTTPBackend, LocalBackend
    from sotserve.planner import InvalidQuestionError, Planner, PlannerError
    from sotserve.schemas import Done, Event, PlanOptions


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sotserve' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
