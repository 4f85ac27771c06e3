"""How fast does the engine decode blocks at a real model geometry? (random weights; speed does not
depend on their values)

For each geometry, attention backend, context length and batch size: prefill the batch, then time
whole blocks of the real loop (denoising passes + the commit pass), synchronised per block.
Prints a table last and writes $OUT/decode.json.

    python -m benchmarks.decode --geometry qwen3-8b --contexts 8192 32768 --batches 1 4
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from runtime.checkpoint import random_model
from runtime.config import EngineConfig, ModelConfig, MoeConfig, RopeConfig
from runtime.decoding import GenerationRequest
from runtime.engine import Engine
from runtime.generate import BlockDiffusionLoop

_QWEN3 = dict(architecture="qwen3", vocab_size=151936, head_dim=128, max_position_embeddings=32768,
              rope=RopeConfig(theta=1e6), qk_norm=True, tie_word_embeddings=False)
GEOMETRIES = {
    # Qwen3-8B as SDAR-8B uses it
    "qwen3-8b": ModelConfig(**_QWEN3, hidden_size=4096, intermediate_size=12288, num_layers=36, num_heads=32,
                            num_kv_heads=8),
    # Qwen3-1.7B as SDAR-1.7B uses it
    "qwen3-1.7b": ModelConfig(**_QWEN3, hidden_size=2048, intermediate_size=6144, num_layers=28, num_heads=16,
                              num_kv_heads=8),
    # SDAR-30B-A3B: Qwen3-30B-A3B's geometry, 128 experts (8 a token) in every layer
    "sdar-30b-a3b": ModelConfig(**{**_QWEN3, "architecture": "qwen3_moe"}, hidden_size=2048, intermediate_size=6144,
                                num_layers=48, num_heads=32, num_kv_heads=4,
                                moe=MoeConfig(128, 8, 768, tuple(range(48)), normalize_weights=True)),
    # LLaDA2.0-mini's published config: 256 experts (8 a token in 4 of 8 groups) + 1 shared, first layer dense
    "llada2-mini": ModelConfig(architecture="llada2_moe", vocab_size=157184, head_dim=128, hidden_size=2048,
                               intermediate_size=5120, num_layers=20, num_heads=16, num_kv_heads=4,
                               max_position_embeddings=32768, rope=RopeConfig(theta=600000.0), qk_norm=True,
                               rotary_dim=64, output_bias=False, rms_norm_eps=1e-6,
                               moe=MoeConfig(256, 8, 512, tuple(range(1, 20)), score="sigmoid", normalize_weights=True,
                                             num_groups=8, groups_per_token=4, routed_scaling=2.5,
                                             num_shared_experts=1, expert_bias=True)),
    # a smoke-test size for machines without a GPU
    "tiny": ModelConfig(**_QWEN3, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4, num_kv_heads=2),
}


def geometry(name: str, max_positions: int) -> ModelConfig:
    """A real model's geometry (random weights), its positions extended to `max_positions`."""
    return replace(GEOMETRIES[name], max_position_embeddings=max(max_positions, GEOMETRIES[name].max_position_embeddings))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_block(loop: BlockDiffusionLoop, seqs: list, device: torch.device, trace: Path | None = None) -> str:
    """torch.profiler table of one more block: where the time goes, device and host side. With
    ``trace`` (a ``.json.gz`` path) the timeline is saved too, for chrome://tracing or Perfetto:
    the side stream's overlap with the main one only shows there."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        loop.decode_block(seqs)
        sync(device)
    if trace is not None:
        trace.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace))
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    return (prof.key_averages().table(sort_by=sort, row_limit=25) + "\n"
            + prof.key_averages().table(sort_by="cpu_time_total", row_limit=15))


def measure(engine: Engine, context: int, batch: int, blocks: int, profile: bool = False) -> dict:
    b = engine.settings.block_size
    gen = torch.Generator().manual_seed(context + batch)
    vocab = engine.model_config.vocab_size - 2
    requests = [GenerationRequest(prompt=torch.randint(0, vocab, (context,), generator=gen).tolist(),
                                  max_new_tokens=(blocks + int(profile)) * b, stop_at_eos=False) for _ in range(batch)]
    seqs = [engine.make_sequence(r) for r in requests]
    mode = engine.make_mode(batch, max(s.max_tokens for s in seqs))
    loop = BlockDiffusionLoop(engine.model, mode, engine.settings, batch, engine.config.prefill_chunk_size,
                              engine.device)
    try:
        t0 = time.perf_counter()
        for seq in seqs:
            mode.add_sequence(seq.seq_id, seq.max_tokens)
            loop.prefill(seq)
        sync(engine.device)
        prefill_s = time.perf_counter() - t0
        latencies = []
        for _ in range(blocks):
            t0 = time.perf_counter()
            loop.decode_block(seqs)
            sync(engine.device)
            latencies.append(time.perf_counter() - t0)
        if profile:
            print(profile_block(loop, seqs, engine.device), flush=True)
    finally:
        mode.close()
        del mode
        if engine.device.type == "cuda":
            torch.cuda.empty_cache()
    steady = latencies[1:] or latencies  # the first block pays warm-up (kernel compilation, caches)
    block_s = statistics.median(steady)
    return dict(context=context, batch=batch, prefill_s=prefill_s, block_latency_s=block_s,
                block_latencies_s=latencies, passes_per_block=engine.settings.steps + 1,
                tokens_per_s=batch * b / block_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--geometry", default="qwen3-8b", choices=sorted(GEOMETRIES))
    parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--backends", nargs="+", default=["torch", "triton"])
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8, help="denoising steps per block (fixed schedule)")
    parser.add_argument("--blocks", type=int, default=3, help="blocks timed per configuration (first is warm-up)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table of one extra block")
    parser.add_argument("--out", default=os.environ.get("OUT", "out"))
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = geometry(args.geometry, max(args.contexts) + args.blocks * args.block_size + 64)
    print(f"building {args.geometry} with random weights on {device} ({dtype})", flush=True)
    model = random_model(config, dtype=dtype, device=device)
    rows = []
    configs = [(be, c, n) for be in args.backends for c in args.contexts for n in args.batches]
    for backend, context, batch in tqdm(configs, desc="decode benchmark", unit="config"):
        engine = Engine(EngineConfig(model_path=f"<random {args.geometry}>", device=args.device,
                                     dtype=str(dtype).removeprefix("torch."), block_size=args.block_size,
                                     denoising_steps=args.steps, unmasking="fixed", mask_token_id=config.vocab_size - 1,
                                     max_batch_size=batch, attention_backend=backend, progress=False), model=model)
        try:
            row = dict(geometry=args.geometry, backend=backend, **measure(engine, context, batch, args.blocks, args.profile))
        except (torch.OutOfMemoryError, MemoryError) as err:
            row = dict(geometry=args.geometry, backend=backend, context=context, batch=batch, error=str(err)[:200])
        rows.append(row)
        tqdm.write(json.dumps({k: v for k, v in row.items() if k != "block_latencies_s"}))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                torch=torch.__version__, block_size=args.block_size, steps=args.steps)
    (out / "decode.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print(f"\n{args.geometry}, block {args.block_size}, {args.steps} steps + 1 commit pass per block, {meta['device']}")
    print(f"{'backend':>8} {'context':>8} {'batch':>5} {'prefill s':>9} {'block ms':>9} {'tokens/s':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['backend']:>8} {r['context']:>8} {r['batch']:>5}  {r['error'][:60]}")
        else:
            print(f"{r['backend']:>8} {r['context']:>8} {r['batch']:>5} {r['prefill_s']:>9.2f} "
                  f"{r['block_latency_s'] * 1e3:>9.1f} {r['tokens_per_s']:>9.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
