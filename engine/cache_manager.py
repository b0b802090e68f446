"""Who owns each KV slot: the prefix cache or one running request.

For a running request ``req``, ``req_to_token[req.row, :req.cached_len]`` are slots
of the prefix cache, locked by the request so they cannot be evicted under it, and
``[req.cached_len, req.num_computed)`` are slots the request owns alone. Committing
hands the private tail to the cache (as much of it as the cache keeps); releasing
unlocks the path and frees whatever is still private. Every slot is therefore free,
held by the cache, or private to exactly one running request.

The same code serves an engine without prefix caching: its
:class:`engine.prefix_cache.NoPrefixCache` keeps nothing, so ``cached_len`` stays 0,
every slot stays private, and release frees them all.
"""

from __future__ import annotations

import torch

from engine.kv_cache import ReqToTokenTable, SlotAllocator
from engine.prefix_cache import PrefixCache
from engine.request import Request


class CacheManager:
    """Slot allocation with eviction, prefix matching at admission, and commits."""

    def __init__(self, slots: SlotAllocator, table: ReqToTokenTable, cache: PrefixCache) -> None:
        self.slots = slots
        self.table = table
        self.cache = cache
        self.evicted_tokens = 0

    # -- capacity ----------------------------------------------------------------
    @property
    def available(self) -> int:
        """Slots that can be had now: free ones plus unlocked cache entries."""
        return self.slots.num_free + self.cache.evictable_size

    def allocate(self, n: int) -> torch.Tensor | None:
        """``n`` slots, evicting least-recently-used cache entries if needed; None if short."""
        if self.slots.num_free < n:
            self.evicted_tokens += self.cache.evict(n - self.slots.num_free)
        if self.slots.num_free < n:
            return None
        return self.slots.alloc(n)

    # -- prefixes ----------------------------------------------------------------
    def match_len(self, req: Request) -> int:
        """Tokens of ``req`` whose KV the cache holds (at least one is left to compute)."""
        return int(self.cache.match_prefix(req.token_slice(0, req.num_tokens - 1))[0].numel())

    def admit(self, req: Request) -> int:
        """Give ``req`` a table row and its cached prefix; returns the prefix length."""
        req.row = self.table.alloc_row()
        # The last token is always computed: its logits give the next token.
        slots, node = self.cache.match_prefix(req.token_slice(0, req.num_tokens - 1))
        self.cache.inc_lock(node)
        req.cache_node = node
        self.table.write(req.row, 0, slots)
        req.num_computed = req.cached_len = int(slots.numel())
        return req.cached_len

    def commit(self, req: Request) -> None:
        """Insert ``req``'s computed tokens into the cache and lock the longer path.

        If another request cached some of the same tokens meanwhile, this request's
        copies are freed and its table row is pointed at the cache's slots. Tokens
        the cache does not keep (all of them, for ``NoPrefixCache``) stay private.
        """
        cache, n = self.cache, req.num_computed
        if n <= req.cached_len:
            return
        tokens = req.token_slice(0, n)
        own = self.table.slots(req.row, n).clone()
        already = cache.insert(tokens, own)
        if already > req.cached_len:
            self.slots.free(own[req.cached_len : already])
        slots, node = cache.match_prefix(tokens)
        self.table.write(req.row, 0, slots)
        cache.inc_lock(node)
        cache.dec_lock(req.cache_node)
        req.cache_node = node
        # RadixCache keeps every token (cached_len == n); NoPrefixCache none (0).
        req.cached_len = int(slots.numel())

    def release(self, req: Request) -> None:
        """A request stops running: keep its KV in the cache, free what the cache did not
        take, drop its row."""
        if req.row is None:
            return
        self.commit(req)
        self.cache.dec_lock(req.cache_node)
        req.cache_node = None
        # Private slots left after the commit: none with a RadixCache (it took them
        # all), every computed one with NoPrefixCache.
        self.slots.free(self.table.slots(req.row, req.num_computed, req.cached_len).clone())
        self.table.free_row(req.row)
        req.row = None
        req.num_computed = req.cached_len = 0
