"""What the engine needs from a prefix cache, and the cache that holds nothing.

A prefix cache maps token sequences to the KV slots that hold them, so a request
that starts with cached tokens reuses their slots instead of recomputing them.
:class:`engine.radix_cache.RadixCache` is the real one. :class:`NoPrefixCache`
(``EngineConfig.prefix_cache=False``) matches nothing, keeps nothing and frees
nothing, so the engine runs the same code with and without a cache instead of
testing for ``None`` everywhere.

Positions in a cache are :class:`TreeNode` s: the node where a matched prefix ends,
which a request locks while it uses that prefix. Every prefix cache is a tree of
prefixes in this sense; the empty cache is a tree that is only its root (the empty
prefix, which needs no lock).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch


class TreeNode:
    """One edge of a prefix tree: ``key`` tokens from ``parent`` to here, and their slots.

    The root has ``parent is None`` and an empty key: it is the empty prefix.
    """

    __slots__ = ("children", "key", "last_access", "lock_ref", "parent", "value")

    def __init__(
        self,
        key: list[int],
        value: torch.Tensor,
        parent: TreeNode | None = None,
        last_access: int = 0,
    ) -> None:
        self.key: list[int] = key
        self.value: torch.Tensor = value
        # Keyed by the first token of the child's key: siblings never share a first
        # token (they would have been merged into one edge), so this is a unique key.
        self.children: dict[int, TreeNode] = {}
        self.parent: TreeNode | None = parent
        self.lock_ref: int = 0
        self.last_access: int = last_access

    @property
    def is_root(self) -> bool:
        return self.parent is None

    @property
    def is_leaf(self) -> bool:
        return not self.children

    def __repr__(self) -> str:
        return (
            f"TreeNode(key={self.key}, value={self.value.tolist()}, "
            f"lock_ref={self.lock_ref}, last_access={self.last_access}, "
            f"children={len(self.children)})"
        )


class PrefixCache(ABC):
    """Token sequences -> the KV slots that hold them, with locks and eviction.

    Ownership: a slot the cache holds is the cache's alone (never on the allocator's
    free list, never held twice); ``evict`` gives slots back to the allocator. A
    request that uses a cached prefix locks the node where it ends (``inc_lock``) so
    the prefix cannot be evicted under it, and unlocks it when done (``dec_lock``).
    """

    @abstractmethod
    def match_prefix(self, token_ids: Sequence[int]) -> tuple[torch.Tensor, TreeNode]:
        """Longest cached prefix of ``token_ids``: its slots (a 1-D int64 tensor, empty
        if nothing matches) and the node it ends at (the root if none)."""

    @abstractmethod
    def insert(self, token_ids: Sequence[int], slots: torch.Tensor) -> int:
        """Offer ``token_ids -> slots`` to the cache.

        Returns how many leading tokens the cache held already: the caller's slots
        for those are duplicates (or those very slots) and stay the caller's to free.
        Of the rest, the cache takes the slots of the tokens it keeps, which
        ``match_prefix(token_ids)`` reports afterwards; any it does not keep stay
        the caller's.
        """

    @abstractmethod
    def inc_lock(self, node: TreeNode) -> None:
        """Protect the prefix that ends at ``node`` from eviction."""

    @abstractmethod
    def dec_lock(self, node: TreeNode) -> None:
        """Undo one ``inc_lock(node)``."""

    @abstractmethod
    def evict(self, num_tokens: int) -> int:
        """Free at least ``num_tokens`` unlocked slots if there are that many; returns
        how many were freed (possibly more than asked)."""

    @property
    @abstractmethod
    def evictable_size(self) -> int:
        """Tokens that ``evict`` could free now (on no locked prefix)."""

    @property
    @abstractmethod
    def protected_size(self) -> int:
        """Tokens on locked prefixes."""

    @property
    @abstractmethod
    def total_size(self) -> int:
        """Tokens (== slots) the cache holds: ``evictable_size + protected_size``."""

    @abstractmethod
    def slots(self) -> torch.Tensor:
        """Every slot the cache holds, as one 1-D int64 tensor (for accounting checks)."""

    @abstractmethod
    def reset(self) -> None:
        """Drop everything, returning all slots to the allocator; nothing may be locked."""


class NoPrefixCache(PrefixCache):
    """The cache of an engine without prefix caching: matches nothing, keeps nothing.

    ``insert`` returns 0 and takes no slot, so a request's slots stay its own and
    are freed when it is released (see :meth:`engine.cache_manager.CacheManager.release`).
    Every match ends at the one root node, and locking the root is a no-op.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        # Empty matches come back on the KV tables' device, like RadixCache's.
        self._empty = torch.empty(0, dtype=torch.int64, device=device)
        self.root = TreeNode([], self._empty)

    def match_prefix(self, token_ids: Sequence[int]) -> tuple[torch.Tensor, TreeNode]:
        return self._empty, self.root

    def insert(self, token_ids: Sequence[int], slots: torch.Tensor) -> int:
        return 0

    def inc_lock(self, node: TreeNode) -> None:
        pass

    def dec_lock(self, node: TreeNode) -> None:
        pass

    def evict(self, num_tokens: int) -> int:
        return 0

    @property
    def evictable_size(self) -> int:
        return 0

    @property
    def protected_size(self) -> int:
        return 0

    @property
    def total_size(self) -> int:
        return 0

    def slots(self) -> torch.Tensor:
        return self._empty

    def reset(self) -> None:
        pass
