"""How much of exact attention does each selection keep, step by step, inside a block?

Records a real decode (the engine's loop, exact attention on the torch path): for a few blocks of
each prompt, per layer, the context keys at the block's start and the B queries of every
denoising step. Then, offline, for every budget (tokens or a share of the context), granularity
(tokens; pages of 8-64 tokens with a page-score aggregate) and selection variant:

- attention mass: the share of each step's exact softmax over the context that falls on the
  selected positions (sinks, local window and last page forced exactly as `SparseConfig` forces
  them), averaged over the B queries and the query heads. The softmax runs over the committed
  context only: the block's own tokens are attended by every mode and are left out.
- top-k recall: the share of that step's oracle top-k that the selection contains, with k = the
  number of tokens the selection covers; the oracle ranks tokens by the step's softmax
  probability averaged over the B queries and the GQA group (MAGE's exact form).
- pages re-fetched vs reused between consecutive blocks (step-0 page selections: what herald's
  page cache would have to fetch), and the MAGE property: cosine between the block-mean query
  at step 0 and at each later step, per layer.

Variants: `mage` (step-0 block-mean query, exact scores, reused for the block), `herald-center`
(step-0 centre-position query, exact scores), `herald-positions` (step-0 queries of every block
position, a token scoring the max over them, exact scores: herald's default), `mage-softmax` (step-0 mean softmax probability:
the step-0 oracle reused), `herald-int4` / `herald-int8` (the `compact_query` queries, by default
herald's per-position ones, against int4/int8 compact keys, as herald's gpu-compact source), `herald-split` (exact scores for the oldest
pages, int-compact for the rest, as herald's split source), `quest` (a new page selection every
step from per-page min/max key bounds) and `oracle` (a new exact selection every step: the
ceiling for one subset per step).

    python -m benchmarks.recall --model checkpoints/tiny-random --context 1024 2048 --blocks 2
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from runtime.attention import DenseAttention, ForwardBatch, Phase
from runtime.config import EngineConfig, ModelConfig, SparseConfig
from runtime.decoding import GenerationRequest
from runtime.engine import Engine
from runtime.generate import BlockDiffusionLoop
from runtime.selection import page_scores_from_tokens, select_pages, select_tokens, selection_queries
from training.evaluate import add_split_argument
from training.tasks import TASKS, generate_examples

STEP0_VARIANTS = ("mage", "herald-center", "herald-positions", "mage-softmax", "herald-int4", "herald-int8",
                  "herald-split")
PER_STEP_VARIANTS = ("oracle", "quest")
ALL_VARIANTS = STEP0_VARIANTS + PER_STEP_VARIANTS
DEFAULT_VARIANTS = ("mage", "herald-center", "herald-positions", "mage-softmax", "herald-int4", "herald-int8",
                    "quest", "oracle")
TOKEN_VARIANTS = ("mage", "herald-center", "herald-positions", "mage-softmax", "oracle")  # herald and quest move whole pages
AGGREGATES = ("max", "mean", "lse")
DEFAULT_BUDGETS = ("512", "1024", "1%", "2%", "5%", "10%")
DEFAULT_PAGE_SIZES = (8, 16, 32, 64)
DEFAULT_OUT = Path("benchmarks/data/recall.json")
DEFAULT_PLOT = Path("benchmarks/plots/recall.png")


# ------------------------------------------------------------------------------------------------
# budgets and settings


@dataclass(frozen=True)
class Budget:
    """A selection budget: a token count ("512") or a share of the context ("5%")."""

    label: str
    tokens: int | None = None
    fraction: float | None = None

    @classmethod
    def parse(cls, text: str) -> "Budget":
        text = text.strip()
        try:
            if text.endswith("%"):
                value = float(text[:-1]) / 100.0
                if not 0.0 < value <= 1.0:
                    raise ValueError
                return cls(text, fraction=value)
            if "." in text:
                value = float(text)
                if not 0.0 < value <= 1.0:
                    raise ValueError
                return cls(f"{value * 100:g}%", fraction=value)
            tokens = int(text)
            if tokens < 1:
                raise ValueError
            return cls(text, tokens=tokens)
        except ValueError:
            raise ValueError(f"budget {text!r}: give a token count (512), a percentage (5%) or a fraction "
                             "in (0, 1] (0.05)") from None

    def sparse_config(self, page_size: int, sink_tokens: int, local_window: int) -> SparseConfig:
        if self.tokens is not None:
            return SparseConfig(budget_tokens=self.tokens, page_size=page_size, sink_tokens=sink_tokens,
                                local_window=local_window)
        return SparseConfig(budget_fraction=self.fraction, page_size=page_size, sink_tokens=sink_tokens,
                            local_window=local_window)


@dataclass
class RecallSettings:
    """What the offline analysis sweeps."""

    budgets: Sequence[str] = DEFAULT_BUDGETS
    page_sizes: Sequence[int] = DEFAULT_PAGE_SIZES
    aggregates: Sequence[str] = AGGREGATES
    variants: Sequence[str] = DEFAULT_VARIANTS
    token_level: bool = True  # also select single tokens (MAGE's granularity)
    sink_tokens: int = 16
    local_window: int = 64
    dense_layers: int = SparseConfig.dense_layers  # averages skip these layers; per-layer data keeps all
    compact_group: int = 32
    compact_query: str = "positions"  # herald's default (SparseConfig.selection_query)
    split_bits: int = 4
    split_cpu_fraction: float = 0.5

    def __post_init__(self) -> None:
        self.budgets = [Budget.parse(b).label for b in self.budgets]  # validates
        unknown = [v for v in self.variants if v not in ALL_VARIANTS]
        if unknown:
            raise ValueError(f"variants {unknown} are unknown; choose from {ALL_VARIANTS}")
        bad = [a for a in self.aggregates if a not in AGGREGATES]
        if bad:
            raise ValueError(f"aggregates {bad} are unknown; choose from {AGGREGATES}")
        for p in self.page_sizes:
            if p < 1 or p & (p - 1):
                raise ValueError(f"page size {p} must be a power of two")
        if self.split_bits not in (4, 8):
            raise ValueError(f"split_bits={self.split_bits}; choose 4 or 8")
        if self.compact_query not in ("mean", "center", "positions"):
            raise ValueError(f"compact_query={self.compact_query!r}; choose mean, center or positions")


# ------------------------------------------------------------------------------------------------
# recording


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


# ------------------------------------------------------------------------------------------------
# metrics (plain functions of one layer's data; unit-tested on hand-made cases)


def mean_probs(q: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """Softmax over the context, averaged over the B queries and the GQA group: [Hkv, L] fp32.

    q: [Hq, B, D]; keys: [Hkv, L, D].
    """
    hq, b, d = q.shape
    hkv = keys.shape[0]
    qg = q.float().reshape(hkv, hq // hkv * b, d)
    probs = torch.softmax(torch.matmul(qg, keys.float().transpose(-1, -2)) * scale, dim=-1)
    return probs.mean(dim=1)


def ranks_of(pbar: torch.Tensor) -> torch.Tensor:
    """Rank of every position by descending probability (0 = most likely): same shape, int64."""
    order = torch.argsort(pbar, dim=-1, descending=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(pbar.shape[-1], device=pbar.device).expand_as(order))
    return ranks


def entries_to_mask(entries: torch.Tensor, length: int) -> torch.Tensor:
    """Bool mask [..., length] of the listed ids (entries [..., K], -1 padded)."""
    idx = entries.long()
    idx = torch.where(idx < 0, torch.full_like(idx, length), idx)
    mask = torch.zeros(*idx.shape[:-1], length + 1, dtype=torch.bool, device=idx.device)
    mask.scatter_(-1, idx, True)
    return mask[..., :length]


def pages_to_tokens(page_mask: torch.Tensor, page_size: int, length: int) -> torch.Tensor:
    """[..., M] page mask -> [..., length] token mask."""
    return page_mask.repeat_interleave(page_size, dim=-1)[..., :length]


def mass_and_recall(mask: torch.Tensor, pbar: torch.Tensor, ranks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Captured mass and oracle top-k recall of fixed selections over several steps.

    mask: [V, H, L] bool (V selections); pbar, ranks: [S, H, L] (each step's mean probability and
    its ranks). Returns (mass, recall), both [S, V, H]: mass = sum of pbar over the selection;
    recall = |selection with rank < k| / k where k = the selection's size.
    """
    maskf = mask.to(pbar.dtype)
    mass = torch.einsum("vhl,shl->svh", maskf, pbar)
    k = mask.sum(-1)  # [V, H]
    hits = torch.zeros_like(mass)
    for kv in torch.unique(k).tolist():  # selections of one budget share their size: usually one pass
        if kv == 0:
            continue
        inside = (ranks < kv).to(pbar.dtype)
        hits = torch.where((k == kv)[None], torch.einsum("vhl,shl->svh", maskf, inside), hits)
    recall = hits / k.clamp(min=1)[None].to(pbar.dtype)
    return mass, recall


def mass_and_recall_per_step(mask: torch.Tensor, pbar: torch.Tensor, ranks: torch.Tensor):
    """Like `mass_and_recall` for selections made at each step: mask [S, H, L] -> ([S, H], [S, H])."""
    mass = (mask.to(pbar.dtype) * pbar).sum(-1)
    k = mask.sum(-1)
    hits = (mask & (ranks < k[..., None])).sum(-1)
    return mass, hits.to(pbar.dtype) / k.clamp(min=1).to(pbar.dtype)


def quest_bounds(keys: torch.Tensor, queries: torch.Tensor, page_size: int) -> torch.Tensor:
    """Quest's per-page upper bound sum_d max(q_d min_d, q_d max_d): [S, H, M].

    keys [H, L, D]; queries [S, H, D] (one selection query per step and KV head).
    """
    h, length, d = keys.shape
    m = -(-length // page_size)
    pad = m * page_size - length
    kf = keys.float()
    lo = F.pad(kf, (0, 0, 0, pad), value=float("inf")).view(h, m, page_size, d).amin(2)
    hi = F.pad(kf, (0, 0, 0, pad), value=float("-inf")).view(h, m, page_size, d).amax(2)
    q = queries.float()[:, :, None]  # [S, H, 1, D]
    return torch.maximum(q * lo[None], q * hi[None]).sum(-1)


def page_scores(token_scores: torch.Tensor, page_size: int, aggregate: str) -> torch.Tensor:
    """[..., H, L] token scores -> [..., H, M] page scores (the runtime's aggregation)."""
    length = token_scores.shape[-1]
    m = -(-length // page_size)
    padded = F.pad(token_scores, (0, m * page_size - length), value=float("-inf"))
    lead = padded.shape[:-2]
    flat = padded.reshape(-1, padded.shape[-2], m * page_size)
    return page_scores_from_tokens(flat, page_size, aggregate).reshape(*lead, padded.shape[-2], m)


def dequantized_keys(keys: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Keys as herald's compact copy holds them (int4/int8 codes, per-group fp16 scales), fp32.

    Uses gpu_kernels.compact_keys: the Triton quantizer on CUDA, its torch reference on the CPU
    (the same codes bit for bit).
    """
    from gpu_kernels.compact_keys import dequantize_keys, quantize_keys, quantize_keys_reference

    if keys.is_cuda:
        codes, scales = quantize_keys(keys.contiguous(), bits, group)
    else:
        codes, scales = quantize_keys_reference(keys, bits, group)
    return dequantize_keys(codes, scales, bits, group)


def compact_unavailable(head_dim: int, group: int) -> str | None:
    """Why the compact-key variants cannot run for this geometry (None: they can)."""
    try:
        from gpu_kernels.compact_keys import check_geometry
    except Exception as err:  # the module may be missing or broken while it is being written
        return f"gpu_kernels.compact_keys does not import ({type(err).__name__}: {err})"
    try:
        for bits in (4, 8):
            check_geometry(head_dim, bits, group)
    except ValueError as err:
        return str(err)
    return None


# ------------------------------------------------------------------------------------------------
# analysis


class _Acc:
    """Sums of one result row over (layer, step) and over the layers for refetch counts."""

    def __init__(self, layers: int, steps: int):
        self.mass = torch.zeros(layers, steps, dtype=torch.float64)
        self.recall = torch.zeros(layers, steps, dtype=torch.float64)
        self.count = torch.zeros(layers, steps, dtype=torch.float64)
        self.selected = torch.zeros(layers, dtype=torch.float64)  # sum of selected tokens (per record, head mean)
        self.context = torch.zeros(layers, dtype=torch.float64)
        self.records = torch.zeros(layers, dtype=torch.float64)
        self.fetched = torch.zeros(layers, dtype=torch.float64)
        self.reused = torch.zeros(layers, dtype=torch.float64)

    def add(self, layer: int, steps: Sequence[int], mass: torch.Tensor, recall: torch.Tensor,
            selected: float, context: int) -> None:
        """mass, recall: [len(steps)] means over heads of one record."""
        idx = torch.tensor(list(steps))
        self.mass[layer].index_add_(0, idx, mass.double().cpu())
        self.recall[layer].index_add_(0, idx, recall.double().cpu())
        self.count[layer].index_add_(0, idx, torch.ones(len(steps), dtype=torch.float64))
        self.selected[layer] += selected
        self.context[layer] += context
        self.records[layer] += 1


def _ratio(num: torch.Tensor, den: torch.Tensor) -> float | None:
    total = float(den.sum())
    return float(num.sum()) / total if total > 0 else None


def _rounded(t: torch.Tensor) -> list:
    return [None if math.isnan(x) else round(x, 5) for x in t.tolist()]


class RecallAnalysis:
    """Accumulates the metrics of every (variant, granularity, aggregate, budget) over records."""

    def __init__(self, model: ModelConfig, steps: int, settings: RecallSettings, device: torch.device):
        self.model, self.steps, self.settings, self.device = model, steps, settings, device
        self.scale = model.head_dim ** -0.5
        self.budgets = [Budget.parse(b) for b in settings.budgets]
        self.acc: dict[tuple[str, str, str, str], _Acc] = {}
        layers = model.num_layers
        self.cos_sum = torch.zeros(layers, steps, dtype=torch.float64)
        self.cos_count = torch.zeros(layers, steps, dtype=torch.float64)
        # page selections per (prompt, layer): of the record being analysed, and of the previous block
        self.cur_pages: dict[tuple[int, int], dict] = {}
        self.prev_pages: dict[tuple[int, int], tuple[int, dict]] = {}
        self.contexts: list[int] = []
        self.notes: list[str] = []
        variants = list(settings.variants)
        reason = None
        if any(v.startswith("herald-int") or v == "herald-split" for v in variants):
            reason = compact_unavailable(model.head_dim, min(settings.compact_group, model.head_dim))
        if reason is not None:
            dropped = [v for v in variants if v.startswith("herald-int") or v == "herald-split"]
            variants = [v for v in variants if v not in dropped]
            self.notes.append(f"skipped {dropped}: {reason}")
        self.variants = variants
        self.group = min(settings.compact_group, model.head_dim)

    def _acc(self, key: tuple[str, str, str, str]) -> _Acc:
        if key not in self.acc:
            self.acc[key] = _Acc(self.model.num_layers, self.steps)
        return self.acc[key]

    # -- one record, one layer -----------------------------------------------------------------

    def add(self, rec: BlockRecord, layer: int) -> None:
        keys = rec.keys[layer]
        if keys is None or not rec.queries[layer] or rec.context_len == 0:
            return
        dev = self.device
        keys = keys.to(dev).float()  # [H, L, D]
        queries = torch.stack(rec.queries[layer]).to(dev).float()  # [S, Hq, B, D]
        steps = rec.steps[: queries.shape[0]]
        hkv, length, _ = keys.shape
        pbar = torch.stack([mean_probs(q, keys, self.scale) for q in queries])  # [S, H, L]
        ranks = ranks_of(pbar)
        q_mean = selection_queries(queries, hkv, "mean")  # [S, H, D]
        self._cosine(layer, steps, q_mean)
        settings = self.settings

        # step-0 token scores of the variants that select once per block
        scores: dict[str, torch.Tensor] = {}
        if "mage" in self.variants:
            scores["mage"] = torch.einsum("hd,hld->hl", q_mean[0], keys) * self.scale
        if "herald-center" in self.variants:
            q_center = selection_queries(queries[:1], hkv, "center")[0]
            scores["herald-center"] = torch.einsum("hd,hld->hl", q_center, keys) * self.scale
        if "herald-positions" in self.variants:
            q_positions = selection_queries(queries[:1], hkv, "positions")[0]  # [H, B, D]
            scores["herald-positions"] = torch.einsum("hrd,hld->hrl", q_positions, keys).amax(1) * self.scale
        if "mage-softmax" in self.variants:
            scores["mage-softmax"] = pbar[0].clamp(min=torch.finfo(pbar.dtype).tiny).log()
        compact_q = selection_queries(queries[:1], hkv, settings.compact_query)[0]  # [H, D] or [H, B, D]
        compact_q = compact_q if compact_q.dim() == 3 else compact_q[:, None]
        for bits in (4, 8):
            split = "herald-split" in self.variants and bits == settings.split_bits
            if f"herald-int{bits}" in self.variants or split:
                compact = dequantized_keys(keys, bits, self.group)
                scores[f"herald-int{bits}"] = torch.einsum("hrd,hld->hrl", compact_q, compact).amax(1) * self.scale
        if "herald-split" in self.variants:  # its CPU part scores the same queries on the exact keys
            split_exact = torch.einsum("hrd,hld->hrl", compact_q, keys).amax(1) * self.scale
        step0 = [v for v in self.variants if v in STEP0_VARIANTS and v != "herald-split"]
        lens = lambda n: torch.full((n,), length, dtype=torch.int64)  # noqa: E731
        oracle_scores = pbar.clamp(min=torch.finfo(pbar.dtype).tiny).log()  # [S, H, L]

        for budget in self.budgets:
            # tokens
            if settings.token_level:
                cfg = budget.sparse_config(1, settings.sink_tokens, settings.local_window)
                token_vars = [v for v in step0 if v in TOKEN_VARIANTS]
                if token_vars:
                    sel = select_tokens(torch.stack([scores[v] for v in token_vars]), lens(len(token_vars)), cfg)
                    mask = entries_to_mask(sel.entries, length)
                    self._add_fixed(layer, steps, [(v, "token", "-") for v in token_vars], budget, mask,
                                    pbar, ranks, length)
                if "oracle" in self.variants:
                    sel = select_tokens(oracle_scores, lens(len(steps)), cfg)
                    self._add_per_step(layer, steps, ("oracle", "token", "-"), budget,
                                       entries_to_mask(sel.entries, length), pbar, ranks, length)
            # pages
            for p in settings.page_sizes:
                cfg = budget.sparse_config(p, settings.sink_tokens, settings.local_window)
                gran = f"page{p}"
                m = -(-length // p)
                page_vars = list(step0)
                if "herald-split" in self.variants:
                    cut = int(settings.split_cpu_fraction * (length // p)) * p
                    pos = torch.arange(length, device=dev)
                    scores["herald-split"] = torch.where(pos < cut, split_exact,
                                                         scores[f"herald-int{settings.split_bits}"])
                    page_vars.append("herald-split")
                if page_vars:
                    stacked = torch.stack([scores[v] for v in page_vars])  # [V, H, L]
                    per_agg = [page_scores(stacked, p, a) for a in settings.aggregates]
                    pscores = torch.cat(per_agg)  # [A*V, H, M]
                    keys_ = [(v, gran, a) for a in settings.aggregates for v in page_vars]
                    sel = select_pages(pscores, lens(len(keys_)), cfg)
                    page_mask = entries_to_mask(sel.entries, m)
                    self._add_fixed(layer, steps, keys_, budget, pages_to_tokens(page_mask, p, length),
                                    pbar, ranks, length)
                    self._refetch(rec, layer, keys_, budget, page_mask)
                if "oracle" in self.variants:
                    sel = select_pages(page_scores(oracle_scores, p, "lse"), lens(len(steps)), cfg)
                    self._add_per_step(layer, steps, ("oracle", gran, "lse"), budget,
                                       pages_to_tokens(entries_to_mask(sel.entries, m), p, length),
                                       pbar, ranks, length)
                if "quest" in self.variants:
                    sel = select_pages(quest_bounds(keys, q_mean, p), lens(len(steps)), cfg)
                    self._add_per_step(layer, steps, ("quest", gran, "bound"), budget,
                                       pages_to_tokens(entries_to_mask(sel.entries, m), p, length),
                                       pbar, ranks, length)

    def _cosine(self, layer: int, steps: Sequence[int], q_mean: torch.Tensor) -> None:
        cos = F.cosine_similarity(q_mean, q_mean[:1].expand_as(q_mean), dim=-1).mean(-1)  # [S]
        idx = torch.tensor(list(steps))
        self.cos_sum[layer].index_add_(0, idx, cos.double().cpu())
        self.cos_count[layer].index_add_(0, idx, torch.ones(len(steps), dtype=torch.float64))

    def _add_fixed(self, layer, steps, keys_, budget: Budget, mask, pbar, ranks, length: int) -> None:
        mass, recall = mass_and_recall(mask, pbar, ranks)  # [S, V, H]
        # one device-to-host copy per call, not one per variant
        mass, recall = mass.mean(-1).cpu(), recall.mean(-1).cpu()  # [S, V]
        selected = mask.sum(-1).double().mean(-1).tolist()  # [V]
        for i, key in enumerate(keys_):
            self._acc((*key, budget.label)).add(layer, steps, mass[:, i], recall[:, i], selected[i], length)

    def _add_per_step(self, layer, steps, key, budget: Budget, mask, pbar, ranks, length: int) -> None:
        mass, recall = mass_and_recall_per_step(mask, pbar, ranks)  # [S, H]
        self._acc((*key, budget.label)).add(layer, steps, mass.mean(-1), recall.mean(-1),
                                            float(mask.sum(-1).double().mean()), length)

    def _refetch(self, rec: BlockRecord, layer: int, keys_, budget: Budget, page_mask: torch.Tensor) -> None:
        """Pages of this block's selection that the previous block of the same prompt did not select."""
        page_mask = page_mask.cpu()
        slot = (budget.label, keys_[0][1])  # (budget, granularity)
        self.cur_pages.setdefault((rec.row, layer), {})[slot] = (keys_, page_mask)
        prev = self.prev_pages.get((rec.row, layer))
        if prev is None or prev[0] != rec.block - 1 or slot not in prev[1]:
            return
        prev_keys, prev_mask = prev[1][slot]
        if prev_keys != keys_:
            return
        old = F.pad(prev_mask, (0, page_mask.shape[-1] - prev_mask.shape[-1]))
        fetched = (page_mask & ~old).sum((-1, -2)).double()  # [V], summed over heads
        reused = (page_mask & old).sum((-1, -2)).double()
        for i, key in enumerate(keys_):
            acc = self._acc((*key, budget.label))
            acc.fetched[layer] += float(fetched[i])
            acc.reused[layer] += float(reused[i])

    def end_record(self, rec: BlockRecord) -> None:
        """Make this record's page selections the 'previous block' of its prompt's next record."""
        self.contexts.append(rec.context_len)
        for layer in range(self.model.num_layers):
            current = self.cur_pages.pop((rec.row, layer), None)
            if current is not None:
                self.prev_pages[(rec.row, layer)] = (rec.block, current)

    # -- results ---------------------------------------------------------------------------------

    def sparse_layers(self) -> list[int]:
        """Layers the averages cover: those after the dense ones, or all when none would be left."""
        layers = list(range(self.settings.dense_layers, self.model.num_layers))
        return layers or list(range(self.model.num_layers))

    def result(self) -> dict[str, Any]:
        layers = self.sparse_layers()
        later = list(range(1, self.steps))
        rows = []
        for key, acc in self.acc.items():
            variant, gran, agg, budget = key
            cnt = acc.count[layers]
            use = later if float(cnt[:, later].sum()) > 0 else [0]
            by_layer_steps = lambda t: (t[:, use].sum(-1) / acc.count[:, use].sum(-1))  # noqa: E731
            with torch.no_grad():
                row = {
                    "variant": variant, "granularity": gran, "aggregate": agg, "budget": budget,
                    "mass": _ratio(acc.mass[layers][:, use], cnt[:, use]),
                    "recall": _ratio(acc.recall[layers][:, use], cnt[:, use]),
                    "mass_step0": _ratio(acc.mass[layers][:, :1], cnt[:, :1]),
                    "recall_step0": _ratio(acc.recall[layers][:, :1], cnt[:, :1]),
                    "steps_averaged": "1.." + str(self.steps - 1) if use == later else "0",
                    "mass_by_layer": _rounded(by_layer_steps(acc.mass)),
                    "recall_by_layer": _rounded(by_layer_steps(acc.recall)),
                    "mass_by_step": _rounded(acc.mass[layers].sum(0) / cnt.sum(0)),
                    "recall_by_step": _rounded(acc.recall[layers].sum(0) / cnt.sum(0)),
                    "selected_tokens": float(acc.selected[layers].sum() / acc.records[layers].sum()),
                    "selected_share": float(acc.selected[layers].sum() / acc.context[layers].sum()),
                }
            if float(acc.fetched.sum() + acc.reused.sum()) > 0:
                moved, kept = acc.fetched[layers].sum(), acc.reused[layers].sum()
                row["refetch"] = {"pages_fetched": float(moved), "pages_reused": float(kept),
                                  "fetched_share": float(moved / (moved + kept))}
            rows.append(row)
        rows.sort(key=lambda r: _row_order(r, self.settings))
        if self.settings.dense_layers >= self.model.num_layers:
            self.notes.append(f"the model has {self.model.num_layers} layers, all within dense_layers="
                              f"{self.settings.dense_layers}: averages cover every layer")
        cos = self.cos_sum / self.cos_count
        cos_later = self.cos_sum[:, 1:].sum(-1) / self.cos_count[:, 1:].sum(-1)
        return {
            "rows": rows,
            "query_cosine": {
                "by_layer_step": [_rounded(r) for r in cos],
                "by_layer": _rounded(cos_later),
                "mean": _ratio(self.cos_sum[layers][:, 1:], self.cos_count[layers][:, 1:]),
            },
            "averaged_layers": layers,
            "variants": self.variants,
            "notes": self.notes,
        }


def _row_order(row: dict, settings: RecallSettings) -> tuple:
    """Tokens first, then pages by size; inside, step-0 variants by aggregate, then per-step ones."""
    gran = -1 if row["granularity"] == "token" else int(row["granularity"][4:])
    per_step = row["variant"] in PER_STEP_VARIANTS
    aggs = list(settings.aggregates)
    agg = aggs.index(row["aggregate"]) if row["aggregate"] in aggs and not per_step else len(aggs)
    return (gran, per_step, agg, ALL_VARIANTS.index(row["variant"]), list(settings.budgets).index(row["budget"]))


def analyze(records: Sequence[BlockRecord], model: ModelConfig, steps: int, settings: RecallSettings,
            device: torch.device | str | None = None, progress: bool = True) -> dict[str, Any]:
    """Offline metrics of recorded blocks (see the module docstring). Returns the JSON-ready dict."""
    if not records:
        raise ValueError("no blocks were recorded: the prompts generated nothing (raise --blocks?)")
    dev = torch.device(device) if device is not None else records[0].queries[0][0].device
    analysis = RecallAnalysis(model, steps, settings, dev)
    ordered = sorted(records, key=lambda r: (r.row, r.block))
    bar = tqdm(total=len(ordered) * model.num_layers, unit="layer", desc="recall analysis",
               disable=not progress, leave=False)
    with torch.no_grad():
        for rec in ordered:
            for layer in range(model.num_layers):
                analysis.add(rec, layer)
                bar.update(1)
            analysis.end_record(rec)
    bar.close()
    out = analysis.result()
    out["records"] = [{"prompt": r.row, "block": r.block, "context": r.context_len, "steps": len(r.steps)}
                      for r in ordered]
    return out


# ------------------------------------------------------------------------------------------------
# prompts, tables, plots, command line


_NUMBER_LIST = re.compile(r"\[\s*((?:[-+\w.]+)(?:,\s*[-+\w.]+)*)\s*\]")


def dumps(result: dict[str, Any]) -> str:
    """Indented JSON with every list of plain numbers (per-layer, per-step series) on one line."""
    text = json.dumps(result, indent=1)
    return _NUMBER_LIST.sub(lambda m: "[" + re.sub(r",\s+", ", ", m.group(1)) + "]", text) + "\n"


def task_prompts(engine: Engine, task: str, contexts: Sequence[int], examples: int, seed: int, *,
                 split: str) -> list[list[int]]:
    """Token ids of the first `examples` task instances of the (split, seed) stream (training/tasks) at
    each context."""
    if engine.tokenizer is None:
        raise ValueError(f"{engine.config.model_path} has no tokenizer: pass --prompt-ids instead of tasks")
    return [engine.tokenizer.encode(ex.prompt) for c in contexts
            for ex in generate_examples(task, c, examples, seed, split=split)]


def _cell(row: dict | None) -> str:
    if row is None or row["mass"] is None:
        return "-"
    return f"{row['mass']:.3f} {row['recall']:.3f}"


def recall_table(result: dict[str, Any]) -> str:
    """Rows: variant / granularity / aggregate; columns: budgets; cells 'mass recall'."""
    budgets = result["settings"]["budgets"]
    by_key: dict[tuple, dict[str, dict]] = {}
    for r in result["rows"]:
        by_key.setdefault((r["variant"], r["granularity"], r["aggregate"]), {})[r["budget"]] = r
    header = ["variant", "gran", "agg"] + budgets
    lines = [[*key, *[_cell(cells.get(b)) for b in budgets]] for key, cells in by_key.items()]
    share = {}
    for r in result["rows"]:
        if r["granularity"] == "token" or r["budget"] not in share:
            share[r["budget"]] = r["selected_share"]
    lines.append(["(selected share)", "", ""] + [f"{share.get(b, float('nan')):.1%}" for b in budgets])
    return _format(header, lines)


def refetch_table(result: dict[str, Any]) -> str:
    """Share of each block's selected pages that the previous block of the prompt did not select."""
    budgets = result["settings"]["budgets"]
    by_key: dict[tuple, dict[str, dict]] = {}
    rows = [r for r in result["rows"] if "refetch" in r]
    if any(r["aggregate"] == "max" for r in rows):  # the runtime ranks pages by max; the JSON has all
        rows = [r for r in rows if r["aggregate"] == "max"]
    for r in rows:
        by_key.setdefault((r["variant"], r["granularity"], r["aggregate"]), {})[r["budget"]] = r
    if not by_key:
        return "(no page re-fetch data: record at least 2 blocks per prompt)"
    header = ["variant", "gran", "agg"] + budgets
    lines = [[*key, *[f"{c[b]['refetch']['fetched_share']:.1%}" if b in c else "-" for b in budgets]]
             for key, c in by_key.items()]
    return _format(header, lines)


def cosine_table(result: dict[str, Any]) -> str:
    cos = result["query_cosine"]["by_layer_step"]
    steps = len(cos[0]) if cos else 0
    header = ["layer"] + [f"s{s}" for s in range(1, steps)] + ["mean"]
    lines = []
    for layer, row in enumerate(cos):
        mean = result["query_cosine"]["by_layer"][layer]
        lines.append([str(layer)] + ["-" if x is None else f"{x:.3f}" for x in row[1:]]
                     + ["-" if mean is None else f"{mean:.3f}"])
    return _format(header, lines)


def _format(header: list[str], lines: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]
    def fmt(r: list[str]) -> str:  # label columns left, numbers right
        return "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(header), "  ".join("-" * w for w in widths), *map(fmt, lines)])


def plot_recall(result: dict[str, Any], path: Path) -> Path | None:
    """Mass and recall against budget (token level and pages of 16 with the max aggregate, plus
    quest and the oracle), and the query cosine per layer. None when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import NullFormatter, PercentFormatter
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib, or pass --no-plot)", file=sys.stderr)
        return None
    budgets = result["settings"]["budgets"]
    pages = result["settings"]["page_sizes"]
    page = 16 if 16 in pages else (pages[0] if pages else None)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    series: dict[str, dict[str, dict]] = {}
    for r in result["rows"]:
        chosen = r["granularity"] == "token" or (
            page is not None and r["granularity"] == f"page{page}" and r["aggregate"] in ("max", "bound", "lse")
            and (r["aggregate"] != "lse" or r["variant"] == "oracle"))
        if chosen:
            series.setdefault(f"{r['variant']} {r['granularity']}", {})[r["budget"]] = r
    # x: the share of the context actually selected (forced sinks/window included), so token counts
    # and fractions of the context sit on one axis
    colors = plt.get_cmap("tab20").colors
    for i, (label, cells) in enumerate(series.items()):
        pts = sorted(((c["selected_share"], c) for c in cells.values() if c["mass"] is not None),
                     key=lambda xc: xc[0])
        for ax, metric in zip(axes[:2], ("mass", "recall")):
            ax.plot([x for x, _ in pts], [c[metric] for _, c in pts], "--" if "token" in label else "-",
                    marker="o", ms=4, color=colors[i % len(colors)], label=label)
    for ax, metric in zip(axes[:2], ("attention mass captured", "top-k recall vs step oracle")):
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(f"selected share of the context (budgets {', '.join(budgets)})")
        ax.set_ylabel(metric)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    cos = result["query_cosine"]["by_layer_step"]
    for layer, row in enumerate(cos):
        axes[2].plot(range(1, len(row)), [float("nan") if v is None else v for v in row[1:]], label=f"L{layer}")
    axes[2].set_xlabel("denoising step")
    axes[2].xaxis.get_major_locator().set_params(integer=True)
    axes[2].set_ylabel("cos(block-mean q at step 0, at step s)")
    axes[2].grid(alpha=0.3)
    if len(cos) <= 12:
        axes[2].legend(fontsize=7, ncol=2)
    fig.suptitle(f"selection recall, {Path(result['model']).name}, contexts {sorted(set(result['contexts']))}, "
                 f"{result['device']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_recall(engine: Engine, prompts: Sequence[list[int]], blocks: int, settings: RecallSettings,
               store_device: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Record `blocks` blocks of each prompt with `engine` and analyse them: the JSON-ready result."""
    t0 = time.perf_counter()
    records = record(engine, prompts, blocks, store_device=store_device, progress=progress)
    t1 = time.perf_counter()
    analysis = analyze(records, engine.model_config, engine.settings.steps, settings, device=engine.device,
                       progress=progress)
    return dict(
        model=str(engine.config.model_path), device=str(engine.device), dtype=str(engine.dtype).replace("torch.", ""),
        block_size=engine.settings.block_size, steps=engine.settings.steps, unmasking=engine.settings.unmasking,
        contexts=[r["context"] for r in analysis["records"]], prompts=len(prompts), blocks=blocks,
        settings=asdict(settings) | {"budgets": list(settings.budgets)},
        record_s=round(t1 - t0, 2), analyze_s=round(time.perf_counter() - t1, 2), **analysis,
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.recall", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint folder")
    p.add_argument("--context", type=int, nargs="+", default=[2048],
                   help="context lengths of the task instances (tokens)")
    p.add_argument("--task", default="passkey", choices=TASKS)
    p.add_argument("--examples", type=int, default=1, help="task instances per context")
    add_split_argument(p)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--prompt-ids", type=Path, default=None,
                   help="JSON file with a list of token ids (or a list of such lists) instead of task instances")
    p.add_argument("--blocks", type=int, default=2, help="blocks recorded per prompt")
    p.add_argument("--budgets", nargs="+", default=list(DEFAULT_BUDGETS))
    p.add_argument("--page-sizes", type=int, nargs="*", default=list(DEFAULT_PAGE_SIZES))
    p.add_argument("--aggregates", nargs="+", default=list(AGGREGATES), choices=AGGREGATES)
    p.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=ALL_VARIANTS)
    p.add_argument("--no-token-level", action="store_true", help="skip token-granularity selections")
    p.add_argument("--sink-tokens", type=int, default=SparseConfig.sink_tokens)
    p.add_argument("--local-window", type=int, default=SparseConfig.local_window)
    p.add_argument("--dense-layers", type=int, default=SparseConfig.dense_layers,
                   help="first layers left out of the averages (default: those the runtime keeps exact)")
    p.add_argument("--compact-group", type=int, default=SparseConfig.compact_group)
    p.add_argument("--compact-query", default="positions", choices=("mean", "center", "positions"),
                   help="the queries of the herald-int* and herald-split variants (herald's default: positions)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--unmasking", default="fixed", choices=("fixed", "threshold"),
                   help="fixed: every block runs all its denoising steps")
    p.add_argument("--steps", type=int, default=None, help="denoising steps per block (default: block size)")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--store-device", default=None, help="where recordings are kept (default: the model's device)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--plot", type=Path, default=DEFAULT_PLOT)
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = RecallSettings(
        budgets=args.budgets, page_sizes=args.page_sizes, aggregates=args.aggregates, variants=args.variants,
        token_level=not args.no_token_level, sink_tokens=args.sink_tokens, local_window=args.local_window,
        dense_layers=args.dense_layers, compact_group=args.compact_group, compact_query=args.compact_query)
    engine = Engine(EngineConfig(model_path=str(args.model), mode="dense", attention_backend="torch",
                                 device=args.device, dtype=args.dtype, unmasking=args.unmasking,
                                 denoising_steps=args.steps, max_batch_size=args.max_batch_size, progress=False))
    if args.prompt_ids is not None:
        data = json.loads(args.prompt_ids.read_text())
        prompts = [data] if data and isinstance(data[0], int) else data
        source = str(args.prompt_ids)
    else:
        prompts = task_prompts(engine, args.task, args.context, args.examples, args.seed, split=args.split)
        source = f"{args.task} ({args.split} split, seed {args.seed})"
    result = run_recall(engine, prompts, args.blocks, settings, store_device=args.store_device,
                        progress=not args.no_progress)
    result["prompt_source"] = source
    result["split"] = None if args.prompt_ids is not None else args.split  # None: the prompts are the file's
    print(f"{args.model}: {len(prompts)} prompt(s) from {source}, {args.blocks} block(s) each, contexts "
          f"{sorted(set(result['contexts']))}, B={result['block_size']}, {result['steps']} steps "
          f"({result['unmasking']}), {result['device']} {result['dtype']}; record {result['record_s']} s, "
          f"analysis {result['analyze_s']} s")
    layers = result["averaged_layers"]
    print(f"\nattention mass captured / top-k recall vs each step's oracle (cells 'mass recall'; mean over "
          f"denoising steps >= 1, layers {layers[0]}..{layers[-1]}, KV heads, blocks)")
    print(recall_table(result))
    print("\npages re-fetched between consecutive blocks (share of the block's selected pages the previous "
          "block did not select)")
    print(refetch_table(result))
    print("\nMAGE property: cosine(block-mean query at step 0, at step s), per layer")
    print(cosine_table(result))
    for note in result["notes"]:
        print(f"note: {note}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(dumps(result))
    print(f"wrote {args.out}")
    if not args.no_plot:
        path = plot_recall(result, args.plot)
        if path is not None:
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
