"""The `herald` mode: the full KV in pinned host memory, a GPU page budget, cooperative selection.

Per block (HERALD, arXiv 2606.21633; this is the synchronous path):
1. Step 0 (all [MASK]), per layer: the selection queries of each (row, KV head) score every context
   page (by default one query per block position, a token scoring the max over them: the block
   mean cancels the positions' RoPE phases and loses the retrieved keys); the source is a compact quantized key copy on the GPU (`gpu-compact`), a numba scan of the
   host keys (`cpu`), or both over two parts of the context (`split`). Top-k pages plus sinks, the
   local window and the last page form the layer's selection.
2. The page cache (offload.partitioned_cache, bookkeeping on the GPU) keeps the selected pages that
   are already resident and gives the misses the slots of dropped pages; a zero-copy UVA kernel
   gathers only the misses from pinned memory before the layer's attention reads them.
3. Steps 1..S-1 and the commit pass attend to those pages plus the block's own K/V; on CUDA they
   are replayed from CUDA graphs (every index they read sits at a fixed address).
4. The commit pass writes the finished block's K/V into the host store (UVA write kernel) and its
   keys into the compact copy, and forgets the cached copies of the pages it wrote into.

With `lookahead` (HERALD's overlap, opt-in): after step 0 of block b the loop runs a LOOKAHEAD pass
over [the draft of block b (step 0's argmax) ; block b+1 all [MASK]]. Its second half's queries
select block b+1's pages, and the misses are fetched into slots block b does not read (each
partition holds two selections). On CUDA the whole LOOKAHEAD pass (its compute, scan, diff and
gather) runs on a side stream, replayed from a CUDA graph of its own, beside block b's remaining
steps on the main stream; block b's commit waits for it (the commit rewrites the cache directory),
and block b+1's step 0 starts from its selection, fetching only the pages the commit rewrote. The
draft is an approximation: in the LOOKAHEAD pass the 2B tokens see each other bidirectionally on
the kernel path.

With the gpu-compact source nothing in a block waits for the host; the cpu and split sources bring
each layer's selection query to the host (one sync per layer at step 0) and the scores back.
The first `dense_layers` layers (default 2, as mage keeps them) stay exact: their KV (2/36 of an
8B model's) lives on the GPU in a dense paged cache and never goes to the host store.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import replace

import torch

from cpu_index import AsyncScanner, host_page_scores
from gpu_kernels.merge import block_self_attention, merge_attention_states
from gpu_kernels.page_copy import gather_pages, gather_pages_reference, write_tokens
from gpu_kernels.paged_attention import block_attention, paged_attention
from offload.compact_keys import CompactKeyIndex
from offload.host_store import HostKVStore
from offload.partitioned_cache import PartitionedPageCache
from offload.prefetcher import DEFAULT_FETCH_PROGRAMS
from runtime.attention import (AttentionMode, DenseAttention, ForwardBatch, Phase, PlannedBuffers, ReplayTables,
                               masked_attention)
from runtime.config import ModelConfig, SparseConfig
from runtime.memory import selected_pages_bound
from runtime.selection import (Selection, SelectionPlan, plan_selection, select_pages, selection_queries,
                               table_attention_torch)
from runtime.uploads import upload, upload_into


def _shared_pages(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many entries of b [N, H, K2] (sorted, -1 padded) also appear in a [N, H, K1]; a scalar."""
    wanted = torch.where(a >= 0, a, 2**31 - 1).to(torch.int32)
    at = torch.searchsorted(wanted, b.to(torch.int32).contiguous()).clamp(max=a.shape[-1] - 1)
    return ((wanted.gather(-1, at) == b) & (b >= 0)).sum()


def _quantizable(k: torch.Tensor) -> torch.Tensor:
    """Keys as the compact index quantizes them (fp64 test models go through fp32)."""
    return k.float() if k.dtype == torch.float64 else k


class _RowBuffers:
    """Per-pass inputs at fixed addresses for one batch size (CUDA graphs read them)."""

    def __init__(self, n: int, pages_per_seq: int, device: torch.device):
        self.rows = torch.zeros(n, dtype=torch.int64, device=device)  # cache partition of each row
        self.store_table = torch.zeros(n, pages_per_seq, dtype=torch.int32, device=device)
        self.context_lens = torch.zeros(n, dtype=torch.int32, device=device)
        self.first_page = torch.zeros(n, dtype=torch.int32, device=device)  # pages a commit writes
        self.last_page = torch.zeros(n, dtype=torch.int32, device=device)


class HeraldAttention(AttentionMode):
    """Offloaded KV with per-block selection and fetch of the misses (see the module docstring)."""

    name = "herald"

    def __init__(self, model: ModelConfig, max_sequences: int, max_tokens: int, dtype: torch.dtype,
                 device: torch.device, backend: str, sparse: SparseConfig, reserve_host_bytes: int | None = None,
                 side_stream: torch.cuda.Stream | None = None,
                 gather_stream: torch.cuda.Stream | None = None, progress: bool = False):
        """The lookahead's gathers use at most sparse.lookahead_fetch_programs programs (they run beside
        the block's steps; step 0's own fetch, which they wait for, uses every SM). side_stream: the stream the
        lookahead runs on; gather_stream: the one its gathers run on (sparse.lookahead_gather_stream)
        (CUDA; default: new ones). An engine passes the same ones to every mode it makes: cuBLAS
        keeps a workspace per stream it has run on for the life of the process, so fresh streams per
        request batch would grow GPU memory. progress: a progress bar while the pinned host store is
        faulted in."""
        if sparse.granularity != "page":
            raise ValueError("herald moves and selects whole pages; set granularity='page' (token level is mage's)")
        if sparse.source == "gpu-exact":
            raise ValueError("herald's KV is off the GPU: choose source cpu, gpu-compact or split")
        self.sparse, self.device, self.backend = sparse, device, backend
        self.cuda = device.type == "cuda"
        self.wants_lookahead = sparse.lookahead_on(self.cuda)
        self.scale = model.head_dim ** -0.5
        self.query = sparse.selection_query("herald")
        self.num_layers, self.num_kv_heads = model.num_layers, model.num_kv_heads
        self.page_size = p = sparse.page_size
        self.dense_layers = 2 if sparse.dense_layers is None else sparse.dense_layers
        if self.dense_layers > model.num_layers:
            raise ValueError(f"dense_layers={self.dense_layers} exceeds the model's {model.num_layers} layers")
        self.pages_per_seq = -(-max_tokens // p)
        self.max_tokens = self.pages_per_seq * p
        self.max_selected = selected_pages_bound(sparse, self.max_tokens)
        self.fetch_programs = (DEFAULT_FETCH_PROGRAMS if sparse.lookahead_fetch_programs is None
                               else sparse.lookahead_fetch_programs)
        self.store = HostKVStore(model.num_layers, model.num_kv_heads, model.head_dim, p,
                                 max_sequences * self.pages_per_seq, dtype=dtype,
                                 pin_memory=self.cuda, reserve_bytes=reserve_host_bytes,
                                 huge_pages=sparse.host_huge_pages, progress=progress)
        self.cache = self.compact = self.scanner = None
        self._buffers: dict[tuple[int, bool], _RowBuffers] = {}  # (rows, side pass) -> buffers
        self._planned = PlannedBuffers()  # which pass each of them was last filled for
        self.dense = None
        try:
            if self.dense_layers:
                self.dense = DenseAttention(replace(model, num_layers=self.dense_layers), max_sequences,
                                            self.max_tokens, p, dtype, device, backend)
            # the lookahead fetches the next block's pages while this block's stay in use: two sets
            capacity = self.max_selected * (2 if self.wants_lookahead else 1)
            self.cache = PartitionedPageCache(model.num_layers, max_sequences, model.num_kv_heads, capacity,
                                              p, model.head_dim, dtype, device)
            if sparse.source in ("gpu-compact", "split"):
                self.compact = CompactKeyIndex(model.num_layers, model.num_kv_heads, model.head_dim, p,
                                               self.store.num_pages, bits=sparse.compact_bits,
                                               group_size=min(sparse.compact_group, model.head_dim), device=device,
                                               use_kernel=self.cuda)  # CPU: the torch path
            if sparse.source in ("cpu", "split"):
                self.scanner = AsyncScanner()
                self.scanner.warmup([dtype])  # numba compiles now, not inside the first block
        except BaseException:
            self.close()
            raise
        self._free_rows = list(range(max_sequences - 1, -1, -1))
        self.row_of: dict[int, int] = {}
        self.batch: ForwardBatch | None = None
        # the block's selection per layer, for the rows that started it: (slot table, kv_len); the
        # passes after step 0 read copies for their own rows
        self._block_tables = ReplayTables(model.num_layers, model.num_kv_heads, self.max_selected, device)
        self._pass_tables = ReplayTables(model.num_layers, model.num_kv_heads, self.max_selected, device)
        self._side_tables = ReplayTables(model.num_layers, model.num_kv_heads, self.max_selected, device)
        self._tables: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._selected_rows: tuple[int, ...] = ()
        self._selection_id = 0
        self._check_entries: dict[int, torch.Tensor] = {}  # assertion mode: each layer's selection
        self._selection_plans: dict[int, SelectionPlan] = {}
        # pages selected and fetched since the block began, counted on the device (graphs included)
        # selected, fetched at step 0, prefetched for the next block; draft-chosen pages the block's own
        # step-0 queries also choose, and how many those choose (measure_draft_recall)
        self._counters = torch.zeros(5, dtype=torch.int64, device=device)
        # the lookahead: per batch size of its pass, the next block's selection [L, n, Hkv,
        # max_selected] (-1 padded) and its plan, at fixed addresses (a side-stream graph writes them);
        # per batch size of step 0, which lookahead row each row takes ([n] int64) and whether it has one
        self._next_store: dict[int, torch.Tensor] = {}
        # the selection a block took from the lookahead (a copy: the block's own lookahead overwrites
        # the store), its rows and width, so that a block rerun after a fault takes it again
        self._next_backup: dict[int, torch.Tensor] = {}
        self._consumed: tuple[tuple[int, ...], int, int] | None = None
        self._next_plans: dict[int, SelectionPlan] = {}
        self._next_index: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._next_rows: tuple[int, ...] | None = None
        self._next_width = 0
        self._step0_key: tuple = ()
        self.fetch_stream = None
        if self.cuda and self.wants_lookahead:
            self.fetch_stream = side_stream if side_stream is not None else torch.cuda.Stream(device)
        self.gather_stream = None
        if self.fetch_stream is not None and sparse.lookahead_gather_stream:
            self.gather_stream = gather_stream if gather_stream is not None else torch.cuda.Stream(device)
        self._gather_inputs: list[tuple[torch.Tensor, ...]] = []  # see _on_gather_stream
        self._side_events: tuple[torch.cuda.Event, ...] | None = None  # the lookahead in flight: start
        self._timeline: list[dict] = []  # per block: selection, transfer, pages selected / fetched
        self._closed_blocks: list[dict] = []  # blocks whose counters are still on their way to the host
        self._block: dict = {}

    # ------------------------------------------------------------------------------------------
    # sequences

    def add_sequence(self, seq_id: int, max_tokens: int) -> None:
        if max_tokens > self.max_tokens:
            raise ValueError(f"sequence {seq_id} needs {max_tokens} tokens; the mode was sized for {self.max_tokens}")
        if seq_id in self.row_of:
            raise ValueError(f"sequence {seq_id} is already running")
        if not self._free_rows:
            raise RuntimeError(f"all {len(self.row_of)} rows are taken; remove a sequence first")
        self.store.allocate(seq_id, max_tokens)
        if self.dense is not None:
            self.dense.add_sequence(seq_id, max_tokens)
        row = self._free_rows.pop()
        self.row_of[seq_id] = row
        self._planned.forget()
        self.cache.reset_rows(torch.tensor([row], device=self.device))

    def remove_sequence(self, seq_id: int) -> None:
        if self.cuda:  # queued kernels may still read its host pages or its slots
            torch.cuda.current_stream(self.device).synchronize()
            for stream in self._side_streams():
                stream.synchronize()
        self.store.free(seq_id)
        if self.dense is not None:
            self.dense.remove_sequence(seq_id)
        row = self.row_of.pop(seq_id)
        self.cache.reset_rows(torch.tensor([row], device=self.device))
        self._free_rows.append(row)
        self._planned.forget()

    def restart_block(self, seq_ids: tuple[int, ...]) -> None:
        """The rerun of an aborted block starts from empty partitions: the failed pass may have
        given slots to pages whose gather never ran (the cost: one refetch of the rows' selections).
        A lookahead the aborted block prepared was made for the block after it: dropped. The
        selection the aborted block took from the last lookahead is put back (from its copy), so the
        rerun selects exactly the same pages and its tokens are a fault-free run's. On CUDA the main
        stream first waits for the side stream, whose work in flight writes those slots."""
        for stream in self._side_streams():
            torch.cuda.current_stream(self.device).wait_stream(stream)
        self._gather_inputs.clear()
        rows = [self.row_of[s] for s in seq_ids if s in self.row_of]
        if rows:
            self.cache.reset_rows(torch.tensor(rows, device=self.device))
        self._next_rows = None
        if self._consumed is not None:  # the rerun takes the selection the aborted block took
            looked, width, n = self._consumed
            self._next_store[n].copy_(self._next_backup[n])
            self._next_rows, self._next_width = looked, width

    def occupancy(self) -> dict[str, int]:
        counts = dict(sequences=len(self.row_of), rows_taken=self.cache.max_rows - len(self._free_rows),
                      host_pages_used=self.store.used_pages, host_sequences=len(self.store.sequences),
                      partition_pages_held=int((self.cache.held >= 0).sum()))
        if self.dense is not None:
            counts.update({f"dense_{name}": count for name, count in self.dense.occupancy().items()})
        return counts

    def load_random_context(self, seq_id: int, num_tokens: int, seed: int = 0) -> None:
        if num_tokens > self.store.num_tokens(seq_id):
            raise ValueError(f"{num_tokens} tokens exceed the {self.store.num_tokens(seq_id)} reserved for {seq_id}")
        gen = torch.Generator(self.device).manual_seed(seed)
        shape = (1, self.num_kv_heads, num_tokens, self.store.head_dim)
        table = self.store.page_tables([seq_id]).to(self.device)
        start = torch.zeros(1, dtype=torch.int32, device=self.device)
        if self.dense is not None:
            self.dense.load_random_context(seq_id, num_tokens, seed)
        for layer in range(self.dense_layers, self.num_layers):
            k = torch.randn(shape, generator=gen, device=self.device, dtype=self.store.dtype)
            v = torch.randn(shape, generator=gen, device=self.device, dtype=self.store.dtype)
            self._store_write(layer, table, start, k, v, [seq_id], [0])
            if self.compact is not None:
                self.compact.write(layer, table, start, _quantizable(k))
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def close(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        if self.scanner is not None:
            self.scanner.close()
        if self.compact is not None:
            self.compact.close()
        if self.cache is not None:
            self.cache.close()
        if self.dense is not None:
            self.dense.close()
        self._buffers.clear()
        self._planned.forget()
        # device buffers planned per batch size (close may run from __init__, before some exist)
        for name in ("_block_tables", "_pass_tables", "_side_tables", "_selection_plans", "_next_store",
                     "_next_backup", "_next_plans", "_next_index"):
            if hasattr(self, name):
                getattr(self, name).clear()
        if getattr(self, "_closed_blocks", None):  # their timeline entries, and their pinned counters freed
            self._record_closed_blocks(wait=True)
        self.store.close()

    # ------------------------------------------------------------------------------------------
    # planning

    def replayable(self, batch: ForwardBatch) -> bool:
        """Every pass but prefill: the indices they read were loaded by plan (or by step 0) into
        fixed buffers. Step 0 and the LOOKAHEAD too when selection stays on the GPU (the
        gpu-compact source)."""
        selecting = (batch.phase is Phase.DENOISE and batch.step == 0) or batch.phase is Phase.LOOKAHEAD
        return (self.cuda and self.backend == "triton" and batch.phase is not Phase.PREFILL
                and (not selecting or self.sparse.source == "gpu-compact")
                and not self.sparse.check_residency)

    def graph_key(self, batch: ForwardBatch) -> object:
        """What a captured step 0 or LOOKAHEAD bakes in: top-k widths and where selections come from."""
        if batch.phase is Phase.LOOKAHEAD:
            return self._next_plans[batch.num_rows].width
        if batch.phase is Phase.DENOISE and batch.step == 0:
            return self._step0_key
        return None

    def pass_stream(self, batch: ForwardBatch) -> torch.cuda.Stream | None:
        """The LOOKAHEAD runs on the fetch stream, beside the block's remaining steps."""
        return self.fetch_stream if batch.phase is Phase.LOOKAHEAD else None

    def _side_streams(self) -> list[torch.cuda.Stream]:
        return [s for s in (self.fetch_stream, self.gather_stream) if s is not None]

    def _join_lookahead(self) -> None:
        """Order the main stream after the lookahead in flight (no host wait), noting how long the
        main stream would have stalled for it."""
        if self._side_events is None:
            return
        main = torch.cuda.current_stream(self.device)
        main_ready, side_done = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        main_ready.record(main)
        side_done.record(self.fetch_stream)
        main.wait_event(side_done)  # the side pass joined its gather stream at its last layer
        if self._block:
            self._block["side_events"] = (*self._side_events, side_done, main_ready)
        self._side_events = None

    def plan(self, batch: ForwardBatch) -> None:
        end = int(batch.context_lens.max()) + batch.num_new
        if end > self.max_tokens:
            raise ValueError(f"forward reaches position {end}; the mode holds {self.max_tokens} tokens per sequence")
        self.batch = batch
        if self.dense is not None:
            self.dense.plan(batch)
        n, side = batch.num_rows, batch.phase is Phase.LOOKAHEAD
        if batch.phase is Phase.COMMIT or (batch.phase is Phase.DENOISE and batch.step == 0):
            self._join_lookahead()  # the commit rewrites the directory the lookahead diffs against
        buf = self._buffers.get((n, side))
        if buf is None:  # a side pass reads buffers of its own: the main stream refills its own meanwhile
            buf = self._buffers[(n, side)] = _RowBuffers(n, self.pages_per_seq, self.device)
        lens = batch.context_lens
        p = self.page_size
        if self._planned.need_upload((n, side), batch):  # a later step of the block: they hold this already
            upload_into(buf.rows, torch.tensor([self.row_of[s] for s in batch.seq_ids]))
            upload_into(buf.store_table, self.store.page_tables(batch.seq_ids, self.pages_per_seq))
            upload_into(buf.context_lens, lens)
            upload_into(buf.first_page, lens // p)
            upload_into(buf.last_page, (lens + batch.num_new - 1) // p)
        self._host_table = None
        self._buf = buf
        self._selecting = batch.phase is Phase.DENOISE and batch.step == 0
        if self._selecting:
            self._selected_rows = batch.seq_ids
            self._selection_id += 1
            fresh = plan_selection(lens, self.pages_per_seq, self.sparse, self.device, self.max_selected)
            if n not in self._selection_plans:  # fixed addresses per batch size (graphs read them)
                self._selection_plans[n] = fresh
            self._selection_plan = self._selection_plans[n].copy_(fresh)
            self._step0_tables: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * self.num_layers
            self._tables = self._block_tables.load(n, self._selection_id, lambda: self._step0_tables)
            # rows the lookahead prepared take its selection; the others (new rows) scan. Per row, so
            # a row's pages never depend on what it shares the batch with
            looked = self._next_rows or ()
            index = [looked.index(s) if s in looked else -1 for s in batch.seq_ids]
            self._use_next = any(i >= 0 for i in index)
            self._every_row = self._use_next and all(i >= 0 for i in index)
            self._looked_n = len(looked)
            if self._use_next:
                if n not in self._next_index:
                    self._next_index[n] = (torch.zeros(n, dtype=torch.int64, device=self.device),
                                           torch.zeros(n, 1, 1, dtype=torch.bool, device=self.device))
                rows_buf, has_buf = self._next_index[n]
                upload_into(rows_buf, torch.tensor([max(i, 0) for i in index]))
                upload_into(has_buf, torch.tensor([i >= 0 for i in index])[:, None, None])
                looked_n = len(looked)
                if looked_n not in self._next_backup:
                    self._next_backup[looked_n] = torch.empty_like(self._next_store[looked_n])
                self._next_backup[looked_n].copy_(self._next_store[looked_n])  # after the join above
                self._consumed = (looked, self._next_width, looked_n)
            else:
                self._consumed = None
            self._step0_key = (fresh.width, self._use_next, self._every_row,
                               self._looked_n if self._use_next else 0, self._next_width if self._use_next else 0)
            self._next_rows = None
            self._start_block_stats(batch)
        elif batch.phase is not Phase.PREFILL:
            missing = [s for s in batch.seq_ids if s not in self._selected_rows]
            if missing:
                raise RuntimeError(f"sequences {missing} reached step {batch.step} without a step-0 selection")
            # Later passes read their own buffers for this batch size (a captured graph reads the
            # same addresses whether its rows are all of the block's or a subset)
            full = self._block_tables.load(len(self._selected_rows), self._selection_id, list)
            tables = self._side_tables if side else self._pass_tables

            def rows_of_block() -> list[tuple[torch.Tensor, torch.Tensor]]:
                # only when these buffers do not hold the selection for these rows yet (once per block)
                if batch.seq_ids == self._selected_rows:
                    return full
                index = upload(torch.tensor([self._selected_rows.index(s) for s in batch.seq_ids]), self.device)
                return [(t[index], kl[index]) for t, kl in full]

            self._tables = tables.load(n, (self._selection_id, batch.seq_ids), rows_of_block)
            if side:
                self._plan_lookahead(batch)

    def _plan_lookahead(self, batch: ForwardBatch) -> None:
        """Buffers of the next block's selection (it starts B tokens later) for this pass's rows, and
        the side stream ordered after everything the main stream has queued (step 0 above all)."""
        n = batch.num_rows
        fresh = plan_selection(batch.context_lens + batch.num_new // 2, self.pages_per_seq, self.sparse, self.device,
                               self.max_selected)
        if n not in self._next_plans:
            self._next_plans[n] = fresh
            self._next_store[n] = torch.full((self.num_layers, n, self.num_kv_heads, self.max_selected), -1,
                                             dtype=torch.int32, device=self.device)
        self._next_plan = self._next_plans[n].copy_(fresh)
        self._next_width = fresh.width
        self._next_rows = batch.seq_ids
        if self.cuda:
            self.fetch_stream.wait_stream(torch.cuda.current_stream(self.device))
            start = torch.cuda.Event(enable_timing=True)
            start.record(self.fetch_stream)
            self._side_events = (start,)

    # ------------------------------------------------------------------------------------------
    # one layer

    def run(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        batch = self.batch
        assert batch is not None, "plan() must precede run()"
        if layer < self.dense_layers:  # resident on the GPU, exact (writes included)
            return self.dense.run(layer, q, k, v)
        if batch.phase is Phase.PREFILL:
            out = self._prefill(layer, q, k, v)
        else:
            if self._selecting:
                self._select_and_fetch(layer, q)
            elif batch.phase is Phase.LOOKAHEAD:
                self._prefetch_next(layer, q)
            slot_table, kv_len = self._tables[layer]
            if self.sparse.check_residency:
                self._check_resident(layer, slot_table, kv_len)
            pool_k, pool_v = self.cache.k_pool(layer), self.cache.v_pool(layer)
            if self.backend == "triton":
                out, _, _ = block_attention(q, k, v, pool_k, pool_v, slot_table, kv_len, scale=self.scale)
            else:
                out = table_attention_torch(q, k, v, pool_k, pool_v, slot_table, kv_len, self.scale)
        if batch.phase is Phase.COMMIT:
            self._commit_layer(layer, k, v)
        return out

    def _prefill(self, layer: int, q, k, v) -> torch.Tensor:
        """Chunk attention (its own mask) merged with the committed context read from host memory;
        then the chunk's K/V go to the host store and its keys to the compact copy."""
        batch = self.batch
        mask = batch.new_token_mask()
        if int(batch.context_lens.max()) == 0:  # the first chunk: nothing to merge with
            out = masked_attention(q, k, v, mask.to(q.device))
        else:
            chunk_out, chunk_lse = block_self_attention(q, k, v, scale=self.scale, mask=mask)
            ctx_out, ctx_lse = self._context_from_host(layer, q)
            out, _ = merge_attention_states(chunk_out, chunk_lse, ctx_out, ctx_lse)
        self._write_new(layer, k, v)
        return out.to(q.dtype)

    def _context_from_host(self, layer: int, q) -> tuple[torch.Tensor, torch.Tensor]:
        """(out, lse) of q over every committed context token, read from the host store."""
        buf = self._buf
        if self.cuda:
            # The kernel is compiled per query count (a constexpr), and a prompt's last chunk may have
            # any length: its queries are padded with zero rows to a power of two, so that prefills
            # share a few compiled kernels instead of adding one (and its memory) per prompt length.
            t = q.shape[2]
            rows = 1 << (t - 1).bit_length()
            padded = q if rows == t else torch.nn.functional.pad(q, (0, 0, 0, rows - t))
            out, lse, _, _ = paged_attention(padded, self.store.kernel_k(layer), self.store.kernel_v(layer),
                                             buf.store_table, buf.context_lens, scale=self.scale)
            return out[:, :, :t], lse[:, :, :t]
        n, hq, t, d = q.shape
        hkv = self.num_kv_heads
        pages = -(-int(self.batch.context_lens.max()) // self.page_size)
        table = buf.store_table[:, :pages].long()
        keys = self.store.k(layer)[table].permute(0, 2, 1, 3, 4).reshape(n, hkv, -1, d).float()
        vals = self.store.v(layer)[table].permute(0, 2, 1, 3, 4).reshape(n, hkv, -1, d).float()
        s = torch.matmul(q.float().view(n, hkv, -1, d), keys.transpose(-1, -2)) * self.scale
        valid = torch.arange(keys.shape[2])[None] < self.batch.context_lens[:, None]
        s = s.masked_fill(~valid[:, None, None], float("-inf"))
        lse = torch.logsumexp(s, dim=-1)
        out = torch.matmul(torch.softmax(s, dim=-1).nan_to_num(0.0), vals)
        return out.view(n, hq, t, d), lse.view(n, hq, t)

    def _store_write(self, layer: int, table: torch.Tensor, start: torch.Tensor, k, v, seq_ids, starts) -> None:
        """K/V [N, Hkv, T, D] of one layer into the host store (a UVA kernel on the current stream)."""
        if self.cuda:
            write_tokens(self.store.kernel_k(layer), self.store.kernel_v(layer), table, start,
                         k.contiguous(), v.contiguous(), validate=False)
        else:
            self.store.write(list(seq_ids), layer, list(starts), k, v)

    def _write_new(self, layer: int, k, v) -> None:
        """The pass's new tokens of one layer: host store and compact keys."""
        buf, batch = self._buf, self.batch
        self._store_write(layer, buf.store_table, buf.context_lens, k, v, batch.seq_ids,
                          [int(c) for c in batch.context_lens])
        if self.compact is not None:
            self.compact.write(layer, buf.store_table, buf.context_lens, _quantizable(k))

    def _commit_layer(self, layer: int, k, v) -> None:
        """Write the finished block's K/V of this layer; after the last layer, forget the cached
        copies of the pages the block wrote into (their host copy now holds more tokens)."""
        self._write_new(layer, k, v)
        if layer == self.num_layers - 1:
            buf = self._buf
            self.cache.invalidate(buf.rows, buf.first_page, buf.last_page)

    # ------------------------------------------------------------------------------------------
    # selection and fetch

    def _scores(self, layer: int, q_sel: torch.Tensor) -> torch.Tensor:
        """[N, Hkv, pages_per_seq] page scores of the planned rows from the configured source."""
        buf, lens, source = self._buf, self.batch.context_lens, self.sparse.source
        if source == "gpu-compact":
            return self.compact.page_scores(layer, q_sel, buf.store_table, buf.context_lens, self.scale)
        if self._host_table is None:  # the host-side copy of the pass's page table, once per pass
            self._host_table = self.store.page_tables(self.batch.seq_ids, self.pages_per_seq)
        host_table = self._host_table
        if self.cuda:  # the CPU reads the store itself: committed K/V must have landed
            torch.cuda.current_stream(self.device).synchronize()
        if source == "cpu":
            scores = host_page_scores(self.store.k(layer), host_table, lens, q_sel.cpu(), scale=self.scale)
            return scores.to(self.device, non_blocking=True)
        # split: the CPU scans the oldest pages while the GPU scans the rest, then the parts join
        cut = int(self.sparse.split_cpu_fraction * (int(lens.min()) // self.page_size))
        future = self.scanner.submit(self.store.k(layer), host_table[:, :max(cut, 1)],
                                     lens.clamp(max=cut * self.page_size), q_sel.cpu(), scale=self.scale)
        gpu_part = self.compact.page_scores(layer, q_sel, buf.store_table[:, cut:].contiguous(),
                                            (buf.context_lens - cut * self.page_size).clamp(min=0), self.scale)
        cpu_part = future.result()[:, :, :cut].to(self.device)
        return torch.cat([cpu_part, gpu_part], dim=-1)

    def _select_and_fetch(self, layer: int, q: torch.Tensor) -> None:
        """Step 0 of one layer: select, diff against the cache, gather the misses, keep the tables."""
        t0 = time.perf_counter()
        every_row = self._every_row
        scanned = None
        if not every_row or self.sparse.measure_draft_recall:
            q_sel = selection_queries(q, self.num_kv_heads, self.query)
            scanned = select_pages(self._scores(layer, q_sel), None, self.sparse, self._selection_plan)
        selection = scanned
        if self._use_next:  # chosen during the last block from its draft; its pages are (mostly) here
            selection = self._next_selection(layer, scanned)
            if self.sparse.measure_draft_recall and every_row:  # what selecting from the draft cost
                self._counters[3:] += torch.stack([_shared_pages(selection.entries, scanned.entries),
                                                   (scanned.entries >= 0).sum()])
        self._block["select_host_ms"] += (time.perf_counter() - t0) * 1e3
        buf = self._buf
        assignment = self.cache.assign(layer, buf.rows, selection.entries)
        physical = buf.store_table[assignment.miss_rows, assignment.miss_pages]
        pool_k, pool_v = self.cache.k_pool(layer), self.cache.v_pool(layer)
        if self.cuda:
            timed = not torch.cuda.is_current_stream_capturing()  # a graph replays without the host
            if timed:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            # Step 0 waits for these pages: every SM may fetch (the fetch_programs cap is for the
            # lookahead's gather, which shares the GPU with the block's steps).
            gather_pages(self.store.kernel_k(layer), self.store.kernel_v(layer), physical, assignment.miss_heads,
                         pool_k, pool_v, assignment.miss_slots, validate=False)
            if timed:
                end.record()
                self._block["events"].append((start, end))
        else:
            gather_pages_reference(self.store.k(layer), self.store.v(layer), physical, assignment.miss_heads,
                                   pool_k, pool_v, assignment.miss_slots)
        self._counters[:2] += torch.stack([selection.counts.sum(), (assignment.miss_slots >= 0).sum()])
        if self.sparse.check_residency:
            self._check_entries[layer] = selection.entries.cpu()
        table_buf, len_buf = self._tables[layer]
        width = selection.entries.shape[-1]
        table_buf[..., width:].fill_(-1)
        table_buf[..., :width].copy_(assignment.slot_table)
        len_buf.copy_(selection.kv_len)

    def _prefetch_next(self, layer: int, q: torch.Tensor) -> None:
        """LOOKAHEAD, one layer: select the next block's pages from the queries of its all-[MASK]
        half and fetch the misses into slots this block does not read (on CUDA this whole pass runs
        on the fetch stream, overlapping this block's remaining steps)."""
        b = self.batch.num_new // 2
        q_sel = selection_queries(q[:, :, b:], self.num_kv_heads, self.query)
        selection = select_pages(self._scores(layer, q_sel), None, self.sparse, self._next_plan)
        buf = self._buf
        current_slots, _ = self._tables[layer]
        assignment = self.cache.assign(layer, buf.rows, selection.entries, protect=current_slots)
        physical = buf.store_table[assignment.miss_rows, assignment.miss_pages]
        self._next_store[self.batch.num_rows][layer][..., :selection.entries.shape[-1]].copy_(selection.entries)
        self._counters[2] += (assignment.miss_slots >= 0).sum()
        pool_k, pool_v = self.cache.k_pool(layer), self.cache.v_pool(layer)
        if self.cuda:
            with self._on_gather_stream(layer, physical, assignment.miss_heads, assignment.miss_slots):
                gather_pages(self.store.kernel_k(layer), self.store.kernel_v(layer), physical, assignment.miss_heads,
                             pool_k, pool_v, assignment.miss_slots, validate=False, max_programs=self.fetch_programs)
        else:
            gather_pages_reference(self.store.k(layer), self.store.v(layer), physical, assignment.miss_heads,
                                   pool_k, pool_v, assignment.miss_slots)

    @contextlib.contextmanager
    def _on_gather_stream(self, layer: int, *inputs: torch.Tensor):
        """Runs a LOOKAHEAD layer's gather on the gather stream, if there is one. The gather writes
        slots this layer's selection just took, which nothing else in the pass reads, so it may run
        beside the next layers' selection. The last layer joins the side stream to it: a captured
        graph must end joined, and the commit orders itself after the side stream alone. inputs:
        tensors the side stream made that the gather reads, held until then (the allocator would
        hand their memory to the side stream's next layer)."""
        if self.gather_stream is None:
            yield
            return
        side = torch.cuda.current_stream(self.device)
        self.gather_stream.wait_stream(side)
        with torch.cuda.stream(self.gather_stream):
            yield
        self._gather_inputs.append(inputs)
        if layer == self.num_layers - 1:
            side.wait_stream(self.gather_stream)
            self._gather_inputs.clear()

    def _next_selection(self, layer: int, scanned: Selection | None) -> Selection:
        """The lookahead's selection of this layer for the rows it prepared (the scan's for the
        others), with lengths for the block's actual context (device work only: step 0 replays)."""
        prepared = self._next_store[self._looked_n][layer][..., :self._next_width]
        rows, has = self._next_index[self.batch.num_rows]
        entries = prepared.index_select(0, rows)  # [N, H, K] in this batch's row order
        if scanned is not None:  # rows without a lookahead keep the scan's pages
            width = max(entries.shape[-1], scanned.entries.shape[-1])
            pad = lambda e: torch.nn.functional.pad(e, (0, width - e.shape[-1]), value=-1)  # noqa: E731
            entries = torch.where(has, pad(entries), pad(scanned.entries))
        counts = (entries >= 0).sum(-1).to(torch.int32)
        last = self._selection_plan.last_tokens[:, None]
        kv_len = torch.where(counts > 0, (counts - 1) * self.page_size + last, 0).to(torch.int32)
        return Selection(entries, counts, kv_len, "page")

    def _check_resident(self, layer: int, slot_table: torch.Tensor, kv_len: torch.Tensor) -> None:
        """Assertion mode: every slot the attention will read lies in its row's and head's partition
        and holds the very page the block's selection named there, a committed page of the row."""
        held = self.cache.held[layer].cpu()
        lens, slots, counts = self.batch.context_lens, slot_table.cpu(), kv_len.cpu()
        entries = self._check_entries[layer]
        c, hkv = self.cache.capacity, self.num_kv_heads
        for i, seq_id in enumerate(self.batch.seq_ids):
            row, named = self.row_of[seq_id], entries[self._selected_rows.index(seq_id)]
            for h in range(hkv):
                for j in range(-(-int(counts[i, h]) // self.page_size)):
                    owner, local = divmod(int(slots[i, h, j]), c)
                    page = int(named[h, j])
                    if owner != row * hkv + h or int(held[row, h, local]) != page or not 0 <= page * self.page_size < int(lens[i]):
                        raise AssertionError(
                            f"layer {layer}: sequence {seq_id} head {h} would read slot {int(slots[i, h, j])} for page "
                            f"{page}, but that slot holds page {int(held[row, h, local])} of partition {owner}")

    # ------------------------------------------------------------------------------------------
    # per-block timeline

    @property
    def timeline(self) -> list[dict]:
        """One entry per block: rows, context tokens, host time of selection at step 0 (scans
        included for the cpu source), GPU time of the fetches, pages selected and fetched; with the
        lookahead, the GPU time of its side pass and how long the main stream stalled for it."""
        self._finish_block_stats()
        self._record_closed_blocks(wait=True)
        return self._timeline

    def _start_block_stats(self, batch: ForwardBatch) -> None:
        self._finish_block_stats()
        self._counters.zero_()
        self._block = dict(rows=batch.num_rows, context=int(batch.context_lens.sum()), select_host_ms=0.0,
                           events=[], replayed=self.replayable(batch))

    def _finish_block_stats(self) -> None:
        """Close the block: its counters go to the host behind its work, and its timeline entry is
        written once they are there. A block's step 0 closes the last block, and must not wait for it."""
        self._join_lookahead()
        block = self._block
        if not block:
            return
        self._block = {}
        if self.cuda:
            block["counters"] = torch.empty(self._counters.shape, dtype=self._counters.dtype, pin_memory=True)
            block["counters"].copy_(self._counters, non_blocking=True)
            block["copied"] = torch.cuda.Event()
            block["copied"].record()
        else:
            block["counters"] = self._counters.clone()
        self._closed_blocks.append(block)
        self._record_closed_blocks(wait=False)

    def _record_closed_blocks(self, wait: bool) -> None:
        """Timeline entries of the closed blocks whose counters have reached the host (all of them
        if `wait`), in block order."""
        while self._closed_blocks:
            block = self._closed_blocks[0]
            if "copied" in block and not block["copied"].query():
                if not wait:
                    return
                block["copied"].synchronize()  # the side pass and the fetches' events are done too
            self._closed_blocks.pop(0)
            selected, fetched, prefetched, shared, exact = block["counters"].tolist()
            lookahead_ms = stall_ms = None
            if "side_events" in block:  # start, end of the side pass; when the main stream reached it
                start, side_done, main_ready = block["side_events"]
                lookahead_ms = start.elapsed_time(side_done)
                stall_ms = max(0.0, main_ready.elapsed_time(side_done))
            unit_bytes = 2 * self.page_size * self.store.head_dim * self.store.dtype.itemsize
            self._timeline.append(dict(
                rows=block["rows"], context=block["context"], select_host_ms=block["select_host_ms"],
                # GPU time of the fetches, when step 0 ran eagerly (a replayed graph has no per-layer events)
                fetch_ms=None if block["replayed"] and not block["events"] else
                sum(s.elapsed_time(e) for s, e in block["events"]),
                pages_selected=selected, pages_fetched=fetched, bytes_fetched=fetched * unit_bytes,
                # fetched during this block for the next one, on the side stream (lookahead)
                pages_prefetched=prefetched, bytes_prefetched=prefetched * unit_bytes,
                # share of the pages this block's step-0 queries select that the last block's draft chose
                draft_recall=shared / exact if exact else None,
                # GPU time of the LOOKAHEAD side pass (compute, scan and gather), and of it the time the
                # main stream waited at the commit: the part of the prefetch not hidden
                lookahead_ms=lookahead_ms, lookahead_stall_ms=stall_ms,
            ))
