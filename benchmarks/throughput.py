"""Throughput against GPU-only inference: dense, mage, quest and herald on the same requests, one GPU.

For each context length and mode the memory planner (runtime/memory.py) finds the largest batch
that fits (GPU memory for dense/mage/quest; host memory plus the page budget for herald); the sweep
runs batches 1, 2, 4, ... up to it. Each configuration loads a random context per sequence (as if
prefilled: speed does not depend on KV values, and a 128K prefill per configuration would swamp
the decode measurement), then times whole blocks of the real loop (denoising passes + commit),
synchronised per block. Weights are random at a real geometry.

Reported per row: generated tokens/s, per-block latency p50/p99, GPU memory peak, host memory the
mode pinned, herald's fetches (GPU time when step 0 runs eagerly, bytes, share of selected pages
missed), and herald's ratio over dense (each at its best batch;
dense is the faster of its Triton-kernel and torch-SDPA backends) and over mage at equal batch.

The share of herald's transfer time that stays hidden, two ways (`transfer_ms_est`: the bytes
fetched per block at the pinned copy rate measured in the run, a lower bound of the transfer time):
- by events (`transfer_hidden_events`): exposed = the step-0 fetches on the compute stream (at the
  copy rate) + the main stream's event-timed wait for the lookahead's side pass;
- end to end (`transfer_hidden_e2e`): right after each herald row the same configuration runs with
  `SparseConfig.move_pages=False` (every gather launched as before, its units holes: no byte
  crosses PCIe); exposed = its mean block time subtracted from the row's. This is what a user
  feels, the gathers' SM time and their slowdown of the steps beside them included.

The roofline (`benchmarks.roofline`): each row's floor, the bytes its block must read from HBM and
move over PCIe (`block_bytes`: weights per pass, KV per pass, quest's summaries, herald's scan, its
fetches at the share of the selection the run fetched, the lookahead's pass) at the HBM read and
pinned copy rates measured at the start of the run (`floor_ms`: HBM + PCIe time, or the larger of
the two where the lookahead overlaps the transfers), and the share of it the row reached (floor /
mean block time). On the CPU there are no rates: the row keeps the bytes, not the floor.

    python -m benchmarks.throughput --geometry qwen3-8b --contexts 32768 65536 131072
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import psutil
import torch
from tqdm.auto import tqdm

from benchmarks.decode import GEOMETRIES, geometry, profile_block, sync
from benchmarks.roofline import block_bytes, floor_ms, hbm_read_GBps, pinned_copy_GBps
from runtime.checkpoint import random_model
from runtime.config import EngineConfig, SparseConfig
from runtime.decoding import GenerationRequest
from runtime.engine import Engine
from runtime.model import weight_bytes
from runtime.memory import kv_storage_dtype

GiB = 2**30
# untimed blocks first: the first captures every pass's graph, the second step 0's from a lookahead
WARMUP_BLOCKS = 2


def variants(sources: list[str]) -> list[tuple[str, str, dict]]:
    """(label, mode, config overrides) of every configuration the table compares."""
    rows = [("dense", "dense", {}), ("dense-sdpa", "dense", {"attention_backend": "torch"}),
            ("mage", "mage", {}), ("quest", "quest", {})]
    # each source on the synchronous path: the block's pages selected and fetched at its own step 0
    rows += [(f"herald-{s}", "herald", {"source": s, "lookahead": False}) for s in sources]
    # ... with SparDA's training-free forecast: layer l's queries fetch layer l+1's pages while l attends
    rows.append(("herald-forecast", "herald", {"source": "gpu-compact", "lookahead": False, "forecast": "next-layer"}))
    # HERALD's overlap: the next block's selection and fetch on a side stream, from this block's draft
    rows.append(("herald-lookahead", "herald", {"source": "gpu-compact", "lookahead": True}))
    # ... and the forecast for the blocks it did not prepare (the first after a prefill)
    rows.append(("herald-lookahead-forecast", "herald", {"source": "gpu-compact", "lookahead": True,
                                                         "forecast": "next-layer"}))
    # the same with the passes at the side stream's priority (the default gives them a higher one)
    rows.append(("herald-lookahead-flat", "herald", {"source": "gpu-compact", "lookahead": True,
                                                     "stream_priority": False}))
    # ... and with each layer's gather after its selection on the side stream (no gather stream)
    rows.append(("herald-lookahead-serial", "herald", {"source": "gpu-compact", "lookahead": True,
                                                       "lookahead_gather_stream": False}))
    # ... and with its gathers capped at 8 programs instead of the page fetcher's default
    rows.append(("herald-lookahead-fetch8", "herald", {"source": "gpu-compact", "lookahead": True,
                                                       "lookahead_fetch_programs": 8}))
    # ... and selecting with the block-mean query instead of one query per block position
    rows.append(("herald-lookahead-mean-query", "herald", {"source": "gpu-compact", "lookahead": True,
                                                           "query": "mean"}))
    # ... and with the host store on 4 KiB pages instead of huge pages
    rows.append(("herald-lookahead-base-pages", "herald", {"source": "gpu-compact", "lookahead": True,
                                                           "host_huge_pages": False}))
    # fp8 K/V (EngineConfig.kv_format): herald's host store, pools and exact layers as e4m3 pages with
    # per-(page, head) scales, against dense with the same format resident (its fair comparator);
    # "dense" above is dense-bf16
    rows.append(("dense-fp8", "dense", {"kv_format": "fp8_e4m3"}))
    rows.append(("herald-fp8", "herald", {"source": "gpu-compact", "lookahead": True, "kv_format": "fp8_e4m3"}))
    return rows


def new_tokens(blocks: int, block_size: int, warmup: int = WARMUP_BLOCKS, profile: bool = False) -> int:
    """Tokens `measure` generates per sequence: the warm-up and timed blocks, one more so that the
    last timed block's lookahead has a next block, and the profiled block (with its next) if any.
    The planner sizes batches for the same count."""
    return (blocks + warmup + 1 + int(profile)) * block_size


def release(device: torch.device) -> None:
    """Hand back what the last configuration left: its garbage, and on CUDA the allocator's cached
    blocks, so every configuration starts from the same allocator state."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def say(line: str) -> None:
    """A line above the progress bar, flushed (stdout is a file on the lent machines)."""
    tqdm.write(line)
    sys.stdout.flush()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def measure(engine: Engine, context: int, batch: int, blocks: int, seed: int, profile: Path | None = None,
            copy_GBps: float | None = None, warmup: int = WARMUP_BLOCKS) -> dict:
    """Time `blocks` blocks (after `warmup` untimed ones) of `batch` sequences at `context` tokens.

    Transfer hidden by events (herald): the transfer time is estimated as bytes moved / the measured
    pinned copy bandwidth `copy_GBps` (a lower bound: the gather is no faster than the copy); exposed
    are the fetches on the compute stream at step 0 (estimated alike) and the main stream's stalls
    for the lookahead's side pass; hidden = 1 - exposed / transfer. The end-to-end share needs a
    second run (`with_reference`)."""
    b = engine.settings.block_size
    vocab = engine.model_config.vocab_size - 2
    gen = torch.Generator().manual_seed(seed)
    requests = [GenerationRequest(prompt=torch.randint(0, vocab, (context,), generator=gen).tolist(),
                                  max_new_tokens=new_tokens(blocks, b, warmup, profile is not None), stop_at_eos=False)
                for _ in range(batch)]
    seqs = [engine.make_sequence(r) for r in requests]
    device = engine.device
    host_before = psutil.virtual_memory().used
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    mode = engine.make_mode(batch, max(s.max_tokens for s in seqs))
    loop = engine.make_loop(mode, batch)
    try:
        for i, seq in enumerate(seqs):
            mode.add_sequence(seq.seq_id, seq.max_tokens)
            mode.load_random_context(seq.seq_id, seq.prefix_len, seed=seed + i)
            seq.tokens = list(seq.prompt_ids)
        sync(device)
        host_used = psutil.virtual_memory().used - host_before
        latencies, parts = [], []
        for _ in range(warmup + blocks):
            t0 = time.perf_counter()
            loop.decode_block(seqs)
            sync(device)
            latencies.append(time.perf_counter() - t0)
            parts.append(dict(loop.last_block_ms))
            parts[-1]["commit_ms"] = latencies[-1] * 1e3 - parts[-1]["step0_ms"] - parts[-1]["steps_ms"]
        if profile:
            print(f"\n=== profile of one more block: {engine.config.mode} context {context} batch {batch}")
            print(profile_block(loop, seqs, device, trace=profile), flush=True)
        timeline = list(mode.timeline)[warmup:]
        gpu_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    finally:
        mode.close()
        del mode, loop
        release(device)
    steady = latencies[warmup:]
    p50 = statistics.median(steady)
    steady_parts = parts[warmup:]
    row = dict(context=context, batch=batch, tokens_per_s=batch * b / statistics.mean(steady),
               block_mean_s=statistics.mean(steady),
               step0_ms=statistics.mean(p["step0_ms"] for p in steady_parts),
               later_steps_ms=statistics.mean(p["steps_ms"] for p in steady_parts),
               commit_ms=statistics.mean(p["commit_ms"] for p in steady_parts),
               block_p50_s=p50, block_p99_s=percentile(steady, 0.99), block_latencies_s=latencies,
               gpu_peak_gib=gpu_peak / GiB, host_gib=max(0, host_used) / GiB)
    if timeline:
        blocks_timed = len(timeline)
        timed = [t["fetch_ms"] for t in timeline if t["fetch_ms"] is not None]  # graphs replay untimed
        fetch = sum(timed) / len(timed) if timed else None
        row.update(fetch_ms_per_block=fetch, select_host_ms_per_block=sum(t["select_host_ms"] for t in timeline) / blocks_timed,
                   pages_fetched_per_block=sum(t["pages_fetched"] for t in timeline) / blocks_timed,
                   pages_selected_per_block=sum(t["pages_selected"] for t in timeline) / blocks_timed,
                   fetch_GBps=(sum(t["bytes_fetched"] for t in timeline) / blocks_timed / fetch / 1e6) if fetch else None,
                   timeline=timeline)
        side = [t for t in timeline if t.get("lookahead_ms") is not None]
        row.update(lookahead_ms_per_block=sum(t["lookahead_ms"] for t in side) / len(side) if side else None,
                   stall_ms_per_block=sum(t["lookahead_stall_ms"] for t in side) / len(side) if side else None,
                   pages_prefetched_per_block=sum(t["pages_prefetched"] for t in timeline) / blocks_timed)
        recalls = [t["forecast_recall"] for t in timeline if t.get("forecast_recall") is not None]
        row.update(forecast_recall=sum(recalls) / len(recalls) if recalls else None,
                   pages_forecast_fetched_per_block=sum(t["pages_forecast_fetched"] for t in timeline) / blocks_timed)
        if copy_GBps:
            sync_bytes = sum(t["bytes_fetched"] for t in timeline) / blocks_timed
            side_bytes = sum(t["bytes_prefetched"] + t["bytes_forecast_fetched"] for t in timeline) / blocks_timed
            transfer_ms = (sync_bytes + side_bytes) / (copy_GBps * 1e6)
            exposed_ms = sync_bytes / (copy_GBps * 1e6) + (row["stall_ms_per_block"] or 0.0)
            row.update(transfer_ms_est=transfer_ms,
                       transfer_hidden_events=max(0.0, 1.0 - exposed_ms / transfer_ms) if transfer_ms > 0 else None)
    return row


def with_reference(row: dict, engine: Engine, context: int, batch: int, blocks: int, seed: int) -> dict:
    """A herald row's end-to-end hidden share: the same configuration once more with no byte moved
    (`move_pages=False`), block time against block time."""
    config = engine.config
    reference = Engine(replace(config, sparse=replace(config.sparse, move_pages=False)), model=engine.model)
    ref = measure(reference, context, batch, blocks, seed)
    exposed_ms = max(0.0, row["block_mean_s"] - ref["block_mean_s"]) * 1e3
    transfer_ms = row.get("transfer_ms_est")
    row.update(reference_block_mean_s=ref["block_mean_s"], reference_tokens_per_s=ref["tokens_per_s"],
               reference_block_latencies_s=ref["block_latencies_s"],
               exposed_transfer_ms_e2e=exposed_ms,
               transfer_hidden_e2e=max(0.0, 1.0 - exposed_ms / transfer_ms) if transfer_ms else None)
    return row


def add_floor(row: dict, engine: Engine, hbm_GBps: float | None, copy_GBps: float | None) -> dict:
    """The row's roofline (`benchmarks.roofline`): its block's bytes, and where the run measured the
    rates, the floor in ms and the share of it reached (floor / mean block time). A herald row's
    fetches count at the share of its selection the run fetched (step 0's and the lookahead's pages
    over the pages selected, per block)."""
    config, settings = engine.config, engine.settings
    fetch_fraction = 1.0
    if row.get("pages_selected_per_block"):
        fetched = (row["pages_fetched_per_block"] + row.get("pages_prefetched_per_block", 0.0)
                   + row.get("pages_forecast_fetched_per_block", 0.0))
        fetch_fraction = min(1.0, fetched / row["pages_selected_per_block"])
    lookahead = config.mode == "herald" and bool(config.sparse.lookahead)
    block = block_bytes(engine.model_config, config.mode, config.sparse, row["batch"], row["context"],
                        settings.steps, settings.block_size, engine.dtype, lookahead=lookahead,
                        fetch_fraction=fetch_fraction, commit_logits=settings.token_shift,
                        kv_dtype=kv_storage_dtype(config.kv_format, engine.dtype))
    row.update(floor_hbm_bytes=block.hbm_bytes, floor_pcie_bytes=block.pcie_bytes, floor_terms=dict(
        block.hbm, pcie_read=block.pcie_read, pcie_write=block.pcie_write), floor_overlapped=block.overlapped,
        floor_fetch_fraction=fetch_fraction if config.mode == "herald" else None)
    if hbm_GBps is None or copy_GBps is None:
        row["floor_note"] = "no floor: the HBM and pinned copy rates are measured on CUDA only"
        return row
    times = floor_ms(block, hbm_GBps, copy_GBps)
    row.update(floor_ms=times["floor_ms"], floor_hbm_ms=times["hbm_ms"], floor_pcie_ms=times["pcie_ms"],
               floor_share=times["floor_ms"] / (row["block_mean_s"] * 1e3))
    return row


def batches_up_to(largest: int, cap: int) -> list[int]:
    out, n = [], 1
    while n < min(largest, cap):
        out.append(n)
        n *= 2
    if largest >= 1:
        out.append(min(largest, cap))
    return out


def summarise(rows: list[dict]) -> dict:
    """Best batch per (label, context); herald's ratios over dense and mage."""
    best: dict[tuple[str, int], dict] = {}
    for r in rows:
        if "error" in r:
            continue
        key = (r["label"], r["context"])
        if key not in best or r["tokens_per_s"] > best[key]["tokens_per_s"]:
            best[key] = r
    ratios = []
    for (label, context), r in sorted(best.items()):
        if not label.startswith("herald"):
            continue
        # fp8 herald against dense with the same fp8 cache; the others against bf16 dense
        comparators = ("dense-fp8",) if label.endswith("-fp8") else ("dense", "dense-sdpa")
        dense = max((best.get((d, context)) for d in comparators if (d, context) in best),
                    key=lambda x: x["tokens_per_s"], default=None)
        entry = dict(label=label, context=context, batch=r["batch"], tokens_per_s=r["tokens_per_s"])
        if dense:
            entry.update(dense_label=dense["label"], dense_batch=dense["batch"],
                         over_dense_best=r["tokens_per_s"] / dense["tokens_per_s"])
        mage_same = [m for m in rows if m.get("label") == "mage" and m["context"] == context
                     and m["batch"] == r["batch"] and "error" not in m]
        if mage_same:
            entry.update(latency_over_mage_equal_batch=r["block_p50_s"] / mage_same[0]["block_p50_s"])
        ratios.append(entry)
    return dict(best={f"{k[0]}@{k[1]}": dict(batch=v["batch"], tokens_per_s=v["tokens_per_s"]) for k, v in best.items()},
                ratios=ratios)


def print_table(rows: list[dict], summary: dict, meta: dict) -> None:
    print(f"\n{meta['geometry']}, block {meta['block_size']}, {meta['steps']} steps + commit, budget "
          f"{meta['budget']}, {meta['device']}")
    head = (f"{'mode':>17} {'context':>7} {'batch':>5} {'tok/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
            f"{'mean ms':>8} {'floor ms':>8} {'of floor':>8} "
            f"{'step0':>6} {'steps':>6} {'commit':>6} "
            f"{'GPU GiB':>7} {'host GiB':>8} {'fetch ms':>8} {'GB/s':>6} {'fetched':>7} {'select ms':>9} "
            f"{'ahead':>6} {'stall':>6} {'hidden':>6} {'e2e':>6} {'fcast':>6}")
    print(head)
    for r in rows:
        if "error" in r:
            print(f"{r['label']:>17} {r['context']:>7} {r['batch']:>5}  {r['error'][:90]}")
            continue
        extra = ""
        if "pages_selected_per_block" in r:
            share = r["pages_fetched_per_block"] / max(1.0, r["pages_selected_per_block"])
            fetch_ms = "-" if r["fetch_ms_per_block"] is None else f"{r['fetch_ms_per_block']:.1f}"
            gbps = "-" if r["fetch_GBps"] is None else f"{r['fetch_GBps']:.1f}"
            ahead = "-" if r.get("lookahead_ms_per_block") is None else f"{r['lookahead_ms_per_block']:.0f}"
            stall = "-" if r.get("stall_ms_per_block") is None else f"{r['stall_ms_per_block']:.1f}"
            hidden = "-" if r.get("transfer_hidden_events") is None else f"{100 * r['transfer_hidden_events']:.0f}%"
            e2e = "-" if r.get("transfer_hidden_e2e") is None else f"{100 * r['transfer_hidden_e2e']:.0f}%"
            fcast = "-" if r.get("forecast_recall") is None else f"{100 * r['forecast_recall']:.0f}%"
            extra = (f" {fetch_ms:>8} {gbps:>6} {100 * share:>6.0f}% "
                     f"{r['select_host_ms_per_block']:>9.1f} {ahead:>6} {stall:>6} {hidden:>6} {e2e:>6} {fcast:>6}")
        floor = "-" if r.get("floor_ms") is None else f"{r['floor_ms']:.1f}"
        of_floor = "-" if r.get("floor_share") is None else f"{100 * r['floor_share']:.0f}%"
        print(f"{r['label']:>17} {r['context']:>7} {r['batch']:>5} {r['tokens_per_s']:>8.1f} "
              f"{r['block_p50_s'] * 1e3:>8.1f} {r['block_p99_s'] * 1e3:>8.1f} {r['block_mean_s'] * 1e3:>8.1f} "
              f"{floor:>8} {of_floor:>8} {r['step0_ms']:>6.0f} "
              f"{r['later_steps_ms']:>6.0f} {r['commit_ms']:>6.0f} {r['gpu_peak_gib']:>7.1f} "
              f"{r['host_gib']:>8.1f}{extra}")
    rates = (f"{meta['hbm_read_GBps']:.0f} GB/s HBM read, {meta['pinned_copy_GBps']:.1f} GB/s pinned copy"
             if meta.get("hbm_read_GBps") and meta.get("pinned_copy_GBps") else "no rates measured: no floor")
    print(f"\nfloor ms: the block's bytes at the rates measured in this run ({rates}; benchmarks.roofline): HBM "
          "reads (weights per pass, KV per pass, quest's summaries, herald's compact-key scan and the lookahead's "
          "pass) plus PCIe (herald's fetches at the share fetched, its commit's write), or the larger of the two "
          "with the lookahead; of floor: floor / mean block time.")
    print("step0, steps: ms of the compute stream's timeline from the block's first pass to the end of step 0, "
          "then to the end of the last step (CUDA events); commit: the rest of the block's wall time (the "
          "commit pass, the block's tokens to the host, the host's work before the first pass).")
    print("fetched: share of selected pages fetched at step 0 on the compute stream (the synchronous path: "
          "not hidden); ahead: GPU ms per block of the lookahead's side pass (its compute, scan and gather, "
          "beside the block's steps); stall: ms the main stream waited for it; hidden: share of the "
          f"transfer time (bytes at the measured {meta.get('pinned_copy_GBps') or 0:.1f} GB/s pinned copy) hidden "
          "by events (step-0 fetches and stalls exposed); e2e: hidden end to end (1 - (block time - block time of "
          "the same run moving no byte) / transfer time); fcast: share of each layer's step-0 selection the "
          "layer before had forecast and fetched beside its attention (SparseConfig.forecast).")
    print("\nherald at its best batch:")
    for e in summary["ratios"]:
        dense = (f"{e['over_dense_best']:.2f}x {e['dense_label']} (batch {e['dense_batch']})"
                 if "over_dense_best" in e else "no dense row")
        mage = (f"block latency {e['latency_over_mage_equal_batch']:.2f}x mage at batch {e['batch']}"
                if "latency_over_mage_equal_batch" in e else "")
        print(f"  {e['label']:>17} @ {e['context']:>6}: batch {e['batch']:>3} {e['tokens_per_s']:>8.1f} tok/s = {dense}; {mage}")


def plot(rows: list[dict], path: Path) -> None:
    """Tokens/s against batch, one panel per context, one line per mode."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    ok = [r for r in rows if "error" not in r]
    contexts = sorted({r["context"] for r in ok})
    if not contexts:
        return
    fig, axes = plt.subplots(1, len(contexts), figsize=(6 * len(contexts), 4.5), squeeze=False)
    for ax, context in zip(axes[0], contexts):
        for label in sorted({r["label"] for r in ok}):
            pts = sorted((r["batch"], r["tokens_per_s"]) for r in ok if r["label"] == label and r["context"] == context)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set_title(f"context {context // 1024}K")
        ax.set_xlabel("batch (sequences)")
        ax.set_ylabel("generated tokens/s")
        ax.set_ylim(bottom=0)  # ratios read true from the heights
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--geometry", default="qwen3-8b", choices=sorted(GEOMETRIES))
    parser.add_argument("--contexts", type=int, nargs="+", default=[32768, 65536, 131072])
    parser.add_argument("--labels", nargs="*", default=None, help="subset of the mode labels to run")
    parser.add_argument("--sources", nargs="+", default=["gpu-compact", "cpu", "split", "gpu-exact"],
                        choices=["gpu-compact", "cpu", "split", "gpu-exact"])
    parser.add_argument("--max-batch", type=int, default=64, help="cap on the sweep")
    parser.add_argument("--batches", type=int, nargs="*", default=None, help="explicit batches (else the sweep)")
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8, help="denoising steps per block (fixed schedule)")
    parser.add_argument("--blocks", type=int, default=4, help=f"timed blocks per configuration (+{WARMUP_BLOCKS} warm-up)")
    parser.add_argument("--budget", type=float, default=0.05, help="sparse budget as a fraction of the context")
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--no-graphs", action="store_true", help="launch every pass eagerly")
    parser.add_argument("--profile", nargs=3, metavar=("LABEL", "CONTEXT", "BATCH"), default=None,
                        help="print a torch.profiler table of one extra block of this configuration and save its "
                             "timeline under --out")
    parser.add_argument("--gpu-memory-gib", type=float, default=None,
                        help="plan every mode as if the GPU had this much memory (e.g. 80 on a 141 GB H200)")
    parser.add_argument("--no-reference", action="store_true",
                        help="skip the no-transfer run after each herald row (no end-to-end hidden share)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=os.environ.get("OUT", "out"))
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model_config = geometry(args.geometry, max(args.contexts) + new_tokens(args.blocks, args.block_size, profile=True))
    weights, experts = weight_bytes(model_config, dtype)
    print(f"building {args.geometry} with random weights on {device} ({dtype}): {weights / GiB:.1f} GiB of weights"
          + (f", {experts / GiB:.1f} GiB of them routed experts" if experts else ""), flush=True)
    model = random_model(model_config, dtype=dtype, device=device)
    sparse = SparseConfig(budget_fraction=args.budget, page_size=args.page_size)
    base = EngineConfig(model_path=f"<random {args.geometry}>", device=args.device,
                        dtype=str(dtype).removeprefix("torch."), block_size=args.block_size,
                        denoising_steps=args.steps, unmasking="fixed", mask_token_id=model_config.vocab_size - 1,
                        progress=False, cuda_graphs=not args.no_graphs, sparse=sparse,
                        gpu_memory_gib=args.gpu_memory_gib)
    if device.type == "cuda":
        # The engines' weight layout now, before the cap: fusing concatenates the q/k/v and gate/up
        # weights (8.4 GiB more at the 8B geometry until the originals are freed), and the freed
        # originals would stay cached, close to a 24 GiB cap, into the first configuration only
        model.set_fused(base.fused_layers)
    copy_GBps, hbm_GBps = pinned_copy_GBps(device), hbm_read_GBps(device)
    release(device)
    if args.gpu_memory_gib is not None and device.type == "cuda":  # the allocator enforces the cap too
        total = torch.cuda.get_device_properties(device).total_memory
        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.gpu_memory_gib * GiB / total), index)
    chosen = [v for v in variants(args.sources) if args.labels is None or v[0] in args.labels]
    plans = []
    for context in args.contexts:
        for label, mode, overrides in chosen:
            sparse_over = {k: v for k, v in overrides.items() if k in SparseConfig.__dataclass_fields__}
            engine_over = {k: v for k, v in overrides.items() if k not in sparse_over}
            config = replace(base, mode=mode, sparse=replace(sparse, **sparse_over), **engine_over)
            engine = Engine(config, model=model)
            profiled = args.profile is not None and args.profile[:2] == [label, str(context)]
            largest = engine.largest_batch(context + new_tokens(args.blocks, args.block_size, profile=profiled))
            batches = args.batches or batches_up_to(largest, args.max_batch)
            if label == "dense-sdpa":  # the baseline as users run it (its gather needs room: small batches)
                batches = batches[:2]
            plans += [(label, context, n, config, largest) for n in batches]
    print(f"{len(plans)} configurations; host RAM {psutil.virtual_memory().total / GiB:.0f} GiB, "
          f"GPU {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'none'}", flush=True)
    rows = []
    for label, context, batch, config, largest in tqdm(plans, desc="throughput", unit="config"):
        release(device)  # the first configuration too: each starts from the same allocator state
        engine = Engine(config, model=model)
        try:
            profile = None
            if args.profile is not None and args.profile == [label, str(context), str(batch)]:
                profile = Path(args.out) / f"trace_{label}_{context}_{batch}.json.gz"
            # a row can take minutes (cold Triton caches, pinned host memory faulted in, graph captures,
            # the reference run): say which part is running
            say(f"{label} context {context} batch {batch}: measuring")
            row = measure(engine, context, batch, args.blocks, seed=context + batch, profile=profile,
                          copy_GBps=copy_GBps)
            if config.mode == "herald" and not args.no_reference:
                say(f"{label} context {context} batch {batch}: the no-transfer reference")
                row = with_reference(row, engine, context, batch, args.blocks, seed=context + batch)
            row = add_floor(row, engine, hbm_GBps, copy_GBps)
        except (torch.OutOfMemoryError, MemoryError, RuntimeError) as err:
            row = dict(context=context, batch=batch, error=f"{type(err).__name__}: {err}"[:300])
        if "error" in row:
            # Outside the except block: until it ends, the traceback's frames keep the failed run's
            # tensors alive, and the next configuration would find their memory taken
            release(device)
        row.update(label=label, mode=config.mode, largest_batch=largest)
        rows.append(row)
        tqdm.write(json.dumps({k: v for k, v in row.items() if k not in ("block_latencies_s", "timeline")}))

    meta = dict(geometry=args.geometry, device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                torch=torch.__version__, block_size=args.block_size, steps=args.steps, budget=args.budget,
                page_size=args.page_size, cuda_graphs=not args.no_graphs,
                host_ram_gib=psutil.virtual_memory().total / GiB, date=time.strftime("%Y-%m-%d"),
                gpu_memory_gib=args.gpu_memory_gib, pinned_copy_GBps=copy_GBps, hbm_read_GBps=hbm_GBps,
                weights_gib=weights / GiB)
    summary = summarise(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "throughput.json").write_text(json.dumps(dict(meta=meta, rows=rows, summary=summary), indent=1))
    print_table(rows, summary, meta)
    plot(rows, out / "throughput.png")
    return 0


def replot(json_paths: list[str], path: str) -> None:
    """Redraw the plot from saved JSON files (rows of several runs together)."""
    rows = [r for p in json_paths for r in json.loads(Path(p).read_text())["rows"]]
    plot(rows, Path(path))


if __name__ == "__main__":
    raise SystemExit(main())
