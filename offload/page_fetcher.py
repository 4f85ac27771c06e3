"""The fetch path: a selection diffed against the GPU page cache, its misses gathered from pinned
host memory into the cache's pools.

`PageFetcher` owns the GPU page pools (per layer K and V ``[max_rows * Hkv * capacity, P, D]``) and
their `PageDirectory`; `fetch` resolves one layer's selection to pool slots and gathers only the
pages that are not already resident, with the zero-copy UVA kernel (`gpu_kernels.page_copy`) on
the current stream, or on the gather stream for a side pass, beside the layers that follow. On the
CPU the same calls run with torch indexing. Everything `fetch` does is device work that reads
fixed-address inputs, so a caller may capture it in a CUDA graph.

Sharing the GPU with compute: the UVA gather keeps its warps resident while they wait on PCIe, so
a gather launched over every SM starves the compute it should hide behind. A side pass's gathers
therefore run as a small persistent grid (`side_programs`, default `DEFAULT_FETCH_PROGRAMS`);
a fetch the next attention waits for (step 0's) uses every SM.

Over an fp8 store (`HostKVStore.fp8`) the pools hold e4m3 codes, so a gather moves half the bytes,
and each slot has its unit's fp32 scale (`k_scale_pool`/`v_scale_pool`, ``[max_rows * Hkv *
capacity]`` per layer): `fetch` copies the misses' scales from the store's, which sit on the GPU, in
one indexing op beside the gather.
"""
from __future__ import annotations

import contextlib

import torch

from gpu_kernels.kv_fp8 import is_fp8
from gpu_kernels.page_copy import gather_pages, gather_pages_reference

from .host_store import HostKVStore
from .page_directory import PageDirectory

# Programs of a side pass's gather (a persistent grid). PCIe Gen5 x16 moves ~52 GB/s and a loaded
# UVA read takes a few microseconds, so ~150-250 KB must be in flight; 16 programs x 32 KiB (the
# default tile) is 512 KiB while holding 16 of an H100's 132 SMs. Every SM a gather program holds
# is lost to a GEMM that wants whole SMs, so the cap trades fetch bandwidth for compute. Measured
# (H100 PCIe Gen5, 2026-11-23, 36 layers x 26.9 MB beside a GPU-bound stand-in of 1.23 ms per
# layer against 0.79 ms of transfer): 75% of the transfer hidden end to end at cap 16, 70% at 32,
# 60% at 66, 48% uncapped; cap 8 fetched at only 18 GB/s. H200, 2026-12-03: 86.5% at cap 8, 84.3%
# at 16, -3% at 6 (starved); the lookahead at 128K ran 1106 tok/s at cap 8 and 1092 at 16, both
# with no stall. 16 stays the default: 8 sits next to the cliff on both GPUs.
DEFAULT_FETCH_PROGRAMS = 16


class PageFetcher:
    """GPU page pools over a `HostKVStore`, filled by diffed gathers (see the module docstring).

    max_rows: sequences the pools hold at once (a row is a partition of every layer); capacity:
    slots per (row, layer, KV head), at least the longest selection (twice that where a side pass
    fetches the next selection while the current one is read). gather_stream (CUDA): where side
    fetches run; None runs them on the caller's stream. side_programs: the most programs a side
    fetch's gather holds (None: `DEFAULT_FETCH_PROGRAMS`). move_pages=False: every gather launches
    as it would, with its units as holes, so no byte moves (a timing reference: the directory then
    names pages its slots do not hold).
    """

    def __init__(self, store: HostKVStore, max_rows: int, capacity: int, device: torch.device | str,
                 gather_stream: torch.cuda.Stream | None = None, side_programs: int | None = None,
                 move_pages: bool = True):
        device = torch.device(device)
        self.store, self.device = store, device
        self.cuda = device.type == "cuda"
        if self.cuda and not store.pinned:
            raise ValueError("a GPU page fetcher gathers from pinned memory: build the HostKVStore with pin_memory")
        self.side_programs = DEFAULT_FETCH_PROGRAMS if side_programs is None else side_programs
        if self.side_programs < 1:
            raise ValueError(f"side_programs={self.side_programs} must be >= 1")
        self.gather_stream, self.move_pages = gather_stream, move_pages
        self.directory = PageDirectory(store.num_layers, max_rows, store.num_kv_heads, capacity, device)
        self.capacity = capacity
        shape = (store.num_layers, self.directory.num_slots, store.page_size, store.head_dim)
        self.nbytes = 2 * shape[0] * shape[1] * shape[2] * shape[3] * store.dtype.itemsize
        if self.cuda:
            free, _ = torch.cuda.mem_get_info(device)
            if self.nbytes > free:
                per_row = self.nbytes // max_rows
                raise MemoryError(
                    f"the GPU page cache for {max_rows} rows x {store.num_kv_heads} heads x {capacity} pages needs "
                    f"{self.nbytes / 2**30:.2f} GiB, {free / 2**30:.2f} GiB are free: {free // per_row} rows would "
                    "fit; lower the batch or the budget")
        self._k = torch.empty(shape, dtype=store.dtype, device=device)
        self._v = torch.empty_like(self._k)
        self._k_scale = self._v_scale = None
        if is_fp8(store.dtype):
            if store.k_scale(0).device != device:
                raise ValueError(f"the fp8 store's scales are on {store.k_scale(0).device}, the pools on {device}: "
                                 "build the HostKVStore with scale_device on the fetcher's device")
            # one slot more than the pools: a hole's scale lands there (a fixed-size copy, no host sync)
            self._k_scale = torch.ones(shape[0], shape[1] + 1, dtype=torch.float32, device=device)
            self._v_scale = torch.ones_like(self._k_scale)
        self._side_inputs: list[tuple[torch.Tensor, ...]] = []  # see _gathering

    def k_pool(self, layer: int) -> torch.Tensor:
        """[max_rows * Hkv * capacity, P, D] keys of one layer (the slots `fetch` returns index it)."""
        return self._k[layer]

    def v_pool(self, layer: int) -> torch.Tensor:
        return self._v[layer]

    def k_scale_pool(self, layer: int) -> torch.Tensor | None:
        """[max_rows * Hkv * capacity] fp32 scales of one layer's key slots (None unless the store is fp8)."""
        return None if self._k_scale is None else self._k_scale[layer, :-1]

    def v_scale_pool(self, layer: int) -> torch.Tensor | None:
        return None if self._v_scale is None else self._v_scale[layer, :-1]

    def fetch(self, layer: int, rows: torch.Tensor, store_table: torch.Tensor, entries: torch.Tensor,
              protect: torch.Tensor | None = None, side: bool = False,
              timed: list[tuple[torch.cuda.Event, torch.cuda.Event]] | None = None,
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Make one layer's selection resident and say where it is.

        rows: [N] int64 partition of each row; store_table: [N, pages] int32 host-store page of each
        logical page; entries: [N, Hkv, K] int32 logical pages (sorted, -1 padded); protect: slots
        misses must not take (`PageDirectory.assign`). side: a side pass's fetch (gathered on the
        gather stream with at most `side_programs` programs). timed: where an eager CUDA fetch
        appends (start, end) events around its gather (a captured one records none).
        Returns (slot_table [N, Hkv, K] int32 pool slots, -1 padded; pages gathered, a device scalar).
        """
        found = self.directory.assign(layer, rows, entries, protect)
        physical = store_table[found.miss_rows, found.miss_pages]
        heads, slots = found.miss_heads, found.miss_slots
        fetched = (slots >= 0).sum()
        if not self.move_pages:
            slots = slots.fill_(-1)
        store = self.store
        if store.fault_hook is not None:  # a test hook (HostKVStore.fault_hook); reads the misses on the host
            store.fault_hook("gather", layer, physical[slots >= 0].cpu())
        if self._k_scale is not None:
            self._copy_scales(layer, physical, heads, slots)
        if not self.cuda:
            gather_pages_reference(store.k(layer), store.v(layer), physical, heads, self._k[layer], self._v[layer],
                                   slots)
            return found.slot_table, fetched
        with self._gathering(layer, side, physical, heads, slots):
            events = None
            if timed is not None and not torch.cuda.is_current_stream_capturing():
                events = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                events[0].record()
            gather_pages(store.kernel_k(layer), store.kernel_v(layer), physical, heads, self._k[layer],
                         self._v[layer], slots, validate=False, max_programs=self.side_programs if side else None)
            if events is not None:
                events[1].record()
                timed.append(events)
        return found.slot_table, fetched

    def _copy_scales(self, layer: int, physical: torch.Tensor, heads: torch.Tensor, slots: torch.Tensor) -> None:
        """The misses' fp8 scales into their slots (store and pools on the same device), holes into
        the spare last slot. Runs on the caller's stream: the scales are read by the same attention
        that reads the gathered pages, which waits for this stream."""
        store, spare = self.store, self._k_scale.shape[1] - 1
        units = (physical.clamp(0, store.num_pages - 1).long(), heads.long())
        into = torch.where(slots >= 0, slots, spare).long()
        self._k_scale[layer].index_copy_(0, into, store.k_scale(layer)[units])
        self._v_scale[layer].index_copy_(0, into, store.v_scale(layer)[units])

    @contextlib.contextmanager
    def _gathering(self, layer: int, side: bool, *inputs: torch.Tensor):
        """Runs a side fetch's gather on the gather stream, if there is one. The gather writes slots
        this layer's selection just took, which nothing else in the pass reads, so it may run beside
        the next layers' selection. The last layer joins the caller's stream to it: a captured graph
        must end joined, and whatever follows the side pass orders itself after its stream alone.
        inputs: tensors the caller's stream made that the gather reads, held until then (the
        allocator would hand their memory to the caller's next layer)."""
        if not side or self.gather_stream is None:
            yield
            return
        caller = torch.cuda.current_stream(self.device)
        self.gather_stream.wait_stream(caller)
        with torch.cuda.stream(self.gather_stream):
            yield
        self._side_inputs.append(inputs)
        if layer == self.store.num_layers - 1:
            caller.wait_stream(self.gather_stream)
            self._side_inputs.clear()

    def join_side_fetches(self) -> None:
        """Order the caller's stream after every side fetch issued so far: the slots they fill are
        read next (herald's forecast, one layer after it was issued)."""
        if self.gather_stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.gather_stream)
        self._side_inputs.clear()

    def abandon_side_fetches(self) -> None:
        """A side pass was cut short (a fault): drop what its gathers were holding."""
        self._side_inputs.clear()

    def side_streams(self) -> list[torch.cuda.Stream]:
        return [] if self.gather_stream is None else [self.gather_stream]

    def close(self) -> None:
        self._k = self._v = None
        self._k_scale = self._v_scale = None
        self.directory = None
