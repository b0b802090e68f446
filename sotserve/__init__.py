"""sotserve: Skeleton-of-Thought serving on a batched engine.

``sotserve.Planner(backend, **options)`` answers questions; ``LocalBackend`` runs
the engine in this process, ``HTTPBackend`` talks to any OpenAI-compatible
``/v1/completions`` server.
"""

from sotserve.backends import Backend, BackendError, HTTPBackend, LocalBackend
from sotserve.planner import InvalidQuestionError, Planner, PlannerError
from sotserve.schemas import Done, Event, PlanOptions

__version__ = "0.1.0"

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
