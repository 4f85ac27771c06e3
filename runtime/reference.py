"""The plain reference decoder: no KV cache, every denoising step recomputes the whole sequence.

It runs one sequence at a time through a full forward under the block-diffusion mask and applies
the same unmasking rule as the engine, so any difference in tokens points at the cached path
(attention modes, KV writes, positions, batching), never at the decoding rule.
"""
from __future__ import annotations

import torch

from runtime.attention import MaskedAttention, block_diffusion_mask
from runtime.decoding import DecodeSettings, SequenceState, finish_block, start_block, unmask_step
from runtime.model import Transformer


@torch.no_grad()
def reference_decode(model: Transformer, seq: SequenceState, settings: DecodeSettings,
                     device: torch.device | str = "cpu") -> SequenceState:
    """Decode `seq` to completion by recomputation; returns it with its tokens filled in."""
    seq.tokens = list(seq.prompt_ids)
    while seq.finish_reason is None:
        start_block(seq, settings)
        for step in range(settings.steps):
            if not seq.masked.any():
                break
            ids = torch.tensor(seq.tokens + seq.block.tolist(), dtype=torch.int64, device=device)[None]
            length = ids.shape[1]
            mask = block_diffusion_mask(length, seq.prefix_len, settings.block_size, settings.prompt_causal)
            positions = torch.arange(length, device=device)[None]
            logits = model(ids, positions, MaskedAttention(mask))
            unmask_step(seq, logits[0, -settings.block_size:], step, settings)
            seq.passes += 1
        finish_block(seq, settings)
    return seq
