"""Where herald's page scores come from: a compact quantized key copy on the GPU (`gpu-compact`),
a numba scan of the host keys (`cpu`), or both over two parts of the context (`split`).

With the gpu-compact source nothing waits for the host, and a step 0 can be replayed from a CUDA
graph; the cpu and split sources bring each layer's selection queries to the host (one sync per
layer at step 0) and the scores back.
"""
from __future__ import annotations

import torch

from cpu_index import AsyncScanner, host_page_scores
from offload.compact_keys import CompactKeyIndex
from offload.host_store import HostKVStore
from runtime.attention import ForwardBatch
from runtime.config import SparseConfig


def _quantizable(k: torch.Tensor) -> torch.Tensor:
    """Keys as the compact index quantizes them (fp64 test models go through fp32)."""
    return k.float() if k.dtype == torch.float64 else k


class PageScorer:
    """Scores of every context page of the planned rows against their selection queries."""

    def __init__(self, store: HostKVStore, sparse: SparseConfig, scale: float, device: torch.device):
        self.store, self.sparse, self.scale, self.device = store, sparse, scale, device
        self.cuda = device.type == "cuda"
        self.compact = self.scanner = None
        try:
            if sparse.source in ("gpu-compact", "split"):
                self.compact = CompactKeyIndex(store.num_layers, store.num_kv_heads, store.head_dim, store.page_size,
                                               store.num_pages, bits=sparse.compact_bits,
                                               group_size=min(sparse.compact_group, store.head_dim), device=device,
                                               use_kernel=self.cuda)  # CPU: the torch path
            if sparse.source in ("cpu", "split"):
                self.scanner = AsyncScanner()
                self.scanner.warmup([store.dtype])  # numba compiles now, not inside the first block
        except BaseException:
            self.close()
            raise
        self._host_table: torch.Tensor | None = None

    def begin_pass(self, batch: ForwardBatch, store_table: torch.Tensor, context_lens: torch.Tensor) -> None:
        """The pass whose rows `scores` scores: store_table [N, pages] int32 and context_lens [N]
        int32 on the device (fixed addresses a captured pass reads)."""
        self._batch, self._store_table, self._context_lens = batch, store_table, context_lens
        self._host_table = None  # the host sources' copy of the page table, made once per pass

    def write(self, layer: int, store_table: torch.Tensor, start: torch.Tensor, k: torch.Tensor) -> None:
        """New keys [N, Hkv, T, D] of one layer into the compact copy (the host store has the rest)."""
        if self.compact is not None:
            self.compact.write(layer, store_table, start, _quantizable(k))

    def scores(self, layer: int, q_sel: torch.Tensor) -> torch.Tensor:
        """[N, Hkv, pages_per_seq] page scores of the planned rows; q_sel: selection queries
        [N, Hkv, D] or [N, Hkv, R, D] (runtime.selection.selection_queries)."""
        source, lens = self.sparse.source, self._batch.context_lens
        if source == "gpu-compact":
            return self.compact.page_scores(layer, q_sel, self._store_table, self._context_lens, self.scale)
        if self._host_table is None:
            self._host_table = self.store.page_tables(self._batch.seq_ids, self._store_table.shape[1])
        if self.cuda:  # the CPU reads the store itself: committed K/V must have landed
            torch.cuda.current_stream(self.device).synchronize()
        if source == "cpu":
            scores = host_page_scores(self.store.k(layer), self._host_table, lens, q_sel.cpu(), scale=self.scale)
            return scores.to(self.device, non_blocking=True)
        # split: the CPU scans the oldest pages while the GPU scans the rest, then the parts join
        p = self.store.page_size
        cut = int(self.sparse.split_cpu_fraction * (int(lens.min()) // p))
        future = self.scanner.submit(self.store.k(layer), self._host_table[:, :max(cut, 1)], lens.clamp(max=cut * p),
                                     q_sel.cpu(), scale=self.scale)
        gpu_part = self.compact.page_scores(layer, q_sel, self._store_table[:, cut:].contiguous(),
                                            (self._context_lens - cut * p).clamp(min=0), self.scale)
        cpu_part = future.result()[:, :, :cut].to(self.device)
        return torch.cat([cpu_part, gpu_part], dim=-1)

    def close(self) -> None:
        if self.scanner is not None:
            self.scanner.close()
        if self.compact is not None:
            self.compact.close()
