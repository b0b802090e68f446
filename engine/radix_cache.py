"""Radix prefix cache: token sequences -> the KV slots that hold them.

Finished (or partly computed) requests leave their KV slots in a radix tree keyed by
token ids, so a later request that starts with the same tokens reuses those slots
instead of recomputing them. Each tree edge carries a run of token ids and the slots
of those tokens (page size 1: one slot per token).

Requests that are using a cached prefix lock its path (``inc_lock``); only unlocked
leaves can be evicted, least recently used first, and their slots go back to the
``SlotAllocator``. Every slot the tree holds is owned by the tree: it is never also
on the allocator's free list and never held twice.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence

import torch

from engine.kv_cache import SlotAllocator
from engine.prefix_cache import PrefixCache, TreeNode


class RadixCache(PrefixCache):
    """Radix tree over token ids with lock counts and LRU eviction of unlocked leaves.

    The engine's prefix cache when ``EngineConfig.prefix_cache`` is on (the default).
    """

    def __init__(self, allocator: SlotAllocator) -> None:
        self.allocator = allocator
        # ``alloc(0)`` takes nothing; it is the public way to get an empty int64 tensor
        # on the allocator's device, which empty matches return.
        self._empty = allocator.alloc(0)
        # A logical clock, not wall time: strictly increasing, so LRU order is exact
        # and reproducible.
        self._clock = itertools.count(1)
        self._init_tree()

    def _init_tree(self) -> None:
        self.root = TreeNode([], self._empty)
        self._evictable_size = 0
        self._protected_size = 0
        # Unlocked non-root leaves, kept up to date on every change so ``evict`` never
        # walks the tree. A dict is an insertion-ordered set: ties in LRU order are
        # broken the same way on every run.
        self._evictable_leaves: dict[TreeNode, None] = {}

    # -- sizes ------------------------------------------------------------------------
    @property
    def total_size(self) -> int:
        """Tokens (== slots) held by the tree."""
        return self._evictable_size + self._protected_size

    @property
    def evictable_size(self) -> int:
        """Tokens in nodes with ``lock_ref == 0`` (all of them can be evicted, leaves first)."""
        return self._evictable_size

    @property
    def protected_size(self) -> int:
        """Tokens in nodes with ``lock_ref > 0``."""
        return self._protected_size

    # -- lookup and insertion ---------------------------------------------------------
    def match_prefix(self, token_ids: Sequence[int]) -> tuple[torch.Tensor, TreeNode]:
        """Longest cached prefix of ``token_ids``.

        Returns its slots as a 1-D int64 tensor (empty if nothing matches) and the
        deepest node of the match (the root if none). If the match ends inside an
        edge, that node is split so the returned node ends exactly at the match, which
        lets the caller lock precisely the matched tokens. Touches ``last_access`` on
        every node of the path.
        """
        node, _, parts = self._walk(list(token_ids))
        if not parts:
            return self._empty, node
        return (parts[0] if len(parts) == 1 else torch.cat(parts)), node

    def insert(self, token_ids: Sequence[int], slots: torch.Tensor) -> int:
        """Insert ``token_ids -> slots``.

        Returns how many leading tokens were already cached. The cache does not take
        ``slots[:returned]``: they duplicate slots the tree already has (or are those
        very slots), and freeing them is the caller's business. The cache takes
        ownership of ``slots[returned:]`` (it keeps a copy of the ids). Splits the edge
        where the sequence leaves the tree or ends, and touches ``last_access`` along
        the path.
        """
        tokens = list(token_ids)
        if slots.dim() != 1 or slots.numel() != len(tokens):
            raise ValueError(
                f"insert: {len(tokens)} tokens but slots has shape {tuple(slots.shape)}"
            )
        node, pos, _ = self._walk(tokens)
        if pos < len(tokens):
            self._add_leaf(node, tokens[pos:], slots[pos:], node.last_access)
        return pos

    def _walk(self, tokens: list[int]) -> tuple[TreeNode, int, list[torch.Tensor]]:
        """Follow ``tokens`` down the tree as far as they match.

        Returns the node the match ends at, the matched length, and the slot tensors of
        the nodes passed. A match that ends inside an edge splits it there, so every
        node on the path is used whole; that keeps ``last_access`` exact: a node is
        touched only when all of its tokens were.
        """
        now = next(self._clock)
        self.root.last_access = now
        node, pos = self.root, 0
        parts: list[torch.Tensor] = []
        while pos < len(tokens):
            child = node.children.get(tokens[pos])
            if child is None:
                break
            n = _common_prefix_len(child.key, tokens, pos)
            if n < len(child.key):
                child = self._split(child, n)
            # After a split ``child`` ends at the mismatch, so the next lookup misses
            # (or the tokens are used up) and the loop stops there.
            child.last_access = now
            parts.append(child.value)
            node, pos = child, pos + n
        return node, pos, parts

    def _add_leaf(self, parent: TreeNode, key: list[int], value: torch.Tensor, now: int) -> None:
        # Clone: the caller's tensor is often a view of the request->token table, whose
        # row is reused by the next request; the tree must own its own copy.
        leaf = TreeNode(key, value.to(torch.int64).clone(), parent, now)
        parent.children[key[0]] = leaf
        self._evictable_size += len(key)
        # The parent stops being a leaf; the new leaf is unlocked, so it is a candidate.
        self._evictable_leaves.pop(parent, None)
        self._evictable_leaves[leaf] = None

    def _split(self, node: TreeNode, n: int) -> TreeNode:
        """Cut ``node``'s edge after ``n`` tokens; returns the new upper node.

        ``node`` keeps its identity (and so any lock a request holds on it, and its
        place among the evictable leaves) and becomes the lower part. The upper part
        lies on every path through ``node``, so it inherits its lock count and access
        time; sizes do not change because both halves stay in the same lock state.
        """
        assert 0 < n < len(node.key)
        parent = node.parent
        assert parent is not None
        upper = TreeNode(node.key[:n], node.value[:n], parent, node.last_access)
        upper.lock_ref = node.lock_ref
        upper.children[node.key[n]] = node
        parent.children[node.key[0]] = upper
        node.key = node.key[n:]
        node.value = node.value[n:]
        node.parent = upper
        return upper

    # -- locking ----------------------------------------------------------------------
    def inc_lock(self, node: TreeNode) -> None:
        """Add one lock on ``node`` and every ancestor except the root (no-op on root)."""
        while node.parent is not None:
            if node.lock_ref == 0:
                self._evictable_size -= len(node.key)
                self._protected_size += len(node.key)
                self._evictable_leaves.pop(node, None)
            node.lock_ref += 1
            node = node.parent

    def dec_lock(self, node: TreeNode) -> None:
        """Remove one lock taken by ``inc_lock(node)``; a count never goes below zero."""
        while node.parent is not None:
            assert node.lock_ref > 0, f"dec_lock below zero on {node!r}"
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self._protected_size -= len(node.key)
                self._evictable_size += len(node.key)
                if not node.children:
                    self._evictable_leaves[node] = None
            node = node.parent

    # -- eviction ---------------------------------------------------------------------
    def evict(self, num_tokens: int) -> int:
        """Free at least ``num_tokens`` slots, if that many are unlocked.

        Removes least-recently-used unlocked leaves one at a time; a parent that is
        left an unlocked leaf joins the candidates (its ``last_access`` is never older
        than its children's, so it takes its fair place in LRU order). Freed slots go
        back through ``allocator.free``. Never touches a node with ``lock_ref > 0``.
        Returns the number of slots freed (whole edges, so possibly more than asked).
        """
        if num_tokens <= 0 or not self._evictable_leaves:
            return 0
        # The tie-break counter keeps the heap from ever comparing TreeNodes.
        tie = itertools.count()
        heap = [(leaf.last_access, next(tie), leaf) for leaf in self._evictable_leaves]
        heapq.heapify(heap)
        freed: list[torch.Tensor] = []
        num_freed = 0
        while num_freed < num_tokens and heap:
            _, _, leaf = heapq.heappop(heap)
            parent = leaf.parent
            assert parent is not None and leaf.lock_ref == 0 and not leaf.children
            del parent.children[leaf.key[0]]
            del self._evictable_leaves[leaf]
            leaf.parent = None
            freed.append(leaf.value)
            num_freed += len(leaf.key)
            self._evictable_size -= len(leaf.key)
            if parent.parent is not None and parent.lock_ref == 0 and not parent.children:
                self._evictable_leaves[parent] = None
                heapq.heappush(heap, (parent.last_access, next(tie), parent))
        if freed:
            # One ``free`` call: each one concatenates onto the allocator's free list.
            self.allocator.free(torch.cat(freed))
        return num_freed

    # -- whole-tree operations --------------------------------------------------------
    def _nodes(self) -> list[TreeNode]:
        """Every non-root node, parents before children."""
        out: list[TreeNode] = []
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(node.children.values())
        return out

    def slots(self) -> torch.Tensor:
        """Every slot the tree holds, as one 1-D int64 tensor (for accounting checks)."""
        values = [node.value for node in self._nodes()]
        return torch.cat(values) if values else self._empty

    def reset(self) -> None:
        """Drop every entry and free all its slots; nothing may be locked."""
        assert self._protected_size == 0, "reset with locked entries"
        held = self.slots()
        self._init_tree()
        self.allocator.free(held)


def _common_prefix_len(key: list[int], tokens: list[int], start: int) -> int:
    """Length of the common prefix of ``key`` and ``tokens[start:]``."""
    end = start + len(key)
    # Fast path: one C-level list comparison when the whole edge matches.
    if tokens[start:end] == key:
        return len(key)
    n = 0
    limit = min(len(key), len(tokens) - start)
    while n < limit and key[n] == tokens[start + n]:
        n += 1
    return n
