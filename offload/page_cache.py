"""The GPU page cache: a fixed budget of page slots per layer and the directory of what they hold.

Each layer owns a pool ``[num_slots, P, D]`` for K and one for V; a slot holds one KV head's page, so
heads select independently. The directory maps (sequence, layer, kv_head, logical_page) -> slot.
``plan`` turns a selection into the slot page table the sparse attention kernel reads plus the list
of misses to fetch; the cache never touches the host store (the prefetcher maps logical pages to
physical pages), so it is pure bookkeeping over numpy arrays and is tested without a GPU.

Replacement: slots of an outstanding plan are pinned until ``release_plan``; among unpinned slots the
least recently selected go first (consecutive blocks reuse most of their selection).
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

_FREE = -1


@dataclass
class CachePlan:
    """One layer's selection for a batch, resolved to slots.

    slot_table: ``[N, Hkv, max_sel]`` int32, the pool slot of each selected page, -1 padded.
    logical_pages: ``[N, Hkv, max_sel]`` int32, the selected logical pages in the same order, -1 padded
    (the attention kernel needs them to mask the partial last page).
    num_selected: ``[N, Hkv]`` int32, valid entries per (row, head).
    miss_rows, miss_heads, miss_pages, miss_slots: ``[M]`` int64, the units to fetch: logical page
    ``miss_pages[m]`` of head ``miss_heads[m]`` of ``seq_ids[miss_rows[m]]`` into ``miss_slots[m]``.
    """

    plan_id: int
    layer: int
    seq_ids: list[Hashable]
    slot_table: torch.Tensor
    logical_pages: torch.Tensor
    num_selected: torch.Tensor
    miss_rows: torch.Tensor
    miss_heads: torch.Tensor
    miss_pages: torch.Tensor
    miss_slots: torch.Tensor
    hits: int
    misses: int
    released: bool = False
    _slots: np.ndarray = field(default=None, repr=False)  # every slot the plan pins
    _gens: np.ndarray = field(default=None, repr=False)  # their generations when pinned

    @property
    def num_misses(self) -> int:
        return int(self.miss_slots.numel())

    def device_tables(self, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(slot_table, logical_pages, num_selected) on ``device`` for the attention kernel; CUDA copies
        go through pinned staging so they are asynchronous on the current stream."""
        device = torch.device(device)
        tabs = (self.slot_table, self.logical_pages, self.num_selected)
        if device.type != "cuda":
            return tuple(t.to(device) for t in tabs)
        return tuple(t.pin_memory().to(device, non_blocking=True) for t in tabs)


def _normalize_selection(selection, n_rows: int):
    """Flatten a selection into entry arrays (row, head, position, logical page), row-major.

    Accepts a ``[N, Hkv, K]`` int tensor/array padded with negative values, or nested sequences
    ``selection[row][head]`` of ints / int tensors / arrays.
    """
    if isinstance(selection, (torch.Tensor, np.ndarray)):
        sel = selection.detach().cpu().numpy() if isinstance(selection, torch.Tensor) else selection
        if sel.ndim != 3 or sel.shape[0] != n_rows or not np.issubdtype(sel.dtype, np.integer):
            raise ValueError(f"selection tensor must be integer [N={n_rows}, Hkv, K]; got {sel.dtype} {sel.shape}")
        heads, width = sel.shape[1], sel.shape[2]
        r, h, j = np.nonzero(sel >= 0)
        return r, h, j, sel[r, h, j].astype(np.int64), heads, width
    if len(selection) != n_rows:
        raise ValueError(f"selection has {len(selection)} rows, expected one per sequence ({n_rows})")
    heads = {len(rowsel) for rowsel in selection}
    if len(heads) > 1:
        raise ValueError(f"every row must select for the same number of KV heads; got {sorted(heads)}")
    heads = heads.pop() if heads else 0
    rs, hs, js, lps = [], [], [], []
    width = 0
    for r, rowsel in enumerate(selection):
        for h, pages in enumerate(rowsel):
            arr = pages.detach().cpu().numpy() if isinstance(pages, torch.Tensor) else np.asarray(pages)
            arr = arr.astype(np.int64).reshape(-1)
            if arr.size and arr.min() < 0:
                raise ValueError(f"selection row {r} head {h} has a negative logical page {int(arr.min())}")
            rs.append(np.full(arr.size, r)), hs.append(np.full(arr.size, h)), js.append(np.arange(arr.size))
            lps.append(arr)
            width = max(width, arr.size)
    if not lps:
        z = np.zeros(0, dtype=np.int64)
        return z, z, z, z, heads, 0
    return (np.concatenate(rs), np.concatenate(hs), np.concatenate(js), np.concatenate(lps), heads, width)


class GpuPageCache:
    """Fixed per-layer budgets of page slots on the GPU, with a directory and LRU-by-selection eviction.

    Args:
        num_layers, num_slots: the budget is ``num_slots`` (page, head) units per layer.
        page_size, head_dim, dtype, device: the pool geometry; pools are ``[num_slots, P, D]`` per layer.
    """

    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        page_size: int,
        head_dim: int,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cuda",
    ) -> None:
        if min(num_layers, num_slots, page_size, head_dim) <= 0:
            raise ValueError(
                f"num_layers, num_slots, page_size, head_dim must be positive; got {num_layers}, {num_slots}, "
                f"{page_size}, {head_dim}"
            )
        self.num_layers, self.num_slots = num_layers, num_slots
        self.page_size, self.head_dim, self.dtype = page_size, head_dim, dtype
        self.device = torch.device(device)
        shape = (num_layers, num_slots, page_size, head_dim)
        self._k = torch.empty(shape, dtype=dtype, device=self.device)
        self._v = torch.empty(shape, dtype=dtype, device=self.device)
        L, S = num_layers, num_slots
        self._owner = np.full((L, S), _FREE, dtype=np.int64)  # sequence handle, or _FREE
        self._head = np.zeros((L, S), dtype=np.int64)
        self._page = np.zeros((L, S), dtype=np.int64)
        self._tick = np.zeros((L, S), dtype=np.int64)  # last plan that selected the slot
        self._pins = np.zeros((L, S), dtype=np.int32)
        self._gen = np.zeros((L, S), dtype=np.int64)  # bumped on every (re)assignment
        self._dirs: dict[tuple[int, int], np.ndarray] = {}  # (handle, layer) -> [Hkv, pages] slot or -1
        self._handles: dict[Hashable, int] = {}
        self._seq_of: dict[int, Hashable] = {}
        self._next_handle = itertools.count()
        self._plan_ids = itertools.count()
        self._clock = 0
        self._open_plans: dict[int, CachePlan] = {}
        self.hits = np.zeros(L, dtype=np.int64)
        self.misses = np.zeros(L, dtype=np.int64)
        self.evictions = np.zeros(L, dtype=np.int64)

    # ------------------------------------------------------------------------------------------
    # pools

    def k_pool(self, layer: int) -> torch.Tensor:
        """``[num_slots, P, D]`` keys of layer ``layer``."""
        return self._k[layer]

    def v_pool(self, layer: int) -> torch.Tensor:
        return self._v[layer]

    @property
    def k_all(self) -> torch.Tensor:
        """``[L, num_slots, P, D]``."""
        return self._k

    @property
    def v_all(self) -> torch.Tensor:
        return self._v

    @property
    def nbytes(self) -> int:
        return 2 * self._k.numel() * self._k.element_size()

    # ------------------------------------------------------------------------------------------
    # directory

    def _handle(self, seq_id: Hashable, create: bool) -> int | None:
        h = self._handles.get(seq_id)
        if h is None and create:
            h = next(self._next_handle)
            self._handles[seq_id] = h
            self._seq_of[h] = seq_id
        return h

    def _dir(self, handle: int, layer: int, heads: int, pages: int) -> np.ndarray:
        """The (handle, layer) directory, grown to at least ``[heads, pages]``."""
        d = self._dirs.get((handle, layer))
        if d is None or d.shape[0] < heads or d.shape[1] < pages:
            old = d if d is not None else np.full((0, 0), _FREE, dtype=np.int64)
            cap = max(pages, 2 * old.shape[1], 16)  # amortized growth as the context grows
            d = np.full((max(heads, old.shape[0]), cap), _FREE, dtype=np.int64)
            d[: old.shape[0], : old.shape[1]] = old
            self._dirs[(handle, layer)] = d
        return d

    def resident(self, seq_id: Hashable, layer: int, kv_head: int, logical_page: int) -> int | None:
        """The slot holding that page, or None."""
        h = self._handles.get(seq_id)
        d = None if h is None else self._dirs.get((h, layer))
        if d is None or kv_head >= d.shape[0] or logical_page >= d.shape[1]:
            return None
        s = int(d[kv_head, logical_page])
        return None if s == _FREE else s

    def free_slots(self, layer: int) -> int:
        return int((self._owner[layer] == _FREE).sum())

    def used_slots(self, layer: int) -> int:
        return self.num_slots - self.free_slots(layer)

    def pinned_slots(self, layer: int) -> int:
        return int((self._pins[layer] > 0).sum())

    # ------------------------------------------------------------------------------------------
    # planning

    def plan(self, layer: int, seq_ids: Sequence[Hashable], selection) -> CachePlan:
        """Resolve a selection for one layer: pin hits, assign slots to misses (evicting), build tables.

        selection: ``[N, Hkv, K]`` int tensor padded with -1, or ``selection[row][head]`` lists /
        int tensors of logical page indices (no duplicates within a (row, head)).
        """
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} out of range for {self.num_layers} layers")
        seq_ids = list(seq_ids)
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError(f"seq_ids has duplicates: {seq_ids}")
        n = len(seq_ids)
        r, h, j, lp, heads, width = _normalize_selection(selection, n)
        total = lp.size
        if total:
            key = (r * heads + h) * (int(lp.max()) + 1) + lp
            if np.unique(key).size != total:
                raise ValueError(f"layer {layer}: a (row, head) selection lists the same logical page twice")
        if total > self.num_slots:
            raise ValueError(
                f"layer {layer}: the selection needs {total} slots ({n} rows x {heads} KV heads) but the cache has "
                f"{self.num_slots} slots per layer; build GpuPageCache with num_slots >= {total} or select fewer pages"
            )

        # 1. look up every entry
        slots = np.full(total, _FREE, dtype=np.int64)
        handles = np.empty(n, dtype=np.int64)
        bounds = np.searchsorted(r, np.arange(n + 1))
        for row, sid in enumerate(seq_ids):
            handles[row] = self._handle(sid, create=True)
            a, b = bounds[row], bounds[row + 1]
            if a == b:
                continue
            d = self._dir(handles[row], layer, heads, int(lp[a:b].max()) + 1)
            slots[a:b] = d[h[a:b], lp[a:b]]
        miss = slots == _FREE
        n_miss = int(miss.sum())

        # 2. pin the hits before choosing victims so they cannot be evicted by this plan
        hit_slots = slots[~miss]
        pins = self._pins[layer]
        pins[hit_slots] += 1
        if n_miss:
            try:
                victims = self._victims(layer, n_miss, total)
            except RuntimeError:
                pins[hit_slots] -= 1
                raise
            self._assign(layer, victims, handles[r[miss]], h[miss], lp[miss])
            slots[miss] = victims
        self._clock += 1
        self._tick[layer, slots] = self._clock
        self.hits[layer] += total - n_miss
        self.misses[layer] += n_miss

        # 3. tables for the kernels
        slot_table = np.full((n, heads, width), _FREE, dtype=np.int32)
        page_table = np.full((n, heads, width), _FREE, dtype=np.int32)
        slot_table[r, h, j] = slots
        page_table[r, h, j] = lp
        counts = np.zeros((n, heads), dtype=np.int32)
        np.add.at(counts, (r, h), 1)
        as_t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
        plan = CachePlan(
            plan_id=next(self._plan_ids), layer=layer, seq_ids=seq_ids,
            slot_table=as_t(slot_table), logical_pages=as_t(page_table), num_selected=as_t(counts),
            miss_rows=as_t(r[miss]), miss_heads=as_t(h[miss]), miss_pages=as_t(lp[miss]), miss_slots=as_t(slots[miss]),
            hits=total - n_miss, misses=n_miss,
            _slots=slots.copy(), _gens=self._gen[layer, slots].copy(),
        )
        self._open_plans[plan.plan_id] = plan
        return plan

    def _victims(self, layer: int, need: int, total: int) -> np.ndarray:
        """``need`` slots for misses: free ones first, then unpinned ones least recently selected."""
        owner, pins = self._owner[layer], self._pins[layer]
        free = np.flatnonzero(owner == _FREE)
        if free.size >= need:
            return free[:need]
        k = need - free.size
        cand = np.flatnonzero((owner != _FREE) & (pins == 0))
        if cand.size < k:
            pinned = int((pins > 0).sum())
            raise RuntimeError(
                f"layer {layer}: {need} misses need slots but only {free.size} are free and {cand.size} evictable; "
                f"{pinned} of {self.num_slots} slots are pinned by outstanding plans. Release plans first "
                f"(release_plan / release_all) or build the cache with num_slots >= {pinned - (total - need) + total}"
            )
        order = np.argpartition(self._tick[layer, cand], k - 1)[:k] if k < cand.size else np.arange(cand.size)
        evict = cand[order]
        self._evict(layer, evict)
        return np.concatenate([free, evict])

    def _evict(self, layer: int, slots: np.ndarray) -> None:
        owners = self._owner[layer, slots]
        for handle in np.unique(owners):
            sel = slots[owners == handle]
            self._dirs[(int(handle), layer)][self._head[layer, sel], self._page[layer, sel]] = _FREE
        self._owner[layer, slots] = _FREE
        self._pins[layer, slots] = 0
        self._gen[layer, slots] += 1
        self.evictions[layer] += slots.size

    def _assign(self, layer: int, slots: np.ndarray, handles: np.ndarray, heads: np.ndarray, pages: np.ndarray) -> None:
        self._owner[layer, slots] = handles
        self._head[layer, slots] = heads
        self._page[layer, slots] = pages
        self._gen[layer, slots] += 1
        self._pins[layer, slots] = 1
        for handle in np.unique(handles):
            sel = handles == handle
            self._dirs[(int(handle), layer)][heads[sel], pages[sel]] = slots[sel]

    # ------------------------------------------------------------------------------------------
    # release / drop

    def release_plan(self, plan: CachePlan) -> None:
        """Unpin a plan's slots (they stay resident and become evictable). Releasing twice is an error."""
        if plan.released or plan.plan_id not in self._open_plans:
            raise ValueError(f"plan {plan.plan_id} (layer {plan.layer}) was already released")
        still = self._gen[plan.layer, plan._slots] == plan._gens  # slots dropped meanwhile were unpinned then
        self._pins[plan.layer, plan._slots[still]] -= 1
        plan.released = True
        del self._open_plans[plan.plan_id]

    def release_all(self, layer: int | None = None) -> int:
        """Release every outstanding plan (of one layer, or all): the start of a new block."""
        todo = [p for p in self._open_plans.values() if layer is None or p.layer == layer]
        for p in todo:
            self.release_plan(p)
        return len(todo)

    @property
    def open_plans(self) -> list[CachePlan]:
        return list(self._open_plans.values())

    def drop_sequence(self, seq_id: Hashable) -> int:
        """Free every slot of a sequence in every layer (pins included); returns how many were freed.

        The GPU may still be reading or writing those slots: the prefetcher defers this until the
        sequence's transfers are done. Unknown ids free nothing.
        """
        handle = self._handles.pop(seq_id, None)
        if handle is None:
            return 0
        del self._seq_of[handle]
        freed = 0
        for layer in range(self.num_layers):
            slots = np.flatnonzero(self._owner[layer] == handle)
            self._owner[layer, slots] = _FREE
            self._pins[layer, slots] = 0
            self._gen[layer, slots] += 1
            freed += slots.size
            self._dirs.pop((handle, layer), None)
        return freed

    def invalidate(self, seq_id: Hashable, logical_pages: Sequence[int]) -> int:
        """Forget the cached copies of some pages of a sequence (every layer and head): the host
        store wrote them since they were fetched (a block committed into a partial page). Pinned
        copies are dropped too, as ``drop_sequence`` drops them; the caller must have released, on
        the compute stream, the plans that read them (the prefetcher orders the next fetch after
        that). Returns how many slots were freed."""
        handle = self._handles.get(seq_id)
        if handle is None:
            return 0
        pages = np.asarray(list(logical_pages), dtype=np.int64)
        freed = 0
        for layer in range(self.num_layers):
            d = self._dirs.get((handle, layer))
            if d is None:
                continue
            cols = pages[pages < d.shape[1]]
            slots = d[:, cols].reshape(-1)
            slots = slots[slots != _FREE]
            if slots.size:
                self._evict(layer, slots)
                self.evictions[layer] -= slots.size  # not a replacement decision
                freed += slots.size
        return freed

    @property
    def sequences(self) -> list[Hashable]:
        return list(self._handles)

    # ------------------------------------------------------------------------------------------

    def check_invariants(self) -> None:
        """Raise AssertionError unless every slot is either free or owned by exactly one directory entry.

        Checks: owned slots point back from their directory entry (none owned twice, none orphaned);
        every directory entry points at a slot that records it; free + used == num_slots; free slots
        are unpinned; pins are non-negative and equal the open plans' references.
        """
        for layer in range(self.num_layers):
            owner = self._owner[layer]
            used = np.flatnonzero(owner != _FREE)
            free = np.flatnonzero(owner == _FREE)
            assert used.size + free.size == self.num_slots, "slot count drifted"
            assert (self._pins[layer] >= 0).all(), f"layer {layer}: negative pin count"
            assert (self._pins[layer, free] == 0).all(), f"layer {layer}: a free slot is pinned"
            for s in used:
                handle = int(owner[s])
                assert handle in self._seq_of, f"layer {layer}: slot {s} owned by a dropped sequence"
                d = self._dirs.get((handle, layer))
                assert d is not None and d[self._head[layer, s], self._page[layer, s]] == s, (
                    f"layer {layer}: slot {s} is not in its owner's directory (lost slot)")
            entries = 0
            for (handle, lyr), d in self._dirs.items():
                if lyr != layer:
                    continue
                assert handle in self._seq_of, f"layer {layer}: directory of a dropped sequence"
                hh, pp = np.nonzero(d != _FREE)
                ss = d[hh, pp]
                entries += ss.size
                assert (owner[ss] == handle).all() and (self._head[layer, ss] == hh).all() and (
                    self._page[layer, ss] == pp).all(), f"layer {layer}: directory entry points at a slot it doesn't own"
            assert entries == used.size, f"layer {layer}: {entries} directory entries for {used.size} used slots"
            expect = np.zeros(self.num_slots, dtype=np.int64)
            for p in self._open_plans.values():
                if p.layer == layer:
                    live = self._gen[layer, p._slots] == p._gens
                    np.add.at(expect, p._slots[live], 1)
            assert (expect == self._pins[layer]).all(), f"layer {layer}: pin counts differ from open plans"

    def stats(self) -> dict:
        hits, misses = int(self.hits.sum()), int(self.misses.sum())
        return {
            "hits": hits,
            "misses": misses,
            "hit_rate": hits / (hits + misses) if hits + misses else 0.0,
            "evictions": int(self.evictions.sum()),
            "used_slots": [self.used_slots(layer) for layer in range(self.num_layers)],
            "num_slots": self.num_slots,
            "open_plans": len(self._open_plans),
        }
