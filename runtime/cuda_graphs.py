"""CUDA-graph replay of denoising and commit passes: one capture per pass shape, replayed after.

A denoising pass at a real geometry launches ~100 kernels per layer; launched from Python that is
a second of host time per block at 36 layers while the GPU needs a tenth of it. Between steps of a
block nothing changes shape: the same rows, the same T positions, the same selection. So the
first replayable pass of a shape runs eagerly (compiling kernels) and is then captured; later
passes only copy their tokens and positions into the graph's input buffers and replay.

What may change between replays lives in fixed-address device buffers that the mode's `plan`
refills (page tables, kv lengths, selections, where new K/V go; see `AttentionMode.replayable`).
Passes a mode does not call replayable (a step 0 that selects on the host, herald's commit that
hands K/V to the host store) run eagerly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from runtime.attention import AttentionMode, ForwardBatch
from runtime.model import Transformer


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    tokens: torch.Tensor  # [N, T] int64 input buffer
    positions: torch.Tensor  # [N, T] int64 input buffer
    logits: torch.Tensor | None  # [N, T, V] fp32 output buffer (None: a pass without logits)


class PassGraphs:
    """Runs planned denoising and commit passes, replaying a captured graph when the mode allows it."""

    def __init__(self, model: Transformer, mode: AttentionMode, device: torch.device):
        if device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device; run without them on the CPU")
        self.model, self.mode, self.device = model, mode, device
        self.pool = torch.cuda.graph_pool_handle()  # one memory pool shared by every main-stream shape
        self.side_pool = torch.cuda.graph_pool_handle()  # side passes run beside them: their own
        self._graphs: dict[tuple, _Captured] = {}
        self.replays = 0
        self.captures = 0

    def forward(self, batch: ForwardBatch, tokens: torch.Tensor, positions: torch.Tensor,
                side_pass: bool = False) -> torch.Tensor | None:
        """A planned pass: logits [N, T, V] fp32 where it needs them (`ForwardBatch.needs_logits`), else None. A
        replayed pass returns the graph's output buffer: read it before the next pass. tokens,
        positions: [N, T] int64 on the device (a replay copies them into the graph's inputs, device
        to device, without a host wait). side_pass: the caller runs it on a side stream,
        concurrently with main-stream passes."""
        need_logits = batch.needs_logits
        if not self.mode.replayable(batch):
            return self.model(tokens, positions, self.mode, need_logits=need_logits)
        key = (batch.phase, need_logits, batch.num_rows, batch.num_new, side_pass, self.mode.graph_key(batch))
        captured = self._graphs.get(key)
        if captured is None:
            logits = self.model(tokens, positions, self.mode, need_logits=need_logits)
            self._graphs[key] = self._capture(tokens, positions, need_logits, self.side_pool if side_pass else self.pool)
            return logits
        captured.tokens.copy_(tokens, non_blocking=True)
        captured.positions.copy_(positions, non_blocking=True)
        captured.graph.replay()
        self.replays += 1
        return captured.logits

    def _capture(self, tokens: torch.Tensor, positions: torch.Tensor, need_logits: bool, pool) -> _Captured:
        tokens_in = tokens.clone()
        positions_in = positions.clone()
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize(self.device)
        with torch.cuda.graph(graph, pool=pool):
            logits = self.model(tokens_in, positions_in, self.mode, need_logits=need_logits)
        self.captures += 1
        return _Captured(graph, tokens_in, positions_in, logits)

    def clear(self) -> None:
        self._graphs.clear()
