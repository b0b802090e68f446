"""sotserve: Skeleton-of-Thought serving on a batched engine."""

__version__ = "0.1.0"
