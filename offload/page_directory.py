"""Which host page each GPU page slot holds: ids only, on the GPU, diffed against a new selection
with device ops alone.

The pages themselves live in `PageFetcher`'s pools; this directory is its block manager (as in
nano-vllm, the manager holds ids and the runner owns the tensors). Slots are partitioned: row r's
KV head h owns slots ``[(r * Hkv + h) * capacity, ... + capacity)`` of every layer's pool, and
``held[layer, r, h, c]`` is the logical page in its slot c (-1: empty). A selection made on the GPU
is diffed and its misses given slots without the host seeing an index, so a whole step (scan,
top-k, diff, fetch, attention) can be captured in a CUDA graph.

Replacement within a partition: pages the new selection keeps stay where they are, misses take the
slots of pages it dropped (lowest slot first). `capacity` must be at least the longest selection
(plus the slots a caller protects, see `assign`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

_NONE = 2**31 - 1  # sorts after every page id


@dataclass
class Assignment:
    """One layer's selection resolved to slots.

    slot_table: [N, Hkv, K] int32 pool slot of each selected page (-1 where the selection is padded).
    miss_pages, miss_heads, miss_slots, miss_rows: [N * Hkv * K] int64 units to fetch: logical page
    `miss_pages[m]` of head `miss_heads[m]` of planned row `miss_rows[m]` into pool slot
    `miss_slots[m]`; a unit with slot -1 is a hole (a hit or padding): nothing to fetch.
    """

    slot_table: torch.Tensor
    miss_pages: torch.Tensor
    miss_heads: torch.Tensor
    miss_slots: torch.Tensor
    miss_rows: torch.Tensor


class PageDirectory:
    """Fixed per-(row, layer, KV head) slot partitions with device-side diffs (module docstring)."""

    def __init__(self, num_layers: int, max_rows: int, num_kv_heads: int, capacity: int,
                 device: torch.device | str):
        if min(num_layers, max_rows, num_kv_heads, capacity) <= 0:
            raise ValueError("num_layers, max_rows, num_kv_heads and capacity must be positive")
        self.num_layers, self.max_rows, self.num_kv_heads, self.capacity = num_layers, max_rows, num_kv_heads, capacity
        self.device = torch.device(device)
        self.num_slots = max_rows * num_kv_heads * capacity  # per layer
        self.held = torch.full((num_layers, max_rows, num_kv_heads, capacity), -1, dtype=torch.int32,
                               device=self.device)
        self._head_base = torch.arange(num_kv_heads, device=self.device)[None, :, None] * capacity  # [1, Hkv, 1]

    def assign(self, layer: int, rows: torch.Tensor, entries: torch.Tensor,
               protect: torch.Tensor | None = None) -> Assignment:
        """Resolve a selection: keep resident pages in place, give misses the slots of dropped pages.

        rows: [N] int64 (device) partition of each planned row; entries: [N, Hkv, K] int32 logical
        pages, sorted ascending, -1 padded at the end (runtime.selection's format), K <= capacity.
        protect: optional [N, Hkv, K'] pool slots (-1 padded) that misses must not take, because
        attention still reads them (the current block's, while the next block's pages arrive);
        the partition then needs K + K' slots.
        """
        n, h, k = entries.shape
        c = self.capacity
        k_protected = 0 if protect is None else protect.shape[-1]
        if h != self.num_kv_heads or k + k_protected > c:
            raise ValueError(f"selection [N, {h}, {k}] (+{k_protected} protected slots) does not fit partitions of "
                             f"{self.num_kv_heads} heads x {c} slots")
        held = self.held[layer, rows]  # [N, H, C]
        wanted = torch.where(entries >= 0, entries, _NONE).to(torch.int32)  # sorted, padding last
        # held slots whose page the new selection keeps
        at = torch.searchsorted(wanted, held.contiguous()).clamp(max=k - 1)
        kept = (wanted.gather(-1, at) == held) & (held >= 0)  # [N, H, C]
        # selected pages already held, and where
        held_sorted, order = torch.sort(torch.where(held >= 0, held, _NONE), dim=-1)
        at = torch.searchsorted(held_sorted, wanted).clamp(max=c - 1)
        hit = (held_sorted.gather(-1, at) == wanted) & (entries >= 0)  # [N, H, K]
        hit_slot = order.gather(-1, at)
        # misses take free slots (not kept) in slot order; there are enough since K <= C
        miss = (entries >= 0) & ~hit
        taken = kept
        base = rows[:, None, None] * (h * c) + self._head_base
        if protect is not None:  # slots in use elsewhere count as taken
            local_protected = torch.where(protect >= 0, protect.long() - base, c)
            in_use = torch.zeros(n, h, c + 1, dtype=torch.bool, device=held.device)
            in_use.scatter_(-1, local_protected, True)
            taken = kept | in_use[..., :c]
        free_slots = torch.argsort(taken.to(torch.int8), dim=-1, stable=True)  # free slots first
        rank = (torch.cumsum(miss.to(torch.int32), dim=-1) - 1).clamp(min=0)
        miss_slot = free_slots.gather(-1, rank.long())
        local = torch.where(hit, hit_slot, torch.where(miss, miss_slot, -1))
        # record the misses' pages in their slots (others write into a scratch column)
        target = torch.where(miss, miss_slot, c)
        updated = torch.cat([held, held.new_full((n, h, 1), -1)], dim=-1)
        updated.scatter_(-1, target, entries.to(torch.int32))
        self.held[layer, rows] = updated[..., :c]
        slot_table = torch.where(local >= 0, base + local, -1).to(torch.int32)
        miss_slots = torch.where(miss, base + miss_slot, -1)
        heads = torch.arange(h, device=entries.device)[None, :, None].expand(n, h, k)
        row_ids = torch.arange(n, device=entries.device)[:, None, None].expand(n, h, k)
        return Assignment(slot_table, entries.reshape(-1).long().clamp(min=0), heads.reshape(-1),
                          miss_slots.reshape(-1), row_ids.reshape(-1))

    def reset_rows(self, rows: torch.Tensor) -> None:
        """Forget everything partitions `rows` [M] hold (a new sequence takes them over)."""
        self.held[:, rows] = -1

    def invalidate(self, rows: torch.Tensor, first_page: torch.Tensor, last_page: torch.Tensor) -> None:
        """Forget pages first..last (inclusive, [N] each) of partitions `rows` [N] in every layer:
        the host store rewrote them (a block committed into a partial page)."""
        held = self.held[:, rows]  # [L, N, H, C]
        stale = (held >= first_page[None, :, None, None]) & (held <= last_page[None, :, None, None])
        self.held[:, rows] = torch.where(stale, -1, held)

    def pages_held(self) -> int:
        """Slots holding a page, over every layer and partition (a device sync: for reports)."""
        return int((self.held >= 0).sum())
