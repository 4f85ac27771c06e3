"""The block-diffusion generation loop over a batch of sequences, with a KV cache.

Sequences wait in a queue and join the running batch at block boundaries (continuous batching at
block granularity). Per block: every running sequence opens a block, the batch runs denoising
passes until all its blocks are unmasked (a sequence whose block finished early sits out the
remaining passes), then one commit pass writes the blocks' final K/V. Each pass is planned once on
the attention mode and run layer by layer; the loop never knows which mode it drives.
"""
from __future__ import annotations

import time
from collections import deque
from typing import Callable, Iterable

import torch

from runtime.attention import AttentionMode, ForwardBatch, Phase
from runtime.cuda_graphs import PassGraphs
from runtime.decoding import (DecodeSettings, SequenceState, finish_block, propose_rows, start_block,
                              unmask_step)
from runtime.model import Transformer


class BlockDiffusionLoop:
    """Drives a model and an attention mode through prefill, denoising and commit passes."""

    def __init__(self, model: Transformer, mode: AttentionMode, settings: DecodeSettings,
                 max_batch_size: int, prefill_chunk_size: int, device: torch.device, cuda_graphs: bool = False):
        self.model = model
        self.mode = mode
        self.settings = settings
        self.max_batch_size = max_batch_size
        b = settings.block_size
        if prefill_chunk_size < b:
            raise ValueError(f"prefill_chunk_size={prefill_chunk_size} is smaller than the block size {b}")
        self.prefill_chunk = prefill_chunk_size // b * b  # chunks stay block-aligned
        self.device = device
        self.graphs = PassGraphs(model, mode, device) if cuda_graphs else None
        self.last_block_ms: dict[str, float] = {}
        self._should_cancel: Callable[[SequenceState], bool] | None = None
        self._cancelled: list[SequenceState] = []

    def _forward(self, phase: Phase, rows: list[SequenceState], tokens: torch.Tensor,
                 visibility_block: int, step: int = 0) -> torch.Tensor | None:
        """tokens: [N, T] int64. Returns fp32 logits [N, T, V] for denoising passes, else None."""
        batch = ForwardBatch(
            phase=phase,
            seq_ids=tuple(s.seq_id for s in rows),
            context_lens=torch.tensor([s.context_len for s in rows], dtype=torch.int64),
            num_new=tokens.shape[1],
            visibility_block=visibility_block,
            step=step,
        )
        self.mode.plan(batch)
        if phase is not Phase.PREFILL and self.graphs is not None:
            return self.graphs.forward(batch, tokens)
        return self.model(tokens.to(self.device), batch.positions(self.device), self.mode,
                          need_logits=phase is Phase.DENOISE)

    def prefill(self, seq: SequenceState) -> None:
        """Write the KV of the prompt's whole blocks, chunk by chunk."""
        b = self.settings.block_size
        visibility = 1 if self.settings.prompt_causal else b
        prefix = seq.prompt_ids[: seq.prefix_len]
        seq.tokens = []
        for start in range(0, len(prefix), self.prefill_chunk):
            chunk = prefix[start:start + self.prefill_chunk]
            self._forward(Phase.PREFILL, [seq], torch.tensor([chunk], dtype=torch.int64), visibility)
            seq.tokens.extend(chunk)
        seq.tokens = list(seq.prompt_ids)

    def _drop_cancelled(self, rows: list[SequenceState]) -> None:
        """Take cancelled sequences out of `rows` (in place) and give their KV back now, mid-block
        included; their unfinished block is dropped, committed tokens stay."""
        if self._should_cancel is None:
            return
        for seq in [s for s in rows if self._should_cancel(s)]:
            rows.remove(seq)
            self.mode.remove_sequence(seq.seq_id)
            seq.block = seq.masked = None
            seq.finish_reason = "cancelled"
            self._cancelled.append(seq)

    def decode_block(self, rows: list[SequenceState]) -> None:
        """Denoise one block of every row, then commit it. Host wall time of its parts lands in
        `last_block_ms` (step 0, later steps: each ends when its logits reach the host; commit:
        enqueue time only, it is not waited for). Rows cancelled meanwhile leave `rows`."""
        settings = self.settings
        times = {"step0_ms": 0.0, "steps_ms": 0.0, "commit_ms": 0.0}
        self._drop_cancelled(rows)
        for seq in rows:
            start_block(seq, settings)
        for step in range(settings.steps):
            self._drop_cancelled(rows)
            active = [s for s in rows if s.masked.any()]
            if not active:
                break
            t0 = time.perf_counter()
            blocks = torch.stack([s.block for s in active])
            logits = self._forward(Phase.DENOISE, active, blocks, settings.block_size, step)
            proposals = propose_rows(logits, active, settings.mask_token_id)
            for seq, proposal in zip(active, proposals):
                unmask_step(seq, None, step, settings, proposal)
                seq.passes += 1
            if step == 0 and getattr(self.mode, "wants_lookahead", False):
                self._lookahead(active, proposals)
            times["step0_ms" if step == 0 else "steps_ms"] += (time.perf_counter() - t0) * 1e3
        self._drop_cancelled(rows)
        if not rows:
            return
        t0 = time.perf_counter()
        self._forward(Phase.COMMIT, rows, torch.stack([s.block for s in rows]), settings.block_size)
        times["commit_ms"] = (time.perf_counter() - t0) * 1e3
        for seq in rows:
            finish_block(seq, settings)
        self.last_block_ms = times

    def _lookahead(self, rows: list[SequenceState], proposals: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """The LOOKAHEAD pass: each row's draft of this block (its step-0 argmax where still masked)
        followed by the next block all [MASK]; rows whose next block would pass their end sit out."""
        b = self.settings.block_size
        rows_next, drafts = [], []
        for seq, (tokens, _) in zip(rows, proposals):
            if seq.context_len + 2 * b > seq.max_tokens:
                continue
            draft = torch.where(seq.masked, tokens, seq.block)
            drafts.append(torch.cat([draft, torch.full((b,), self.settings.mask_token_id, dtype=torch.int64)]))
            rows_next.append(seq)
        if rows_next:
            self._forward(Phase.LOOKAHEAD, rows_next, torch.stack(drafts), b)

    def run(self, sequences: Iterable[SequenceState],
            on_block: Callable[[list[SequenceState]], None] | None = None,
            should_cancel: Callable[[SequenceState], bool] | None = None) -> list[SequenceState]:
        """Generate every sequence to completion; returns them in completion order.

        should_cancel(seq) is asked before a waiting sequence starts and before every pass of a
        running one; a cancelled sequence ends with finish_reason "cancelled" and its KV (pages,
        slots, cache partition) is released at once.
        """
        waiting = deque(sequences)
        running: list[SequenceState] = []
        done: list[SequenceState] = []
        self._should_cancel, self._cancelled = should_cancel, done
        try:
            while waiting or running:
                while waiting and len(running) < self.max_batch_size:
                    seq = waiting.popleft()
                    if should_cancel is not None and should_cancel(seq):
                        seq.finish_reason = "cancelled"
                        done.append(seq)
                        continue
                    self.mode.add_sequence(seq.seq_id, seq.max_tokens)
                    running.append(seq)
                    seq.started_at = time.perf_counter()
                    self.prefill(seq)
                if not running:
                    continue
                self.decode_block(running)
                if on_block is not None:
                    on_block(running)
                for seq in [s for s in running if s.finish_reason is not None]:
                    running.remove(seq)
                    self.mode.remove_sequence(seq.seq_id)
                    done.append(seq)
        finally:
            for seq in running:
                self.mode.remove_sequence(seq.seq_id)
            self._should_cancel, self._cancelled = None, []
        return done
