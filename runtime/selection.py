"""Turning scores into the context a block attends to: selection queries, top-k with forced pages.

Every source (exact kernel pass, CPU scan, compact GPU keys, Quest's page bounds) yields scores per
(row, KV head, page) or per token; `select_pages` / `select_tokens` turn them into one format that
every sparse attention reads: a per-(row, KV head) list of logical pages (or token positions) sorted
ascending, -1 padded, and `kv_len` [N, Hkv], the valid tokens of each list. Sorting makes the last,
partial context page (always selected: it is the local window's end) the last list entry, so
`kv_len` alone masks its unwritten tail, exactly as for a dense page table.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from gpu_kernels.kv_fp8 import dequantize_units
from runtime.config import SparseConfig
from offload.uploads import upload


def selection_queries(q: torch.Tensor, num_kv_heads: int, how: str) -> torch.Tensor:
    """Selection queries per (row, KV head) from q [N, Hq, T, D], fp32.

    mean: [N, Hkv, D], the mean over the T block positions and the G query heads of the KV head
    (MAGE's block-mean); center: [N, Hkv, D], the centre position T // 2, mean over the G heads
    (HERALD's single [MASK] query); positions: [N, Hkv, T, D], one query per block position, mean
    over the G heads. A token then scores the max over the T queries (`query_sets`): the positions'
    RoPE rotations differ, and their mean cancels the high-frequency dimensions that locate a
    retrieved key (RESULTS.md, seventh session: at a 5% budget it lifts herald from 0.72 to 0.94 on
    key-value and variable tracking at 2K tokens).
    """
    n, hq, t, d = q.shape
    grouped = q.float().view(n, num_kv_heads, hq // num_kv_heads, t, d)
    if how == "mean":
        return grouped.mean(dim=(2, 3))
    if how == "center":
        return grouped[:, :, :, t // 2].mean(dim=2)
    if how == "positions":
        return grouped.mean(dim=2)
    raise ValueError(f"selection query {how!r}; choose mean, center or positions")


def query_sets(q: torch.Tensor) -> torch.Tensor:
    """[N, Hkv, R, D] from selection queries [N, Hkv, D] (R = 1) or [N, Hkv, R, D] (returned as is).
    A token's score against a set is the max over its R queries."""
    if q.dim() == 3:
        return q[:, :, None]
    if q.dim() != 4:
        raise ValueError(f"selection queries must be [N, Hkv, D] or [N, Hkv, R, D], got {tuple(q.shape)}")
    return q


@dataclass
class Selection:
    """The context each (row, KV head) attends to.

    entries: [N, Hkv, K] int32, logical pages (granularity page) or token positions (token),
      sorted ascending, -1 padded; kv_len: [N, Hkv] int32 valid tokens of each list, read in list
      order (page granularity: full pages, the last one possibly partial).
    """

    entries: torch.Tensor
    counts: torch.Tensor
    kv_len: torch.Tensor
    granularity: str

    def rows(self, index: torch.Tensor) -> "Selection":
        return Selection(self.entries[index], self.counts[index], self.kv_len[index], self.granularity)


def forced_pages(context_lens: torch.Tensor, num_pages: int, config: SparseConfig, device) -> torch.Tensor:
    """[N, M] bool: sink pages, the local window's pages and the last page of each row's context."""
    p = config.page_size
    lens = context_lens.to(device)
    page = torch.arange(num_pages, device=device)
    last = (lens - 1).clamp(min=0) // p  # [N]
    sinks = page[None] * p < config.sink_tokens
    window_start = (lens - config.local_window).clamp(min=0) // p
    window = page[None] >= window_start[:, None]
    valid = page[None] * p < lens[:, None]
    return (sinks | window | (page[None] == last[:, None])) & valid


def _top_sorted(scores: torch.Tensor, forced: torch.Tensor, valid: torch.Tensor, keep: torch.Tensor, k: int):
    """Top `keep[n]` (at most k) entries per (row, head) of scores [N, H, M], forced ones first;
    sorted ids, -1 padded to width k."""
    n, h, m = scores.shape
    s = scores.float().masked_fill(~valid, float("-inf"))
    s = torch.where(forced, torch.full_like(s, float("inf")), s)
    _, idx = torch.topk(s, k, dim=-1)  # [N, H, k]
    counts = torch.minimum(keep.to(idx.device)[:, None].expand(n, h), valid.sum(-1))  # [N, H]
    take = torch.arange(k, device=idx.device)[None, None] < counts[..., None]
    big = torch.iinfo(torch.int32).max
    idx = torch.where(take, idx.to(torch.int32), torch.full_like(idx, big, dtype=torch.int32))
    idx, _ = torch.sort(idx, dim=-1)
    idx = torch.where(idx == big, torch.full_like(idx, -1), idx)
    return idx, counts.to(torch.int32)


@dataclass
class SelectionPlan:
    """Everything about a page selection that depends on the context lengths only, on the device,
    so the selection itself is device work alone (capturable in a CUDA graph).

    keep [N] int64 pages to select per row (the budget plus the forced ones); forced, valid [N, M] bool; last_tokens
    [N] int32 valid tokens of each row's last page; width: the top-k width (host int, max of keep).
    """

    keep: torch.Tensor
    forced: torch.Tensor
    valid: torch.Tensor
    last_tokens: torch.Tensor
    width: int

    def copy_(self, other: "SelectionPlan") -> "SelectionPlan":
        """Load another plan of the same shape into this one's buffers (fixed addresses)."""
        for name in ("keep", "forced", "valid", "last_tokens"):
            getattr(self, name).copy_(getattr(other, name))
        self.width = other.width
        return self


def plan_selection(context_lens: torch.Tensor, num_pages: int, config: SparseConfig,
                   device: torch.device | str, width: int | None = None) -> SelectionPlan:
    """The SelectionPlan of rows with `context_lens` [N] (CPU) over page score rows of `num_pages`.

    width: the top-k width, at least every row's keep (default: the largest keep). A mode that
    replays CUDA graphs passes its fixed bound, so that a context growing block by block (and the
    budget with it) never changes a captured selection's shape; rows still keep only `keep` pages.
    """
    p = config.page_size
    lens = context_lens.to(torch.int64)
    forced = forced_pages(lens, num_pages, config, "cpu")
    valid = torch.arange(num_pages)[None] * p < lens[:, None]
    # the budget buys top-k pages on top of the forced ones (sinks, window, last page)
    budget = torch.tensor([config.budget_pages(int(c)) for c in lens], dtype=torch.int64)
    keep = torch.minimum(budget + forced.sum(-1), valid.sum(-1))
    last_tokens = (lens - ((lens - 1).clamp(min=0) // p) * p).to(torch.int32)
    needed = int(keep.max()) if keep.numel() else 1
    if width is not None and width < needed:
        raise ValueError(f"top-k width {width} is smaller than the {needed} pages a row keeps")
    width = max(1, min(num_pages, needed if width is None else width))
    dev = torch.device(device)
    return SelectionPlan(upload(keep, dev), upload(forced, dev), upload(valid, dev), upload(last_tokens, dev), width)


def select_pages(page_scores: torch.Tensor, context_lens: torch.Tensor | None, config: SparseConfig,
                 plan: SelectionPlan | None = None) -> Selection:
    """The budget's top-k pages per (row, KV head) plus the forced ones, from page_scores [N, Hkv, M].

    context_lens: [N] int64 (CPU) committed tokens of each row (pages at or beyond a row's context
    are never chosen); or a precomputed `plan` (then only device work runs here).
    """
    n, h, m = page_scores.shape
    if plan is None:
        plan = plan_selection(context_lens, m, config, page_scores.device)
    valid = plan.valid[:, None].expand(n, h, m)
    forced = plan.forced[:, None].expand(n, h, m)
    pages, counts = _top_sorted(page_scores, forced, valid, plan.keep, plan.width)
    # all lists end with the row's last page: full pages before it, its valid tokens after
    kv_len = torch.where(counts > 0, (counts - 1) * config.page_size + plan.last_tokens[:, None], 0)
    return Selection(pages, counts, kv_len.to(torch.int32), "page")


def select_tokens(token_scores: torch.Tensor, context_lens: torch.Tensor, config: SparseConfig) -> Selection:
    """Top-k token positions per (row, KV head) plus sinks and the local window, from
    token_scores [N, Hkv, L] (L >= each row's context)."""
    n, h, length = token_scores.shape
    dev = token_scores.device
    lens = context_lens.to(torch.int64).to(dev)
    pos = torch.arange(length, device=dev)[None]
    valid = (pos < lens[:, None])[:, None].expand(n, h, length)
    forced = ((pos < config.sink_tokens) | (pos >= lens[:, None] - config.local_window))[:, None] & valid
    budget = torch.tensor([config.budget_pages(int(c)) * config.page_size for c in context_lens],
                          dtype=torch.int64, device=dev)
    keep = torch.minimum(budget + forced[:, 0].sum(-1), lens)
    positions, counts = _top_sorted(token_scores, forced, valid, keep, max(1, min(length, int(keep.max()))))
    return Selection(positions, counts, counts.clone(), "token")


def page_scores_from_tokens(token_scores: torch.Tensor, page_size: int, aggregate: str = "max") -> torch.Tensor:
    """[N, H, M] page scores from token scores [N, H, M * page_size] (-inf marks invalid tokens).

    max: the best token; mean: mean over valid tokens; lse: log-sum-exp (the page's softmax mass).
    """
    n, h, length = token_scores.shape
    t = token_scores.float().view(n, h, length // page_size, page_size)
    if aggregate == "max":
        return t.amax(-1)
    if aggregate == "lse":
        return torch.logsumexp(t, dim=-1)
    if aggregate == "mean":
        valid = torch.isfinite(t)
        total = torch.where(valid, t, torch.zeros_like(t)).sum(-1)
        count = valid.sum(-1)
        return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, float("-inf")))
    raise ValueError(f"aggregate={aggregate!r}; choose max, mean or lse")


def gather_token_scores(q_sel: torch.Tensor, k_pages: torch.Tensor, page_table: torch.Tensor,
                        context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Exact token scores scale * q_sel . k over a paged store, in torch: [N, Hkv, M * P] fp32.

    q_sel [N, Hkv, D] or [N, Hkv, R, D] (the max over the R queries); k_pages store layout [num_pages, Hkv, P, D]; page_table [N, M] (>= 0 where
    read); context_lens [N]. -inf beyond each row's context.
    """
    q_sel = query_sets(q_sel)
    n, hkv, _, d = q_sel.shape
    m, p = page_table.shape[1], k_pages.shape[2]
    keys = k_pages[page_table.clamp(min=0).long()]  # [N, M, Hkv, P, D]
    keys = keys.permute(0, 2, 1, 3, 4).reshape(n, hkv, m * p, d).float()
    scores = torch.einsum("nhrd,nhld->nhrl", q_sel.float(), keys).amax(2) * scale
    valid = torch.arange(m * p, device=scores.device)[None] < context_lens.to(scores.device)[:, None]
    return scores.masked_fill(~valid[:, None], float("-inf"))


def table_attention_torch(q: torch.Tensor, k_block: torch.Tensor, v_block: torch.Tensor,
                          k_pages: torch.Tensor, v_pages: torch.Tensor, table: torch.Tensor,
                          kv_len: torch.Tensor, scale: float, k_scale: torch.Tensor | None = None,
                          v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Plain-torch twin of `gpu_kernels.paged_attention.block_attention` with a per-head table.

    q [N, Hq, T, D]; k_block, v_block [N, Hkv, T, D] (bidirectional within the block); k_pages,
    v_pages store layout [num_pages, Hkv, P, D] or pool layout [num_slots, P, D]; table
    [N, Hkv, K] int32 (-1 padded); kv_len [N, Hkv]; k_scale, v_scale: fp8 pages' scales (store
    [num_pages, Hkv], pool [num_slots]; the pages are dequantized with them), else None. Gathers the
    listed pages and runs one masked softmax; used on the CPU, where the Triton kernel only runs
    interpreted.
    """
    n, hq, t, d = q.shape
    hkv, k = table.shape[1], table.shape[2]
    idx = table.clamp(min=0).long()
    if k_pages.dim() == 4:  # store: pick each head's own page
        index = (idx, torch.arange(hkv, device=idx.device)[None, :, None].expand_as(idx))
    else:
        index = (idx,)
    keys, vals = k_pages[index], v_pages[index]  # [N, Hkv, K, P, D]
    if k_scale is not None:
        keys, vals = dequantize_units(keys, k_scale[index]), dequantize_units(vals, v_scale[index])
    p = keys.shape[3]
    keys = torch.cat([keys.reshape(n, hkv, k * p, d), k_block.to(keys.dtype)], dim=2)
    vals = torch.cat([vals.reshape(n, hkv, k * p, d), v_block.to(vals.dtype)], dim=2)
    visible = torch.arange(k * p + t, device=q.device)[None, None] < (kv_len.to(q.device).long()[..., None])
    visible |= torch.arange(k * p + t, device=q.device)[None, None] >= k * p  # the block itself
    g = hq // hkv
    qg = q.reshape(n, hkv, g * t, d)
    out = torch.nn.functional.scaled_dot_product_attention(
        qg, keys.to(q.dtype), vals.to(q.dtype), attn_mask=visible[:, :, None, :], scale=scale)
    return out.reshape(n, hq, t, d)
