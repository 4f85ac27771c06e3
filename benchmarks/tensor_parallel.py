"""Tensor parallelism against data parallelism on the GPUs of one host: the scaling efficiency per GPU.

Run under torchrun, one process a GPU (N = --nproc-per-node):
- data parallel (TP=1): every rank runs its own engine over the whole model (random weights at a
  real geometry) on its own batch; the host decodes the sum of the ranks' tokens/s;
- tensor parallel (TP=N): one engine split over the N ranks (runtime/parallel.py) on one batch;
  every rank commits the same tokens, so the host decodes batch * block / block time.
Both at each context, at the largest batch the planner fits (the same on every rank: the min
over them) or `--batches`, with `benchmarks.throughput.measure` (random context per sequence as if
prefilled; whole blocks of the real loop). Reported: tokens/s and block latency p50 of each, and
per-GPU scaling efficiency = TP tokens/s / DP tokens/s (1.0: splitting the model costs nothing
against N independent engines). Where the whole model does not fit one GPU (LLaDA2.0-flash), the
DP row says so and `--no-dp` skips it.

    torchrun --nproc-per-node 2 -m benchmarks.tensor_parallel --geometry qwen3-8b --contexts 131072
    torchrun --nproc-per-node 4 -m benchmarks.tensor_parallel --geometry llada2-flash --contexts 131072 --no-dp
    torchrun --nproc-per-node 2 -m benchmarks.tensor_parallel --geometry tiny --contexts 512 --device cpu  # smoke run

Results go to $OUT/tensor_parallel.json (rank 0 writes it).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from benchmarks.decode import geometry
from benchmarks.throughput import measure, new_tokens, release
from runtime.checkpoint import random_model
from runtime.config import EngineConfig, ModelConfig, MoeConfig, RopeConfig, SparseConfig
from runtime.engine import Engine
from runtime.model import weight_bytes
from runtime.parallel import TensorParallel, allowed_sizes, process_group_from_env, shutdown

GiB = 2**30
# LLaDA2.0-flash's published config.json (inclusionAI/dFactory configs/model_configs/llada2_flash):
# 100B parameters, 256 experts (8 a token in 4 of 8 groups) + 1 shared, first layer dense
LLADA2_FLASH = ModelConfig(architecture="llada2_moe", vocab_size=157184, head_dim=128, hidden_size=4096,
                           intermediate_size=9216, num_layers=32, num_heads=32, num_kv_heads=4,
                           max_position_embeddings=16384, rope=RopeConfig(theta=600000.0), qk_norm=True,
                           rotary_dim=64, output_bias=False, rms_norm_eps=1e-6,
                           moe=MoeConfig(256, 8, 1024, tuple(range(1, 32)), score="sigmoid", normalize_weights=True,
                                         num_groups=8, groups_per_token=4, routed_scaling=2.5,
                                         num_shared_experts=1, expert_bias=True))


def model_geometry(name: str, max_positions: int) -> ModelConfig:
    if name == "llada2-flash":
        return replace(LLADA2_FLASH, max_position_embeddings=max(max_positions, LLADA2_FLASH.max_position_embeddings))
    return geometry(name, max_positions)


def efficiency(tp_tokens_per_s: float, dp_tokens_per_s: float | None) -> float | None:
    """Per-GPU scaling efficiency of TP over as many GPUs running one engine each (None: no DP row)."""
    return tp_tokens_per_s / dp_tokens_per_s if dp_tokens_per_s else None


def run_engine(config: EngineConfig, model, context: int, batches: list[int] | None, blocks: int,
               agree: TensorParallel) -> list[dict]:
    """`measure` rows of one engine at `context`: the largest batch every rank fits, or `batches`."""
    engine = Engine(config, model=model)
    tokens = context + new_tokens(blocks, config.block_size)
    largest = agree.agree(engine.largest_batch(tokens))
    rows = []
    for batch in batches or [largest]:
        if batch < 1:
            rows.append(dict(context=context, batch=batch, error="not even one sequence fits"))
            continue
        release(engine.device)
        try:
            row = measure(engine, context, batch, blocks, seed=context + batch)
        except (torch.OutOfMemoryError, MemoryError) as err:
            row = dict(context=context, batch=batch, error=f"{type(err).__name__}: {err}"[:300])
        rows.append({k: v for k, v in row.items() if k not in ("block_latencies_s", "timeline")} | dict(largest_batch=largest))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--geometry", default="qwen3-8b", help="a benchmarks.decode geometry or llada2-flash")
    parser.add_argument("--contexts", type=int, nargs="+", default=[131072])
    parser.add_argument("--modes", nargs="+", default=["dense", "herald"])
    parser.add_argument("--batches", type=int, nargs="*", default=None, help="explicit batches (else the largest)")
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--budget", type=float, default=0.05)
    parser.add_argument("--no-dp", action="store_true", help="skip the data-parallel rows (the model fits no one GPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=os.environ.get("OUT", "out"))
    args = parser.parse_args(argv)

    process_group_from_env(torch.device(args.device).type)
    if not dist.is_initialized():
        parser.error("run it under torchrun: torchrun --nproc-per-node N -m benchmarks.tensor_parallel ...")
    world, rank = dist.get_world_size(), dist.get_rank()
    tp = TensorParallel(rank, world)
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = model_geometry(args.geometry, max(args.contexts) + new_tokens(args.blocks, args.block_size))
    if world not in allowed_sizes(config):
        parser.error(f"{args.geometry} splits over {allowed_sizes(config)} ranks, not {world}")
    base = EngineConfig(model_path=f"<random {args.geometry}>", device=str(device), dtype=str(dtype).removeprefix("torch."),
                        block_size=args.block_size, denoising_steps=args.steps, unmasking="fixed",
                        mask_token_id=config.vocab_size - 1, progress=False,
                        sparse=SparseConfig(budget_fraction=args.budget))
    say = print if rank == 0 else (lambda *a, **k: None)
    say(f"{args.geometry}: {weight_bytes(config, dtype)[0] / GiB:.1f} GiB of weights, "
        f"{weight_bytes(config, dtype, world)[0] / GiB:.1f} GiB per rank at TP={world}; {world} ranks on {device.type}",
        flush=True)
    rows = []
    for parallel in ([] if args.no_dp else [1]) + [world]:
        shard = TensorParallel(rank, world) if parallel > 1 else None
        try:
            model = random_model(config, dtype=dtype, device=device, tp=shard)
        except torch.OutOfMemoryError as err:
            say(f"TP={parallel}: the weights do not fit: {err}"[:300])
            continue
        if device.type == "cuda":
            model.set_fused(base.fused_layers)
        for mode in args.modes:
            for context in args.contexts:
                engine_config = replace(base, mode=mode, tensor_parallel_size=parallel)
                for row in run_engine(engine_config, model, context, args.batches, args.blocks, tp):
                    if not tp.agree(int("error" not in row)):  # a row counts where every rank ran it
                        row.setdefault("error", "failed on another rank")
                    elif parallel == 1:  # one engine per rank: the host decodes the sum
                        total = torch.tensor([row["tokens_per_s"]], dtype=torch.float64, device=device)
                        dist.all_reduce(total)
                        row["host_tokens_per_s"] = float(total.item())
                    else:  # one engine over every rank: each commits the same tokens
                        row["host_tokens_per_s"] = row["tokens_per_s"]
                    row.update(mode=mode, tensor_parallel=parallel, ranks=world)
                    rows.append(row)
                    say(json.dumps({k: row.get(k) for k in ("mode", "tensor_parallel", "context", "batch",
                                                            "host_tokens_per_s", "block_p50_s", "error")}), flush=True)
        del model
        release(device)
    for row in rows:
        if row["tensor_parallel"] == world and "error" not in row:
            dp = next((r.get("host_tokens_per_s") for r in rows if r["tensor_parallel"] == 1 and r["mode"] == row["mode"]
                       and r["context"] == row["context"] and "error" not in r), None)
            row["efficiency_per_gpu"] = efficiency(row["host_tokens_per_s"], dp)
    if rank == 0:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        meta = dict(geometry=args.geometry, ranks=world, device=name, torch=torch.__version__,
                    date=time.strftime("%Y-%m-%d"), block_size=args.block_size, steps=args.steps, budget=args.budget)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "tensor_parallel.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
        print(f"\n{args.geometry}, {world} x {name}, {meta['date']}")
        print("| mode | TP | context | batch | tokens/s (host) | block p50 ms | efficiency per GPU |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for r in rows:
            if "error" in r:
                print(f"| {r['mode']} | {r['tensor_parallel']} | {r['context']} | {r['batch']} | {r['error']} | | |")
                continue
            eff = r.get("efficiency_per_gpu")
            print(f"| {r['mode']} | {r['tensor_parallel']} | {r['context']} | {r['batch']} | "
                  f"{r['host_tokens_per_s']:.1f} | {1e3 * r['block_p50_s']:.1f} | "
                  f"{'' if eff is None else f'{eff:.3f}'} |")
    shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
