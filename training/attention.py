"""Attention over training rows: the dense [N, L, L] mask, or flex attention for long rows.

A training row's visibility (training/data.py `training_mask`) is block-causal over the clean
part plus a few small noisy blocks, so at 16K-32K tokens almost half of the [L, L] tiles are
empty and the dense mask alone is 1 GiB per 32K row. `FlexTrainingAttention` states the same
rule as a flex-attention `mask_mod`: the rule is evaluated per tile, empty tiles are skipped and
no [L, L] tensor is built. `attention_for` picks the path: the dense mask on the CPU (plain
SDPA, exact, what the tests use as the reference) and flex on CUDA.
"""
from __future__ import annotations

import functools

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from runtime.attention import AttentionMode, MaskedAttention
from training.data import CLEAN, NOISY, PAD, TrainBatch

TRAINING_ATTENTION = ("auto", "mask", "flex")

@functools.cache
def _compiled_flex():
    """flex_attention compiled once per process. The first row length compiles a static kernel, the
    second recompiles with the length symbolic (dynamo's automatic dynamic shapes) and later lengths
    reuse it; rows are still padded coarsely (LayoutSettings.length_buckets) so the block masks,
    built per batch, come in few shapes."""
    return torch.compile(flex_attention)


def training_block_mask(batch: TrainBatch, compile_mask: bool) -> BlockMask:
    """The rows' visibility (training_mask's rule, tile by tile) as a BlockMask over [N, L, L]."""
    kind, copy_id = batch.kind, batch.copy_id
    block = batch.positions // batch.block_size

    def visible(b, h, q, kv):
        bq, bk = block[b, q], block[b, kv]
        kq, kk = kind[b, q], kind[b, kv]
        clean_k = kk == CLEAN
        seen = (((kq == CLEAN) & clean_k & (bk <= bq)) | ((kq == NOISY) & clean_k & (bk < bq))
                | ((kq == NOISY) & (kk == NOISY) & (copy_id[b, q] == copy_id[b, kv]) & (bk == bq)))
        return seen | ((kq == PAD) & (q == kv))

    n, length = batch.input_ids.shape
    return create_block_mask(visible, B=n, H=None, Q_LEN=length, KV_LEN=length, device=batch.input_ids.device,
                             _compile=compile_mask)


class FlexTrainingAttention(MaskedAttention):
    """MaskedAttention whose mask is the rows' BlockMask, run by flex attention (compiled on CUDA).
    q: [N, Hq, L, D]; k, v: [N, Hkv, L, D]."""

    name = "flex-training"

    def __init__(self, batch: TrainBatch, compiled: bool):
        super().__init__(training_block_mask(batch, compile_mask=compiled))
        self.compiled = compiled

    def run(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        run = _compiled_flex() if self.compiled else flex_attention
        return run(q, k, v, block_mask=self.mask, enable_gqa=q.shape[1] != k.shape[1])


def attention_for(batch: TrainBatch, choice: str) -> AttentionMode:
    """The attention a training forward over `batch` runs: `choice` "mask" (dense mask + SDPA),
    "flex" (compiled flex attention on CUDA, eager elsewhere) or "auto" (flex on CUDA)."""
    if choice not in TRAINING_ATTENTION:
        raise ValueError(f"training attention {choice!r}; choose one of {TRAINING_ATTENTION}")
    on_cuda = batch.input_ids.device.type == "cuda"
    if choice == "mask" or (choice == "auto" and not on_cuda):
        return MaskedAttention(batch.mask)
    return FlexTrainingAttention(batch, compiled=on_cuda)


__all__ = ["TRAINING_ATTENTION", "FlexTrainingAttention", "attention_for", "training_block_mask"]
