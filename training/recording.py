"""Exact decodes recorded for offline analysis: per block, the context keys and every denoising
step's queries of every layer.

`record` runs the engine's own loop over `RecordingAttention` (dense, exact, torch path).
benchmarks/recall.py measures what each selection would keep from these records, and
training/forecast.py fits the learned forecast of the next layer's pages on them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from tqdm.auto import tqdm

from runtime.attention import DenseAttention, ForwardBatch, Phase
from runtime.config import ModelConfig
from runtime.decoding import GenerationRequest
from runtime.engine import Engine
from runtime.generate import BlockDiffusionLoop


@dataclass
class BlockRecord:
    """One block of one prompt: context keys per layer, and each denoising step's queries.

    keys[layer]: [Hkv, L, D] (RoPE applied) for the L committed context tokens;
    queries[layer][i]: [Hq, B, D] of the pass at denoising step steps[i].
    """

    seq_id: int
    block: int
    context_len: int
    keys: list[torch.Tensor | None]
    queries: list[list[torch.Tensor]]
    steps: list[int] = field(default_factory=list)
    row: int = -1  # index of the prompt, filled in by `record`


class RecordingAttention(DenseAttention):
    """Exact dense attention (torch path) that also keeps what the recall analysis needs.

    For the first `max_blocks` blocks of every sequence: the context keys at the block's first
    denoising pass and the queries of every denoising pass, moved to `store_device`.
    """

    name = "recording"

    def __init__(self, model: ModelConfig, max_sequences: int, max_tokens: int, page_size: int,
                 dtype: torch.dtype, device: torch.device, max_blocks: int,
                 store_device: torch.device | str | None = None):
        super().__init__(model, max_sequences, max_tokens, page_size, dtype, device, backend="torch")
        if max_blocks < 1:
            raise ValueError(f"max_blocks={max_blocks} must be >= 1")
        self.num_layers = model.num_layers
        self.max_blocks = max_blocks
        self.store_device = torch.device(store_device) if store_device is not None else device
        self.records: list[BlockRecord] = []
        self._open: dict[int, BlockRecord] = {}
        self._blocks_seen: dict[int, int] = {}
        self._recording: list[tuple[int, BlockRecord]] = []  # (row in the planned batch, record)
        self._first_pass = False

    def plan(self, batch: ForwardBatch) -> None:
        super().plan(batch)
        self._recording = []
        if batch.phase is Phase.COMMIT:
            for seq_id in batch.seq_ids:
                rec = self._open.pop(seq_id, None)
                if rec is not None:
                    self.records.append(rec)
            return
        if batch.phase is not Phase.DENOISE:
            return
        for i, seq_id in enumerate(batch.seq_ids):
            rec = self._open.get(seq_id)
            if rec is None:
                seen = self._blocks_seen.get(seq_id, 0)
                self._blocks_seen[seq_id] = seen + 1
                if seen >= self.max_blocks:
                    continue
                rec = BlockRecord(seq_id, seen, int(batch.context_lens[i]), [None] * self.num_layers,
                                  [[] for _ in range(self.num_layers)])
                self._open[seq_id] = rec
            rec.steps.append(batch.step)
            self._recording.append((i, rec))

    def run(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self._recording:
            keys = None
            for i, rec in self._recording:
                if rec.keys[layer] is None:
                    if keys is None:
                        keys = self._rows(self.k_cache[layer], self.k_scale[layer], int(self.batch.context_lens.max()))
                    rec.keys[layer] = keys[i, :, :rec.context_len].to(self.store_device, copy=True)
                rec.queries[layer].append(q[i].detach().to(self.store_device, copy=True))
        return super().run(layer, q, k, v)

    def remove_sequence(self, seq_id: int) -> None:
        super().remove_sequence(seq_id)
        self._blocks_seen.pop(seq_id, None)


def record(engine: Engine, prompts: Sequence[list[int]], blocks: int, store_device: str | None = None,
           progress: bool = True) -> list[BlockRecord]:
    """Decode `blocks` blocks of every prompt (token ids) with exact attention and record them.

    Runs the engine's own loop and decoding settings (batch of `engine.config.max_batch_size`).
    Returns the records sorted by (prompt, block).
    """
    if blocks < 1:
        raise ValueError(f"blocks={blocks} must be >= 1")
    b = engine.settings.block_size
    requests = [GenerationRequest(prompt=list(p), max_new_tokens=blocks * b, stop_at_eos=False) for p in prompts]
    seqs = [engine.make_sequence(r) for r in requests]
    row_of = {s.seq_id: i for i, s in enumerate(seqs)}
    batch = min(engine.config.max_batch_size, len(seqs))
    mode = RecordingAttention(engine.model_config, batch, max(s.max_tokens for s in seqs), page_size=16,
                              dtype=engine.dtype, device=engine.device, max_blocks=blocks,
                              store_device=store_device)
    loop = BlockDiffusionLoop(engine.model, mode, engine.settings, batch, engine.config.prefill_chunk_size,
                              engine.device)
    total = sum((s.max_tokens - s.prefix_len) // b for s in seqs)
    bar = tqdm(total=total, unit="block", desc="record (exact attention)", disable=not progress, leave=False)
    try:
        with torch.no_grad():
            loop.run(seqs, lambda rows: bar.update(len(rows)))
    finally:
        bar.close()
        records = mode.records
        mode.close()
    for rec in records:
        rec.row = row_of[rec.seq_id]
    return sorted(records, key=lambda r: (r.row, r.block))


__all__ = ["BlockRecord", "RecordingAttention", "record"]
