"""The plain reference decoder: no KV cache, every denoising step recomputes the whole sequence.

It runs one sequence at a time through a full forward under the block-diffusion mask and applies
the same unmasking rule as the engine, so any difference in tokens points at the cached path
(attention modes, KV writes, positions, batching), never at the decoding rule.
"""
from __future__ import annotations

import torch

from runtime.attention import MaskedAttention, block_diffusion_mask
from runtime.decoding import (DecodeSettings, SequenceState, finish_block, next_block_token, shift_logits,
                              start_block, unmask_step)
from runtime.model import Transformer


@torch.no_grad()
def reference_decode(model: Transformer, seq: SequenceState, settings: DecodeSettings,
                     device: torch.device | str = "cpu") -> SequenceState:
    """Decode `seq` to completion by recomputation; returns it with its tokens filled in."""

    def logits_of(ids: list[int]) -> torch.Tensor:
        """[len(ids), V]: the whole sequence under the block-diffusion mask."""
        mask = block_diffusion_mask(len(ids), seq.prefix_len, settings.block_size, settings.prompt_causal)
        positions = torch.arange(len(ids), device=device)[None]
        return model(torch.tensor(ids, dtype=torch.int64, device=device)[None], positions, MaskedAttention(mask))[0]

    def first_token_after(ids: list[int]) -> int:
        return int(next_block_token(logits_of(ids)[-1:], settings.mask_token_id)[0])

    seq.tokens = list(seq.prompt_ids)
    if settings.token_shift and 0 < seq.prefix_len == seq.prompt_len:
        seq.tokens.append(first_token_after(seq.tokens))
    while seq.finish_reason is None:
        start_block(seq, settings)
        for step in range(settings.steps):
            if not seq.masked.any():
                break
            logits = logits_of(seq.tokens + seq.block.tolist())
            unmask_step(seq, shift_logits(logits[-settings.block_size:], settings), step, settings)
            seq.passes += 1
        next_token = first_token_after(seq.tokens + seq.block.tolist()) if settings.token_shift else None
        finish_block(seq, settings, next_token)
    return seq
