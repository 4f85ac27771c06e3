"""The next block's selection, made by herald's LOOKAHEAD pass from this block's draft and taken
by the next block's step 0.

The LOOKAHEAD pass of block b selects, per layer, the pages block b+1 will read and writes them
into a store at fixed addresses (one per batch size of the pass: a side-stream graph writes it).
Block b+1's step 0 then takes that selection for the rows the lookahead prepared, instead of
scanning, with lengths for the block's actual context; rows without one (new rows) keep their own
scan. A block that fails and runs again must select exactly what it selected the first time, so
the selection it took is copied aside and put back on a restart.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from offload.uploads import upload_into
from runtime.attention import ForwardBatch
from runtime.config import SparseConfig
from runtime.selection import Selection, SelectionPlan, plan_selection


class NextSelections:
    """The lookahead's selections, per batch size of its pass: [L, n, Hkv, max_selected] int32."""

    def __init__(self, num_layers: int, num_kv_heads: int, max_selected: int, pages_per_seq: int,
                 sparse: SparseConfig, device: torch.device):
        self.num_layers, self.num_kv_heads, self.max_selected = num_layers, num_kv_heads, max_selected
        self.pages_per_seq, self.sparse, self.device = pages_per_seq, sparse, device
        self._store: dict[int, torch.Tensor] = {}
        self._plans: dict[int, SelectionPlan] = {}
        # a copy of what a block took (its own lookahead overwrites the store), and (rows, width, n)
        self._backup: dict[int, torch.Tensor] = {}
        self._consumed: tuple[tuple[int, ...], int, int] | None = None
        # per batch size of step 0: the lookahead row each row takes ([n] int64), whether it has one
        self._index: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._rows: tuple[int, ...] | None = None  # the rows of the last lookahead, until a block takes it
        self._width = 0
        self._looked_n = 0
        self.key: tuple = (False, False, 0, 0)  # what a captured step 0 bakes in of the taken selection

    # the LOOKAHEAD pass

    def plan_next(self, batch: ForwardBatch) -> SelectionPlan:
        """The plan of the next block's selection for a LOOKAHEAD pass over `batch` (the next block
        starts B = num_new / 2 tokens later), at fixed addresses per batch size."""
        n = batch.num_rows
        fresh = plan_selection(batch.context_lens + batch.num_new // 2, self.pages_per_seq, self.sparse, self.device,
                               self.max_selected)
        if n not in self._plans:
            self._plans[n] = fresh
            self._store[n] = torch.full((self.num_layers, n, self.num_kv_heads, self.max_selected), -1,
                                        dtype=torch.int32, device=self.device)
        self._width = fresh.width
        self._rows = batch.seq_ids
        return self._plans[n].copy_(fresh)

    def width_for(self, num_rows: int) -> int:
        """The top-k width a captured LOOKAHEAD pass over `num_rows` rows bakes in."""
        return self._plans[num_rows].width

    def record(self, layer: int, num_rows: int, entries: torch.Tensor) -> None:
        """The next block's selection of one layer, [n, Hkv, K] (device work)."""
        self._store[num_rows][layer][..., :entries.shape[-1]].copy_(entries)

    # the next block's step 0

    def take(self, batch: ForwardBatch) -> tuple[bool, bool]:
        """Step 0 of a block over `batch`: the rows the last lookahead prepared take its selection.
        Returns (any row takes it, every row does). Per row, so that a row's pages never depend on
        what it shares the batch with."""
        looked = self._rows or ()
        index = [looked.index(s) if s in looked else -1 for s in batch.seq_ids]
        use, every_row = any(i >= 0 for i in index), all(i >= 0 for i in index)
        self._looked_n = len(looked)
        n = batch.num_rows
        if use:
            if n not in self._index:
                self._index[n] = (torch.zeros(n, dtype=torch.int64, device=self.device),
                                  torch.zeros(n, 1, 1, dtype=torch.bool, device=self.device))
            rows_buf, has_buf = self._index[n]
            upload_into(rows_buf, torch.tensor([max(i, 0) for i in index]))
            upload_into(has_buf, torch.tensor([i >= 0 for i in index])[:, None, None])
            if self._looked_n not in self._backup:
                self._backup[self._looked_n] = torch.empty_like(self._store[self._looked_n])
            self._backup[self._looked_n].copy_(self._store[self._looked_n])
            self._consumed = (looked, self._width, self._looked_n)
        else:
            self._consumed = None
        self.key = (use, use and every_row, self._looked_n if use else 0, self._width if use else 0)
        self._rows = None
        return use, use and every_row

    def selection(self, layer: int, num_rows: int, scanned: Selection | None, plan: SelectionPlan,
                  page_size: int) -> Selection:
        """The taken selection of one layer for this block's rows (the scan's for rows without one),
        with lengths for the block's actual context (`plan`, step 0's); device work only."""
        prepared = self._store[self._looked_n][layer][..., :self._width]
        rows, has = self._index[num_rows]
        entries = prepared.index_select(0, rows)  # [N, H, K] in this batch's row order
        if scanned is not None:
            width = max(entries.shape[-1], scanned.entries.shape[-1])
            entries = torch.where(has, F.pad(entries, (0, width - entries.shape[-1]), value=-1),
                                  F.pad(scanned.entries, (0, width - scanned.entries.shape[-1]), value=-1))
        counts = (entries >= 0).sum(-1).to(torch.int32)
        last = plan.last_tokens[:, None]
        kv_len = torch.where(counts > 0, (counts - 1) * page_size + last, 0).to(torch.int32)
        return Selection(entries, counts, kv_len, "page")

    # faults

    def restart(self) -> None:
        """A block is run again: a lookahead it prepared was for the block after it (dropped), and
        the selection it took is put back, so the rerun selects exactly the same pages."""
        self._rows = None
        if self._consumed is not None:
            looked, width, n = self._consumed
            self._store[n].copy_(self._backup[n])
            self._rows, self._width = looked, width

    def clear(self) -> None:
        for held in (self._store, self._plans, self._backup, self._index):
            held.clear()
