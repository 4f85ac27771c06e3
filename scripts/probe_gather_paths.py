"""Probe: can host threads plus the copy engines move a selection faster, or more quietly, than the
SMs' zero-copy gather?

The UVA gather (`gather_pages`) reaches 81-87% of the pinned copy at 16-token pages, no more than the
same launch reading contiguous spans (RESULTS.md, fifth session), and while it runs its programs
hold SMs that concurrent compute wants (the prefetcher's end-to-end loss). The copy engines use no
SMs but pay ~1.8 us of host time per scattered piece (scripts/probe_batch_memcpy.py). This probe
times a third path over the same random 5% / 10% selections of an 8 GiB registered store (16-token
pages, 8 KV heads x 128, bf16, K and V; 8 selections cycled so that no byte is re-read from the
GPU's L2 between calls):

- ``sm``: `gather_pages` at its default grid and at the prefetcher's caps;
- ``staged``: host threads gather the units into pinned staging chunks (torch.index_select), the
  copy engine moves each chunk with one cudaMemcpyAsync while the next chunk is gathered, and a
  device-to-device `gather_pages` scatters the staged units into their pool slots;
- the contiguous pinned copy of the same bytes, and of 1 GiB (RESULTS' reference);

then, for each, how much a concurrent matmul pass slows down (36 layers, layer l's matmul waiting
on layer l's fetch only): the prefetcher's end-to-end measure.

Prints JSON lines as it goes and writes $OUT/gather_paths.json. Run on a GPU:
    python scripts/probe_gather_paths.py [--gib 8] [--iters 10]
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import threading
import time
from pathlib import Path

import torch

from gpu_kernels._uva import HostPointer
from gpu_kernels.page_copy import gather_pages
from offload.host_store import host_buffer, register_host_memory
from probe_hugepage_gather import timed_ms as gpu_ms  # a sibling script: run from scripts/ or the repo root

GiB = 2**30
BF16 = torch.bfloat16


def wall_ms(fn, iters: int, warmup: int = 2) -> float:
    """Median wall time of ``fn`` until the device is idle: the host-side paths do their work on the
    host, which CUDA events would not see (``gpu_ms`` times the device-only ones)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


class Staged:
    """Host-thread gather into pinned staging + copy-engine copy + device scatter, chunk-pipelined."""

    def __init__(self, rows_k: torch.Tensor, rows_v: torch.Tensor, max_units: int, chunk_units: int, threads: int):
        self.rows_k, self.rows_v = rows_k, rows_v  # [units in store, P*D] host views
        self.chunk, self.threads = chunk_units, threads
        unit = rows_k.shape[1]
        self.pin = [torch.empty(2, chunk_units, unit, dtype=BF16, pin_memory=True) for _ in range(2)]
        self.free = [torch.cuda.Event() for _ in range(2)]
        for e in self.free:
            e.record()
        self.dev = torch.empty(2, max_units, unit, dtype=BF16, device="cuda")
        self.ids = torch.arange(max_units, dtype=torch.int32, device="cuda")
        self.stream = torch.cuda.Stream(priority=0)

    def run(self, unit_rows: torch.Tensor, slots: torch.Tensor, pool_k, pool_v) -> torch.cuda.Event:
        """Enqueue one transfer; the host gathers chunk i + 1 while the copy engine moves chunk i.
        Returns the event after the scatter."""
        torch.set_num_threads(self.threads)
        m = unit_rows.numel()
        for i, start in enumerate(range(0, m, self.chunk)):
            idx = unit_rows[start:start + self.chunk]
            n = idx.numel()
            buf = self.pin[i % 2]
            self.free[i % 2].synchronize()  # the copy that last read this staging buffer is done
            torch.index_select(self.rows_k, 0, idx, out=buf[0, :n])
            torch.index_select(self.rows_v, 0, idx, out=buf[1, :n])
            with torch.cuda.stream(self.stream):
                self.dev[0, start:start + n].copy_(buf[0, :n], non_blocking=True)
                self.dev[1, start:start + n].copy_(buf[1, :n], non_blocking=True)
                self.free[i % 2].record(self.stream)
        p, d = pool_k.shape[-2:]
        done = torch.cuda.Event()
        with torch.cuda.stream(self.stream):
            ids = self.ids[:m]
            gather_pages(self.dev[0, :m].view(m, 1, p, d), self.dev[1, :m].view(m, 1, p, d), ids, torch.zeros_like(ids),
                         pool_k, pool_v, slots, validate=False)
            done.record(self.stream)
        return done


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=8.0)
    ap.add_argument("--context", type=int, default=131072)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--layers", type=int, default=36, help="layers of the overlap pass")
    ap.add_argument("--compute-ms", type=float, default=0.8, help="matmul time per layer in the overlap pass")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("this probe needs a CUDA GPU")
    out_path = Path(os.environ.get("OUT", ".")) / "gather_paths.json"
    report: dict = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, cpus=os.cpu_count())

    def save(key, value):
        report[key] = value
        print(json.dumps({key: value}), flush=True)
        out_path.write_text(json.dumps(report, indent=1))

    hkv, p, d = 8, 16, 128
    unit = p * d
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    nbytes = int(args.gib * GiB) // (4 * 2**20) * (4 * 2**20)
    buf, owner = host_buffer(nbytes, True)
    chunk = 256 * 2**20
    for start in range(0, nbytes, chunk):  # random bits drawn on the GPU (the host's RNG is slow)
        part = buf[start:start + chunk]
        part.copy_(torch.randint(0, 256, (part.numel(),), dtype=torch.uint8, device="cuda"))
    if not register_host_memory(buf):
        raise RuntimeError("cudaHostRegister failed")
    half = nbytes // 2
    num_pages = half // (hkv * unit * 2)
    host_k = buf[:half].view(BF16)[: num_pages * hkv * unit].view(num_pages, hkv, p, d)
    host_v = buf[half:].view(BF16)[: num_pages * hkv * unit].view(num_pages, hkv, p, d)
    src_k, src_v = HostPointer(host_k, registered=True), HostPointer(host_v, registered=True)
    rows_k, rows_v = host_k.view(num_pages * hkv, unit), host_v.view(num_pages * hkv, unit)

    gen = torch.Generator().manual_seed(0)
    shares = {}
    for share in (0.05, 0.10):
        units = int(share * args.context // p) * hkv
        sels = []
        for _ in range(8):
            pages = torch.randint(0, num_pages, (units,), generator=gen, dtype=torch.int32)
            heads = torch.arange(units, dtype=torch.int32) % hkv
            sels.append(dict(rows=pages.long() * hkv + heads.long(), pages=pages.cuda(), heads=heads.cuda()))
        shares[f"{round(share * 100)}%"] = dict(units=units, sels=sels, MB=2 * units * unit * 2 / 1e6,
                                               slots=torch.arange(units, dtype=torch.int32, device="cuda"))
    max_units = max(s["units"] for s in shares.values())
    pool_k = torch.empty(max_units, p, d, dtype=BF16, device="cuda")
    pool_v = torch.empty_like(pool_k)

    dev_bytes = torch.empty(GiB, dtype=torch.uint8, device="cuda")
    copies = {}
    for name, s in shares.items():
        n = int(s["MB"] * 1e6)
        offsets = itertools.cycle(range(0, nbytes - n, nbytes // 8))
        copies[name] = s["MB"] / gpu_ms(lambda: dev_bytes[:n].copy_(buf[(o := next(offsets)):o + n], non_blocking=True),  # noqa: B023
                                        args.iters)
    copies["1GiB"] = GiB / 1e6 / gpu_ms(lambda: dev_bytes.copy_(buf[:GiB], non_blocking=True), args.iters)
    del dev_bytes
    save("copy_GBps", copies)

    def correct(s, sel) -> bool:
        torch.cuda.synchronize()
        m = s["units"]
        want = host_k[sel["rows"] // hkv, sel["rows"] % hkv]
        ok = torch.equal(pool_k[:m].cpu().view(torch.int16), want.view(torch.int16))  # random bits hold NaNs
        pool_k.zero_()
        return bool(ok)

    def sm_path(cap):
        def go(s, sel, pk=pool_k, pv=pool_v):
            gather_pages(src_k, src_v, sel["pages"], sel["heads"], pk, pv, s["slots"], validate=False, max_programs=cap)
        return go

    def staged_path(threads, chunk_units):
        st = Staged(rows_k, rows_v, max_units, chunk_units, threads)

        def go(s, sel, pk=pool_k, pv=pool_v):
            return st.run(sel["rows"], s["slots"], pk, pv)
        return go

    paths = {f"sm_cap{c}": (sm_path(c), False) for c in (8, 16, 2 * sms)}
    for threads, chunk_units in itertools.product((4, 8, 16), (512, 1024, 4096)):
        paths[f"staged_t{threads}_c{chunk_units}"] = (staged_path(threads, chunk_units), True)
    bandwidth = {}
    for label, (go, host_side) in paths.items():
        bandwidth[label] = {}
        for name, s in shares.items():
            go(s, s["sels"][0])
            ok = correct(s, s["sels"][0])
            it = itertools.cycle(s["sels"])
            ms = (wall_ms if host_side else gpu_ms)(lambda: go(s, next(it)), args.iters)  # noqa: B023
            gbps = s["MB"] / ms
            bandwidth[label][name] = dict(ms=ms, GBps=gbps, of_copy_1GiB=gbps / copies["1GiB"],
                                          of_copy_same_bytes=gbps / copies[name], correct=ok)
        print(json.dumps({label: bandwidth[label]}), flush=True)
    torch.set_num_threads(os.cpu_count() or 1)
    save("bandwidth", bandwidth)

    host_rate = {}
    s = shares["5%"]
    out = torch.empty(s["units"], unit, dtype=BF16, pin_memory=True)
    for threads in (1, 4, 8, 16):
        torch.set_num_threads(threads)
        t = time.perf_counter()
        for sel in s["sels"]:
            torch.index_select(rows_k, 0, sel["rows"], out=out)
        host_rate[threads] = s["units"] * unit * 2 * len(s["sels"]) / (time.perf_counter() - t) / 1e9
    torch.set_num_threads(os.cpu_count() or 1)
    save("host_index_select_GBps", host_rate)

    # overlap with compute: 36 layers, layer l's matmul waits on layer l's fetch only
    n = 4096
    w = torch.randn(n, n, device="cuda", dtype=BF16)
    x = torch.randn(n, n, device="cuda", dtype=BF16)
    y = torch.empty_like(x)
    square = gpu_ms(lambda: torch.matmul(x, w, out=y), 10)
    rows = max(128, int(n * args.compute_ms / square) // 128 * 128)
    xa = torch.randn(rows, n, device="cuda", dtype=BF16)
    ya = torch.empty(rows, n, device="cuda", dtype=BF16)
    compute_stream = torch.cuda.Stream(priority=-1)
    fetch_stream = torch.cuda.Stream(priority=0)
    L = args.layers
    pools = [tuple(torch.empty(s["units"], p, d, dtype=BF16, device="cuda") for _ in range(2)) for _ in range(2)]

    def one_pass(go=None, host_side=False) -> float:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        events: list = [None] * L
        ready = [threading.Event() for _ in range(L)]
        worker = None
        if go is not None and host_side:
            def host_thread():
                for layer in range(L):
                    events[layer] = go(s, s["sels"][layer % 8], *pools[layer % 2])
                    ready[layer].set()
            worker = threading.Thread(target=host_thread)
        with torch.cuda.stream(compute_stream):
            start.record()
            if worker:
                worker.start()
            for layer in range(L):
                if go is not None and not host_side:
                    with torch.cuda.stream(fetch_stream):
                        go(s, s["sels"][layer % 8], *pools[layer % 2])
                        events[layer] = torch.cuda.Event()
                        events[layer].record(fetch_stream)
                if worker:
                    ready[layer].wait()
                if events[layer] is not None:
                    compute_stream.wait_event(events[layer])
                torch.matmul(xa, w, out=ya)
            end.record()
        torch.cuda.synchronize()
        if worker:
            worker.join()
        return start.elapsed_time(end)

    compute_only = statistics.median(one_pass() for _ in range(3))
    overlap = dict(compute_only_ms=compute_only, compute_ms_per_layer=compute_only / L, layers=L)
    best_staged = sorted((lab for lab in bandwidth if lab.startswith("staged")),
                         key=lambda lab: -bandwidth[lab]["5%"]["GBps"])[:3]
    for label in ["sm_cap8", "sm_cap16", *best_staged]:
        go, host_side = paths[label]
        transfer = s["MB"] / bandwidth[label]["5%"]["GBps"]
        passes = sorted(one_pass(go, host_side) for _ in range(3))
        pass_ms = passes[1]
        overlap[label] = dict(transfer_ms=transfer, pass_ms=pass_ms, vs_compute=pass_ms / compute_only,
                              hidden_end_to_end=1 - max(0.0, pass_ms - compute_only) / (L * transfer))
        print(json.dumps({label: overlap[label]}), flush=True)
    save("overlap", overlap)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaHostUnregister(buf.data_ptr())
    del owner
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
