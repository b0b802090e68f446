"""Token-slot KV memory: the pool, its free list, and the request -> slot table.

Page size is 1: every token owns one slot per layer. Two requests share a prefix by
listing the same slots in their ``req_to_token`` rows; nothing is copied.
Slot 0 is never handed out: it is the padding slot that fixed-shape kernels may
read or write without touching real data.
"""

from __future__ import annotations

import torch

PAD_SLOT = 0


class KVPool:
    """Preallocated K and V buffers: ``k[layer] -> [num_slots + 1, Hk, D]``."""

    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (num_layers, num_slots + 1, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_slots = num_slots

    @staticmethod
    def bytes_per_slot(
        num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        return (
            2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
        )


class SlotAllocator:
    """Free list of KV slots. ``alloc`` hands out slots; ``free`` returns them."""

    def __init__(self, num_slots: int, device: torch.device) -> None:
        self.num_slots = num_slots
        self._free = torch.arange(1, num_slots + 1, dtype=torch.int64, device=device)

    @property
    def num_free(self) -> int:
        return int(self._free.numel())

    @property
    def num_used(self) -> int:
        return self.num_slots - self.num_free

    def alloc(self, n: int) -> torch.Tensor:
        """Take ``n`` slots; the caller checks ``num_free`` first."""
        if n > self.num_free:
            raise RuntimeError(f"KV pool exhausted: asked for {n}, {self.num_free} free")
        out, self._free = self._free[:n], self._free[n:]
        return out

    def free(self, slots: torch.Tensor) -> None:
        if slots.numel():
            self._free = torch.cat([self._free, slots.to(self._free.dtype)])

    def free_set(self) -> set[int]:
        """The free slots as a set (for accounting checks in tests)."""
        return set(self._free.tolist())


class ReqToTokenTable:
    """``table[row, pos]`` is the slot that holds token ``pos`` of the request in ``row``."""

    def __init__(self, max_rows: int, max_len: int, device: torch.device) -> None:
        self.table = torch.zeros((max_rows, max_len), dtype=torch.int64, device=device)
        self._free_rows = list(range(max_rows - 1, -1, -1))

    @property
    def num_free_rows(self) -> int:
        return len(self._free_rows)

    def alloc_row(self) -> int:
        return self._free_rows.pop()

    def free_row(self, row: int) -> None:
        self._free_rows.append(row)

    def write(self, row: int, start: int, slots: torch.Tensor) -> None:
        self.table[row, start : start + slots.numel()] = slots

    def slots(self, row: int, end: int, start: int = 0) -> torch.Tensor:
        return self.table[row, start:end]
