"""Host time of an eager `paged_attention` call, per kernel choice: what a caller that does not
replay a CUDA graph (a herald block's step 0) pays on the CPU for each layer's attention.

Times 200 back-to-back calls without syncing (host us per call), then the same with a sync at the
end (wall), and the stream time between two events around 50 calls (device-side, host gaps
included), for the Triton kernel, the warp-specialised kernel (sm_90 only) and the default's pick;
then the planning alone: `plan_attention` (the checks and the cache lookup every call pays) and the
plan made afresh (what the first call of a shape pays). Prints JSON lines.

    python scripts/dev/probe_host_overhead.py [--batch 6] [--T 32] [--tokens 6554]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.kernels import HKV, HQ, D  # noqa: E402  (benchmarks.kernels' shape)
from gpu_kernels.features import warp_specialized_supported  # noqa: E402
from gpu_kernels.attention_inputs import describe_inputs  # noqa: E402
from gpu_kernels.attention_plan import AttentionOptions, plan_attention, plan_for  # noqa: E402
from gpu_kernels.paged_attention import paged_attention  # noqa: E402

PAGE = 16


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=6)
    ap.add_argument("--T", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=6554, help="selected tokens per (row, KV head)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("probe_host_overhead.py needs a CUDA GPU")
    dev = torch.device("cuda")
    n, t = args.batch, args.T
    pages = -(-args.tokens // PAGE)
    gen = torch.Generator(device=dev).manual_seed(0)
    k = torch.randn(n * HKV * pages, PAGE, D, device=dev, dtype=torch.bfloat16, generator=gen)
    v = torch.randn_like(k)
    table = torch.randperm(n * HKV * pages, device=dev, generator=gen).reshape(n, HKV, pages).int()
    kv_len = torch.full((n, HKV), args.tokens, dtype=torch.int32, device=dev)
    q = torch.randn(n, HQ, t, D, device=dev, dtype=torch.bfloat16, generator=gen)
    kb = torch.randn(n, HKV, t, D, device=dev, dtype=torch.bfloat16, generator=gen)
    vb = torch.randn_like(kb)
    kinds = [("triton", AttentionOptions(warp_specialized=False)), ("default", AttentionOptions())]
    if warp_specialized_supported(dev):
        kinds.insert(1, ("warp_specialized", AttentionOptions(warp_specialized=True)))
    for name, options in kinds:
        def call():
            paged_attention(q, k, v, table, kv_len, scale=D ** -0.5, k_block=kb, v_block=vb, options=options)

        for _ in range(5):
            call()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(200):
            call()
        host = (time.perf_counter() - t0) / 200 * 1e6
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / 200 * 1e6
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(50):
            call()
        end.record()
        torch.cuda.synchronize()
        print(json.dumps(dict(kernel=name, host_us=host, wall_us=wall, stream_us=start.elapsed_time(end) * 1e3 / 50)))
    inputs, _ = describe_inputs(q, k, v, table, kv_len, kb, vb, False, False)
    for name, fn in (("plan_attention", lambda: plan_attention(q, k, v, table, kv_len, k_block=kb, v_block=vb)),
                     ("uncached_plan", lambda: plan_for.__wrapped__(inputs, AttentionOptions()))):
        t0 = time.perf_counter()
        for _ in range(200):
            fn()
        print(json.dumps({name + "_us": (time.perf_counter() - t0) / 200 * 1e6}))


if __name__ == "__main__":
    main()
