"""Moves pages between the host store and the GPU page cache on side CUDA streams.

- ``fetch`` gathers a plan's misses from pinned host memory (zero-copy UVA kernel) on the fetch
  stream and records one event per layer; ``wait(layer)`` makes the compute stream wait on that
  layer's event only, so layer l's attention starts as soon as layer l's pages are in.
- ``commit_block`` writes a finished block's K/V of every layer to the host store in one kernel
  launch on the commit stream (the decode path); ``commit`` with a layer is for prefill, where
  each layer's K/V exist before the next layer runs.
- ``release`` unpins a plan and records where on the compute stream its slots stop being read;
  a later fetch that may overwrite those slots waits on that point first.
- ``drop_sequence`` frees a sequence's slots and host pages only once its in-flight transfers
  (and the compute enqueued before the drop) have finished.

Counters use CUDA events: transfer time is the fetch kernels' time on the fetch stream; stall time
is how long the compute stream sat in ``wait``; hidden = transfer - stall.

Sharing the GPU with compute: the UVA gather keeps its warps resident while they wait on PCIe, so
a gather launched over every SM starves the compute it should hide behind. The prefetcher therefore
launches it as a small persistent grid (``max_programs``, default ``DEFAULT_FETCH_PROGRAMS``), each
program keeping a 32 KiB K+V tile in flight, and puts the fetch and commit streams at the lowest
priority; compute should run on ``compute_stream`` (high priority), so that the block scheduler
places compute blocks before pending transfer blocks.

Streams: "the compute stream" below is whichever stream is current when ``wait``, ``release``,
``commit``/``commit_block`` and ``drop_sequence`` are called; the prefetcher records and waits relative
to it and never switches streams for the caller. All compute is assumed to run on that one stream: to
get the priority above, call them (and launch the compute) inside
``with torch.cuda.stream(pf.compute_stream):``. ``fetch`` always runs on ``fetch_stream`` and waits
there for the last ``release`` of its layer (so a fetch never overwrites slots compute may still
read) and for the last commit (a fetched page may have just been written); ``wait(layer)`` makes the
compute stream wait for that layer's fetch event only. ``synchronize`` waits for the side streams,
``compute_stream`` and the current stream.

Without CUDA (device "cpu") the same API runs synchronously with torch indexing.
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Sequence

import torch

from gpu_kernels.page_copy import gather_pages, gather_pages_reference

from .host_store import HostKVStore
from .page_cache import CachePlan, GpuPageCache

# Programs of the prefetcher's gather (a persistent grid). PCIe Gen5 x16 moves ~52 GB/s and a
# loaded UVA read takes a few microseconds, so ~150-250 KB must be in flight; 16 programs x 32 KiB
# (the default tile) is 512 KiB while holding 16 of an H100's 132 SMs. Every SM a gather program
# holds is lost to a GEMM that wants whole SMs, so the cap trades fetch bandwidth for compute.
# Measured (benchmarks.transfer "overlap", H100 PCIe Gen5, 2026-11-23, 36 layers x 26.9 MB,
# GPU-bound stand-in of 1.23 ms per layer vs 0.79 ms of transfer): end-to-end share of the transfer
# hidden 75% at cap 16 (pass 1.16x compute-only), 70% at 32, 60% at 66, 48% uncapped; cap 8 fetched
# at only 18 GB/s and left transfers exposed. H200, 2026-12-03 (medians of 5 back-to-back pairs,
# 0.80 ms of compute vs 0.56 ms of transfer per layer): 86.5% at cap 8, 85.6% at 12, 84.3% at 16,
# -3% at 6 (starved); the runtime's lookahead at 128K ran 1106 tok/s at cap 8 and 1092 at 16, both
# with no stall. 16 stays the default: 8 sits next to the cliff on both GPUs.
DEFAULT_FETCH_PROGRAMS = 16
# CUDA stream priorities: lower is more urgent; 0 is the default streams' (and the lowest) priority.
_LOW_PRIORITY, _HIGH_PRIORITY = 0, -1


class Prefetcher:
    """Fetch stream + commit stream between a ``HostKVStore`` and a ``GpuPageCache``."""

    def __init__(
        self,
        store: HostKVStore,
        cache: GpuPageCache,
        device: torch.device | str | None = None,
        max_programs: int | None = DEFAULT_FETCH_PROGRAMS,
        units_per_program: int | None = None,
    ) -> None:
        """``max_programs`` / ``units_per_program``: the gather kernel's persistent grid and per-step
        tile (see ``gather_pages``); few programs leave the SMs to the compute fetches overlap with.
        None: ``gather_pages``' standalone defaults (2 programs per SM, for a GPU with nothing else
        to do)."""
        device = cache.device if device is None else torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        cache_dev = cache.device if cache.device.index is not None or cache.device.type != "cuda" else device
        if cache_dev != device:
            raise ValueError(f"the page cache lives on {cache.device} but the prefetcher was given {device}")
        mismatch = [
            (name, a, b)
            for name, a, b in (
                ("page_size", store.page_size, cache.page_size),
                ("head_dim", store.head_dim, cache.head_dim),
                ("dtype", store.dtype, cache.dtype),
                ("num_layers", store.num_layers, cache.num_layers),
            )
            if a != b
        ]
        if mismatch:
            raise ValueError("store and cache disagree: " + ", ".join(f"{n} {a} vs {b}" for n, a, b in mismatch))
        self.store, self.cache, self.device = store, cache, device
        if max_programs is not None and max_programs <= 0:
            raise ValueError(f"max_programs must be positive or None, got {max_programs}")
        self.max_programs, self.units_per_program = max_programs, units_per_program
        self.cuda = device.type == "cuda"
        if self.cuda:
            if not store.pinned:
                raise ValueError("a GPU prefetcher needs a pinned HostKVStore (pin_memory=None or True)")
            # Transfers at the lowest priority; compute_stream above them (the default stream already
            # has the lowest priority, so compute must move up for the scheduler to favour it).
            self.fetch_stream = torch.cuda.Stream(device, priority=_LOW_PRIORITY)
            self.commit_stream = torch.cuda.Stream(device, priority=_LOW_PRIORITY)
            self.compute_stream = torch.cuda.Stream(device, priority=_HIGH_PRIORITY)
            self._uploader = store.uploader(device)  # unit ids go up through a reused pinned ring
            self._uploader.warm()
        self.unit_bytes = 2 * store.page_size * store.head_dim * torch.empty((), dtype=store.dtype).element_size()
        self._layer_event: dict[int, torch.cuda.Event] = {}  # last fetch of each layer
        self._release_event: dict[int, torch.cuda.Event] = {}  # last release of each layer (compute stream)
        self._last_commit: torch.cuda.Event | None = None
        self._seq_events: dict[Hashable, list] = {}  # latest fetch / commit event per sequence
        self._deferred: list[tuple[Hashable, bool, list]] = []
        self._dropping: set[Hashable] = set()
        self._timed: list[tuple[str, object, object, int]] = []  # (kind, start, end, bytes) not yet resolved
        self._stalls: list[tuple[object, object]] = []
        self.reset_stats()

    # ------------------------------------------------------------------------------------------
    # counters

    def reset_stats(self) -> None:
        self.bytes_fetched = 0
        self.bytes_committed = 0
        self.fetch_ms = 0.0
        self.commit_ms = 0.0
        self.stall_ms = 0.0
        self.num_fetches = 0
        self.num_commits = 0
        self.num_waits = 0
        self._timed.clear()
        self._stalls.clear()

    def _resolve(self, block: bool) -> None:
        """Fold finished event pairs into the counters (all of them when ``block``)."""
        if not self.cuda:
            return
        keep = []
        for item in self._timed:
            kind, start, end, nbytes = item
            if block or end.query():
                if block:
                    end.synchronize()
                ms = start.elapsed_time(end)
                if kind == "fetch":
                    self.fetch_ms += ms
                else:
                    self.commit_ms += ms
            else:
                keep.append(item)
        self._timed = keep
        keep_s = []
        for e0, e1 in self._stalls:
            if block or e1.query():
                if block:
                    e1.synchronize()
                self.stall_ms += e0.elapsed_time(e1)
            else:
                keep_s.append((e0, e1))
        self._stalls = keep_s

    def stats(self, sync: bool = True) -> dict:
        """Counters; ``sync`` waits for in-flight transfers so the times are complete."""
        if sync:
            self.synchronize()
        self._resolve(block=sync)
        hidden = max(0.0, self.fetch_ms - self.stall_ms)
        gbps = lambda b, ms: b / ms / 1e6 if ms > 0 else 0.0  # noqa: E731
        return {
            "bytes_fetched": self.bytes_fetched,
            "bytes_committed": self.bytes_committed,
            "fetch_ms": self.fetch_ms,
            "commit_ms": self.commit_ms,
            "stall_ms": self.stall_ms,
            "hidden_ms": hidden,
            "hidden_fraction": hidden / self.fetch_ms if self.fetch_ms > 0 else 0.0,
            "fetch_GBps": gbps(self.bytes_fetched, self.fetch_ms),
            "commit_GBps": gbps(self.bytes_committed, self.commit_ms),
            "fetches": self.num_fetches,
            "commits": self.num_commits,
            "waits": self.num_waits,
            "pending_drops": len(self._deferred),
            "cache": self.cache.stats(),
        }

    # ------------------------------------------------------------------------------------------
    # fetch / wait / release

    def _event(self) -> torch.cuda.Event:
        return torch.cuda.Event(enable_timing=True)

    def _check_live(self, seq_ids: Sequence[Hashable]) -> None:
        dropping = [s for s in seq_ids if s in self._dropping]
        if dropping:
            raise ValueError(f"sequences {dropping} are being dropped; no new transfers for them")

    def physical_pages(self, plan: CachePlan) -> torch.Tensor:
        """``[M]`` int64 store page ids of a plan's misses (logical page -> physical via the store)."""
        if plan.num_misses == 0:
            return torch.zeros(0, dtype=torch.int64)
        tables = self.store.page_tables(plan.seq_ids).long()
        width = tables.shape[1]
        rows, pages = plan.miss_rows, plan.miss_pages
        bad = pages >= width
        phys = tables[rows, pages.clamp(max=max(width - 1, 0))] if width else torch.full_like(pages, -1)
        bad |= phys < 0
        if bool(bad.any()):
            m = int(bad.nonzero()[0, 0])
            sid = plan.seq_ids[int(rows[m])]
            raise ValueError(
                f"layer {plan.layer}: selection names logical page {int(pages[m])} of {sid!r}, which has only "
                f"{self.store.num_tokens(sid)} tokens ({-(-self.store.num_tokens(sid) // self.store.page_size)} pages) "
                "in the host store"
            )
        return phys

    def fetch(self, layer: int, seq_ids: Sequence[Hashable], plan: CachePlan) -> None:
        """Enqueue the gather of ``plan``'s misses for ``layer`` and record the layer's event."""
        if plan.layer != layer or list(seq_ids) != plan.seq_ids:
            raise ValueError(
                f"fetch(layer={layer}, seq_ids={list(seq_ids)}) does not match the plan (layer {plan.layer}, "
                f"seq_ids {plan.seq_ids})"
            )
        if plan.released:
            raise ValueError(f"plan {plan.plan_id} was released; plan again before fetching")
        self._check_live(plan.seq_ids)
        self.poll()
        if plan.num_misses == 0:
            return  # the layer's previous event (if any) still covers earlier fetches of resident pages
        phys = self.physical_pages(plan)
        nbytes = plan.num_misses * self.unit_bytes
        k_dst, v_dst = self.cache.k_pool(layer), self.cache.v_pool(layer)
        if not self.cuda:
            k_src, v_src = self.store.k(layer), self.store.v(layer)
            t0 = time.perf_counter()
            gather_pages_reference(k_src, v_src, phys, plan.miss_heads, k_dst, v_dst, plan.miss_slots)
            ms = (time.perf_counter() - t0) * 1e3
            self.fetch_ms += ms
            self.stall_ms += ms  # synchronous: compute waited for all of it
        else:
            k_src, v_src = self.store.kernel_k(layer), self.store.kernel_v(layer)
            stream = self.fetch_stream
            with torch.cuda.device(self.device), torch.cuda.stream(stream):
                rel = self._release_event.get(layer)
                if rel is not None:
                    stream.wait_event(rel)  # evicted slots may still be read by released plans' attention
                if self._last_commit is not None:
                    stream.wait_event(self._last_commit)  # a fetched page may have just been committed
                start, end = self._event(), self._event()
                start.record(stream)
                pages_dev, heads_dev, slots_dev = self._uploader.upload([phys, plan.miss_heads, plan.miss_slots])
                gather_pages(k_src, v_src, pages_dev, heads_dev, k_dst, v_dst, slots_dev, validate=False,
                             max_programs=self.max_programs, units_per_program=self.units_per_program)
                end.record(stream)
            self._layer_event[layer] = end
            self._timed.append(("fetch", start, end, nbytes))
            for row in plan.miss_rows.unique().tolist():
                self._seq_events.setdefault(plan.seq_ids[row], [None, None])[0] = end
        self.bytes_fetched += nbytes
        self.num_fetches += 1

    def wait(self, layer: int) -> None:
        """Make the compute stream (the current stream) wait for ``layer``'s fetches: that layer's
        event only, so later layers' fetches keep running behind it."""
        self.num_waits += 1
        ev = self._layer_event.get(layer)
        if not self.cuda or ev is None:
            return
        cur = torch.cuda.current_stream(self.device)
        e0, e1 = self._event(), self._event()
        e0.record(cur)
        cur.wait_event(ev)
        e1.record(cur)
        self._stalls.append((e0, e1))

    def wait_commits(self) -> None:
        """Make the compute stream (the current stream) wait for every commit enqueued so far: for
        kernels that read the host store directly (prefill context, dense layers over UVA)."""
        if self.cuda and self._last_commit is not None:
            torch.cuda.current_stream(self.device).wait_event(self._last_commit)

    def release(self, plan: CachePlan) -> None:
        """Unpin ``plan`` once its attention has been enqueued on the compute stream (the current
        stream): the next fetch of this layer waits for this point of that stream before it may
        overwrite the plan's slots."""
        if self.cuda:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.device))
            self._release_event[plan.layer] = ev
        self.cache.release_plan(plan)

    # ------------------------------------------------------------------------------------------
    # commit

    def commit_block(
        self,
        seq_ids: Sequence[Hashable],
        start_pos: int | Sequence[int],
        k: torch.Tensor,
        v: torch.Tensor,
    ) -> None:
        """Write a finished block of every layer to the host store in one kernel launch (the decode path):
        k, v ``[L, N, Hkv, T, D]`` at ``start_pos`` (int or one per row). One launch over all layers
        moves a 32-token block at ~20 GB/s where a launch per layer is launch-bound (~1 GB/s at N=1)."""
        if k.dim() != 5 or k.shape[0] != self.store.num_layers:
            raise ValueError(
                f"commit_block takes k, v [L={self.store.num_layers}, N, Hkv, T, D]; got {tuple(k.shape)} "
                "(per-layer writes during prefill go through commit(seq_ids, layer, ...))"
            )
        self.commit(seq_ids, None, start_pos, k, v)

    def commit(
        self,
        seq_ids: Sequence[Hashable],
        layer: int | None,
        start_pos: int | Sequence[int],
        k: torch.Tensor,
        v: torch.Tensor,
    ) -> None:
        """Write K/V to the host store: k, v ``[N, Hkv, T, D]`` for one ``layer`` (prefill, layer by
        layer), or ``[L, N, Hkv, T, D]`` when ``layer`` is None (one launch; see ``commit_block``)
        at ``start_pos`` (int or one per row). The store must already hold the positions (extend
        first). On the GPU this runs on the commit stream after the work already enqueued on the
        current stream, and k/v stay allocated until the copy is done."""
        seq_ids = list(seq_ids)
        self._check_live(seq_ids)
        self.poll()
        nbytes = 2 * k.numel() * k.element_size()
        if not self.cuda or not k.is_cuda:
            t0 = time.perf_counter()
            self.store.write(seq_ids, layer, start_pos, k, v)
            self.commit_ms += (time.perf_counter() - t0) * 1e3
        else:
            cur = torch.cuda.current_stream(self.device)
            ready = torch.cuda.Event()
            ready.record(cur)
            stream = self.commit_stream
            with torch.cuda.device(self.device), torch.cuda.stream(stream):
                stream.wait_event(ready)  # k, v are produced on the compute stream
                start, end = self._event(), self._event()
                start.record(stream)
                self.store.write(seq_ids, layer, start_pos, k, v)
                end.record(stream)
            k.record_stream(stream)  # the allocator must not hand k/v out again before the copy ran
            v.record_stream(stream)
            self._last_commit = end
            self._timed.append(("commit", start, end, nbytes))
            for s in seq_ids:
                self._seq_events.setdefault(s, [None, None])[1] = end
        self.bytes_committed += nbytes
        self.num_commits += 1

    # ------------------------------------------------------------------------------------------
    # sequence lifetime

    def drop_sequence(self, seq_id: Hashable, free_host: bool = True) -> bool:
        """Free a finished or cancelled sequence's cache slots (and host pages when ``free_host``).

        On the GPU the frees wait until its last fetch and commit and the compute enqueued so far have
        finished; returns True if done now, False if deferred (``poll``/``synchronize`` complete it).
        """
        if seq_id in self._dropping:
            raise ValueError(f"sequence {seq_id!r} is already being dropped")
        events = [e for e in self._seq_events.pop(seq_id, [None, None]) if e is not None]
        if self.cuda:
            now = torch.cuda.Event()
            now.record(torch.cuda.current_stream(self.device))
            events.append(now)
        self._dropping.add(seq_id)
        self._deferred.append((seq_id, free_host, events))
        self.poll()
        return seq_id not in self._dropping

    def _finish_drop(self, seq_id: Hashable, free_host: bool) -> None:
        self.cache.drop_sequence(seq_id)
        if free_host and self.store.has(seq_id):
            self.store.free(seq_id)
        self._dropping.discard(seq_id)

    def poll(self) -> int:
        """Complete deferred drops whose transfers have finished; returns how many completed."""
        done = 0
        keep = []
        for seq_id, free_host, events in self._deferred:
            if all(e.query() for e in events):
                self._finish_drop(seq_id, free_host)
                done += 1
            else:
                keep.append((seq_id, free_host, events))
        self._deferred = keep
        self._resolve(block=False)
        return done

    @property
    def pending_drops(self) -> list[Hashable]:
        return [s for s, _, _ in self._deferred]

    def synchronize(self) -> None:
        """Wait for both side streams, ``compute_stream`` and the current stream, then complete
        deferred drops."""
        if self.cuda:
            self.fetch_stream.synchronize()
            self.commit_stream.synchronize()
            self.compute_stream.synchronize()  # compute may have been enqueued there from another context
            torch.cuda.current_stream(self.device).synchronize()
        self.poll()
