"""Sparse modes over a GPU-resident KV cache: `mage` and `quest`.

Both keep the whole KV on the GPU in DenseAttention's paged store and differ in how they choose
the context a block attends to:
- mage (MAGE): the all-[MASK] step 0 runs exact attention and its pass scores every context page
  (or token) with the block-mean query; the top-k is reused by every later step and the commit
  pass of the block. Token granularity packs the selected tokens' K/V into pages once per block.
- quest (Quest, the autoregressive-style baseline): per-page min/max key summaries, and a new
  selection at every step from the query-aware upper bound sum_d max(q_d min_d, q_d max_d).
The first `dense_layers` layers stay exact in both (as both papers keep two).
"""
from __future__ import annotations

import torch

from gpu_kernels.paged_attention import block_attention
from runtime.attention import DenseAttention, ForwardBatch, Phase, ReplayTables
from runtime.config import ModelConfig, SparseConfig
from runtime.memory import selected_pages_bound
from runtime.selection import (Selection, SelectionPlan, gather_token_scores, page_scores_from_tokens,
                               plan_selection, select_pages, select_tokens, selection_queries,
                               table_attention_torch)
from offload.uploads import upload, upload_into


class ResidentSparseAttention(DenseAttention):
    """DenseAttention's GPU store, with sparse layers reading a per-(row, KV head) selection."""

    def __init__(self, model: ModelConfig, max_sequences: int, max_tokens: int, dtype: torch.dtype,
                 device: torch.device, backend: str, sparse: SparseConfig):
        super().__init__(model, max_sequences, max_tokens, sparse.page_size, dtype, device, backend)
        self.sparse = sparse
        self.num_kv_heads = model.num_kv_heads
        self.num_layers = model.num_layers
        sparse.check_dense_layers(model.num_layers)
        self.dense_layers = sparse.dense_layers
        self._slot_bases: dict[int, torch.Tensor] = {}  # rows -> [N, 1, 1] first store page of each row

    def plan(self, batch: ForwardBatch) -> None:
        super().plan(batch)
        n = batch.num_rows
        if n not in self._slot_bases:  # fixed address per batch size: read inside CUDA graphs
            self._slot_bases[n] = torch.empty(n, 1, 1, dtype=torch.int32, device=self.k_cache[0].device)
        self._slot_base = self._slot_bases[n]
        if self._planned.need_upload(("slot_base", n), batch):
            upload_into(self._slot_base, (self._slots * self.pages_per_seq).view(n, 1, 1))

    def _physical(self, selection: Selection) -> torch.Tensor:
        """Store page table [N, Hkv, K] int32 of a page selection over the planned rows."""
        entries = selection.entries
        return torch.where(entries >= 0, entries + self._slot_base, entries)

    def _check_resident(self, table: torch.Tensor, kv_len: torch.Tensor) -> None:
        """Every listed page lies inside its row's committed context and its own slot's pages."""
        lens = self.batch.context_lens.to(kv_len.device)
        if bool((kv_len.long() > lens[:, None]).any()):
            raise AssertionError(f"a selection lists {kv_len.max().item()} tokens, beyond the committed context")
        base = (self._slots * self.pages_per_seq).to(table.device)[:, None, None]
        logical = table.long() - base
        used = torch.arange(table.shape[-1], device=table.device)[None, None] * self.page_size < kv_len[..., None]
        end = (lens + self.page_size - 1) // self.page_size
        if bool((used & ((logical < 0) | (logical >= end[:, None, None]))).any()):
            raise AssertionError("attention would read a page outside its row's committed context")

    def _sparse_attention(self, layer: int, q, k, v, table: torch.Tensor, kv_len: torch.Tensor,
                          k_pages: torch.Tensor | None = None, v_pages: torch.Tensor | None = None):
        if self.batch.phase.writes_kv:  # written past kv_len: never read by this pass
            self._write(layer, k, v)
        k_pages = self.k_cache[layer] if k_pages is None else k_pages
        v_pages = self.v_cache[layer] if v_pages is None else v_pages
        if self.backend == "triton":
            out, _, _ = block_attention(q, k, v, k_pages, v_pages, table, kv_len, scale=self.scale)
            return out
        return table_attention_torch(q, k, v, k_pages, v_pages, table, kv_len, self.scale)


class MageAttention(ResidentSparseAttention):
    """Exact step 0 whose top-k serves the rest of the block (see the module docstring).

    Page granularity: step 0 writes each layer's selection (store page table, kv_len) into fixed
    buffers for the rows that started the block, and later passes read copies for their own rows,
    so every pass can be replayed from a CUDA graph. Token granularity packs the selected tokens'
    K/V into fresh pages at step 0 (eager).
    """

    name = "mage"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_selected = width = selected_pages_bound(self.sparse, self.max_tokens)
        dev = self.k_cache[0].device
        self._block_tables = ReplayTables(self.num_layers, self.num_kv_heads, width, dev)
        self._pass_tables = ReplayTables(self.num_layers, self.num_kv_heads, width, dev)
        self._selection_plans: dict[int, SelectionPlan] = {}
        self._token_selection: list[tuple[Selection, torch.Tensor, torch.Tensor] | None] = [None] * self.num_layers
        self._selected_rows: tuple[int, ...] = ()
        self._row_index: torch.Tensor | None = None  # later passes: their rows among the block's [n] int64
        self._row_index_of: tuple = ()  # (selection id, seq_ids) `_row_index` was made for
        self._selection_id = 0  # bumped at every step 0

    def replayable(self, batch: ForwardBatch) -> bool:
        return super().replayable(batch) and self.sparse.granularity == "page" and not self.sparse.check_residency

    def graph_key(self, batch: ForwardBatch) -> object:
        return self._selection_plan.width if self._selecting else None  # the top-k width is baked in

    def plan(self, batch: ForwardBatch) -> None:
        super().plan(batch)
        self._selecting = batch.phase is Phase.DENOISE and batch.step == 0
        if batch.phase is Phase.PREFILL:
            return
        n, dev = batch.num_rows, self.k_cache[0].device
        if self._selecting:
            self._selected_rows = batch.seq_ids
            self._selection_id += 1
            self._row_index, self._row_index_of = None, ()
            fresh = plan_selection(batch.context_lens, self.pages_per_seq, self.sparse, dev, self.max_selected)
            if n not in self._selection_plans:  # fixed addresses per batch size
                self._selection_plans[n] = fresh
            self._selection_plan = self._selection_plans[n].copy_(fresh)
            self._tables = self._block_tables.load(n, self._selection_id, lambda: [None] * self.num_layers)
            return
        missing = [s for s in batch.seq_ids if s not in self._selected_rows]
        if missing:
            raise RuntimeError(f"sequences {missing} reached step {batch.step} of a block without a step-0 selection")
        if self._row_index_of != (self._selection_id, batch.seq_ids):  # an upload: once per block and row set
            index = [self._selected_rows.index(s) for s in batch.seq_ids]
            self._row_index = upload(torch.tensor(index), dev)
            self._row_index_of = (self._selection_id, batch.seq_ids)
        block = self._block_tables.load(len(self._selected_rows), self._selection_id, list)
        self._tables = self._pass_tables.load(n, (self._selection_id, batch.seq_ids),
                                              lambda: [(t[self._row_index], kl[self._row_index]) for t, kl in block])

    def close(self) -> None:
        self._block_tables.clear()
        self._pass_tables.clear()
        self._selection_plans.clear()
        super().close()

    def run(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        batch = self.batch
        if batch.phase is Phase.PREFILL or layer < self.dense_layers:
            return super().run(layer, q, k, v)
        if self._selecting:
            return self._exact_and_select(layer, q, k, v)
        if self.sparse.granularity == "token":
            selection, k_pool, v_pool = self._token_selection[layer]
            selection = selection.rows(self._row_index)  # packed slot ids: rows index the packed pool
            return self._sparse_attention(layer, q, k, v, selection.entries, selection.kv_len, k_pool, v_pool)
        table, kv_len = self._tables[layer]
        if self.sparse.check_residency:
            self._check_resident(table, kv_len)
        return self._sparse_attention(layer, q, k, v, table, kv_len)

    def _exact_and_select(self, layer: int, q, k, v) -> torch.Tensor:
        """Step 0: exact attention, and the selection its scores give."""
        sparse = self.sparse
        tokens = sparse.granularity == "token"
        lens = self.batch.context_lens
        query = sparse.selection_query("mage")
        if self.backend == "triton" and query == "mean":  # the kernel scores in the same pass
            out, pscores, tscores = block_attention(
                q, k, v, self.k_cache[layer], self.v_cache[layer], self._page_table, self._kv_len,
                scale=self.scale, return_page_scores=not tokens, return_token_scores=tokens)
        else:
            out = super().run(layer, q, k, v)
            q_sel = selection_queries(q, self.num_kv_heads, query)
            table = self.store_table(self.pages_per_seq)
            tscores = gather_token_scores(q_sel, self.k_cache[layer], table, lens, self.scale)
            pscores = None if tokens else page_scores_from_tokens(tscores, self.page_size)
        if tokens:
            selection = select_tokens(tscores, lens, sparse)
            packed, selection = self._pack(layer, selection)
            self._token_selection[layer] = (selection, *packed)
            return out
        selection = select_pages(pscores[..., :self.pages_per_seq], None, sparse, self._selection_plan)
        table_buf, len_buf = self._tables[layer]
        width = selection.entries.shape[-1]
        table_buf[..., width:].fill_(-1)
        table_buf[..., :width].copy_(self._physical(selection))
        len_buf.copy_(selection.kv_len)
        return out

    def _pack(self, layer: int, selection: Selection) -> tuple[tuple[torch.Tensor, torch.Tensor], Selection]:
        """Copy the selected tokens' K/V into pages of their own; the selection then lists those pages."""
        pos = selection.entries.long()  # [N, Hkv, K] (-1 padded)
        n, h, k = pos.shape
        p = self.page_size
        kp = -(-k // p)
        page = self._slots.to(pos.device)[:, None, None] * self.pages_per_seq + pos.clamp(min=0) // p
        head = torch.arange(h, device=pos.device)[None, :, None].expand_as(pos)
        offset = pos.clamp(min=0) % p

        def pack(cache: torch.Tensor) -> torch.Tensor:
            rows = cache[page, head, offset]  # [N, Hkv, K, D]
            padded = rows.new_zeros(n, h, kp * p, rows.shape[-1])
            padded[:, :, :k] = rows
            return padded.view(n * h * kp, p, rows.shape[-1])

        pool = (pack(self.k_cache[layer]), pack(self.v_cache[layer]))
        table = torch.arange(n * h * kp, device=pos.device, dtype=torch.int32).view(n, h, kp)
        return pool, Selection(table, selection.counts, selection.kv_len, "token")


class QuestAttention(ResidentSparseAttention):
    """A new selection at every pass from per-page min/max key bounds (see the module docstring)."""

    name = "quest"

    def __init__(self, model: ModelConfig, max_sequences: int, max_tokens: int, dtype: torch.dtype,
                 device: torch.device, backend: str, sparse: SparseConfig):
        if sparse.granularity != "page":
            raise ValueError("quest selects pages from page summaries; set granularity='page'")
        super().__init__(model, max_sequences, max_tokens, dtype, device, backend, sparse)
        shape = (self.k_cache[0].shape[0], model.num_kv_heads, model.head_dim)
        # fp32 summaries: bf16 min/max would round the bound below some keys' true scores
        self.key_min = [torch.zeros(shape, dtype=torch.float32, device=device) for _ in range(model.num_layers)]
        self.key_max = [torch.zeros(shape, dtype=torch.float32, device=device) for _ in range(model.num_layers)]
        self._plans: dict[int, tuple[SelectionPlan, torch.Tensor]] = {}  # rows -> (plan, store table)

    def _summarise(self, layer: int, slots: torch.Tensor, first: torch.Tensor, last: torch.Tensor,
                   end: torch.Tensor) -> None:
        """Recompute min/max of logical pages first..last (inclusive, [N] each) of the rows in KV slots
        `slots` [N], over their tokens below `end` [N] (the unwritten tail of a page is left out)."""
        p = self.page_size
        span = int((last - first).max()) + 1
        logical = torch.minimum(first[:, None] + torch.arange(span)[None], last[:, None])  # [N, span]
        physical = (slots[:, None] * self.pages_per_seq + logical).reshape(-1)
        valid = (logical[..., None] * p + torch.arange(p)[None, None]) < end[:, None, None]  # [N, span, P]
        dev = self.k_cache[layer].device
        physical = physical.to(dev)
        keys = self.k_cache[layer][physical].float()  # [N*span, Hkv, P, D]
        valid = valid.reshape(-1, 1, p, 1).to(dev)
        self.key_min[layer][physical] = keys.masked_fill(~valid, float("inf")).amin(dim=2)
        self.key_max[layer][physical] = keys.masked_fill(~valid, float("-inf")).amax(dim=2)

    def load_random_context(self, seq_id: int, num_tokens: int, seed: int = 0) -> None:
        super().load_random_context(seq_id, num_tokens, seed)
        slots = torch.tensor([self.slot_of[seq_id]])
        pages = -(-num_tokens // self.page_size)
        for layer in range(self.num_layers):
            for start in range(0, pages, 4096):  # bounded temporaries
                stop = min(pages, start + 4096) - 1
                self._summarise(layer, slots, torch.tensor([start]), torch.tensor([stop]), torch.tensor([num_tokens]))

    def replayable(self, batch: ForwardBatch) -> bool:
        # denoising passes only: the commit pass recomputes summaries with host-built indices
        return (super().replayable(batch) and batch.phase is Phase.DENOISE
                and not self.sparse.check_residency)

    def graph_key(self, batch: ForwardBatch) -> object:
        return self._plan.width  # the top-k width is baked into a captured graph

    def plan(self, batch: ForwardBatch) -> None:
        super().plan(batch)
        if batch.phase is Phase.PREFILL:
            return
        n, dev = batch.num_rows, self.k_cache[0].device
        if self._planned.need_upload(("quest", n), batch) or n not in self._plans:
            fresh = plan_selection(batch.context_lens, self.pages_per_seq, self.sparse, dev,
                                   selected_pages_bound(self.sparse, self.max_tokens))
            table = self.store_table(self.pages_per_seq).long()
            if n not in self._plans:  # fixed addresses per batch size, refilled when the rows or contexts change
                self._plans[n] = (fresh, table)
            else:
                self._plans[n][0].copy_(fresh)
                self._plans[n][1].copy_(table)
        self._plan, self._table = self._plans[n]

    def run(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        batch = self.batch
        if batch.phase is Phase.PREFILL or layer < self.dense_layers:
            out = super().run(layer, q, k, v)
        else:
            q_sel = selection_queries(q, self.num_kv_heads, "mean")[:, :, None]  # [N, Hkv, 1, D]
            lo = self.key_min[layer][self._table].transpose(1, 2)  # [N, Hkv, M, D]
            hi = self.key_max[layer][self._table].transpose(1, 2)
            bound = torch.maximum(q_sel * lo, q_sel * hi).sum(-1)  # [N, Hkv, M]
            selection = select_pages(bound, None, self.sparse, self._plan)
            table = self._physical(selection)
            if self.sparse.check_residency:
                self._check_resident(table, selection.kv_len)
            out = self._sparse_attention(layer, q, k, v, table, selection.kv_len)
        if batch.phase.writes_kv:
            p = self.page_size
            lens = batch.context_lens
            self._summarise(layer, self._slots, lens // p, (lens + batch.num_new - 1) // p, lens + batch.num_new)
        return out

    def close(self) -> None:
        super().close()
        self._plans.clear()
        self.key_min.clear()
        self.key_max.clear()
