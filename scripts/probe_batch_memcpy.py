"""Probe: can the copy engines gather scattered 4-16 KiB pieces from pinned host memory fast enough?

Measures cuMemcpyBatchAsync (driver API, CUDA 12.8+) against one plain copy of the same bytes,
the slowdown it causes to a concurrent matmul loop, and whether it can be graph-captured.
Prints JSON. Run on a GPU: python scripts/probe_batch_memcpy.py
"""
from __future__ import annotations

import ctypes
import json
import sys
import time

import numpy as np
import torch


class _Attrs(ctypes.Structure):
    _fields_ = [("src_access_order", ctypes.c_int), ("src_loc_type", ctypes.c_int), ("src_loc_id", ctypes.c_int),
                ("dst_loc_type", ctypes.c_int), ("dst_loc_id", ctypes.c_int), ("flags", ctypes.c_uint)]


def batch_fn():
    cuda = ctypes.CDLL("libcuda.so.1")
    ver = ctypes.c_int()
    cuda.cuDriverGetVersion(ctypes.byref(ver))
    out = {"driver_version": ver.value}
    get = cuda.cuGetProcAddress_v2
    get.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_uint64,
                    ctypes.POINTER(ctypes.c_int)]
    for version, has_fail in ((13000, False), (12080, True)):
        fn = ctypes.c_void_p()
        status = ctypes.c_int()
        rc = get(b"cuMemcpyBatchAsync", ctypes.byref(fn), version, 0, ctypes.byref(status))
        if rc == 0 and fn.value:
            args = [ctypes.c_void_p] * 3 + [ctypes.c_size_t, ctypes.POINTER(_Attrs), ctypes.c_void_p, ctypes.c_size_t]
            if has_fail:
                args.append(ctypes.c_void_p)
            proto = ctypes.CFUNCTYPE(ctypes.c_int, *args, ctypes.c_void_p)
            out["abi"] = version
            return proto(fn.value), has_fail, out
    out["error"] = "cuMemcpyBatchAsync not found"
    return None, False, out


def main() -> int:
    fn, has_fail, info = batch_fn()
    print(json.dumps(info), flush=True)
    if fn is None:
        return 1
    dev = torch.device("cuda")
    host = torch.empty(4 << 30, dtype=torch.uint8).pin_memory()
    gpu = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    rng = np.random.default_rng(0)
    stream = torch.cuda.Stream()
    results = []
    ref_ms = None
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)

    def mm_loop(n):
        for _ in range(n):
            a @ a

    def timed_mm(n):
        torch.cuda.synchronize()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        mm_loop(n)
        e1.record()
        torch.cuda.synchronize()
        return e0.elapsed_time(e1)

    mm_loop(3)
    mm_alone = timed_mm(20)
    total = 512 << 20
    with torch.cuda.stream(stream):
        plain = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        gpu[:total].copy_(host[:total], non_blocking=True)
        plain[0].record()
        gpu[:total].copy_(host[:total], non_blocking=True)
        plain[1].record()
    torch.cuda.synchronize()
    ref_ms = plain[0].elapsed_time(plain[1])
    info["plain_copy_GBps"] = total / ref_ms / 1e6
    for piece in (4096, 8192, 16384, 65536):
        for flags in (0, 1):
            n = total // piece
            src = host.data_ptr() + rng.choice((4 << 30) // piece, n, replace=False).astype(np.uint64) * piece
            dst = gpu.data_ptr() + rng.permutation(n).astype(np.uint64) * piece
            sizes = np.full(n, piece, dtype=np.uint64)
            attrs = _Attrs(1, 0, 0, 0, 0, flags)  # source read in stream order
            idx = ctypes.c_size_t(0)
            fail = ctypes.c_size_t(0)

            def issue():
                args = [dst.ctypes.data, src.ctypes.data, sizes.ctypes.data, n, ctypes.byref(attrs),
                        ctypes.addressof(idx), 1]
                if has_fail:
                    args.append(ctypes.addressof(fail))
                rc = fn(*args, stream.cuda_stream)
                if rc != 0:
                    raise RuntimeError(f"cuMemcpyBatchAsync returned {rc}")

            issue()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(stream):
                e0.record()
                issue()
                t_host = time.perf_counter() - t0
                e1.record()
            torch.cuda.synchronize()
            ms = e0.elapsed_time(e1)
            # concurrent: matmul loop on the default stream while the batch copies run on `stream`
            torch.cuda.synchronize()
            m0, m1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            m0.record()
            with torch.cuda.stream(stream):
                issue()
                issue()
            mm_loop(20)
            m1.record()
            torch.cuda.synchronize()
            row = {"piece": piece, "flags": flags, "copies": n, "ms": ms, "GBps": total / ms / 1e6,
                   "of_plain": ref_ms / ms, "host_issue_ms": t_host * 1e3,
                   "mm_alone_ms": mm_alone, "mm_with_copies_ms": m0.elapsed_time(m1)}
            results.append(row)
            print(json.dumps(row), flush=True)
    # graph capture
    try:
        g = torch.cuda.CUDAGraph()
        n = 1024
        src = host.data_ptr() + np.arange(n, dtype=np.uint64) * 4096
        dst = gpu.data_ptr() + np.arange(n, dtype=np.uint64) * 4096
        sizes = np.full(n, 4096, dtype=np.uint64)
        attrs = _Attrs(1, 0, 0, 0, 0, 1)
        idx = ctypes.c_size_t(0)
        fail = ctypes.c_size_t(0)
        with torch.cuda.graph(g):
            args = [dst.ctypes.data, src.ctypes.data, sizes.ctypes.data, n, ctypes.byref(attrs), ctypes.addressof(idx), 1]
            if has_fail:
                args.append(ctypes.addressof(fail))
            rc = fn(*args, torch.cuda.current_stream().cuda_stream)
        g.replay()
        torch.cuda.synchronize()
        info["graph_capture"] = f"rc={rc}"
    except Exception as e:  # noqa: BLE001 - a probe reports whatever happens
        info["graph_capture"] = f"failed: {e}"
    info["rows"] = results
    print(json.dumps(info), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
