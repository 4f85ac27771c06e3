"""Merging attention computed over disjoint key sets, and attention over a block's own K/V.

An attention result over a key set is (out, lse): the softmax-weighted mean of the values and the
natural-log sum of exp(scores). Two results over disjoint key sets combine exactly into the result
over their union: herald's prefill joins a chunk's attention over its own keys to the context's
this way (the block passes do it inside the paged kernel).
"""
from __future__ import annotations

import torch


def merge_attention_states(
    o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine attention over two disjoint key sets into attention over their union.

    o1, o2: [..., D] (any float dtype); lse1, lse2: [...] natural-log sum-exp of the scaled scores,
    -inf where a set is empty. Returns (out [..., D] in o1's dtype, lse [...] fp32). Where both sets
    are empty the result is out 0, lse -inf (never NaN).
    """
    if o1.shape != o2.shape or lse1.shape != lse2.shape or o1.shape[:-1] != lse1.shape:
        raise ValueError(
            f"shapes disagree: o1 {tuple(o1.shape)}, o2 {tuple(o2.shape)}, "
            f"lse1 {tuple(lse1.shape)}, lse2 {tuple(lse2.shape)}; want o [..., D] and lse [...]")
    l1, l2 = lse1.float(), lse2.float()
    m = torch.maximum(l1, l2)
    # Both empty: m = -inf; shifting by 0 keeps exp(-inf - 0) = 0 instead of exp(nan).
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w1 = torch.exp(l1 - m)
    w2 = torch.exp(l2 - m)
    den = w1 + w2
    safe = torch.where(den > 0, den, torch.ones_like(den))
    out = (w1.unsqueeze(-1) * o1.float() + w2.unsqueeze(-1) * o2.float()) / safe.unsqueeze(-1)
    lse = torch.where(den > 0, m + torch.log(safe), torch.full_like(m, float("-inf")))
    return out.to(o1.dtype), lse


def block_self_attention(
    q: torch.Tensor, k_block: torch.Tensor, v_block: torch.Tensor, *, scale: float,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of a block's queries over the block's own keys, in fp32: bidirectional, or under
    `mask` [T, Tk] bool (True = visible; every query must see at least one key).

    q [N, Hq, T, D]; k_block, v_block [N, Hkv, Tk, D] with Hq = G * Hkv (query head h reads KV
    head h // G). Returns (out [N, Hq, T, D] fp32, lse [N, Hq, T] fp32).
    """
    n, hq, t, d = q.shape
    if k_block.dim() != 4 or k_block.shape != v_block.shape:
        raise ValueError(f"k_block {tuple(k_block.shape)} and v_block {tuple(v_block.shape)} "
                         "must both be [N, Hkv, Tk, D]")
    nk, hkv, tk, dk = k_block.shape
    if nk != n or dk != d or hq % hkv != 0:
        raise ValueError(f"q {tuple(q.shape)} does not match k_block {tuple(k_block.shape)}: "
                         "need the same N and D, and Hq a multiple of Hkv")
    g = hq // hkv
    qf = q.float().reshape(n, hkv, g * t, d)
    s = torch.matmul(qf, k_block.float().transpose(-1, -2)) * scale  # [N, Hkv, G*T, Tk]
    if mask is not None:  # rows are (g, t): the mask repeats per query head of the group
        s = s.masked_fill(~mask.to(s.device).repeat(g, 1), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    out = torch.matmul(torch.softmax(s, dim=-1), v_block.float())
    return out.reshape(n, hq, t, d), lse.reshape(n, hq, t)
