"""Probe: does backing the pinned host store with 2 MiB pages speed up the scattered page gather?

The UVA gather reads (page, head) units of 4 KiB (K) + 4 KiB (V) at 16-token pages from random
places in a store of tens of GiB. It reaches 82-87% of the pinned copy rate (RESULTS.md), while
gathers of 64 KiB units reach ~90%. One suspect is address translation: every 4 KiB unit of a
store backed by 4 KiB pages is its own page to translate. With transparent huge pages the same
store spans 512x fewer pages.

This probe allocates a store-sized buffer twice with `HostKVStore`'s own allocation (4 KiB pages:
torch.empty; huge pages: an anonymous mapping advised MADV_HUGEPAGE) and registers it as the store
does, checks how much of each the
kernel backed with huge pages (AnonHugePages in /proc/self/smaps), and times the project's
`gather_pages` over the same random selections from both, beside a contiguous copy from each.
Prints JSON (and writes it to $OUT/hugepage_gather.json when OUT is set).

Run on a GPU: python scripts/dev/probe_hugepage_gather.py [--gib 16] [--iters 20]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import torch

from gpu_kernels._uva import HostPointer
from gpu_kernels.page_copy import gather_pages
from offload.host_store import host_buffer, huge_page_bytes, register_host_memory

MiB, GiB = 2**20, 2**30
HUGE = 2 * MiB


def thp_settings() -> dict[str, str]:
    out = {}
    for name in ("enabled", "defrag"):
        path = Path("/sys/kernel/mm/transparent_hugepage") / name
        out[name] = path.read_text().strip() if path.exists() else "absent"
    return out


def timed_ms(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure(buf: torch.Tensor, selections: dict[str, tuple], heads: int, page: int, dim: int,
            iters: int) -> dict:
    half = buf.numel() // 2
    num_pages = half // (heads * page * dim * 2)
    view = lambda t: t[: num_pages * heads * page * dim * 2].view(torch.bfloat16).view(num_pages, heads, page, dim)  # noqa: E731
    src_k = HostPointer(view(buf[:half]), registered=True)
    src_v = HostPointer(view(buf[half:]), registered=True)
    out = {}
    for name, (pages, head_ids, slots) in selections.items():
        pool_k = torch.empty(slots.numel(), page, dim, dtype=torch.bfloat16, device="cuda")
        pool_v = torch.empty_like(pool_k)
        ms = timed_ms(lambda: gather_pages(src_k, src_v, pages, head_ids, pool_k, pool_v, slots,  # noqa: B023
                                           validate=False), iters)
        nbytes = 2 * slots.numel() * page * dim * 2
        out[name] = dict(units=slots.numel(), MB=nbytes / 1e6, ms=ms, GBps=nbytes / ms / 1e6)
    chunk = buf[: 256 * MiB]
    dev = torch.empty(chunk.numel(), dtype=torch.uint8, device="cuda")
    ms = timed_ms(lambda: dev.copy_(chunk, non_blocking=True), iters)
    out["contiguous_copy_GBps"] = chunk.numel() / ms / 1e6
    for name in selections:
        out[name]["of_copy"] = out[name]["GBps"] / out["contiguous_copy_GBps"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=16.0, help="size of each buffer (K and V halves)")
    ap.add_argument("--context", type=int, default=131072, help="tokens a selection is a share of")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("this probe needs a CUDA GPU (it times UVA reads of host memory)")
    heads, page, dim = 8, 16, 128
    nbytes = int(args.gib * GiB) // HUGE * HUGE
    num_pages = nbytes // 2 // (heads * page * dim * 2)
    gen = torch.Generator().manual_seed(args.seed)
    selections = {}
    for share in (0.05, 0.10):
        # per head, share of a context's pages, drawn anywhere in the store (sequences' pages are)
        units = int(share * args.context // page) * heads
        pages = torch.randint(0, num_pages, (units,), generator=gen, dtype=torch.int32)
        head_ids = (torch.arange(units, dtype=torch.int32) % heads)
        slots = torch.arange(units, dtype=torch.int32)
        selections[f"{int(share * 100)}%"] = tuple(t.cuda() for t in (pages, head_ids, slots))

    report = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, thp=thp_settings(),
                  buffer_GiB=nbytes / GiB, page_tokens=page, kv_heads=heads, head_dim=dim)
    for label, huge in (("plain", False), ("madv_hugepage", True)):
        buf, owner = host_buffer(nbytes, huge)  # as HostKVStore allocates with huge_pages=False / True
        buf.fill_(1)  # first touch: the kernel backs the pages now (huge ones where it can)
        report[label] = dict(huge_page_share=(huge_page_bytes(buf.data_ptr(), nbytes) or 0) / nbytes)
        if not register_host_memory(buf):
            raise RuntimeError("cudaHostRegister failed")
        try:
            report[label].update(measure(buf, selections, heads, page, dim, args.iters))
        finally:
            torch.cuda.synchronize()
            torch.cuda.cudart().cudaHostUnregister(buf.data_ptr())
        del buf, owner
        print(json.dumps({label: report[label]}), flush=True)
    print(json.dumps(report, indent=1))
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "hugepage_gather.json"
        path.write_text(json.dumps(report, indent=1))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
