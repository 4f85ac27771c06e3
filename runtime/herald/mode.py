"""The `herald` mode: the full KV in pinned host memory, a GPU page budget, cooperative selection.

Per block (HERALD, arXiv 2606.21633; this is the synchronous path):
1. Step 0 (all [MASK]), per layer: the selection queries of each (row, KV head) score every context
   page (by default one query per block position, a token scoring the max over them: the block
   mean cancels the positions' RoPE phases and loses the retrieved keys), from the source
   `sources.PageScorer` reads; top-k pages plus sinks, the local window and the last page form the
   layer's selection.
2. `offload.PageFetcher` keeps the selected pages that are already resident on the GPU and gives
   the misses the slots of dropped pages; a zero-copy UVA kernel gathers only the misses from
   pinned memory before the layer's attention reads them.
3. Steps 1..S-1 and the commit pass attend to those pages plus the block's own K/V; on CUDA they
   are replayed from CUDA graphs (every index they read sits at a fixed address).
4. The commit pass writes the finished block's K/V into the host store (UVA write kernel) and its
   keys into the compact copy, and forgets the cached copies of the pages it wrote into.

With the lookahead (HERALD's overlap; on by default on CUDA): after step 0 of block b the loop runs
a LOOKAHEAD pass over [the draft of block b (step 0's argmax) ; block b+1 all [MASK]]. Its second
half's queries select block b+1's pages (`lookahead.NextSelections`), and the misses are fetched
into slots block b does not read (each partition holds two selections). On CUDA the whole
LOOKAHEAD pass (its compute, scan, diff and gather) runs on a side stream, replayed from a CUDA
graph of its own, beside block b's remaining steps on the main stream; block b's commit waits for
it (the commit rewrites the cache directory), and block b+1's step 0 starts from its selection,
fetching only the pages the commit rewrote. The draft is an approximation: in the LOOKAHEAD pass
the 2B tokens see each other bidirectionally on the kernel path.

fp8 K/V (`kv_dtype` float8_e4m3fn, `EngineConfig.kv_format`): the host store, the page pools and
the exact layers' cache hold e4m3 codes with per-(page, KV head) scales, so each fetched page moves
half the bytes; the compact keys are made from the model's keys before quantization, so selection
is the same as without it.

The first `dense_layers` layers stay exact: their KV (2/36 of an 8B model's) lives on the GPU in a
dense paged cache and never goes to the host store. `timeline.BlockTimeline` counts what each
block selected and moved.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from gpu_kernels.kv_fp8 import dequantize_units, is_fp8
from gpu_kernels.merge import block_self_attention, merge_attention_states
from gpu_kernels.paged_attention import block_attention, block_attention_reference, paged_attention
from offload.host_store import HostKVStore, TransferFault
from offload.page_fetcher import PageFetcher
from offload.streams import Streams, make_streams
from offload.uploads import upload, upload_into
from runtime.attention import (AttentionMode, DenseAttention, ForwardBatch, Phase, PlannedBuffers, ReplayTables,
                               RequestError, masked_attention)
from runtime.config import ModelConfig, SparseConfig
from runtime.herald.lookahead import NextSelections
from runtime.herald.sources import PageScorer
from runtime.herald.timeline import BlockTimeline
from runtime.memory import selected_pages_bound
from runtime.selection import (SelectionPlan, plan_selection, query_sets, select_pages, selection_queries,
                               table_attention_torch)


def _shared_pages(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many entries of b [N, H, K2] (sorted, -1 padded) also appear in a [N, H, K1]; a scalar."""
    wanted = torch.where(a >= 0, a, 2**31 - 1).to(torch.int32)
    at = torch.searchsorted(wanted, b.to(torch.int32).contiguous()).clamp(max=a.shape[-1] - 1)
    return ((wanted.gather(-1, at) == b) & (b >= 0)).sum()


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
                 streams: Streams | None = None, progress: bool = False, kv_dtype: torch.dtype | None = None,
                 forecast_weights: torch.Tensor | None = None):
        """sparse: resolved for the device (`SparseConfig.for_device`). streams (CUDA, with the
        lookahead or the forecast): where the LOOKAHEAD pass and the side gathers run
        (`offload.streams`; default: a new set by the same rule; an engine passes its own to every
        mode it makes). progress: a progress bar while the pinned host store is faulted in.
        kv_dtype: how K/V are stored (default: dtype; float8_e4m3fn: e4m3 pages with scales, with the
        gpu-compact source only). forecast_weights: [L, Hkv, D, D] on `device`, what
        sparse.forecast="learned" maps the queries with (runtime.checkpoint.load_forecast)."""
        if sparse.granularity != "page":
            raise ValueError("herald moves and selects whole pages; set granularity='page' (token level is mage's)")
        if sparse.source == "gpu-exact" and (sparse.lookahead_resolved() or sparse.forecast != "off"):
            raise ValueError("source='gpu-exact' selects from step 0's exact attention over the host store, which "
                             "a lookahead or forecast pass does not run: set lookahead=False and forecast='off', or "
                             "choose source gpu-compact")
        sparse.check_dense_layers(model.num_layers)
        self.sparse, self.device, self.backend = sparse, device, backend
        self.cuda = device.type == "cuda"
        self.wants_lookahead = sparse.lookahead_resolved()
        self.forecasting = sparse.forecast != "off"
        if (sparse.forecast == "learned") != (forecast_weights is not None):
            raise ValueError("forecast='learned' needs the checkpoint's forecast weights (and only it takes them): "
                             "build the mode through the Engine, which loads forecast.safetensors")
        self.forecast_weights = forecast_weights
        self.scale = model.head_dim ** -0.5
        self.query = sparse.selection_query("herald")
        self.num_layers, self.num_kv_heads = model.num_layers, model.num_kv_heads
        self.page_size = p = sparse.page_size
        self.dense_layers = sparse.dense_layers
        self.pages_per_seq = -(-max_tokens // p)
        self.max_tokens = self.pages_per_seq * p
        self.max_selected = selected_pages_bound(sparse, self.max_tokens)
        kv_dtype = dtype if kv_dtype is None else kv_dtype
        if is_fp8(kv_dtype) and sparse.source != "gpu-compact":
            raise ValueError(f"fp8 K/V select with source='gpu-compact' only (the numba scan of "
                             f"source={sparse.source!r} reads 16-bit host keys)")
        self.dtype = dtype  # the model's: what the passes give and the random contexts are drawn in
        self.store = HostKVStore(model.num_layers, model.num_kv_heads, model.head_dim, p,
                                 max_sequences * self.pages_per_seq, dtype=kv_dtype,
                                 pin_memory=self.cuda, reserve_bytes=reserve_host_bytes,
                                 huge_pages=sparse.host_huge_pages, progress=progress, scale_device=device)
        self.lookahead_stream = None
        if self.cuda and (self.wants_lookahead or self.forecasting):
            streams = streams if streams is not None else make_streams(device)
            self.lookahead_stream = streams.lookahead if self.wants_lookahead else None
        self.fetcher = self.scorer = self.dense = None
        try:
            if self.dense_layers:
                self.dense = DenseAttention(replace(model, num_layers=self.dense_layers), max_sequences, self.max_tokens, p,
                                            dtype, device, backend, kv_dtype=kv_dtype)
            # the lookahead fetches the next block's pages while this block's stay in use, the forecast
            # a layer's pages while the last block's stay in place for its exact selection: two sets
            capacity = self.max_selected * (2 if self.wants_lookahead or self.forecasting else 1)
            gather_stream = None
            if self.cuda and (self.forecasting or (self.wants_lookahead and sparse.lookahead_gather_stream)):
                gather_stream = streams.gather
            self.fetcher = PageFetcher(self.store, max_sequences, capacity, device, gather_stream=gather_stream,
                                       side_programs=sparse.lookahead_fetch_programs, move_pages=sparse.move_pages)
            self.scorer = PageScorer(self.store, sparse, self.scale, device)
        except BaseException:
            self.close()
            raise
        self._free_rows = list(range(max_sequences - 1, -1, -1))
        self.row_of: dict[int, int] = {}
        self.batch: ForwardBatch | None = None
        self._buffers: dict[tuple[int, bool], _RowBuffers] = {}  # (rows, side pass) -> buffers
        self._planned = PlannedBuffers()  # which pass each of them was last filled for
        # the block's selection per layer, for the rows that started it: (slot table, kv_len); the
        # passes after step 0 read copies for their own rows
        self._block_tables = ReplayTables(model.num_layers, model.num_kv_heads, self.max_selected, device)
        self._pass_tables = ReplayTables(model.num_layers, model.num_kv_heads, self.max_selected, device)
        self._side_tables = ReplayTables(model.num_layers, model.num_kv_heads, self.max_selected, device)
        self._tables: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._selected_rows: tuple[int, ...] = ()
        self._selection_id = 0
        self._selection_plans: dict[int, SelectionPlan] = {}
        self._check_entries: dict[int, torch.Tensor] = {}  # assertion mode: each layer's selection
        self._step0_key: tuple = ()
        self.next_selections = NextSelections(model.num_layers, model.num_kv_heads, self.max_selected,
                                              self.pages_per_seq, sparse, device)
        unit_bytes = 2 * p * model.head_dim * kv_dtype.itemsize  # K and V of one (page, head): what a miss moves
        self.stats = BlockTimeline(unit_bytes, model.num_layers, device)
        self._forecasts: dict[int, torch.Tensor] = {}  # layer -> the pages the layer before forecast for it
        self._side_start: torch.cuda.Event | None = None  # the lookahead in flight: when it started

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
        self.fetcher.directory.reset_rows(torch.tensor([row], device=self.device))

    def remove_sequence(self, seq_id: int) -> None:
        if self.cuda:  # queued kernels may still read its host pages or its slots
            torch.cuda.current_stream(self.device).synchronize()
            for stream in self._side_streams():
                stream.synchronize()
        self.store.free(seq_id)
        if self.dense is not None:
            self.dense.remove_sequence(seq_id)
        row = self.row_of.pop(seq_id)
        self.fetcher.directory.reset_rows(torch.tensor([row], device=self.device))
        self._free_rows.append(row)
        self._planned.forget()

    def restart_block(self, seq_ids: tuple[int, ...]) -> None:
        """The rerun of an aborted block starts from empty partitions: the failed pass may have
        given slots to pages whose gather never ran (the cost: one refetch of the rows' selections).
        The lookahead's selections are put back as the aborted block found them
        (`NextSelections.restart`), so the rerun's tokens are a fault-free run's. On CUDA the main
        stream first waits for the side streams, whose work in flight writes those slots."""
        for stream in self._side_streams():
            torch.cuda.current_stream(self.device).wait_stream(stream)
        self.fetcher.abandon_side_fetches()
        rows = [self.row_of[s] for s in seq_ids if s in self.row_of]
        if rows:
            self.fetcher.directory.reset_rows(torch.tensor(rows, device=self.device))
        self.next_selections.restart()

    def occupancy(self) -> dict[str, int]:
        counts = dict(sequences=len(self.row_of), rows_taken=self.fetcher.directory.max_rows - len(self._free_rows),
                      host_pages_used=self.store.used_pages, host_sequences=len(self.store.sequences),
                      partition_pages_held=self.fetcher.directory.pages_held())
        if self.dense is not None:
            counts.update({f"dense_{name}": count for name, count in self.dense.occupancy().items()})
        return counts

    def load_random_context(self, seq_id: int, num_tokens: int, seed: int = 0) -> None:
        if num_tokens > self.store.num_tokens(seq_id):
            raise ValueError(f"{num_tokens} tokens exceed the {self.store.num_tokens(seq_id)} reserved for {seq_id}")
        gen = torch.Generator(self.device).manual_seed(seed)
        shape = (1, self.num_kv_heads, num_tokens, self.store.head_dim)
        table = upload(self.store.page_tables([seq_id]), self.device)
        start = torch.zeros(1, dtype=torch.int32, device=self.device)
        if self.dense is not None:
            self.dense.load_random_context(seq_id, num_tokens, seed)
        for layer in range(self.dense_layers, self.num_layers):
            k = torch.randn(shape, generator=gen, device=self.device, dtype=self.dtype)
            v = torch.randn(shape, generator=gen, device=self.device, dtype=self.dtype)
            self._write(layer, table, start, k, v)
        if self.cuda:
            torch.cuda.synchronize(self.device)

    @property
    def timeline(self) -> list[dict]:
        """One entry per block (`BlockTimeline.entries`)."""
        self._join_lookahead()
        return self.stats.entries()

    def close(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        for part in (self.scorer, self.fetcher, self.dense):
            if part is not None:
                part.close()
        if hasattr(self, "stats"):  # close may run from __init__, before the rest exists
            self.stats.close()
            self._buffers.clear()
            self._planned.forget()
            for held in (self._block_tables, self._pass_tables, self._side_tables, self._selection_plans,
                         self.next_selections):
                held.clear()
        self.store.close()

    # ------------------------------------------------------------------------------------------
    # planning

    def replayable(self, batch: ForwardBatch) -> bool:
        """Every pass but prefill: the indices they read were loaded by plan (or by step 0) into
        fixed buffers. Step 0 and the LOOKAHEAD too when selection stays on the GPU (the
        gpu-compact source). None while a fault hook is set on the store (tests)."""
        selecting = (batch.phase is Phase.DENOISE and batch.step == 0) or batch.phase is Phase.LOOKAHEAD
        return (self.cuda and self.backend == "triton" and batch.phase is not Phase.PREFILL
                and (not selecting or self.sparse.source == "gpu-compact")
                and not self.sparse.check_residency
                and self.store.fault_hook is None)  # the test hook runs on the host, every pass

    def graph_key(self, batch: ForwardBatch) -> object:
        """What a captured step 0 or LOOKAHEAD bakes in: top-k widths and where selections come from."""
        if batch.phase is Phase.LOOKAHEAD:
            return self.next_selections.width_for(batch.num_rows)
        if batch.phase is Phase.DENOISE and batch.step == 0:
            return self._step0_key
        return None

    def pass_stream(self, batch: ForwardBatch) -> torch.cuda.Stream | None:
        """The LOOKAHEAD runs on the lookahead stream, beside the block's remaining steps."""
        return self.lookahead_stream if batch.phase is Phase.LOOKAHEAD else None

    def _side_streams(self) -> list[torch.cuda.Stream]:
        streams = [] if self.lookahead_stream is None else [self.lookahead_stream]
        return streams + self.fetcher.side_streams()

    def _join_lookahead(self) -> None:
        """Order the main stream after the lookahead in flight (no host wait), noting how long the
        main stream would have stalled for it."""
        if self._side_start is None:
            return
        main = torch.cuda.current_stream(self.device)
        main_ready, side_done = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        main_ready.record(main)
        side_done.record(self.lookahead_stream)
        main.wait_event(side_done)  # the side pass joined its gather stream at its last layer
        self.stats.lookahead_joined(self._side_start, side_done, main_ready)
        self._side_start = None

    def plan(self, batch: ForwardBatch) -> None:
        end = int(batch.context_lens.max()) + batch.num_new
        if end > self.max_tokens:
            raise ValueError(f"forward reaches position {end}; the mode holds {self.max_tokens} tokens per sequence")
        self.batch = batch
        if self.dense is not None:
            self.dense.plan(batch)
        n, side = batch.num_rows, batch.phase is Phase.LOOKAHEAD
        self._selecting = batch.phase is Phase.DENOISE and batch.step == 0
        if batch.phase is Phase.COMMIT or self._selecting:
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
        self._buf = buf
        self.scorer.begin_pass(batch, buf.store_table, buf.context_lens)
        if self._selecting:
            self._plan_step0(batch)
        elif batch.phase is not Phase.PREFILL:
            self._plan_later_pass(batch, side)

    def _plan_step0(self, batch: ForwardBatch) -> None:
        """A block's selection: fixed-address plans and tables for this batch size; the rows the
        last lookahead prepared take its selection, the others (new rows) scan."""
        n = batch.num_rows
        self._selected_rows = batch.seq_ids
        self._selection_id += 1
        fresh = plan_selection(batch.context_lens, self.pages_per_seq, self.sparse, self.device, self.max_selected)
        if n not in self._selection_plans:
            self._selection_plans[n] = fresh
        self._selection_plan = self._selection_plans[n].copy_(fresh)
        self._tables = self._block_tables.load(n, self._selection_id, lambda: [None] * self.num_layers)
        self._use_next, self._every_row = self.next_selections.take(batch)
        self._forecasts.clear()  # an aborted block's, if any
        self._step0_key = (fresh.width, *self.next_selections.key)
        self.stats.start_block(n, int(batch.context_lens.sum()), self.replayable(batch))

    def _plan_later_pass(self, batch: ForwardBatch, side: bool) -> None:
        """Later passes read their own buffers for this batch size (a captured graph reads the
        same addresses whether its rows are all of the block's or a subset)."""
        missing = [s for s in batch.seq_ids if s not in self._selected_rows]
        if missing:
            raise RuntimeError(f"sequences {missing} reached step {batch.step} without a step-0 selection")
        full = self._block_tables.load(len(self._selected_rows), self._selection_id, list)

        def rows_of_block() -> list[tuple[torch.Tensor, torch.Tensor]]:
            # only when these buffers do not hold the selection for these rows yet (once per block)
            if batch.seq_ids == self._selected_rows:
                return full
            index = upload(torch.tensor([self._selected_rows.index(s) for s in batch.seq_ids]), self.device)
            return [(t[index], kl[index]) for t, kl in full]

        tables = self._side_tables if side else self._pass_tables
        self._tables = tables.load(batch.num_rows, (self._selection_id, batch.seq_ids), rows_of_block)
        if side:  # the next block's selection; the side stream ordered after the main stream's work
            self._next_plan = self.next_selections.plan_next(batch)
            if self.cuda:
                self.lookahead_stream.wait_stream(torch.cuda.current_stream(self.device))
                self._side_start = torch.cuda.Event(enable_timing=True)
                self._side_start.record(self.lookahead_stream)

    # ------------------------------------------------------------------------------------------
    # one layer

    def run(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        batch = self.batch
        assert batch is not None, "plan() must precede run()"
        if layer < self.dense_layers:  # resident on the GPU, exact (writes included)
            return self.dense.run(layer, q, k, v)
        try:
            return self._run_offloaded(layer, q, k, v)
        except TransferFault as fault:
            # only the sequences whose pages the transfer carried fail; the pass's other rows run
            # their block again from empty partitions (restart_block), so no slot the failed gather
            # was given is ever read as if it held its page
            owners = [s for s in self.store.owners(fault.pages) if s in batch.seq_ids]
            pages = sorted(fault.pages)
            raise RequestError(owners or batch.seq_ids, f"a transfer failed at layer {layer} for host pages "
                                                         f"{pages[:8]}{' ...' if len(pages) > 8 else ''}: {fault}") from fault

    def _run_offloaded(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        batch = self.batch
        if batch.phase is Phase.PREFILL:
            out = self._prefill(layer, q, k, v)
        elif self._selecting and self.sparse.source == "gpu-exact":
            out = self._exact_step0(layer, q, k, v)
        else:
            if self._selecting:
                self._select_and_fetch(layer, q)
            elif batch.phase is Phase.LOOKAHEAD:
                self._prefetch_next(layer, q)
            slot_table, kv_len = self._tables[layer]
            if self.sparse.check_residency:
                self._check_resident(layer, slot_table, kv_len)
            fetcher = self.fetcher
            pools = (fetcher.k_pool(layer), fetcher.v_pool(layer))
            scales = dict(k_scale=fetcher.k_scale_pool(layer), v_scale=fetcher.v_scale_pool(layer))
            if self.backend == "triton":
                out, _, _ = block_attention(q, k, v, *pools, slot_table, kv_len, scale=self.scale, **scales)
            else:
                out = table_attention_torch(q, k, v, *pools, slot_table, kv_len, self.scale, **scales)
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
        self._write(layer, self._buf.store_table, self._buf.context_lens, k, v)
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
                                             buf.store_table, buf.context_lens, scale=self.scale,
                                             k_scale=self.store.k_scale(layer), v_scale=self.store.v_scale(layer))
            return out[:, :, :t], lse[:, :, :t]
        n, hq, t, d = q.shape
        hkv = self.num_kv_heads
        pages = -(-int(self.batch.context_lens.max()) // self.page_size)
        table = buf.store_table[:, :pages].long()
        keys, vals = (self._host_pages(pages_of, scales, table).permute(0, 2, 1, 3, 4).reshape(n, hkv, -1, d)
                      for pages_of, scales in ((self.store.k(layer), self.store.k_scale(layer)),
                                               (self.store.v(layer), self.store.v_scale(layer))))
        s = torch.matmul(q.float().view(n, hkv, -1, d), keys.transpose(-1, -2)) * self.scale
        valid = torch.arange(keys.shape[2])[None] < self.batch.context_lens[:, None]
        s = s.masked_fill(~valid[:, None, None], float("-inf"))
        lse = torch.logsumexp(s, dim=-1)
        out = torch.matmul(torch.softmax(s, dim=-1).nan_to_num(0.0), vals)
        return out.view(n, hq, t, d), lse.view(n, hq, t)

    def _exact_step0(self, layer: int, q, k, v) -> torch.Tensor:
        """The design's literal step 0 (source 'gpu-exact'): exact attention over the whole context,
        read from the host store (zero-copy over PCIe on CUDA) and the block's own K/V, whose page
        scores (of the block-mean query, in the same kernel pass) select what the later steps read."""
        buf = self._buf
        if self.cuda:
            out, _, page_scores, _ = paged_attention(q, self.store.kernel_k(layer), self.store.kernel_v(layer),
                                                     buf.store_table, buf.context_lens, scale=self.scale,
                                                     return_page_scores=True, k_block=k, v_block=v)
        else:  # plain torch: one softmax over [the context's keys, the block's]
            out, page_scores, _ = block_attention_reference(q, k, v, self.store.k(layer), self.store.v(layer),
                                                            buf.store_table, buf.context_lens, scale=self.scale,
                                                            return_page_scores=True)
        self._select_and_fetch(layer, q, page_scores)
        return out.to(q.dtype)

    @staticmethod
    def _host_pages(pages: torch.Tensor, scales: torch.Tensor | None, table: torch.Tensor) -> torch.Tensor:
        """The store's pages [num_pages, Hkv, P, D] at table [N, K] as fp32 [N, K, Hkv, P, D]
        (fp8 ones dequantized with their scales [num_pages, Hkv])."""
        if scales is None:
            return pages[table].float()
        return dequantize_units(pages[table], scales[table])

    def _write(self, layer: int, table: torch.Tensor, start: torch.Tensor, k, v) -> None:
        """New K/V [N, Hkv, T, D] of one layer: host store and compact keys."""
        self.store.write(layer, table, start, k.contiguous(), v.contiguous())
        self.scorer.write(layer, table, start, k)

    def _commit_layer(self, layer: int, k, v) -> None:
        """Write the finished block's K/V of this layer; after the last layer, forget the cached
        copies of the pages the block wrote into (their host copy now holds more tokens)."""
        buf = self._buf
        self._write(layer, buf.store_table, buf.context_lens, k, v)
        if layer == self.num_layers - 1:
            self.fetcher.directory.invalidate(buf.rows, buf.first_page, buf.last_page)

    # ------------------------------------------------------------------------------------------
    # selection and fetch

    def _select_and_fetch(self, layer: int, q: torch.Tensor, exact_scores: torch.Tensor | None = None) -> None:
        """Step 0 of one layer: select, fetch the misses, keep the tables for the block's passes.
        exact_scores: [N, Hkv, pages] from step 0's exact attention (source 'gpu-exact'), else the
        scorer's source scores the selection queries."""
        self.stats.selecting()
        scanned = None
        if exact_scores is not None:
            scanned = select_pages(exact_scores, None, self.sparse, self._selection_plan)
        elif not self._every_row or self.sparse.measure_draft_recall:
            q_sel = selection_queries(q, self.num_kv_heads, self.query)
            scanned = select_pages(self.scorer.scores(layer, q_sel), None, self.sparse, self._selection_plan)
        selection = scanned
        if self._use_next:  # chosen during the last block from its draft; its pages are (mostly) here
            selection = self.next_selections.selection(layer, self.batch.num_rows, scanned, self._selection_plan,
                                                       self.page_size)
            if self.sparse.measure_draft_recall and self._every_row:  # what selecting from the draft cost
                self.stats.count_draft_recall(_shared_pages(selection.entries, scanned.entries),
                                              (scanned.entries >= 0).sum())
        self.stats.selected()
        buf = self._buf
        forecast = self._forecasts.pop(layer, None)
        if forecast is not None:  # its gather (beside the last layer's attention) lands before these slots are read
            self.fetcher.join_side_fetches()
            self.stats.count_forecast(layer, _shared_pages(forecast, selection.entries), (selection.entries >= 0).sum())
        # step 0 waits for these pages: every SM may fetch (the side-program cap is the lookahead's)
        slot_table, fetched = self.fetcher.fetch(layer, buf.rows, buf.store_table, selection.entries,
                                                 timed=self.stats.fetch_events)
        self.stats.count_fetch(selection.counts.sum(), fetched)
        if self.sparse.check_residency:
            self._check_entries[layer] = selection.entries.cpu()
        table_buf, len_buf = self._tables[layer]
        if self.forecasting and not self._use_next and layer + 1 < self.num_layers:
            self._forecast_next_layer(layer + 1, q_sel)
        width = selection.entries.shape[-1]
        table_buf[..., width:].fill_(-1)
        table_buf[..., :width].copy_(slot_table)
        len_buf.copy_(selection.kv_len)

    def _forecast_next_layer(self, layer: int, q_sel: torch.Tensor) -> None:
        """SparDA's training-free forecast, at step 0 of layer - 1: that layer's selection queries
        scored against `layer`'s keys select the pages `layer` will probably need, and their misses
        are gathered on the gather stream while layer - 1 attends. Its slot table still names the
        last block's pages there (this block's is written after the forecast), and they are kept
        too, since `layer`'s exact selection will mostly be them again."""
        if self.forecast_weights is not None:  # learned: layer - 1's queries mapped to this layer's
            q_sel = torch.einsum("nhrd,hde->nhre", query_sets(q_sel), self.forecast_weights[layer])
        forecast = select_pages(self.scorer.scores(layer, q_sel), None, self.sparse, self._selection_plan)
        last_block_slots, _ = self._tables[layer]
        _, fetched = self.fetcher.fetch(layer, self._buf.rows, self._buf.store_table, forecast.entries,
                                        protect=last_block_slots, side=True)
        self.stats.count_forecast_fetch(fetched)
        self._forecasts[layer] = forecast.entries

    def _prefetch_next(self, layer: int, q: torch.Tensor) -> None:
        """LOOKAHEAD, one layer: select the next block's pages from the queries of its all-[MASK]
        half and fetch the misses into slots this block does not read (on CUDA this whole pass runs
        on the lookahead stream, overlapping this block's remaining steps)."""
        b = self.batch.num_new // 2
        q_sel = selection_queries(q[:, :, b:], self.num_kv_heads, self.query)
        selection = select_pages(self.scorer.scores(layer, q_sel), None, self.sparse, self._next_plan)
        self.next_selections.record(layer, self.batch.num_rows, selection.entries)
        current_slots, _ = self._tables[layer]
        buf = self._buf
        _, fetched = self.fetcher.fetch(layer, buf.rows, buf.store_table, selection.entries, protect=current_slots,
                                        side=True)
        self.stats.count_prefetch(fetched)

    def _check_resident(self, layer: int, slot_table: torch.Tensor, kv_len: torch.Tensor) -> None:
        """Assertion mode: every slot the attention will read lies in its row's and head's partition
        and holds the very page the block's selection named there, a committed page of the row."""
        held = self.fetcher.directory.held[layer].cpu()
        lens, slots, counts = self.batch.context_lens, slot_table.cpu(), kv_len.cpu()
        entries = self._check_entries[layer]
        c, hkv = self.fetcher.capacity, self.num_kv_heads
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
