"""Where a small sparse call's time goes: the attention kernel vs the split merge (CUPTI durations).

benchmarks.kernels times a sparse call as one graph replay (attention + merge). This probe runs the
same pool-layout shapes eagerly under torch.profiler, L2 flushed before each call (--l2: by
writing 256 MB, leaving dirty lines, or by reading it), and prints each kernel's mean device time,
so that the merge's share is measured rather than guessed, for each dtype of the split partials. The
merge is launched plainly here (pdl=False): launched as a programmatic dependent it would be resident
while the attention runs, and its duration would include that wait. Prints JSON.

--ncu runs each case once inside a CUDA profiler range instead (compiled and warmed up outside it),
for Nsight Compute's hardware counters (`bash scripts/dev/ncu_sparse.sh NAME [these args]` runs it so);
the cases print in launch order, the report's order:

    python scripts/dev/probe_sparse_phases.py [--contexts 32768 131072] [--T 16 32] [--fractions 0.05 0.1]
        [--batch 1] [--splits 8 16 (0: the plan's default)] [--partial-dtypes bfloat16 float32]
        [--l2 clean|dirty] [--warp-specialized STAGES (the Gluon kernel instead of the Triton one)]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.kernels import HKV, HQ, D, flush_l2, preallocated  # noqa: E402  (benchmarks.kernels' shape)
from gpu_kernels.attention_plan import AttentionOptions, plan_attention  # noqa: E402
from gpu_kernels.paged_attention import run_attention  # noqa: E402

PAGE = 16


def kernel_times(fn, flush: torch.Tensor, reps: int, dirty_l2: bool) -> dict:
    """Mean CUDA time (us) per call of each kernel fn launches, by kernel name; L2 flushed before
    each call by writing `flush` (dirty lines) or by reading it (clean lines)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            flush_l2(flush, dirty_l2)
            fn()
        torch.cuda.synchronize()
    times = {}
    for ev in prof.key_averages():
        if "paged_attention" in ev.key or "merge_splits" in ev.key:
            times[ev.key] = ev.device_time_total / reps
    return times


def profiled_once(fn) -> None:
    """One call of fn inside a CUDA profiler range (after a warm-up outside it), for ncu."""
    fn()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    fn()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--T", type=int, nargs="+", default=[16, 32], dest="ts")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.05, 0.10])
    ap.add_argument("--splits", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--batch", type=int, default=1, help="sequences per call (each its own lists)")
    ap.add_argument("--ncu", action="store_true", help="one call per case in a profiler range (for ncu)")
    ap.add_argument("--warp-specialized", type=int, default=0, metavar="STAGES",
                    help="run the warp-specialised Gluon kernel with this many stages instead (0: the Triton kernel)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--partial-dtypes", nargs="+", default=["bfloat16", "float32"],
                    choices=["bfloat16", "float32"])
    ap.add_argument("--l2", choices=["clean", "dirty"], default="clean",
                    help="flush L2 before each call by reading (clean lines, default) or writing (dirty lines, "
                         "whose write-back the call's reads then pay too)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("probe_sparse_phases.py needs a CUDA GPU")
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=dev)
    rows = []
    for ctx in args.contexts:
        for frac in args.fractions:
            n_sel = max(1, round(frac * ctx / PAGE))
            n = args.batch
            k_pool = torch.randn(n * HKV * n_sel, PAGE, D, device=dev, dtype=torch.bfloat16, generator=gen)
            v_pool = torch.randn_like(k_pool)
            table = torch.randperm(n * HKV * n_sel, device=dev, generator=gen).reshape(n, HKV, n_sel).int()
            kv_len = torch.full((n, HKV), n_sel * PAGE, dtype=torch.int32, device=dev)
            nbytes = 2 * k_pool.numel() * k_pool.element_size()
            for t in args.ts:
                q = torch.randn(n, HQ, t, D, device=dev, dtype=torch.bfloat16, generator=gen)
                for splits in args.splits:
                    cfg = dict(num_splits=splits or None, block_n=64)
                    if args.warp_specialized:
                        cfg.update(warp_specialized=True, num_stages=args.warp_specialized)
                    elif not args.ncu:  # the sweep's fixed configs; under ncu, what the plan picks
                        cfg.update(num_warps=4 if t <= 16 else 8, num_stages=3)
                    for partials in args.partial_dtypes:
                        options = AttentionOptions(**cfg, partial_dtype=getattr(torch, partials), pdl=False)
                        plan = plan_attention(q, k_pool, v_pool, table, kv_len, options=options)
                        bufs = preallocated(plan)

                        def call():
                            return run_attention(plan, q, k_pool, v_pool, table, kv_len, scale=D ** -0.5, **bufs)

                        row = dict(batch=n, context=ctx, fraction=frac, T=t, num_splits=plan.config.num_splits,
                                   block_m=plan.config.block_m, num_warps=plan.config.num_warps,
                                   partial_dtype=partials, l2=args.l2, MB=nbytes / 1e6)
                        if args.ncu:  # the times are in ncu's report; this row says which case it is
                            profiled_once(call)
                        else:
                            times = kernel_times(call, flush, args.reps, args.l2 == "dirty")
                            attn = sum(us for name, us in times.items() if "paged_attention" in name)
                            merge = sum(us for name, us in times.items() if "merge_splits" in name)
                            row.update(attention_us=attn, merge_us=merge,
                                       attention_TBps=nbytes / (attn * 1e-6) / 1e12 if attn else None)
                        rows.append(row)
                        print(json.dumps(row), flush=True)
    print(json.dumps(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), indent=1))


if __name__ == "__main__":
    main()
