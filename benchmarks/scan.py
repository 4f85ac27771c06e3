"""What does selecting with one query per block position cost? The selection scans, R queries per KV head.

herald's step 0 (and its lookahead) scores every context token of every sparse layer with the
selection queries of each (row, KV head): one block-mean query (R = 1, the old default) or one per
block position (R = block size, the default since the seventh session). This times, at the Qwen3-8B
KV geometry (8 KV heads x 128), one layer:

- the int4 compact-key scan on the GPU (`gpu_kernels.compact_keys.compact_page_scores`) of a batch
  of rows in one launch, as the engine runs it, each R with the queries one after the other on the
  CUDA cores (`loop`) and, for R > 1, all at once on the tensor cores (`dot`, at each operand
  precision), against the HBM floor (the bytes the scan must read over the device copy
  bandwidth measured in the same run);
- the numba scan of bf16 host keys (`cpu_index.host_page_scores`, the `cpu` source), each R, against
  its key bytes.

    python -m benchmarks.scan --contexts 32768 131072 --queries 1 4 32
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch

from cpu_index import host_page_scores
from gpu_kernels.compact_keys import compact_bytes_per_token, compact_page_scores, quantize_keys_reference

HKV, D, PAGE, BITS, GROUP = 8, 128, 16, 4, 32


def compact_case(context: int, rows: int, queries: int, device: torch.device, gen: torch.Generator):
    """`rows` rows' random compact keys in shuffled pages, their tables, and [rows, Hkv, R, D] queries."""
    pages = context // PAGE
    keys = torch.randn(rows * pages, HKV, PAGE, D, generator=gen, dtype=torch.float32)
    codes, scales = quantize_keys_reference(keys, BITS, GROUP)
    table = torch.randperm(rows * pages, generator=gen).int().view(rows, pages)
    q = torch.randn(rows, HKV, queries, D, generator=gen)
    lens = torch.full((rows,), context, dtype=torch.int32)
    return [t.to(device) for t in (q, codes, scales, table, lens)]


def gpu_rows(contexts: list[int], queries: list[int], reps_ms: float, dot_precisions: list[str],
             batch: int) -> tuple[dict, list[dict]]:
    import triton.testing
    dev = torch.device("cuda")
    nbytes = 1 << 30
    src, dst = torch.empty(nbytes, dtype=torch.uint8, device=dev), torch.empty(nbytes, dtype=torch.uint8, device=dev)
    copy_ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=reps_ms, return_mode="median")
    hbm_GBps = 2 * nbytes / copy_ms / 1e6
    del src, dst
    gen = torch.Generator().manual_seed(0)
    rows = []
    for context in contexts:
        for r in queries:
            q, codes, scales, table, lens = compact_case(context, batch, r, dev, gen)
            out = torch.empty(batch, HKV, context // PAGE, device=dev)
            scanned = batch * context * HKV * compact_bytes_per_token(D, BITS, GROUP)  # codes and scales of one layer
            floor_ms = scanned / hbm_GBps / 1e6
            variants = [("loop", False, "tf32x3")] + [(f"dot {p}", True, p) for p in dot_precisions if r > 1]
            for name, use_dot, precision in variants:
                def call():
                    compact_page_scores(q, codes, scales, table, lens, bits=BITS, group_size=GROUP, scale=D ** -0.5,
                                        out=out, use_dot=use_dot, dot_precision=precision)
                ms = triton.testing.do_bench(call, warmup=25, rep=reps_ms, return_mode="median")
                rows.append(dict(where=f"gpu int4, {batch} rows", context=context, queries=r, path=name, ms=ms,
                                 bytes=scanned, GBps=scanned / ms / 1e6, over_floor=ms / floor_ms))
            del q, codes, scales, table, lens, out
    return dict(hbm_copy_rw_GBps=hbm_GBps), rows


def cpu_rows(contexts: list[int], queries: list[int], reps: int) -> list[dict]:
    gen = torch.Generator().manual_seed(1)
    rows = []
    for context in contexts:
        pages = context // PAGE
        keys = torch.randn(pages, HKV, PAGE, D, generator=gen).to(torch.bfloat16)
        table = torch.randperm(pages, generator=gen).int()[None]
        for r in queries:
            q = torch.randn(1, HKV, r, D, generator=gen)
            host_page_scores(keys, table, [context], q, scale=D ** -0.5)  # compile
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                host_page_scores(keys, table, [context], q, scale=D ** -0.5)
                times.append((time.perf_counter() - t0) * 1e3)
            ms = sorted(times)[len(times) // 2]
            nbytes = keys.numel() * keys.element_size()
            rows.append(dict(where=f"cpu bf16 ({os.cpu_count()} cpus)", context=context, queries=r, path="numba",
                             ms=ms, bytes=nbytes, GBps=nbytes / ms / 1e6, over_floor=None))
    return rows


def table(rows: list[dict]) -> str:
    head = f"{'scan':<22} {'context':>8} {'R':>3} {'path':>11} {'ms':>8} {'GB/s':>7} {'x floor':>8} {'x R=1':>6}"
    lines = [head, "-" * len(head)]
    base = {(r["where"], r["context"]): r["ms"] for r in rows if r["queries"] == 1}
    for r in rows:
        floor = "-" if r["over_floor"] is None else f"{r['over_floor']:.2f}"
        ratio = base.get((r["where"], r["context"]))
        lines.append(f"{r['where']:<22} {r['context']:>8} {r['queries']:>3} {r['path']:>11} {r['ms']:>8.3f} "
                     f"{r['GBps']:>7.1f} {floor:>8} {r['ms'] / ratio if ratio else math.nan:>6.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.scan", description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--queries", type=int, nargs="+", default=[1, 4, 32], help="selection queries per KV head")
    ap.add_argument("--cpu-contexts", type=int, nargs="*", default=[32768], help="contexts of the numba scan")
    ap.add_argument("--cpu-reps", type=int, default=5)
    ap.add_argument("--rep-ms", type=float, default=100.0)
    ap.add_argument("--batch", type=int, default=6, help="rows scanned in one launch (the engine scans a batch)")
    ap.add_argument("--dot-precisions", nargs="+", default=["tf32x3", "tf32", "fp16"],
                    choices=("tf32x3", "tf32", "fp16"), help="operand precisions of the dot path to time")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out")) / "scan.json")
    args = ap.parse_args(argv)
    if any(c % PAGE for c in args.contexts + args.cpu_contexts):
        raise SystemExit(f"contexts must be multiples of the {PAGE}-token page")
    if any(r < 1 for r in args.queries):
        raise SystemExit("--queries must be >= 1")
    limits, rows = {}, []
    if torch.cuda.is_available():
        limits, rows = gpu_rows(args.contexts, args.queries, args.rep_ms, args.dot_precisions, args.batch)
    else:
        print("no CUDA device: the GPU scan rows are skipped")
    rows += cpu_rows(args.cpu_contexts, args.queries, args.cpu_reps)
    meta = dict(device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", hkv=HKV, head_dim=D,
                page=PAGE, bits=BITS, group=GROUP, date=time.strftime("%Y-%m-%d"), **limits)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print(f"one layer, {args.batch} rows on the GPU (one on the CPU), {HKV} KV heads x {D}; HBM copy {limits.get('hbm_copy_rw_GBps', math.nan):.0f} GB/s")
    print(table(rows))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
