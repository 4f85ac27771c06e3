"""Fit herald's learned forecast (SparDA's Forecast projections) on a frozen checkpoint.

    python -m training.forecast --model checkpoints/retrieval-6m --contexts 1024 2048 --prompts 24

For every layer l >= 1 and KV head h, a D x D projection W[l, h] maps layer l-1's step-0
selection queries (one per block position, the mean of the head's query group, RoPE applied) to
queries whose scores against layer l's keys should rank layer l's tokens as layer l's own queries
do. The loss distils layer l's own selection scores: the KL divergence from the token distribution
of its own queries (softmax over the context of the max over block positions) to that of the
mapped ones. W starts at the identity, which is the training-free forecast, so a fit can only
move from it. Data: exact decodes of training-split task prompts (training/recording.py), the
first block of each; the report: on held-out prompts (the validation split), the share of each
layer's own page selection that the forecast's selection holds (the forced pages, sinks and
window, included as herald selects them), before (identity) and after. The projections go to
`<model>/forecast.safetensors` (runtime.checkpoint.FORECAST_FILE), which
`SparseConfig(forecast="learned")` loads.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from runtime.checkpoint import FORECAST_FILE
from runtime.config import EngineConfig, SparseConfig
from runtime.engine import Engine
from runtime.selection import page_scores_from_tokens, plan_selection, select_pages, selection_queries
from training.evaluate import add_tasks_argument
from training.recording import BlockRecord, record
from training.tasks import RULER_TASKS, generate_examples


@dataclass
class LayerPairs:
    """One layer's training pairs over M recorded blocks (contexts padded to the longest, T).

    q_before, q_own: [M, Hkv, B, D] step-0 selection queries of the layer before and of this one;
    keys: [M, Hkv, T, D] this layer's context keys; valid: [M, T] bool (False: padding)."""

    q_before: torch.Tensor
    q_own: torch.Tensor
    keys: torch.Tensor
    valid: torch.Tensor


def step0_queries(records: Sequence[BlockRecord]) -> list[torch.Tensor]:
    """Per layer, the records' step-0 selection queries [M, Hkv, B, D] (one per block position)."""
    hkv = records[0].keys[0].shape[0]
    return [selection_queries(torch.stack([r.queries[layer][0].float() for r in records]), hkv, "positions")
            for layer in range(len(records[0].keys))]


def layer_pairs(records: Sequence[BlockRecord], layer: int, queries: Sequence[torch.Tensor]) -> LayerPairs:
    """The pairs of `layer` (>= 1) from exact-decode records and their `step0_queries`."""
    hkv = records[0].keys[layer].shape[0]
    length = max(r.context_len for r in records)
    keys = torch.zeros(len(records), hkv, length, records[0].keys[layer].shape[-1])
    valid = torch.zeros(len(records), length, dtype=torch.bool)
    for i, r in enumerate(records):
        keys[i, :, :r.context_len] = r.keys[layer].float()
        valid[i, :r.context_len] = True
    return LayerPairs(queries[layer - 1], queries[layer], keys, valid)


def token_scores(queries: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, scale: float) -> torch.Tensor:
    """[M, Hkv, T] a token's score: the max over the B queries [M, Hkv, B, D]; -inf on padding."""
    scores = torch.einsum("mhbd,mhtd->mhbt", queries, keys).amax(2) * scale
    return scores.masked_fill(~valid[:, None], float("-inf"))


def distillation_loss(weight: torch.Tensor, pairs: LayerPairs, scale: float) -> torch.Tensor:
    """KL(own || forecast) of the token distributions, mean over blocks and KV heads; weight [Hkv, D, D]."""
    target = F.log_softmax(token_scores(pairs.q_own, pairs.keys, pairs.valid, scale), dim=-1)
    mapped = torch.einsum("mhbd,hde->mhbe", pairs.q_before, weight)
    predicted = F.log_softmax(token_scores(mapped, pairs.keys, pairs.valid, scale), dim=-1)
    kl = torch.where(pairs.valid[:, None], target.exp() * (target - predicted), 0.0)
    return kl.sum(-1).mean()


def selection_overlap(weight: torch.Tensor, pairs: LayerPairs, scale: float, sparse: SparseConfig) -> float:
    """Share of the layer's own page selection (herald's rule) that the forecast's selection holds."""
    p = sparse.page_size
    lens = pairs.valid.sum(-1)
    pad = (-pairs.keys.shape[2]) % p

    def pages(queries: torch.Tensor) -> torch.Tensor:
        scores = F.pad(token_scores(queries, pairs.keys, pairs.valid, scale), (0, pad), value=float("-inf"))
        page = page_scores_from_tokens(scores, p, "max")
        plan = plan_selection(lens, page.shape[-1], sparse, "cpu")
        return select_pages(page, None, sparse, plan).entries

    own = pages(pairs.q_own)
    forecast = pages(torch.einsum("mhbd,hde->mhbe", pairs.q_before, weight))
    hits = ((own[..., :, None] == forecast[..., None, :]) & (own[..., :, None] >= 0)).any(-1).sum()
    return float(hits / (own >= 0).sum().clamp(min=1))


def fit_forecast(train: Sequence[BlockRecord], held_out: Sequence[BlockRecord], scale: float, sparse: SparseConfig,
                 *, steps: int = 300, lr: float = 3e-3, log_every: int = 50) -> tuple[torch.Tensor, list[dict]]:
    """Projections [L, Hkv, D, D] (identity for layer 0, which nothing forecasts) and a per-layer
    report: loss and held-out selection overlap before (identity) and after the fit."""
    num_layers = len(train[0].keys)
    hkv, d = train[0].keys[0].shape[0], train[0].keys[0].shape[-1]
    weights = torch.eye(d).repeat(num_layers, hkv, 1, 1)
    report = []
    train_queries, held_out_queries = step0_queries(train), step0_queries(held_out)
    for layer in range(1, num_layers):
        pairs, check = layer_pairs(train, layer, train_queries), layer_pairs(held_out, layer, held_out_queries)
        weight = torch.eye(d).repeat(hkv, 1, 1).requires_grad_()
        opt = torch.optim.Adam([weight], lr=lr)
        with torch.no_grad():
            before = dict(loss=float(distillation_loss(weight, check, scale)),
                          overlap=selection_overlap(weight, check, scale, sparse))
        for step in range(steps):
            loss = distillation_loss(weight, pairs, scale)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if log_every and (step + 1) % log_every == 0:
                print(f"layer {layer} step {step + 1}: train KL {loss.item():.4f}", flush=True)
        with torch.no_grad():
            after = dict(loss=float(distillation_loss(weight, check, scale)),
                         overlap=selection_overlap(weight, check, scale, sparse))
        weights[layer] = weight.detach()
        report.append(dict(layer=layer, kl_before=before["loss"], kl_after=after["loss"],
                           overlap_before=before["overlap"], overlap_after=after["overlap"]))
        print(f"layer {layer}: held-out KL {before['loss']:.4f} -> {after['loss']:.4f}, selection overlap "
              f"{before['overlap']:.3f} -> {after['overlap']:.3f}", flush=True)
    return weights, report


def recorded_blocks(engine: Engine, tasks: Sequence[str], contexts: Sequence[int], per_task: int, seed: int,
                    split: str, progress: bool) -> list[BlockRecord]:
    """First-block records of `per_task` prompts of every (task, context) of the split."""
    prompts = [engine.tokenizer.encode(ex.prompt) for c in contexts for t in tasks
               for ex in generate_examples(t, c, per_task, seed=seed, split=split)]
    return record(engine, prompts, blocks=1, store_device="cpu", progress=progress)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.forecast", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, type=Path, help="checkpoint folder (the file is written there)")
    add_tasks_argument(p, default=RULER_TASKS, help="tasks whose prompts are recorded")
    p.add_argument("--contexts", type=int, nargs="+", default=[2048])
    p.add_argument("--per-task", type=int, default=2, help="training prompts per task and context")
    p.add_argument("--held-out-per-task", type=int, default=1, help="validation-split prompts per task and context")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=300, help="Adam steps per layer")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--budget", type=float, default=5.0, help="percent of the context the overlap is measured at")
    p.add_argument("--page-size", type=int, default=SparseConfig.page_size)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, default=None, help=f"default: <model>/{FORECAST_FILE}")
    p.add_argument("--report-json", type=Path, default=None)
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    engine = Engine(EngineConfig(model_path=str(args.model), mode="dense", device=args.device, progress=False,
                                 max_batch_size=8))
    if engine.tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer.json: the task prompts are text")
    sparse = SparseConfig(budget_fraction=args.budget / 100.0, page_size=args.page_size)
    progress = not args.no_progress
    train = recorded_blocks(engine, args.tasks, args.contexts, args.per_task, args.seed, "train", progress)
    held_out = recorded_blocks(engine, args.tasks, args.contexts, args.held_out_per_task, args.seed, "validation",
                               progress)
    scale = engine.model_config.head_dim ** -0.5
    weights, report = fit_forecast(train, held_out, scale, sparse, steps=args.steps, lr=args.lr)
    out = args.out if args.out is not None else args.model / FORECAST_FILE
    meta = dict(tasks=" ".join(args.tasks), contexts=" ".join(map(str, args.contexts)), train_blocks=str(len(train)),
                held_out_blocks=str(len(held_out)), steps=str(args.steps), budget_percent=f"{args.budget:g}")
    save_file({"weight": weights.contiguous()}, str(out), metadata=meta)
    summary = dict(model=str(args.model), out=str(out), **meta, layers=report, wall_s=round(time.perf_counter() - t0, 1))
    if args.report_json is not None:
        args.report_json.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {out} ({len(train)} training blocks, {len(held_out)} held out, {summary['wall_s']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
