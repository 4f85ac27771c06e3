"""Transfer benchmark: how close page recalls and commits get to PCIe, and how much transfer the
runtime's own fetch path hides behind compute.

One run measures, on one GPU:
  1. pinned host <-> GPU copy bandwidth (1 GiB, tensor.copy_ = cudaMemcpyAsync): the reference;
  2. gather_pages reading pinned host memory through UVA, 5% / 10% of a 128K-token context at page
     sizes 16..128 (Hkv=8, D=128, bf16, K+V) from a store of --gather-layers layers (each timed
     gather reads the next layer), checked bit for bit, each timing the gather's device time with its
     host launch work off the clock (`benchmarks.timing`; the runtime enqueues gathers ahead), and
     the best launch also from an idle GPU, launch included; a sweep of the persistent launch
     (programs per SM {1, 2, 4, 8} x block {default, half} x units per program {1, 2, 4, 8} x warps
     {4, 8}) against the defaults and the old one-program-per-unit shape, the best per grid size, and
     the best launch reading the same store on 4 KiB pages instead of huge pages, and reading as many
     bytes from contiguous spans (the zero-copy ceiling: what SMs reach from host memory without a gather);
  3. write_tokens GPU -> pinned host for a 32-token block across 36 layers (one launch, one per layer,
     and HostKVStore.write of all layers, the runtime's commit);
  4. the runtime's fetch path over 36 layers, as herald's lookahead runs it: every layer's misses
     gathered by `offload.PageFetcher` on the gather stream (a side fetch, capped programs) while a
     bf16 matmul stand-in for the block's remaining steps runs on the compute stream, which then
     joins the side stream (one matmul per layer, sized to the target time, so the GPU and not the
     host paces the pass; rows where host ms > 0.8 x gpu ms are flagged host-bound); for gather caps
     {8, 16, 32, 66, 2 per SM} (--overlap-caps): the hidden share by the runtime's own events and end
     to end, and the slowdown vs compute alone, when compute > transfer and when compute < transfer,
     each row the median of --overlap-reps back-to-back (compute-only, compute + fetch, fetch-only)
     triplets, beside the SM-tax model (1 - programs / SMs), plus the recommended cap (the runtime's
     default is DEFAULT_FETCH_PROGRAMS). --overlap-only runs this part alone.
Prints a table last and writes $OUT/transfer.json (OUT defaults to ./out).

    python benchmarks/transfer.py            # full run (GPU)
    python benchmarks/transfer.py --quick    # 32K context, 5 iterations, a few launch shapes (smoke test)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import triton

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import kernels_source  # noqa: E402
from benchmarks.timing import BusyWaitTimer  # noqa: E402
from gpu_kernels.page_copy import gather_pages, write_tokens  # noqa: E402
from offload import DEFAULT_FETCH_PROGRAMS, HostKVStore, PageFetcher, make_streams, upload  # noqa: E402

GB = 1e9
BF16 = torch.bfloat16


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--context", type=int, default=131072, help="context tokens per layer (default 128K)")
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--page-sizes", type=int, nargs="+", default=[16, 32, 64, 128])
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.05, 0.10])
    ap.add_argument("--layers", type=int, default=36)
    ap.add_argument("--gather-layers", type=int, default=16,
                    help="layers of the gather benchmark's store (each 4 KiB-page and huge-page): 16 at 128K "
                         "= 8 GiB, so that scattered reads cover a store of the runtime's size, not one layer")
    ap.add_argument("--block-tokens", type=int, default=32, help="tokens per committed block")
    ap.add_argument("--overlap-page-size", type=int, default=32)
    ap.add_argument("--overlap-fraction", type=float, default=0.05)
    ap.add_argument("--overlap-context", type=int, default=None, help="context for the overlap test (default --context)")
    ap.add_argument("--overlap-caps", type=int, nargs="+", default=None,
                    help="gather program caps for the overlap test (0 = gather_pages' standalone default; "
                         "default 8 16 32 66 0)")
    ap.add_argument("--overlap-reps", type=int, default=3,
                    help="(compute-only, compute + fetch, fetch-only) pass triplets per overlap row, run back "
                         "to back; the row reports their medians")
    ap.add_argument("--overlap-compute", nargs="+", default=["matmul"], choices=list(STAND_INS),
                    help="per-layer compute of the overlap passes: a tensor-core-bound matmul (default) and/or "
                         "a weight-read matmul of 64 rows (HBM-bound, as small-batch decoder layers are)")
    ap.add_argument("--overlap-only", action="store_true", help="skip the gather and commit sweeps")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="32K context, 5 iterations, small sweeps: a smoke test")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: a dry run of the benchmark's code path on tiny sizes (needs TRITON_INTERPRET=1); "
                         "its numbers mean nothing")
    ap.add_argument("--out", type=str, default=os.environ.get("OUT", "./out"))
    args = ap.parse_args(argv)
    if args.quick:
        args.context, args.iters = 32768, 5
    if args.overlap_context is None:
        args.overlap_context = args.context
    return args


class Clock:
    """CUDA events on the current stream on a GPU; wall time on the CPU dry run."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.busy_wait = BusyWaitTimer() if self.cuda else None

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def ms(self, a, b) -> float:
        if not self.cuda:
            return (b - a) * 1e3
        b.synchronize()
        return a.elapsed_time(b)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def median_ms(self, fn, iters: int, warmup: int = 2, launch_hidden: bool = False) -> float:
        """Median over iters calls of fn, after warmup calls. launch_hidden (GPU): each call's device
        time alone, its host launch work off the clock (`benchmarks.timing`), as for a transfer that a
        pipeline enqueues ahead of need; otherwise from an idle GPU, launch included."""
        for _ in range(warmup):
            fn()
        self.sync()
        if launch_hidden and self.cuda:
            return statistics.median(self.busy_wait(fn) for _ in range(iters))
        times = []
        for _ in range(iters):
            a = self.mark()
            fn()
            times.append(self.ms(a, self.mark()))
        return statistics.median(times)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16)  # bitwise comparison, NaN-safe


def fill_random(host: torch.Tensor, clock: Clock, dev: torch.device, chunk_elems: int = 1 << 26) -> None:
    """Fill a (pinned) host tensor with random values made on the GPU (fast; no CPU RNG over GiBs)."""
    flat = host.view(-1)
    src = torch.randn(min(chunk_elems, flat.numel()), device=dev, dtype=host.dtype)
    for a in range(0, flat.numel(), chunk_elems):
        b = min(a + chunk_elems, flat.numel())
        src.normal_()
        flat[a:b].copy_(src[: b - a], non_blocking=True)
    clock.sync()


# ---------------------------------------------------------------------------------------------- 1


def copy_bandwidth(clock: Clock, dev: torch.device, n: int) -> dict:
    h = torch.empty(n, dtype=torch.uint8, pin_memory=clock.cuda)
    h.fill_(1)
    d = torch.empty(n, dtype=torch.uint8, device=dev)
    h2d = clock.median_ms(lambda: d.copy_(h, non_blocking=True), iters=10, launch_hidden=True)
    d2h = clock.median_ms(lambda: h.copy_(d, non_blocking=True), iters=10, launch_hidden=True)
    del h, d
    return {"bytes": n, "h2d_GBps": n / h2d / 1e6, "d2h_GBps": n / d2h / 1e6}


# ---------------------------------------------------------------------------------------------- 2


def random_units(num_pages: int, hkv: int, k: int, device) -> tuple[torch.Tensor, ...]:
    """k distinct pages per head (sorted, as a top-k page set would be fetched), random slot order."""
    pages = torch.stack([torch.randperm(num_pages)[:k].sort().values for _ in range(hkv)]).view(-1)
    heads = torch.arange(hkv).repeat_interleave(k)
    slots = torch.randperm(hkv * k)
    return tuple(t.to(torch.int32).to(device) for t in (pages, heads, slots))


def contiguous_units(num_pages: int, hkv: int, k: int, device) -> tuple[torch.Tensor, ...]:
    """k consecutive pages from a random start, every head of each, in store order (the store is
    page-major): as many units as a selection, but one contiguous span of host memory per layer."""
    start = int(torch.randint(0, num_pages - k + 1, ()))
    pages = torch.arange(start, start + k).repeat_interleave(hkv)
    heads = torch.arange(hkv).repeat(k)
    slots = torch.arange(hkv * k)
    return tuple(t.to(torch.int32).to(device) for t in (pages, heads, slots))


LEGACY = 10**9  # max_programs "uncapped": one program per task, the pre-persistent launch shape


def gather_configs(args, unit: int, sms: int) -> list[dict]:
    """Launch shapes to sweep: programs per SM x block x units per program x warps, plus the resolved
    defaults and the old one-program-per-unit shape for comparison."""
    default_block = min(triton.next_power_of_2(unit), 4096)
    configs = [dict(block=None, num_warps=None, max_programs=None, units_per_program=None),
               dict(block=None, num_warps=None, max_programs=LEGACY, units_per_program=1)]
    if args.quick:
        per_sm, blocks, units, warps = (1, 4), (default_block,), (None,), (8,)
    else:
        per_sm, blocks, units, warps = (1, 2, 4, 8), (default_block, default_block // 2), (1, 2, 4, 8), (4, 8)
    for pps in per_sm:
        for block in blocks:
            if block < 512:
                continue
            for u in units:
                for w in warps:
                    configs.append(dict(block=block, num_warps=w, max_programs=pps * sms, units_per_program=u))
    return configs


def _cfg_label(cfg: dict, sms: int) -> str:
    mp = cfg["max_programs"]
    grid = "default" if mp is None else ("1/unit" if mp >= LEGACY else f"{mp // sms}/SM" if mp % sms == 0 else str(mp))
    return (f"grid={grid} block={cfg['block'] or 'dflt'} units={cfg['units_per_program'] or 'dflt'} "
            f"warps={cfg['num_warps'] or 'dflt'}")


def bench_gather(args, clock: Clock, dev: torch.device, copy_gbps: float, sms: int) -> list[dict]:
    """Per page size and selection share: the launch sweep over a store of ``--gather-layers`` layers
    backed by huge pages (the store's default), each timed gather reading the next layer (as a pass
    does: the scattered reads cover the whole store, not one layer's slice); then the best launch
    from the same store on 4 KiB pages."""
    rows = []
    hkv, d, layers = args.kv_heads, args.head_dim, args.gather_layers
    for p in args.page_sizes:
        num_pages = args.context // p
        stores = {huge: HostKVStore(layers, hkv, d, p, num_pages, dtype=BF16, pin_memory=clock.cuda, huge_pages=huge)
                  for huge in (True, False)}
        for store in stores.values():
            fill_random(store.k_all, clock, dev)
            fill_random(store.v_all, clock, dev)
        huge_share = stores[True].huge_page_share()
        unit = p * d
        configs = gather_configs(args, unit, sms)
        for frac in args.fractions:
            k = max(1, round(frac * num_pages))
            m = hkv * k
            nbytes = 2 * m * unit * 2
            pool_k = torch.empty(m, p, d, device=dev, dtype=BF16)
            pool_v = torch.empty_like(pool_k)
            # several selections, each from the next layer, cycled: repeated iterations neither re-read
            # host-cache-hot lines nor stay inside one layer's slice of the store
            sels = [(i % layers, *random_units(num_pages, hkv, k, dev)) for i in range(max(6, layers))]

            def gather_call(cfg, store):
                it = iter(range(10**9))

                def run():
                    layer, pg, hd, sl = sels[next(it) % len(sels)]
                    gather_pages(store.kernel_k(layer), store.kernel_v(layer), pg, hd, pool_k, pool_v, sl,
                                 validate=False, **cfg)

                return run

            def timed(cfg, store, launch_hidden=True):
                return clock.median_ms(gather_call(cfg, store), args.iters, launch_hidden=launch_hidden)

            results = []
            for cfg in configs:
                ms = timed(cfg, stores[True])
                results.append({**cfg, "ms": ms, "GBps": nbytes / ms / 1e6})
            best = max(results, key=lambda r: r["GBps"])
            cfg = {k_: best[k_] for k_ in ("block", "num_warps", "max_programs", "units_per_program")}
            # the same gather from an idle GPU: its host launch work (Python checks, the launch) on the
            # clock as well, as the rows before 2026-12-06 (eighteenth session) were timed
            launch_ms = timed(cfg, stores[True], launch_hidden=False)
            run = gather_call(cfg, stores[True])
            clock.sync()
            t0 = time.perf_counter()
            for _ in range(5):  # enqueue only: the GPU runs them after the host has moved on
                run()
            host_launch_us = (time.perf_counter() - t0) / 5 * 1e6
            clock.sync()
            base_ms = timed(cfg, stores[False])
            # the zero-copy ceiling: the same launch and bytes over contiguous spans instead of scattered
            # units. What SMs reading host memory reach without a gather (the copy engines reach more)
            scattered = sels
            sels = [(layer, *contiguous_units(num_pages, hkv, k, dev)) for layer, *_ in scattered]
            contiguous_ms = timed(cfg, stores[True])
            sels = scattered
            # correctness of the best configuration, bit for bit against torch indexing on the host
            pool_k.fill_(float("nan"))
            pool_v.fill_(float("nan"))
            layer, pg, hd, sl = sels[-1]
            store = stores[True]
            gather_pages(store.kernel_k(layer), store.kernel_v(layer), pg, hd, pool_k, pool_v, sl, validate=False, **cfg)
            clock.sync()
            pgc, hdc, slc = pg.cpu().long(), hd.cpu().long(), sl.cpu().long()
            ok = torch.equal(bits(pool_k.cpu()[slc]), bits(store.k(layer)[pgc, hdc])) and torch.equal(
                bits(pool_v.cpu()[slc]), bits(store.v(layer)[pgc, hdc]))
            by_grid = {}
            for r in results:  # best per grid size: how many programs the link needs
                key = "default" if r["max_programs"] is None else (
                    "1/unit" if r["max_programs"] >= LEGACY else f"{r['max_programs'] // sms}/SM")
                if key not in by_grid or r["GBps"] > by_grid[key]["GBps"]:
                    by_grid[key] = r
            row = {
                "page_size": p, "fraction": frac, "units": m, "MB": nbytes / 1e6,
                "store_GiB": store.nbytes / 2**30, "huge_page_share": huge_share,
                "GBps": best["GBps"], "ratio_to_copy": best["GBps"] / copy_gbps, "ok": ok,
                "best_config": cfg, "best_label": _cfg_label(cfg, sms),
                "launch_included_GBps": nbytes / launch_ms / 1e6, "host_launch_us": host_launch_us,
                "default_GBps": results[0]["GBps"], "legacy_GBps": results[1]["GBps"],
                "base_pages_GBps": nbytes / base_ms / 1e6,
                "contiguous_GBps": nbytes / contiguous_ms / 1e6,
                "ratio_to_contiguous": best["GBps"] / (nbytes / contiguous_ms / 1e6),
                "best_by_grid": {g: {"GBps": r["GBps"], "label": _cfg_label(r, sms)} for g, r in by_grid.items()},
                "configs": results,
            }
            rows.append(row)
            print(f"gather P={p} frac={frac}: best {best['GBps']:.1f} GB/s ({100 * row['ratio_to_copy']:.0f}% of copy) "
                  f"[{row['best_label']}], {row['launch_included_GBps']:.1f} with its launch on the clock "
                  f"({row['host_launch_us']:.0f} us of host work per call), "
                  f"default {row['default_GBps']:.1f}, old 1-program-per-unit "
                  f"{row['legacy_GBps']:.1f}, same launch from 4 KiB pages {row['base_pages_GBps']:.1f}, "
                  f"same launch over contiguous spans {row['contiguous_GBps']:.1f} "
                  f"(store {row['store_GiB']:.1f} GiB, huge-page share {huge_share}), ok={ok}", flush=True)
            print("    best per grid: " + ", ".join(f"{g} {v['GBps']:.1f}" for g, v in row["best_by_grid"].items()),
                  flush=True)
            del pool_k, pool_v, sels
        for store in stores.values():
            store.close()
        del stores, store
    return rows


# ---------------------------------------------------------------------------------------------- 3


def bench_write(args, clock: Clock, dev: torch.device, d2h_gbps: float) -> list[dict]:
    rows = []
    L, hkv, d, t, p = args.layers, args.kv_heads, args.head_dim, args.block_tokens, 16
    for n in (1, 8):
        tokens = 263 + t  # the block starts mid-page (263 % 16 = 7) and spans three 16-token pages
        pages_per_seq = -(-tokens // p)
        store = HostKVStore(L, hkv, d, p, n * pages_per_seq + 3, dtype=BF16, pin_memory=clock.cuda)
        store.allocate("pad", 40)  # so sequences do not start at physical page 0
        seqs = list(range(n))
        for s in seqs:
            store.allocate(s, tokens)
        k_new = torch.randn(L, n, hkv, t, d, device=dev, dtype=BF16)
        v_new = torch.randn_like(k_new)
        table = store.page_tables(seqs).to(dev)
        start = torch.full((n,), 263, device=dev, dtype=torch.int64)
        nbytes = 2 * k_new.numel() * 2

        def one_launch():
            write_tokens(store.kernel_k_all, store.kernel_v_all, table, start, k_new, v_new, validate=False)

        def per_layer():
            for layer in range(L):
                write_tokens(store.kernel_k(layer), store.kernel_v(layer), table, start, k_new[layer], v_new[layer],
                             validate=False)

        def store_write():  # HostKVStore.write of every layer, device tables: the runtime's commit
            store.write(None, table, start, k_new, v_new)

        host_k = torch.empty(k_new.shape, dtype=BF16, pin_memory=clock.cuda)
        host_v = torch.empty(k_new.shape, dtype=BF16, pin_memory=clock.cuda)

        def contiguous_d2h():
            host_k.copy_(k_new, non_blocking=True)
            host_v.copy_(v_new, non_blocking=True)

        ms_one, ms_per, ms_store, ms_d2h = (clock.median_ms(f, args.iters)
                                            for f in (one_launch, per_layer, store_write, contiguous_d2h))
        store.k_all.fill_(0)
        store.v_all.fill_(0)
        one_launch()
        clock.sync()
        ok = all(
            torch.equal(bits(store.read(s, layer, 263, 263 + t)[0]), bits(k_new[layer, s].cpu()))
            and torch.equal(bits(store.read(s, layer, 263, 263 + t)[1]), bits(v_new[layer, s].cpu()))
            for s in seqs for layer in (0, L // 2, L - 1)
        )
        row = {
            "rows": n, "tokens": t, "layers": L, "page_size": p, "MB": nbytes / 1e6,
            "one_launch_ms": ms_one, "one_launch_GBps": nbytes / ms_one / 1e6,
            "per_layer_ms": ms_per, "per_layer_GBps": nbytes / ms_per / 1e6,
            "store_write_ms": ms_store, "store_write_GBps": nbytes / ms_store / 1e6,
            "contiguous_d2h_GBps": nbytes / ms_d2h / 1e6,
            "ratio_to_1GiB_d2h": nbytes / ms_one / 1e6 / d2h_gbps, "ok": ok,
        }
        rows.append(row)
        print(f"write_tokens N={n}: {row['one_launch_GBps']:.1f} GB/s one launch, {row['per_layer_GBps']:.1f} "
              f"per layer, store.write (commit_block) {row['store_write_GBps']:.1f}, contiguous D2H "
              f"{row['contiguous_d2h_GBps']:.1f}, ok={ok}", flush=True)
        store.close()
    return rows


# ---------------------------------------------------------------------------------------------- 4


HOST_BOUND_RATIO = 0.8  # a pass whose host enqueue time exceeds this share of its GPU time was paced by the host


class ComputeStandIn:
    """Per-layer compute for the overlap passes: ONE bf16 matmul ``[rows, n] @ [n, n]`` per layer whose
    ``rows`` are chosen so it takes the target time, so the host enqueues ~3 launches per layer (fetch,
    wait, matmul) and runs far ahead of the GPU. (A loop of ~45 small matmuls per layer made the host,
    not the GPU, pace the pass: host ms equalled GPU ms in every row.) That matmul is bound by the
    tensor cores, so every SM a gather holds slows it; `WeightReadStandIn` is the other regime.

    Calibrated once: a square ``n x n`` matmul is timed and ``rows`` scaled from it (a GEMM this large
    takes time linear in its M dimension), then the sized matmul is timed and rescaled once if it
    missed the target by more than 10%. Past ``MAX_ROWS_PER_N * n`` rows the work is split into a few
    equal matmuls (bounded memory)."""

    MAX_ROWS_PER_N = 16

    def __init__(self, clock: Clock, dev: torch.device) -> None:
        self.clock, self.dev = clock, dev
        self.n = 4096 if clock.cuda else 64
        self.granule = 128 if clock.cuda else 16  # rows in whole GEMM tiles
        self.w = torch.randn(self.n, self.n, device=dev, dtype=BF16)
        sq = torch.randn(self.n, self.n, device=dev, dtype=BF16)
        out = torch.empty_like(sq)
        self.square_ms = clock.median_ms(lambda: torch.matmul(sq, self.w, out=out), 10, warmup=3)

    def _make(self, rows: int):
        launches = -(-rows // (self.MAX_ROWS_PER_N * self.n))
        per = -(-rows // launches // self.granule) * self.granule
        x = torch.randn(per, self.n, device=self.dev, dtype=BF16)
        out = torch.empty(per, self.n, device=self.dev, dtype=BF16)

        def compute() -> None:
            for _ in range(launches):
                torch.matmul(x, self.w, out=out)

        return compute, launches, per * launches

    def build(self, target_ms: float):
        """``(compute, info)``: ``compute()`` enqueues one layer's stand-in on the current stream; info
        has the rows, launches, the measured ms and the target."""
        rows = max(self.granule, round(self.n * target_ms / self.square_ms))
        for attempt in range(2):
            compute, launches, rows = self._make(rows)
            ms = self.clock.median_ms(compute, 10, warmup=3)
            if attempt or abs(ms / target_ms - 1) <= 0.1:
                break
            rows = max(self.granule, round(rows * target_ms / ms))
        return compute, {"rows": rows, "n": self.n, "launches": launches, "ms": ms, "target_ms": target_ms}


class WeightReadStandIn:
    """Per-layer compute bound by HBM instead of the tensor cores: ``x [ROWS, n] @ W [n, cols]`` with
    ROWS = 64 (two 32-token blocks: 64 FLOP per weight byte, a third of the H200's ridge) and
    ``cols`` sized so the weight read takes the target time, as a decoder layer's projections read
    their weights at small batch. (Herald's batch-6 passes, 192 rows, sit near the ridge, between
    this and `ComputeStandIn`.) A bandwidth-bound kernel needs fewer SMs than the GPU has to
    saturate HBM, so the SMs a gather holds should cost it less than they cost the matmul."""

    ROWS = 64

    def __init__(self, clock: Clock, dev: torch.device) -> None:
        self.clock, self.dev = clock, dev
        self.n = 4096 if clock.cuda else 64
        self.granule = 256 if clock.cuda else 16
        self.x = torch.randn(self.ROWS, self.n, device=dev, dtype=BF16)
        probe_cols = 65536 if clock.cuda else 64
        w = torch.randn(self.n, probe_cols, device=dev, dtype=BF16)
        self.probe_ms = clock.median_ms(lambda: torch.matmul(self.x, w), 10, warmup=3)
        self.probe_cols = probe_cols

    def build(self, target_ms: float):
        """``(compute, info)`` as `ComputeStandIn.build`, for one weight-read matmul per layer."""
        cols = max(self.granule, round(self.probe_cols * target_ms / self.probe_ms / self.granule) * self.granule)
        w = torch.randn(self.n, cols, device=self.dev, dtype=BF16)
        out = torch.empty(self.ROWS, cols, device=self.dev, dtype=BF16)

        def compute() -> None:
            torch.matmul(self.x, w, out=out)

        ms = self.clock.median_ms(compute, 10, warmup=3)
        return compute, {"rows": self.ROWS, "n": self.n, "cols": cols, "launches": 1, "ms": ms,
                         "target_ms": target_ms, "weight_GB": w.numel() * w.element_size() / 1e9}


# the overlap passes' per-layer compute, by --overlap-compute name
STAND_INS = {"matmul": ComputeStandIn, "weight-read": WeightReadStandIn}


def overlap_caps(args, sms: int) -> list[int]:
    """Program caps of the side fetch's gather (SparseConfig.lookahead_fetch_programs); 0 on the
    command line = gather_pages' standalone grid, 2 programs per SM."""
    caps = args.overlap_caps if args.overlap_caps is not None else (
        [DEFAULT_FETCH_PROGRAMS, 0] if args.quick else [8, 16, 32, 66, 0])
    return [c or 2 * sms for c in caps]


def sm_tax_hidden(max_programs: int, sms: int) -> float:
    """End-to-end hidden share a gather of `max_programs` persistent programs can reach beside compute
    that wants every SM: its programs hold that many SMs for as long as the transfer runs, so the
    compute loses programs / SMs of the transfer time."""
    return max(0.0, 1.0 - max_programs / sms)


def bench_overlap(args, clock: Clock, dev: torch.device, sms: int) -> dict:
    """The runtime's own fetch beside compute: herald's LOOKAHEAD gathers every layer's misses with
    `PageFetcher.fetch(side=True)` (the gather stream, at most `side_programs` programs) while the
    block's remaining steps run on the compute stream, and the main stream joins the side stream at
    the commit. Here the side pass is those fetches alone (the lookahead's own forward left out) and
    the steps are a stand-in, one sized matmul per layer; the streams come from `offload.streams`
    with the engine's priorities (or, `prio default`, none)."""
    L, hkv, d, p = args.layers, args.kv_heads, args.head_dim, args.overlap_page_size
    num_pages = args.overlap_context // p
    k = max(1, round(args.overlap_fraction * num_pages))
    t_setup = time.perf_counter()
    store = HostKVStore(L, hkv, d, p, num_pages, dtype=BF16, pin_memory=clock.cuda)
    fill_random(store.k_all, clock, dev)
    fill_random(store.v_all, clock, dev)
    setup_s = time.perf_counter() - t_setup
    store.allocate("ctx", args.overlap_context)
    table = upload(store.page_tables(["ctx"]), dev)
    rows = torch.zeros(1, dtype=torch.int64, device=dev)
    gen = torch.Generator().manual_seed(0)
    selections = [upload(torch.stack([torch.randperm(num_pages, generator=gen)[:k].sort().values
                                      for _ in range(hkv)])[None].to(torch.int32), dev) for _ in range(L)]
    streams = {prio: make_streams(dev, prioritize=prio == "high") for prio in ("high", "default")} if clock.cuda else {}

    def on(stream):
        return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()

    def side_pass(fetcher: PageFetcher, prio: str):
        """Every layer's side fetch, each selected page a miss (as for a block of new pages); on the
        GPU captured once in a CUDA graph on the lookahead stream and replayed, as the runtime replays
        its LOOKAHEAD pass (launched eagerly, ~25 small ops per layer make the host, not the GPU,
        pace it)."""
        def fetch_all():
            fetcher.directory.held.fill_(-1)  # the one row's partitions emptied (capturable, unlike reset_rows)
            for layer in range(L):
                fetcher.fetch(layer, rows, table, selections[layer], side=True)

        if not clock.cuda:
            return fetch_all
        side = streams[prio].lookahead
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fetch_all()  # compiles and warms up outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            fetch_all()
        return graph.replay

    def run_pass(fetch_all, compute, prio: str, with_fetch: bool = True, with_compute: bool = True) -> dict:
        """One block's worth: the side fetches of every layer beside `compute` per layer on the main
        stream, which then joins the side stream (ms from CUDA events on the GPU)."""
        clock.sync()
        s = streams.get(prio)
        main = (s.compute or torch.cuda.current_stream()) if s else None
        side = s.lookahead if s else None
        t0 = time.perf_counter()
        with on(main):
            start = clock.mark()
            if side is not None:
                side.wait_stream(main)
            with on(side):
                side_start = clock.mark()
                if with_fetch:
                    fetch_all()
                side_done = clock.mark()
            if with_compute:
                for _ in range(L):
                    compute()
            main_ready = clock.mark()
            if side is not None:
                main.wait_stream(side)
            end = clock.mark()
        host_ms = (time.perf_counter() - t0) * 1e3
        gpu_ms = clock.ms(start, end)
        fetch_ms = clock.ms(side_start, side_done)
        stall_ms = max(0.0, clock.ms(main_ready, side_done)) if clock.cuda else fetch_ms
        return dict(gpu_ms=gpu_ms, fetch_ms=fetch_ms, stall_ms=stall_ms, host_enqueue_ms=host_ms,
                    host_bound=host_ms > HOST_BOUND_RATIO * gpu_ms)

    def resident(fetcher: PageFetcher) -> bool:
        """Spot check after a pass: the last layer's selection reads back bit for bit."""
        slots, fetched = fetcher.fetch(L - 1, rows, table, selections[L - 1])
        clock.sync()
        sel, slot = selections[L - 1][0].cpu(), slots[0].cpu()
        physical = table[0].cpu()[sel.long()]
        heads = torch.arange(hkv)[:, None].expand_as(sel)
        return int(fetched) == 0 and torch.equal(bits(fetcher.k_pool(L - 1).cpu()[slot.long()]),
                                                 bits(store.k(L - 1)[physical.long(), heads]))

    caps = overlap_caps(args, sms)
    variants = [(c, "high") for c in caps] + ([(DEFAULT_FETCH_PROGRAMS, "default")] if clock.cuda else [])
    kinds = [kind for kind in STAND_INS if kind in args.overlap_compute]
    stand_ins = {kind: STAND_INS[kind](clock, dev) for kind in kinds}
    # compute is sized against the side fetch at the default cap; each row's end-to-end share is
    # against the fetch-only pass of its own triplet (a figure taken once drifted by up to 30%)
    sizing = PageFetcher(store, 1, k, dev, side_programs=DEFAULT_FETCH_PROGRAMS,
                         gather_stream=streams["high"].gather if clock.cuda else None)
    sizing_pass = side_pass(sizing, "high")
    per_layer_transfer = statistics.median(
        run_pass(sizing_pass, None, "high", with_compute=False)["gpu_ms"] for _ in range(3)) / L
    del sizing_pass
    sizing.close()
    layer_bytes = hkv * k * 2 * p * d * 2
    cases = []
    ratios = (("compute>transfer", 1.5), ("compute<transfer", 0.5))
    for kind, (label, ratio) in ((kind, r) for kind in kinds for r in ratios):
        compute, mm = stand_ins[kind].build(ratio * per_layer_transfer)
        for max_programs, prio in variants:
            fetcher = PageFetcher(store, 1, k, dev, side_programs=max_programs,
                                  gather_stream=streams[prio].gather if clock.cuda else None)
            fetch_all = side_pass(fetcher, prio)
            run_pass(fetch_all, compute, prio)  # warm-up
            # triplets run back to back, so that clock and thermal drift between rows cancels in each
            bases, res, alones = [], [], []
            for _ in range(2 if args.quick else args.overlap_reps):
                bases.append(run_pass(fetch_all, compute, prio, with_fetch=False))
                res.append(run_pass(fetch_all, compute, prio))
                alones.append(run_pass(fetch_all, compute, prio, with_compute=False))
            ok = resident(fetcher)
            del fetch_all  # the graph holds the fetcher's pools
            fetcher.close()
            triplet_e2e = [1 - max(0.0, x["gpu_ms"] - b["gpu_ms"]) / a["gpu_ms"] for b, x, a in zip(bases, res, alones)]
            events = [1 - x["stall_ms"] / x["fetch_ms"] for x in res]
            gpu_ms = statistics.median(x["gpu_ms"] for x in res)
            base_ms = statistics.median(b["gpu_ms"] for b in bases)
            alone_ms = statistics.median(a["gpu_ms"] for a in alones)
            host_ms = statistics.median(x["host_enqueue_ms"] for x in res)
            case = {
                "case": label, "max_programs": max_programs, "compute_priority": prio, "compute_kind": kind,
                "matmul": mm, "compute_per_layer_ms": mm["ms"], "transfer_per_layer_ms": per_layer_transfer,
                "transfer_alone_per_layer_ms": alone_ms / L, "transfer_alone_runs": [a["gpu_ms"] / L for a in alones],
                "fetch_GBps": L * layer_bytes / alone_ms / 1e6,
                # the runtime's timeline measure: 1 - (main stream's stall at the join) / (side pass time)
                "hidden_fraction": statistics.median(events), "hidden_fraction_runs": events,
                "stall_ms": statistics.median(x["stall_ms"] for x in res),
                "gpu_ms": gpu_ms, "compute_only_gpu_ms": base_ms,
                # end to end: the share of the triplet's fetch-only time that did not lengthen the pass
                "hidden_fraction_e2e": statistics.median(triplet_e2e), "hidden_fraction_e2e_runs": triplet_e2e,
                "sm_tax_model_e2e": sm_tax_hidden(max_programs, sms),
                "slowdown_vs_compute_only": gpu_ms / base_ms,
                "host_enqueue_ms": host_ms, "host_bound": any(x["host_bound"] for x in res + bases + alones),
                "ok": ok,
            }
            cases.append(case)
            print(f"overlap {label} ({kind}) max_programs={max_programs} priority {prio}: hidden "
                  f"{100 * case['hidden_fraction']:.1f}% by events, {100 * case['hidden_fraction_e2e']:.1f}% end to "
                  f"end; gpu {gpu_ms:.2f} ms vs compute-only {base_ms:.2f} ms (x{case['slowdown_vs_compute_only']:.2f}), "
                  f"fetch alone {case['fetch_GBps']:.1f} GB/s{' HOST-BOUND' if case['host_bound'] else ''}", flush=True)
    store.close()
    # the pick: among the prioritised rows, e2e hidden >= 90% when compute > transfer, then the
    # smallest slowdown (ties within 2%: the fewer programs); host-bound rows only when every row is
    cand = [c for c in cases if c["case"] == "compute>transfer" and c["compute_priority"] == "high"
            and c["compute_kind"] == kinds[0]]
    cand = [c for c in cand if not c["host_bound"]] or cand
    good = [c for c in cand if c["hidden_fraction_e2e"] >= 0.9] or cand
    best_slow = min(c["slowdown_vs_compute_only"] for c in good)
    pick = min((c for c in good if c["slowdown_vs_compute_only"] <= best_slow * 1.02), key=lambda c: c["max_programs"])
    return {
        "layers": L, "page_size": p, "fraction": args.overlap_fraction, "context": args.overlap_context,
        "units_per_layer": hkv * k, "MB_per_layer": layer_bytes / 1e6,
        "square_matmul": ({"n": stand_ins["matmul"].n, "ms": stand_ins["matmul"].square_ms}
                          if "matmul" in stand_ins else None),
        "transfer_per_layer_ms": per_layer_transfer,
        "store_setup_s": setup_s, "cases": cases, "runtime_default": DEFAULT_FETCH_PROGRAMS,
        "recommended_max_programs": pick["max_programs"], "recommendation_host_bound": pick["host_bound"],
        "host_bound_ratio": HOST_BOUND_RATIO,
        "note": "the runtime's fetch path (offload.PageFetcher, side fetches on the gather stream of "
                "offload.streams) beside one sized matmul per layer on the compute stream; hidden = 1 - the main "
                "stream's stall at the join / the side pass's time (herald's timeline measure); hidden_e2e = "
                "1 - (pass - compute-only pass) / fetch-only pass, each triplet back to back; host_bound: host "
                f"enqueue ms > {HOST_BOUND_RATIO} x gpu ms (the GPU idled, so slowdown and hidden describe Python)",
    }


# ----------------------------------------------------------------------------------------------


def print_tables(res: dict) -> None:
    c = res["copy"]
    print("\n== pinned copy (1 GiB, tensor.copy_): host->GPU {:.1f} GB/s, GPU->host {:.1f} GB/s".format(
        c["h2d_GBps"], c["d2h_GBps"]))
    if "gather" in res:  # absent with --overlap-only
        print("\n== gather_pages: pinned host -> GPU pool through UVA (target >= 90% of copy at 16-token pages)")
        print(f"{'page':>5} {'frac':>5} {'units':>7} {'MB':>7} {'best GB/s':>9} {'%copy':>6} {'+launch':>8} "
              f"{'default':>8} {'old':>6} {'4KiB pgs':>9} {'contig':>8} {'%contig':>8} {'ok':>5}  best launch")
        for r in res["gather"]:
            print(f"{r['page_size']:>5} {r['fraction']:>5.2f} {r['units']:>7} {r['MB']:>7.1f} {r['GBps']:>9.1f} "
                  f"{100 * r['ratio_to_copy']:>5.0f}% {r['launch_included_GBps']:>8.1f} "
                  f"{r['default_GBps']:>8.1f} {r['legacy_GBps']:>6.1f} "
                  f"{r['base_pages_GBps']:>9.1f} {r['contiguous_GBps']:>8.1f} {100 * r['ratio_to_contiguous']:>7.0f}% "
                  f"{str(r['ok']):>5}  "
                  f"{r['best_label']}")
        print("  (best: device time, launch hidden behind a busy-wait; +launch: the best launch timed from an idle "
              "GPU, its host launch work on the clock; default: gather_pages' defaults; old: one program per unit; 4KiB pgs: the best launch reading "
              "the same store backed by 4 KiB pages instead of huge pages; contig: the best launch reading as many bytes "
              "from contiguous spans, the zero-copy ceiling without a gather)")
        grids = sorted({g for r in res["gather"] for g in r["best_by_grid"]})
        print(f"\n   best GB/s per grid size: {'page':>5} {'frac':>5} " + " ".join(f"{g:>8}" for g in grids))
        for r in res["gather"]:
            print(f"{'':>27}{r['page_size']:>5} {r['fraction']:>5.2f} " + " ".join(
                f"{r['best_by_grid'][g]['GBps']:>8.1f}" if g in r["best_by_grid"] else f"{'-':>8}" for g in grids))
        print(f"\n== write_tokens: GPU -> pinned host, {res['write'][0]['tokens']}-token block x "
              f"{res['write'][0]['layers']} layers (16-token pages, mid-page start)")
        print(f"{'rows':>5} {'MB':>7} {'1-launch GB/s':>14} {'per-layer GB/s':>15} {'store.write GB/s':>17} "
              f"{'contig D2H GB/s':>16} {'%1GiB D2H':>10} {'ok':>5}")
        for r in res["write"]:
            print(f"{r['rows']:>5} {r['MB']:>7.2f} {r['one_launch_GBps']:>14.1f} {r['per_layer_GBps']:>15.1f} "
                  f"{r['store_write_GBps']:>17.1f} {r['contiguous_d2h_GBps']:>16.1f} "
                  f"{100 * r['ratio_to_1GiB_d2h']:>9.0f}% {str(r['ok']):>5}")
    o = res["overlap"]
    print(f"\n== the runtime's side fetch beside compute: {o['layers']} layers, {o['page_size']}-token pages, "
          f"{o['fraction']:.0%} of {o['context']} tokens = {o['MB_per_layer']:.1f} MB/layer "
          "(target hidden >= 90% when compute > transfer)")
    print(f"{'case':>17} {'compute':>11} {'max_prog':>8} {'prio':>7} {'xfer alone ms':>13} {'compute/layer ms':>16} "
          f"{'hidden':>7} {'e2e hid':>7} {'SM tax':>6} {'fetch GB/s':>10} {'gpu ms':>8} {'compute-only ms':>15} "
          f"{'slowdown':>8} {'host ms':>8} {'bound':>5} {'ok':>5}")
    for r in o["cases"]:
        print(f"{r['case']:>17} {r['compute_kind']:>11} {r['max_programs']:>8} {r['compute_priority']:>7} "
              f"{r['transfer_alone_per_layer_ms']:>13.3f} {r['compute_per_layer_ms']:>16.3f} "
              f"{100 * r['hidden_fraction']:>6.1f}% {100 * r['hidden_fraction_e2e']:>6.1f}% "
              f"{100 * r['sm_tax_model_e2e']:>5.0f}% {r['fetch_GBps']:>10.1f} {r['gpu_ms']:>8.2f} "
              f"{r['compute_only_gpu_ms']:>15.2f} {r['slowdown_vs_compute_only']:>8.2f} "
              f"{r['host_enqueue_ms']:>8.1f} {('host' if r['host_bound'] else 'gpu'):>5} {str(r['ok']):>5}")
    print("  hidden: 1 - the compute stream's stall at the join / the side fetches' time (CUDA events, herald's "
          "timeline measure); e2e hid: 1 - (gpu ms - compute-only ms) / fetch-only ms, median over back-to-back "
          "(compute-only, compute + fetch, fetch-only) triplets; SM tax: 1 - max_prog / SMs, the e2e share a "
          "gather that holds max_prog SMs for its whole transfer can hide beside compute that wants every SM")
    print(f"  prio high: the engine's streams (offload.streams); default: no priorities. The runtime's default "
          f"max_programs = {o['runtime_default']}; this run recommends {o['recommended_max_programs']} (e2e hidden "
          ">= 90% when compute > transfer, then the smallest slowdown, then the fewest programs, among rows that "
          "are not host-bound)")
    sq = o["square_matmul"]
    sizing = f"a {sq['n']}^2 matmul of {sq['ms']:.3f} ms" if sq else "a square matmul"
    print(f"  bound: host when host ms > {o['host_bound_ratio']} x gpu ms (the GPU waited for Python: slowdown "
          f"and hidden are not GPU numbers); compute/layer = one bf16 matmul per layer: matmul = rows sized from "
          f"{sizing} (tensor-core bound); weight-read = {WeightReadStandIn.ROWS} rows times a weight "
          "sized to the target time (HBM bound)"
          + ("; THE RECOMMENDATION COMES FROM A HOST-BOUND ROW" if o["recommendation_host_bound"] else ""))


def main(argv=None) -> int:
    args = parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("benchmarks/transfer.py needs a CUDA GPU (pinned host memory, UVA kernels, CUDA streams); "
              "--device cpu is a dry run of the code path only.", file=sys.stderr)
        return 2
    if dev.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        print("--device cpu runs the kernels in the Triton interpreter: set TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    clock = Clock(dev)
    if clock.cuda:
        props = torch.cuda.get_device_properties(0)
        name, sms = props.name, props.multi_processor_count
    else:
        name, sms = "cpu dry run (numbers meaningless)", 2
    res = {
        "device": name, "torch": torch.__version__, "triton": triton.__version__, "gpu_kernels": kernels_source(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "args": vars(args),
    }
    res["copy"] = copy_bandwidth(clock, dev, (1 << 30) if clock.cuda else (1 << 20))
    print(f"gpu_kernels from {res['gpu_kernels']}", flush=True)
    print(f"copy: h2d {res['copy']['h2d_GBps']:.1f} GB/s, d2h {res['copy']['d2h_GBps']:.1f} GB/s", flush=True)
    if not args.overlap_only:
        res["gather"] = bench_gather(args, clock, dev, res["copy"]["h2d_GBps"], sms)
        res["write"] = bench_write(args, clock, dev, res["copy"]["d2h_GBps"])
    res["overlap"] = bench_overlap(args, clock, dev, sms)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "transfer.json").write_text(json.dumps(res, indent=1))
    print_tables(res)
    print(f"\nwrote {out / 'transfer.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
