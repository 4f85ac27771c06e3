"""Probe: does the Hopper tensor memory accelerator (TMA) read pinned host memory faster than SM loads?

The shipped gather (`gpu_kernels.page_copy.gather_pages`) reads host memory with 16-byte loads and
stops near 86% of the pinned copy engine's rate, even over contiguous spans. One explanation is the
size of the PCIe reads that SM loads produce (a cache line each) against the copy engine's larger
ones. TMA copies a whole 4 KiB (page, head) unit per instruction, so its reads may be larger, and a
few threads keep many KiB in flight.

For one selection (5% of a 128K context, 16-token pages, 8 KV heads x 128, bf16, K and V) scattered
over a pinned store, this times, back to back: one contiguous copy of the same bytes, the shipped
gather, and a TMA gather (host-side tensor descriptor over the store, `desc.load` of one unit per
step, plain stores into the pool) over program counts, pipeline depths and units per step. Every
gather is checked bit for bit against torch indexing. Prints JSON.

    python scripts/probe_tma_gather.py [--programs 8 16 32 66 132] [--stages 2 4 8] [--units 1 2 4]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_kernels.page_copy import gather_pages  # noqa: E402
from probe_hugepage_gather import timed_ms  # noqa: E402  (a sibling script)

P, D, HKV = 16, 128, 8


@triton.jit(do_not_specialize=["num_tasks"])
def _tma_gather_kernel(src_k, src_v, dst_k, dst_v, unit_ids, slot_ids, num_tasks,
                       P: tl.constexpr, D: tl.constexpr, UNITS: tl.constexpr, STAGES: tl.constexpr):
    # src_k/src_v: tensor descriptors over the store viewed [units * P, D], block [P, D] (one unit).
    rows = tl.arange(0, P)[:, None] * D + tl.arange(0, D)[None, :]
    for task in tl.range(tl.program_id(0), num_tasks, tl.num_programs(0), num_stages=STAGES):
        for j in tl.static_range(UNITS):
            u = task * UNITS + j
            unit = tl.load(unit_ids + u)
            slot = tl.load(slot_ids + u).to(tl.int64)
            k = src_k.load([unit * P, 0])
            v = src_v.load([unit * P, 0])
            tl.store(dst_k + slot * (P * D) + rows, k)
            tl.store(dst_v + slot * (P * D) + rows, v)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (the store holds random bit patterns, NaNs among them)."""
    return torch.equal(a.view(torch.int16), b.view(torch.int16))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--programs", type=int, nargs="+", default=[8, 16, 32, 66, 132])
    ap.add_argument("--stages", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--units", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--store-gib", type=float, default=2.0)
    ap.add_argument("--fraction", type=float, default=0.05)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("probe_tma_gather.py needs a CUDA GPU")
    from triton.tools.tensor_descriptor import TensorDescriptor

    dev = torch.device("cuda")
    unit_bytes = P * D * 2
    total_units = int(args.store_gib * 2**30 / 2 / unit_bytes)  # K and V halves
    host_k = torch.empty(total_units * P, D, dtype=torch.bfloat16).pin_memory()
    host_v = torch.empty_like(host_k).pin_memory()
    host_k.view(torch.int16).random_()
    host_v.view(torch.int16).random_()
    n_units = HKV * round(args.fraction * 131072 / P)
    gen = torch.Generator().manual_seed(0)
    pick = torch.randperm(total_units, generator=gen)[:n_units]
    unit_ids = pick.to(dev, torch.int32)
    slot_ids = torch.randperm(n_units, generator=gen).to(dev, torch.int32)
    pool_k = torch.empty(n_units, P, D, dtype=torch.bfloat16, device=dev)
    pool_v = torch.empty_like(pool_k)
    want_k = torch.empty_like(pool_k)
    want_v = torch.empty_like(pool_v)
    want_k[slot_ids.long()] = host_k.view(total_units, P, D)[pick].to(dev)
    want_v[slot_ids.long()] = host_v.view(total_units, P, D)[pick].to(dev)
    nbytes = 2 * n_units * unit_bytes

    contiguous = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    gpu_buf = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    copy_ms = timed_ms(lambda: gpu_buf.copy_(contiguous, non_blocking=True), 10)
    copy_gbps = nbytes / copy_ms / 1e6
    out = dict(device=torch.cuda.get_device_name(), triton=triton.__version__, MB=nbytes / 1e6,
               units=n_units, same_bytes_copy_GBps=copy_gbps, rows=[])
    print(json.dumps({k: v for k, v in out.items() if k != "rows"}), flush=True)

    # The store as [units, 1, P, D] (page, head) units: page_ids = unit, head_ids = 0.
    store_k = host_k.view(total_units, 1, P, D)
    store_v = host_v.view(total_units, 1, P, D)
    zeros = torch.zeros_like(unit_ids)
    for programs in args.programs:
        pool_k.zero_()
        pool_v.zero_()
        ms = timed_ms(lambda: gather_pages(store_k, store_v, unit_ids, zeros, pool_k, pool_v, slot_ids,
                                           validate=False, max_programs=programs), 10)
        row = dict(kind="shipped", programs=programs, ms=ms, GBps=nbytes / ms / 1e6,
                   of_same_bytes_copy=nbytes / ms / 1e6 / copy_gbps,
                   exact=same_bits(pool_k, want_k) and same_bits(pool_v, want_v))
        out["rows"].append(row)
        print(json.dumps(row), flush=True)

    desc_k = TensorDescriptor.from_tensor(host_k, [P, D])
    desc_v = TensorDescriptor.from_tensor(host_v, [P, D])
    for units in args.units:
        tasks = n_units // units
        done = tasks * units
        for stages in args.stages:
            for programs in args.programs:
                pool_k.zero_()
                pool_v.zero_()
                grid = (min(programs, tasks),)
                try:
                    ms = timed_ms(lambda: _tma_gather_kernel[grid](
                        desc_k, desc_v, pool_k, pool_v, unit_ids, slot_ids, tasks,
                        P=P, D=D, UNITS=units, STAGES=stages, num_warps=4), 10)
                except Exception as ex:  # noqa: BLE001 (a probe reports what failed and goes on)
                    row = dict(kind="tma", units=units, stages=stages, programs=programs, error=repr(ex)[:400])
                    out["rows"].append(row)
                    print(json.dumps(row), flush=True)
                    continue
                slots = slot_ids[:done].long()
                moved = 2 * done * unit_bytes
                row = dict(kind="tma", units=units, stages=stages, programs=programs, ms=ms,
                           GBps=moved / ms / 1e6, of_same_bytes_copy=moved / ms / 1e6 / copy_gbps,
                           exact=same_bits(pool_k[slots], want_k[slots]) and same_bits(pool_v[slots], want_v[slots]))
                out["rows"].append(row)
                print(json.dumps(row), flush=True)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
