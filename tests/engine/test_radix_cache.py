"""Radix prefix cache: matching, splitting, insertion, locking, LRU eviction and slot
accounting, with unit tests and a stateful property test against a naive model."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)

from engine.kv_cache import PAD_SLOT, SlotAllocator
from engine.radix_cache import RadixCache, TreeNode

CPU = torch.device("cpu")


# -- helpers ------------------------------------------------------------------------------------
def make(num_slots: int = 64) -> tuple[SlotAllocator, RadixCache]:
    alloc = SlotAllocator(num_slots, CPU)
    return alloc, RadixCache(alloc)


def put(cache: RadixCache, alloc: SlotAllocator, tokens: list[int]) -> tuple[int, torch.Tensor]:
    """Insert ``tokens`` with fresh slots, freeing the duplicates the way an engine would."""
    slots = alloc.alloc(len(tokens))
    n = cache.insert(tokens, slots)
    alloc.free(slots[:n])
    return n, slots


def shape(node: TreeNode) -> dict[tuple[int, ...], Any]:
    """The tree as nested dicts of edge keys, e.g. ``{(1, 2): {(3,): {}, (4,): {}}}``."""
    return {tuple(c.key): shape(c) for c in node.children.values()}


def path(node: TreeNode) -> tuple[int, ...]:
    """Tokens from the root down to the end of ``node``'s edge."""
    keys: list[list[int]] = []
    while node.parent is not None:
        keys.append(node.key)
        node = node.parent
    return tuple(t for key in reversed(keys) for t in key)


def sizes(cache: RadixCache) -> tuple[int, int, int]:
    return cache.evictable_size, cache.protected_size, cache.total_size


def as_list(t: torch.Tensor) -> list[int]:
    return [int(x) for x in t.tolist()]


# -- matching -----------------------------------------------------------------------------------
def test_empty_match():
    alloc, cache = make()
    slots, node = cache.match_prefix([1, 2, 3])
    assert node is cache.root
    assert slots.dtype == torch.int64 and slots.shape == (0,)
    assert sizes(cache) == (0, 0, 0)

    put(cache, alloc, [1, 2, 3])
    for miss in ([], [2, 1], [5]):
        slots, node = cache.match_prefix(miss)
        assert node is cache.root and slots.numel() == 0
    assert shape(cache.root) == {(1, 2, 3): {}}


def test_exact_match():
    alloc, cache = make()
    _, s = put(cache, alloc, [1, 2, 3])
    for query in ([1, 2, 3], [1, 2, 3, 4, 5]):
        slots, node = cache.match_prefix(query)
        assert as_list(slots) == as_list(s)
        assert slots.dtype == torch.int64
        assert node.key == [1, 2, 3] and node.parent is cache.root
    assert shape(cache.root) == {(1, 2, 3): {}}, "a full-edge match must not split"
    assert sizes(cache) == (3, 0, 3)


def test_match_mid_edge_splits_node():
    alloc, cache = make()
    _, s = put(cache, alloc, [1, 2, 3, 4, 5])
    lower = cache.root.children[1]

    slots, node = cache.match_prefix([1, 2, 9])
    assert as_list(slots) == as_list(s[:2])
    assert node.key == [1, 2] and as_list(node.value) == as_list(s[:2])
    assert node.parent is cache.root and cache.root.children[1] is node
    # The original node object is now the lower half, under the new upper node.
    assert node.children == {3: lower}
    assert lower.parent is node
    assert lower.key == [3, 4, 5] and as_list(lower.value) == as_list(s[2:])
    assert shape(cache.root) == {(1, 2): {(3, 4, 5): {}}}
    assert sizes(cache) == (5, 0, 5)

    # Matching exactly at the new boundary, or past it, splits nothing more.
    assert cache.match_prefix([1, 2])[1] is node
    slots, deep = cache.match_prefix([1, 2, 3, 4, 5, 6])
    assert deep is lower and as_list(slots) == as_list(s)
    assert shape(cache.root) == {(1, 2): {(3, 4, 5): {}}}


def test_match_ending_with_query_splits_node():
    alloc, cache = make()
    _, s = put(cache, alloc, [7, 8, 9])
    slots, node = cache.match_prefix([7])
    assert node.key == [7] and as_list(slots) == as_list(s[:1])
    assert shape(cache.root) == {(7,): {(8, 9): {}}}


# -- insertion ----------------------------------------------------------------------------------
def test_insert_over_existing_path_takes_only_new_suffix():
    alloc, cache = make(16)
    n, s1 = put(cache, alloc, [1, 2, 3])
    assert n == 0

    s2 = alloc.alloc(5)
    n = cache.insert([1, 2, 3, 4, 5], s2)
    assert n == 3
    # The cache kept its own slots for the shared prefix and took only s2[3:].
    held = set(as_list(cache.slots()))
    assert held == set(as_list(s1)) | set(as_list(s2[3:]))
    assert held.isdisjoint(as_list(s2[:3]))
    alloc.free(s2[:3])
    assert shape(cache.root) == {(1, 2, 3): {(4, 5): {}}}
    slots, node = cache.match_prefix([1, 2, 3, 4, 5])
    assert as_list(slots) == as_list(s1) + as_list(s2[3:])
    assert node.key == [4, 5]
    assert sizes(cache) == (5, 0, 5)
    assert alloc.num_used == 5

    # A sequence that is already fully cached adds nothing; one that ends inside an
    # edge splits it there, like a match would.
    for tokens in ([1, 2, 3, 4, 5], [1, 2, 3, 4], [1]):
        s = alloc.alloc(len(tokens))
        assert cache.insert(tokens, s) == len(tokens)
        alloc.free(s)
    assert shape(cache.root) == {(1,): {(2, 3): {(4,): {(5,): {}}}}}
    assert as_list(cache.match_prefix([1, 2, 3, 4, 5])[0]) == as_list(s1) + as_list(s2[3:])
    assert sizes(cache) == (5, 0, 5) and alloc.num_used == 5


def test_insert_reusing_matched_slots():
    # The engine pattern: reuse the matched prefix's slots, allocate only the rest.
    alloc, cache = make(16)
    _, s1 = put(cache, alloc, [1, 2, 3])
    prefix, _ = cache.match_prefix([1, 2, 3, 4])
    fresh = alloc.alloc(1)
    assert cache.insert([1, 2, 3, 4], torch.cat([prefix, fresh])) == 3
    assert as_list(cache.match_prefix([1, 2, 3, 4])[0]) == as_list(s1) + as_list(fresh)
    assert alloc.num_used == cache.total_size == 4


def test_insert_branching_sequence():
    alloc, cache = make()
    _, a = put(cache, alloc, [1, 2, 3, 4])
    n, b = put(cache, alloc, [1, 2, 5, 6])
    assert n == 2
    assert shape(cache.root) == {(1, 2): {(3, 4): {}, (5, 6): {}}}
    assert as_list(cache.match_prefix([1, 2, 3, 4])[0]) == as_list(a)
    assert as_list(cache.match_prefix([1, 2, 5, 6])[0]) == as_list(a[:2]) + as_list(b[2:])
    n, c = put(cache, alloc, [1, 7])
    assert n == 1
    assert shape(cache.root) == {(1,): {(2,): {(3, 4): {}, (5, 6): {}}, (7,): {}}}
    assert as_list(cache.match_prefix([1, 7])[0]) == [int(a[0]), int(c[1])]
    put(cache, alloc, [9])
    assert set(shape(cache.root)) == {(1,), (9,)}
    assert sizes(cache) == (8, 0, 8) == (8, 0, alloc.num_used)


def test_insert_copies_slots():
    alloc, cache = make()
    s = alloc.alloc(3)
    cache.insert([1, 2, 3], s)
    expected = as_list(s)
    s.fill_(0)  # e.g. the request's table row is reused by the next request
    assert as_list(cache.match_prefix([1, 2, 3])[0]) == expected


def test_insert_rejects_length_mismatch():
    alloc, cache = make()
    with pytest.raises(ValueError):
        cache.insert([1, 2, 3], alloc.alloc(2))


def test_insert_empty_sequence():
    _, cache = make()
    assert cache.insert([], torch.empty(0, dtype=torch.int64)) == 0
    assert shape(cache.root) == {} and sizes(cache) == (0, 0, 0)


# -- locking and eviction -----------------------------------------------------------------------
def test_lock_protects_from_evict():
    alloc, cache = make()
    _, a = put(cache, alloc, [1, 2, 3])
    put(cache, alloc, [4, 5])
    _, node = cache.match_prefix([1, 2, 3])
    cache.inc_lock(node)
    assert sizes(cache) == (2, 3, 5)

    assert cache.evict(100) == 2, "only the unlocked sequence can go"
    assert sizes(cache) == (0, 3, 3)
    assert cache.evict(1) == 0, "everything left is locked"
    assert as_list(cache.match_prefix([1, 2, 3])[0]) == as_list(a)

    cache.dec_lock(node)
    assert sizes(cache) == (3, 0, 3)
    assert cache.evict(1) == 3
    assert sizes(cache) == (0, 0, 0)
    assert alloc.num_free == alloc.num_slots


def test_locks_nest_and_count():
    alloc, cache = make()
    put(cache, alloc, [1, 2, 3, 4])
    _, node = cache.match_prefix([1, 2, 3, 4])
    _, upper = cache.match_prefix([1, 2])
    cache.inc_lock(node)
    cache.inc_lock(node)
    cache.inc_lock(upper)
    assert (upper.lock_ref, node.lock_ref) == (3, 2)
    assert sizes(cache) == (0, 4, 4)
    cache.dec_lock(node)
    cache.dec_lock(node)
    assert (upper.lock_ref, node.lock_ref) == (1, 0)
    assert sizes(cache) == (2, 2, 4)
    assert cache.evict(10) == 2
    assert shape(cache.root) == {(1, 2): {}}
    cache.dec_lock(upper)
    with pytest.raises(AssertionError):
        cache.dec_lock(upper)
    # Root is never locked: locking the empty match is a no-op.
    cache.inc_lock(cache.root)
    cache.dec_lock(cache.root)
    assert cache.root.lock_ref == 0


def test_evict_frees_lru_leaves_first():
    alloc, cache = make()
    _, a = put(cache, alloc, [1, 1, 1])
    _, b = put(cache, alloc, [2, 2, 2])
    _, c = put(cache, alloc, [3, 3, 3])
    cache.match_prefix([1, 1, 1])  # a is now the most recently used

    free_before = alloc.free_set()
    assert cache.evict(3) == 3
    assert alloc.free_set() - free_before == set(as_list(b))
    assert set(shape(cache.root)) == {(1, 1, 1), (3, 3, 3)}

    assert cache.evict(1) == 3, "whole edges are evicted"
    assert set(shape(cache.root)) == {(1, 1, 1)}
    assert set(as_list(c)) <= alloc.free_set()

    cache.insert([2, 2], alloc.alloc(2))  # newer than a
    assert cache.evict(1) == 3
    assert set(shape(cache.root)) == {(2, 2)}
    assert set(as_list(a)) <= alloc.free_set()


def test_parent_becomes_evictable_after_children():
    alloc, cache = make()
    put(cache, alloc, [1, 2, 3, 4])
    put(cache, alloc, [1, 2, 5, 6])
    cache.match_prefix([1, 2, 5, 6])  # [3, 4] is the LRU leaf
    assert shape(cache.root) == {(1, 2): {(3, 4): {}, (5, 6): {}}}

    assert cache.evict(1) == 2
    assert shape(cache.root) == {(1, 2): {(5, 6): {}}}
    # [5, 6] goes, then its parent [1, 2] is an unlocked leaf and goes too.
    assert cache.evict(3) == 4
    assert shape(cache.root) == {}
    assert sizes(cache) == (0, 0, 0)
    assert alloc.num_free == alloc.num_slots

    # A locked child keeps its parent; its unlocked sibling still goes.
    put(cache, alloc, [1, 2, 3, 4])
    put(cache, alloc, [1, 2, 5, 6])
    _, node = cache.match_prefix([1, 2, 3, 4])
    cache.inc_lock(node)
    assert cache.evict(100) == 2
    assert shape(cache.root) == {(1, 2): {(3, 4): {}}}
    cache.dec_lock(node)
    assert cache.evict(100) == 4
    assert shape(cache.root) == {}


def test_sizes_after_each_operation():
    alloc, cache = make()
    assert sizes(cache) == (0, 0, 0)
    put(cache, alloc, [1, 2, 3, 4])
    assert sizes(cache) == (4, 0, 4)
    _, leaf = cache.match_prefix([1, 2, 3, 4])
    cache.inc_lock(leaf)
    assert sizes(cache) == (0, 4, 4)

    # Splitting a locked node: the new upper part inherits the lock.
    _, upper = cache.match_prefix([1, 2, 7])
    assert upper.key == [1, 2] and upper.lock_ref == 1 and leaf.lock_ref == 1
    assert leaf.parent is upper
    assert sizes(cache) == (0, 4, 4)

    put(cache, alloc, [1, 2, 7, 8])  # an unlocked branch under a locked node
    assert sizes(cache) == (2, 4, 6)
    cache.dec_lock(leaf)  # releases the whole path, including the split-off upper part
    assert upper.lock_ref == 0 and leaf.lock_ref == 0
    assert sizes(cache) == (6, 0, 6)
    cache.inc_lock(upper)
    assert sizes(cache) == (4, 2, 6)
    assert cache.evict(100) == 4
    assert sizes(cache) == (0, 2, 2)
    cache.dec_lock(upper)
    assert sizes(cache) == (2, 0, 2)
    assert alloc.num_used == cache.total_size
    cache.reset()
    assert sizes(cache) == (0, 0, 0)


def test_freed_slots_return_to_allocator():
    alloc, cache = make(10)
    _, a = put(cache, alloc, [1, 2, 3, 4])
    _, b = put(cache, alloc, [5, 6, 7])
    assert alloc.num_free == 3
    assert set(as_list(cache.slots())) == set(as_list(a)) | set(as_list(b))

    assert cache.evict(4) == 4
    assert alloc.num_free == 7
    assert set(as_list(a)) <= alloc.free_set()
    assert set(as_list(cache.slots())) == set(as_list(b))

    cache.reset()
    assert alloc.num_free == 10 and alloc.free_set() == set(range(1, 11))
    assert cache.slots().numel() == 0 and shape(cache.root) == {}
    # The cache is usable after a reset.
    put(cache, alloc, [1, 2])
    assert sizes(cache) == (2, 0, 2)


def test_reset_refuses_locked_entries():
    alloc, cache = make()
    put(cache, alloc, [1, 2])
    _, node = cache.match_prefix([1, 2])
    cache.inc_lock(node)
    with pytest.raises(AssertionError):
        cache.reset()


def test_evict_nothing():
    alloc, cache = make()
    assert cache.evict(5) == 0
    put(cache, alloc, [1, 2])
    assert cache.evict(0) == 0
    assert sizes(cache) == (2, 0, 2)


# -- property test against a naive model --------------------------------------------------------
ALPHABET = 4  # tiny, so sequences share prefixes and split edges all the time
MAX_LEN = 8
NUM_SLOTS = 40  # small, so inserts regularly have to evict

sequences = st.lists(st.integers(0, ALPHABET - 1), max_size=MAX_LEN)


class RadixCacheMachine(RuleBasedStateMachine):
    """The model is the set of cached prefixes, each mapped to the slot of its last token.

    The tree is a trie, so the cached prefixes are closed under taking prefixes, and a
    sequence's match is its longest prefix in the model. Eviction is not predicted;
    the model drops whatever the allocator got back, after checking it was allowed.
    """

    def __init__(self) -> None:
        super().__init__()
        self.alloc = SlotAllocator(NUM_SLOTS, CPU)
        self.cache = RadixCache(self.alloc)
        self.ref: dict[tuple[int, ...], int] = {}
        self.locks: list[tuple[TreeNode, tuple[int, ...]]] = []
        self.seen: list[list[int]] = []  # every sequence inserted so far
        # The model's own LRU clock: when each cached prefix was last matched or
        # inserted. It is kept apart from the tree's ``last_access`` so that a cache
        # that forgets to touch a path is caught by the LRU check in ``checked_evict``.
        self.tick = 0
        self.atime: dict[tuple[int, ...], int] = {}

    def touch(self, seq: list[int], k: int) -> None:
        self.tick += 1
        for i in range(1, k + 1):
            self.atime[tuple(seq[:i])] = self.tick

    def draw_seq(self, data: st.DataObject) -> list[int]:
        """A random sequence, often a cut of an earlier one plus a new tail, so that
        matches and inserts end inside or branch off existing edges."""
        tail = data.draw(sequences, label="tail")
        if not self.seen or not data.draw(st.booleans(), label="extend earlier"):
            return tail
        base = data.draw(st.sampled_from(self.seen), label="earlier")
        cut = data.draw(st.integers(0, len(base)), label="cut")
        return base[:cut] + tail[: MAX_LEN - cut]

    # -- model helpers ------------------------------------------------------------------
    def ref_match(self, seq: list[int]) -> int:
        k = 0
        while k < len(seq) and tuple(seq[: k + 1]) in self.ref:
            k += 1
        return k

    def ref_slots(self, seq: list[int], k: int) -> list[int]:
        return [self.ref[tuple(seq[: i + 1])] for i in range(k)]

    def nodes(self) -> list[tuple[tuple[int, ...], TreeNode]]:
        out: list[tuple[tuple[int, ...], TreeNode]] = []
        stack: list[tuple[tuple[int, ...], TreeNode]] = [((), self.cache.root)]
        while stack:
            prefix, node = stack.pop()
            for child in node.children.values():
                p = prefix + tuple(child.key)
                out.append((p, child))
                stack.append((p, child))
        return out

    def checked_evict(self, k: int) -> int:
        free_before = self.alloc.free_set()
        evictable_before = self.cache.evictable_size
        # A node was last used when any of its tokens was, i.e. when its first one was.
        before = {
            p: (self.atime[p[: len(p) - len(n.key) + 1]], n.lock_ref == 0 and not n.children)
            for p, n in self.nodes()
        }

        got = self.cache.evict(k)

        freed = self.alloc.free_set() - free_before
        assert got == len(freed)
        assert min(k, evictable_before) <= got <= evictable_before
        # It stops as soon as it has enough: the last edge freed is at most MAX_LEN long.
        assert got == 0 if k <= 0 else got < k + MAX_LEN
        removed = {p for p, s in self.ref.items() if s in freed}
        assert len(removed) == len(freed), "freed a slot the cache did not hold"
        for _, prefix in self.locks:
            for i in range(1, len(prefix) + 1):
                assert prefix[:i] not in removed, "evicted a locked entry"
        for p in self.ref:
            if len(p) > 1 and p[:-1] in removed:
                assert p in removed, "evicted a node but left its child"
        # LRU: nothing evicted was touched later than a leaf that was a candidate and stayed.
        gone = [la for p, (la, _) in before.items() if p in removed]
        stayed = [la for p, (la, cand) in before.items() if cand and p not in removed]
        if gone and stayed:
            assert max(gone) <= min(stayed)
        for p in removed:
            del self.ref[p]
            del self.atime[p]
        return got

    def take(self, n: int) -> torch.Tensor | None:
        if self.alloc.num_free < n:
            self.checked_evict(n - self.alloc.num_free)
        if self.alloc.num_free < n:
            return None
        return self.alloc.alloc(n)

    # -- rules --------------------------------------------------------------------------
    @rule(data=st.data(), reuse=st.booleans())
    def insert(self, data: st.DataObject, reuse: bool) -> None:
        seq = self.draw_seq(data)
        self.seen.append(seq)
        if reuse:
            # Engine pattern: lock the match while allocating the rest, so eviction
            # cannot take the prefix being reused.
            prefix, node = self.cache.match_prefix(seq)
            m = int(prefix.numel())
            assert m == self.ref_match(seq)
            self.touch(seq, m)
            self.cache.inc_lock(node)
            fresh = self.take(len(seq) - m)
            self.cache.dec_lock(node)
            if fresh is None:
                return
            slots = torch.cat([prefix, fresh])
        else:
            fresh = self.take(len(seq))
            if fresh is None:
                return
            slots = fresh
            m = self.ref_match(seq)
        n = self.cache.insert(seq, slots)
        assert n == m
        if not reuse:
            self.alloc.free(slots[:n])
        for i in range(n, len(seq)):
            self.ref[tuple(seq[: i + 1])] = int(slots[i])
        self.touch(seq, len(seq))

    @rule(data=st.data(), lock=st.booleans())
    def match(self, data: st.DataObject, lock: bool) -> None:
        seq = self.draw_seq(data)
        slots, node = self.cache.match_prefix(seq)
        k = self.ref_match(seq)
        self.touch(seq, k)
        assert slots.dtype == torch.int64 and slots.dim() == 1
        assert as_list(slots) == self.ref_slots(seq, k)
        assert path(node) == tuple(seq[:k])
        if lock:
            self.cache.inc_lock(node)
            self.locks.append((node, tuple(seq[:k])))

    @precondition(lambda self: bool(self.locks))
    @rule(data=st.data())
    def unlock(self, data: st.DataObject) -> None:
        i = data.draw(st.integers(0, len(self.locks) - 1), label="lock index")
        node, _ = self.locks.pop(i)
        self.cache.dec_lock(node)

    @rule(k=st.integers(0, 24))
    def evict(self, k: int) -> None:
        self.checked_evict(k)

    @precondition(lambda self: not self.locks)
    @rule(go=st.integers(0, 5))
    def reset(self, go: int) -> None:
        if go:  # only now and then, so the tree usually gets big
            return
        self.cache.reset()
        self.ref.clear()
        self.atime.clear()
        assert self.alloc.num_free == NUM_SLOTS

    # -- invariants ---------------------------------------------------------------------
    @invariant()
    def tree_matches_model(self) -> None:
        nodes = self.nodes()
        held: dict[tuple[int, ...], int] = {}
        for p, node in nodes:
            parent = node.parent
            assert parent is not None and parent.children[node.key[0]] is node
            assert len(node.key) > 0 and node.value.shape == (len(node.key),)
            assert node.value.dtype == torch.int64
            start = len(p) - len(node.key)
            for i, slot in enumerate(as_list(node.value)):
                held[p[: start + i + 1]] = slot
            # A parent is touched whenever its child is, so it is never older.
            if not parent.is_root:
                assert parent.last_access >= node.last_access
        assert held == self.ref

    @invariant()
    def access_order_matches_model(self) -> None:
        # Every token of a node was last used at the same time (paths are split where
        # a use ends), and the tree's clock orders nodes exactly as the model's does.
        tree_time: dict[int, int] = {}
        for p, node in self.nodes():
            start = len(p) - len(node.key)
            times = {self.atime[p[:i]] for i in range(start + 1, len(p) + 1)}
            assert len(times) == 1, "a node whose tokens were used at different times"
            t = times.pop()
            assert tree_time.setdefault(t, node.last_access) == node.last_access
        tree_order = [tree_time[t] for t in sorted(tree_time)]
        assert tree_order == sorted(set(tree_order))

    @invariant()
    def locks_are_counted(self) -> None:
        evictable = protected = 0
        leaves: set[int] = set()
        for p, node in self.nodes():
            want = sum(1 for _, lp in self.locks if lp[: len(p)] == p)
            assert node.lock_ref == want
            if node.lock_ref:
                protected += len(node.key)
            else:
                evictable += len(node.key)
                if not node.children:
                    leaves.add(id(node))
        assert (self.cache.evictable_size, self.cache.protected_size) == (evictable, protected)
        assert self.cache.total_size == evictable + protected
        assert {id(n) for n in self.cache._evictable_leaves} == leaves
        for node, prefix in self.locks:
            # Locked sequences stay fully cached, and a lock handle survives splits.
            assert path(node) == prefix
            assert self.ref_match(list(prefix)) == len(prefix)

    @invariant()
    def slots_are_accounted(self) -> None:
        held = as_list(self.cache.slots())
        assert len(held) == len(set(held)) == self.cache.total_size
        assert PAD_SLOT not in held
        assert self.cache.total_size == self.alloc.num_slots - self.alloc.num_free
        assert self.alloc.free_set().isdisjoint(held)


TestRadixCacheMachine = RadixCacheMachine.TestCase
TestRadixCacheMachine.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
