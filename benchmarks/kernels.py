"""Paged attention kernel throughput on the GPU, against the limits measured in the same run.

One run measures:
  1. pinned host->GPU copy bandwidth (1 GiB), HBM device copy bandwidth (read + write) and HBM read
     bandwidth (a reduction);
  2. for N=1 (`--batch`: N sequences, sparse rows only), Hq=32, Hkv=8, D=128, bf16, T in {16, 32},
     context in {32K, 64K, 128K},
     page_size in {16, 64}:
     (a) GPU-resident store layout: time (do_bench median), TB/s of K+V read, speed-up over torch
         SDPA (enable_gqa) on the same KV made contiguous, fraction of the HBM copy bandwidth,
         and the extra time of return_page_scores=True;
     (b) K/V read zero-copy from pinned host memory: GB/s and fraction of the pinned copy
         bandwidth;
     (c) sparse: a random 5% and 10% of the pages per KV head in the pool layout: the bytes
         read (K+V of the selected pages, plus q and the page table) and TB/s over the K+V bytes,
         against what a graph replay could reach: the replay floor of a graph of one (or two, with
         the split merge) trivial kernels, measured in the same run, plus the bytes at the HBM read
         rate; the graph-best variant is replayed again after the other L2 flush (--l2), with each
         list's page table in ascending slot order, with its split path with each saving off, and
         as one of --layers calls back to back in one graph (each over its own copy of the pool, as
         a decoding step runs one attention per layer: the graph's launch is paid once for all),
         against the same graph of empty kernels on the call's grids (its floor per call) plus
         the bytes at the HBM read rate.
  Each mode sweeps a few tile/warp/stage configs and split counts; every variant is checked
  against the plain-torch reference (rel error printed) and timed two ways:
    "launch ms": triton.testing.do_bench median of the Python call (allocations, checks and
                 kernel launches included; when the host is slower than the GPU this is host time);
    "graph ms":  one replay of a CUDA graph of the call with preallocated outputs and workspace
                 (what the runtime sees when it replays graphs), L2 flushed before each replay
                 (--l2: by writes, leaving dirty lines, or by reads) and the host's replay
                 submission hidden behind a GPU sleep.
  The table shows the variant with the best launch ms and, separately, the best graph ms.
Prints a table and writes $OUT/kernels.json (OUT defaults to ./out).

    python -m benchmarks.kernels                # full sweep (about 4 minutes on an H100)
    python -m benchmarks.kernels --quick        # 32K context only, smaller sweep
    python -m benchmarks.kernels --sparse-only  # only the sparse pool rows (add --quick for 32K)
    python -m benchmarks.kernels --batch 6 --T 32 --pages 16 --contexts 131072  # herald's shape at 128K
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import time
from typing import TYPE_CHECKING

import torch

from benchmarks import kernels_source
from benchmarks.roofline import reduction_read_ms
from benchmarks.timing import BusyWaitTimer

if TYPE_CHECKING:
    from gpu_kernels.attention_plan import AttentionOptions, AttentionPlan

HQ, HKV, D = 32, 8, 128
TARGETS = dict(resident_TBps=2.0, uva_frac_of_pinned=0.9, sparse_TBps=1.5)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-30))


def scores_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    fin = torch.isfinite(ref)
    if not torch.equal(torch.isfinite(got), fin):
        return float("inf")
    return rel_err(got[fin], ref[fin]) if fin.any() else 0.0


def flush_l2(buffer: torch.Tensor, dirty: bool) -> None:
    """Evict the L2 by writing `buffer` (uint8, larger than the L2; as do_bench does: the lines left
    are dirty, so the timed call's first reads also pay their write-back) or, dirty=False, by reading
    it (clean lines)."""
    if dirty:
        buffer.zero_()
    else:
        buffer.view(torch.int32).amax()


class Timer:
    """do_bench median, plus a variant whose launch overhead is hidden behind a GPU busy-wait.

    triton.testing.do_bench flushes L2 (a 256 MB memset, not timed) before each repetition; the
    busy-wait variant also keeps the GPU busy before the start event, for as long as the host takes
    to launch the call (`benchmarks.timing.BusyWaitTimer`), so that work is off the clock. A large
    gap between the two means the call is launch-bound. The busy-wait and graph timings flush L2 by
    reading (clean lines) unless dirty_l2: a memset leaves up to an L2 of dirty lines, and a call
    reading 27 MB then also writes back as much of someone else's data (on an H100 that made the N=1
    sparse calls 15-27% slower than after a clean flush).
    """

    def __init__(self, warmup_ms: float, rep_ms: float, dirty_l2: bool = False):
        import triton.testing
        self.do_bench = triton.testing.do_bench
        self.warmup_ms, self.rep_ms = warmup_ms, rep_ms
        self.dirty_l2 = dirty_l2  # how graph_ms / hidden_launch_ms flush L2 unless told
        self.flush = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
        self.busy_wait = BusyWaitTimer()

    def median_ms(self, fn) -> float:
        return float(self.do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, return_mode="median"))

    def hidden_launch_ms(self, fn, reps: int = 20, dirty_l2: bool | None = None) -> float:
        dirty_l2 = self.dirty_l2 if dirty_l2 is None else dirty_l2
        fn()
        torch.cuda.synchronize()
        times = sorted(self.busy_wait(fn, before=lambda: flush_l2(self.flush, dirty_l2)) for _ in range(reps))
        return times[len(times) // 2]

    def graph_ms(self, fn, reps: int = 20, dirty_l2: bool | None = None) -> float:
        """GPU time of one replay of a CUDA graph of fn (fn must allocate nothing: preallocated
        outputs), measured like hidden_launch_ms."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compile and warm up outside the capture
            fn()
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        ms = self.hidden_launch_ms(graph.replay, reps, dirty_l2)
        del graph
        return ms


def copy_bandwidths(timer: Timer, nbytes: int) -> dict:
    """Pinned host->GPU copy, HBM device copy (read + write bytes) and HBM read (a reduction that
    writes one number: the best of an fp32 sum and an int32 max over nbytes)."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    host.fill_(1)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    h2d_ms = timer.median_ms(lambda: dev.copy_(host, non_blocking=True))
    src = torch.ones(nbytes, dtype=torch.uint8, device="cuda")
    d2d_ms = timer.median_ms(lambda: dev.copy_(src))
    read_ms = reduction_read_ms(src, timer.median_ms)
    del host, dev, src
    return dict(bytes=nbytes, pinned_h2d_GBps=nbytes / h2d_ms / 1e6,
                hbm_copy_rw_GBps=2 * nbytes / d2d_ms / 1e6, hbm_read_GBps=nbytes / read_ms / 1e6)


def launch_floor(timer: Timer) -> dict:
    """GPU time of replaying a graph of one and of two trivial kernels (a 1-element add), timed
    like `Timer.graph_ms`: the fixed cost under every graph-ms figure, whatever the kernel reads.
    A call that moves `nbytes` cannot beat floor + nbytes / HBM bandwidth."""
    tiny = torch.zeros(1, device="cuda")
    one = timer.graph_ms(lambda: tiny.add_(1))
    two = timer.graph_ms(lambda: (tiny.add_(1), tiny.add_(1)))
    return dict(graph_1_kernel_ms=one, graph_2_kernels_ms=two)


@functools.cache
def _empty_kernel():
    """A Triton kernel that does nothing but PDL's signals (WAIT: griddepcontrol.wait first;
    SIGNAL: let a programmatic dependent launch): what launching a grid costs, with no bytes to
    move. Built on first use, so importing this module needs no Triton."""
    import triton
    import triton.language as tl

    @triton.jit
    def empty(unused_ptr, WAIT: tl.constexpr, SIGNAL: tl.constexpr):
        if WAIT:
            tl.extra.cuda.gdc_wait()
        if SIGNAL:
            tl.extra.cuda.gdc_launch_dependents()

    return empty


def layer_floor_ms(timer, layers: int, attention_grid: int, attention_warps: int, merge_grid: int,
                   attention_chained: bool, pdl: bool) -> float:
    """Per call: GPU time of one replay of a graph of `layers` empty calls, each an empty kernel on
    the attention's grid and, if merge_grid, one on the split merge's, divided by `layers`: the layer
    run's fixed cost per call, whatever the call reads. Launched as `paged_attention` launches them:
    with pdl, the merge as the attention's programmatic dependent (it waits, then lets the next
    kernel launch), and if attention_chained, the attention as the previous kernel's (it waits)."""
    empty = _empty_kernel()
    unused = torch.zeros(1, device="cuda")
    chained = pdl and attention_chained
    attention_pdl = dict(launch_pdl=True) if chained else {}
    merge_pdl = dict(launch_pdl=True) if pdl else {}

    def run():
        for _ in range(layers):
            empty[(attention_grid,)](unused, WAIT=chained, SIGNAL=pdl, num_warps=attention_warps, **attention_pdl)
            if merge_grid:
                empty[(merge_grid,)](unused, WAIT=pdl, SIGNAL=pdl, num_warps=1, **merge_pdl)

    return timer.graph_ms(run) / layers


def _stream_ms(rec: dict, limits: dict) -> float:
    """A row's read bytes at the measured HBM read rate (the copy rate for runs that did not
    measure reads)."""
    rate = limits.get("hbm_read_GBps", limits["hbm_copy_rw_GBps"])
    return rec.get("read_bytes", rec["kv_bytes"]) / (rate * 1e6)


def attainable_fields(rec: dict, limits: dict) -> dict:
    """The best a graph replay of this call could do: the launch floor for its kernel count (the
    split merge is a second kernel) plus its bytes at the measured HBM read rate (the copy rate for
    runs that did not measure reads)."""
    if "graph_ms" not in rec:
        return {}
    merged = rec["graph_best"]["num_splits"] > 1
    floor = limits["launch_floor"]["graph_2_kernels_ms" if merged else "graph_1_kernel_ms"]
    best_ms = floor + _stream_ms(rec, limits)
    return dict(floor_ms=floor, attainable_ms=best_ms, attainable_TBps=rec["kv_bytes"] / best_ms / 1e9,
                frac_of_attainable=best_ms / rec["graph_ms"])


def sweep_configs(quick: bool) -> list[dict]:
    """Launch candidates (block_n, num_warps, num_stages, optionally block_m); block_n is raised
    to the page size inside the kernel wrapper."""
    if quick:
        return [dict(block_n=64, num_warps=4, num_stages=3), dict(block_n=64, num_warps=8, num_stages=3),
                dict(block_n=128, num_warps=8, num_stages=2)]
    return [dict(block_n=64, num_warps=4, num_stages=2), dict(block_n=64, num_warps=4, num_stages=3),
            dict(block_n=64, num_warps=8, num_stages=3), dict(block_n=64, num_warps=8, num_stages=4),
            dict(block_n=128, num_warps=4, num_stages=2), dict(block_n=128, num_warps=8, num_stages=2),
            # 128-token tiles with 3 stages (208 KB of shared memory at 64 rows): a fifth fewer sm_90
            # instructions per token than 64-token tiles (scripts/dev/sass_attention_loop.py)
            dict(block_n=128, num_warps=4, num_stages=3),
            # 64 query rows per program: T=32 (128 rows) becomes two row blocks that share K/V via L2
            dict(block_m=64, block_n=64, num_warps=4, num_stages=3)]


def split_candidates(default: int, factors=(0.5, 1, 2)) -> list[int]:
    return sorted({max(1, int(round(default * f))) for f in factors})


def best_cfg(record: dict) -> dict:
    """The launch keywords of a sweep record."""
    return {key: val for key, val in record.items() if key not in ("ms", "graph_ms", "rel_err", "graph_rel_err", "error")}


def options_of(cfg: dict) -> AttentionOptions:
    """A launch config of the sweep (a dict of `AttentionOptions` fields, as the JSON records hold
    them) as the options a call takes."""
    from gpu_kernels.attention_plan import AttentionOptions

    return AttentionOptions(**cfg)


def preallocated(plan: AttentionPlan) -> dict:
    """Output buffers (page scores too where the plan computes them) and split workspace for a call
    of `plan`, so that it allocates nothing (graphs)."""
    inp = plan.inputs
    dev = inp.device
    bufs = dict(out=torch.empty(inp.n, inp.hq, inp.t, inp.head_dim, dtype=inp.dtype, device=dev),
                lse=torch.empty(inp.n, inp.hq, inp.t, device=dev),
                workspace=torch.empty(max(1, plan.config.workspace_numel), device=dev))
    if inp.page_scores:
        bufs["page_scores"] = torch.empty(inp.n, inp.hkv, inp.max_pages, device=dev)
    return bufs


def run_sweep(timer, call, ref_out, configs, splits_for, label, graphs=True) -> dict:
    """Time the call under every config with each split count, with launches (do_bench) and, when
    graphs, as a CUDA graph replay with preallocated buffers.

    splits_for(cfg) -> candidate split counts. Returns the best variant by launch ms ("best")
    and by graph ms ("graph_best"), the max rel error over all variants and every record.
    """
    records = []
    for cfg in configs:
        for s in splits_for(cfg):
            try:
                options = options_of(dict(cfg, num_splits=s))
                out = call(options)[0]
                err = rel_err(out.float(), ref_out)
                ms = timer.median_ms(lambda: call(options))
                rec = dict(cfg, num_splits=s, ms=ms, rel_err=err)
                if graphs:
                    plan = call.plan(options)
                    bufs = preallocated(plan)
                    rec["graph_ms"] = timer.graph_ms(lambda: call.run(plan, **bufs))
                    rec["graph_rel_err"] = rel_err(bufs["out"].float(), ref_out)
                    err = max(err, rec["graph_rel_err"])
                records.append(rec)
            except Exception as ex:  # a config that does not compile or run is recorded, not fatal
                records.append(dict(cfg, num_splits=s, error=repr(ex)[:300]))
                print(f"  {label} {cfg} splits={s}: FAILED {repr(ex)[:200]}", flush=True)
    ok = [r for r in records if "ms" in r]
    if not ok:
        return dict(best=None, graph_best=None, max_rel_err=float("nan"), variants=records)
    best = min(ok, key=lambda r: r["ms"])
    graph_best = min(ok, key=lambda r: r["graph_ms"]) if graphs else None
    return dict(best=best, graph_best=graph_best,
                max_rel_err=max(max(r["rel_err"], r.get("graph_rel_err", 0.0)) for r in ok),
                variants=records)


class Shape:
    """One benchmark shape: q, a GPU-resident store with pages in random physical order, and the
    reference output (fp32)."""

    def __init__(self, t: int, ctx: int, page: int, gen: torch.Generator, dev: torch.device, batch: int = 1):
        from gpu_kernels.paged_attention import paged_attention_reference

        self.t, self.ctx, self.page, self.dev, self.gen, self.batch = t, ctx, page, dev, gen, batch
        self.dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
        self.scale = D ** -0.5
        self.num_pages = ctx // page
        # Rows share the resident store (the exact rows are N=1); the sparse rows select per row.
        self.q = torch.randn(batch, HQ, t, D, device=dev, dtype=self.dtype, generator=gen)
        shape = (self.num_pages, HKV, page, D)
        self.k = torch.randn(shape, device=dev, dtype=self.dtype, generator=gen)
        self.v = torch.randn(shape, device=dev, dtype=self.dtype, generator=gen)
        self.table = torch.randperm(self.num_pages, device=dev, generator=gen).int()[None]
        self.kv_len = torch.full((1, HKV), ctx, dtype=torch.int32, device=dev)
        self.kv_bytes = 2 * self.k.numel() * self.k.element_size()
        out, _, self.ref_ps, _ = paged_attention_reference(
            self.q[:1], self.k, self.v, self.table, self.kv_len, scale=self.scale, return_page_scores=True)
        self.ref_out = out.float()
        self.base = dict(T=t, context=ctx, page_size=page, N=batch)

    def default_splits(self, cfg: dict, max_pages: int) -> int:
        """The split count the plan picks for this config's tiles over max_pages table entries."""
        from gpu_kernels.attention_plan import AttentionOptions, launch_config

        options = AttentionOptions(block_m=cfg.get("block_m"), block_n=cfg.get("block_n"),
                                   warp_specialized=cfg.get("warp_specialized"))
        return launch_config(self.batch, HQ, self.t, D, HKV, self.page, max_pages, self.dev, options).num_splits


class Call:
    """The attention over fixed inputs: call(options, return_page_scores=...) is `paged_attention`
    (planned, cached, and run into new outputs); call.plan(options) its plan, and call.run(plan,
    **buffers) `run_attention` into given buffers, as a CUDA graph captures it. A timed call gets
    options (and plans) built before it."""

    def __init__(self, sh: Shape, k, v, table, kv_len):
        from gpu_kernels.paged_attention import paged_attention, plan_attention, run_attention

        self.paged_attention, self.plan_attention, self.run_attention = paged_attention, plan_attention, run_attention
        self.q, self.k, self.v, self.table, self.kv_len, self.scale = sh.q, k, v, table, kv_len, sh.scale

    def __call__(self, options: AttentionOptions | None = None, **flags):
        if options is not None:
            flags["options"] = options
        return self.paged_attention(self.q, self.k, self.v, self.table, self.kv_len, scale=self.scale, **flags)

    def plan(self, options: AttentionOptions | None = None, page_scores: bool = False) -> AttentionPlan:
        return self.plan_attention(self.q, self.k, self.v, self.table, self.kv_len, page_scores=page_scores,
                                   options=options or options_of({}))

    def run(self, plan: AttentionPlan, **buffers):
        return self.run_attention(plan, self.q, self.k, self.v, self.table, self.kv_len, scale=self.scale, **buffers)


def graph_fields(sw: dict, nbytes: int) -> dict:
    """The best-by-graph variant of a sweep: its config, ms and TB/s over nbytes."""
    g = sw.get("graph_best")
    if g is None:
        return {}
    return dict(graph_best=best_cfg(g), graph_ms=g["graph_ms"], graph_TBps=nbytes / g["graph_ms"] / 1e9)


# The split path's two savings, each switched off alone and both together (the ninth session's
# path): 16-bit partials halve what the merge moves; PDL launches the merge during the attention.
SPLIT_PATH_VARIANTS = {
    "shipped": {},
    "fp32_partials": dict(partial_dtype=torch.float32),
    "no_pdl": dict(pdl=False),
    "fp32_partials_no_pdl": dict(partial_dtype=torch.float32, pdl=False),
}


def split_path_ab(timer, call, cfg: dict, bufs: dict, nbytes: int, ref: torch.Tensor) -> dict:
    """Graph replays of one split config under each SPLIT_PATH_VARIANTS setting, back to back in
    this run: {variant: dict(graph_ms, graph_TBps, rel_err)}."""
    results = {}
    for name, kw in SPLIT_PATH_VARIANTS.items():
        plan = call.plan(options_of(dict(cfg, **kw)))
        ms = timer.graph_ms(lambda: call.run(plan, **bufs))
        results[name] = dict(graph_ms=ms, graph_TBps=nbytes / ms / 1e9, rel_err=rel_err(bufs["out"].float(), ref))
    return results


def bench_resident(timer, limits, sh: Shape, configs) -> dict:
    """(a) exact attention over the GPU-resident store."""
    call = Call(sh, sh.k, sh.v, sh.table, sh.kv_len)
    max_pages = sh.num_pages
    sw = run_sweep(timer, call, sh.ref_out, configs,
                   lambda cfg: split_candidates(sh.default_splits(cfg, max_pages)), "resident")
    order = sh.table[0].long()
    k_c = sh.k[order].permute(1, 0, 2, 3).reshape(1, HKV, sh.ctx, D).contiguous()
    v_c = sh.v[order].permute(1, 0, 2, 3).reshape(1, HKV, sh.ctx, D).contiguous()
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
        sh.q, k_c, v_c, scale=sh.scale, enable_gqa=True)
    sdpa_err = rel_err(sdpa().float(), sh.ref_out)
    sdpa_ms = timer.median_ms(sdpa)
    del k_c, v_c
    rec = dict(sh.base, mode="resident", kv_bytes=sh.kv_bytes, default_ms=timer.median_ms(lambda: call()),
               default_splits=sh.default_splits({}, max_pages),
               sdpa_ms=sdpa_ms, sdpa_rel_err_vs_ref=sdpa_err, max_rel_err=sw["max_rel_err"],
               variants=sw["variants"])
    if sw["best"] is None:
        return rec
    cfg, ms = best_cfg(sw["best"]), sw["best"]["ms"]
    options = options_of(cfg)
    out_s, _, ps, _ = call(options, return_page_scores=True)
    ms_scores = timer.median_ms(lambda: call(options, return_page_scores=True))
    rec.update(graph_fields(sw, sh.kv_bytes))
    # page-score overhead without host noise: graphs of the graph-best config with and without
    graph_options = options_of(rec["graph_best"])
    plan, plan_s = call.plan(graph_options), call.plan(graph_options, page_scores=True)
    bufs, bufs_s = preallocated(plan), preallocated(plan_s)
    g_plain = timer.graph_ms(lambda: call.run(plan, **bufs))
    g_scores = timer.graph_ms(lambda: call.run(plan_s, **bufs_s))
    t0 = time.perf_counter()
    for _ in range(50):
        call(options)
    host_us = (time.perf_counter() - t0) / 50 * 1e6
    torch.cuda.synchronize()
    plan_launch = call.plan(options)
    bufs_launch = preallocated(plan_launch)  # sized for cfg's split count
    t0 = time.perf_counter()
    for _ in range(50):
        call.run(plan_launch, **bufs_launch)
    host_us_prealloc = (time.perf_counter() - t0) / 50 * 1e6
    torch.cuda.synchronize()
    tbps = sh.kv_bytes / ms / 1e9
    rec.update(best=cfg, ms=ms, hidden_launch_ms=timer.hidden_launch_ms(lambda: call(options)),
               TBps=tbps, vs_sdpa=sdpa_ms / ms, frac_hbm=tbps * 1e3 / limits["hbm_copy_rw_GBps"],
               scores_ms=ms_scores, scores_overhead=ms_scores / ms - 1,
               graph_plain_ms=g_plain, graph_scores_ms=g_scores, graph_scores_overhead=g_scores / g_plain - 1,
               scores_rel_err=scores_err(ps, sh.ref_ps), scores_out_rel_err=rel_err(out_s.float(), sh.ref_out),
               graph_scores_rel_err=scores_err(bufs_s["page_scores"], sh.ref_ps),
               host_us_per_call=host_us, host_us_per_call_prealloc=host_us_prealloc,
               target_ok=max(tbps, rec["graph_TBps"]) >= TARGETS["resident_TBps"])
    return rec


def l2_state(dirty: bool) -> str:
    return "dirty" if dirty else "clean"


def layer_run_fields(timer, sh: Shape, inputs: tuple, cfg: dict, max_pages: int, nbytes: int,
                     ref: torch.Tensor, layers: int, prefetch_pages: tuple[int, ...] = ()) -> dict:
    """One call's share of a CUDA graph that runs `layers` calls back to back, each over its own copy
    of the K/V pool (inputs = (k_pool, v_pool, table, kv_len)) and with its own outputs.

    A decoding step runs one attention per layer inside one replayed graph: the graph's launch is
    paid once for all of them, and what each call costs is its kernels and the gaps between them.
    The L2 is flushed once before the replay; every layer's pool is read from HBM all the same,
    since no call reads another's bytes. Returns layers, layers_ms (per call), layers_TBps (over the
    call's K+V bytes), layers_rel_err (the worst of the calls' outputs) and layers_floor_ms (per
    call, the same graph of empty kernels on the call's grids: `layer_floor_ms`); where the split
    merge is launched as a programmatic dependent of the attention (`AttentionOptions.pdl`), also
    the same graph with plain launches: layers_ms_no_pdl and layers_TBps_no_pdl; where the
    attention is chained too (so it prefetches its first tiles before its wait), the same graph
    without that prefetch: layers_ms_no_prefetch and layers_TBps_no_prefetch, and with each count
    of prefetch_pages asked for: layers_ms_by_prefetch_pages {count: ms per call}."""
    from gpu_kernels.features import pdl_supported

    k_pool, v_pool, table, kv_len = inputs
    pools = [(k_pool, v_pool)] + [(k_pool.clone(), v_pool.clone()) for _ in range(layers - 1)]
    calls = [Call(sh, k, v, table, kv_len) for k, v in pools]
    bufs = [preallocated(call.plan(options_of(cfg))) for call in calls]

    def run_layers(plans: list[AttentionPlan]):
        for call, plan, b in zip(calls, plans, bufs):
            call.run(plan, **b)

    rec = dict(layers=layers, layers_rel_err=0.0)

    def per_call_ms(**kw) -> float:
        """One replay of the graph with cfg's launch options and kw's, per call; its worst output
        joins layers_rel_err."""
        plans = [call.plan(options_of(dict(cfg, **kw))) for call in calls]
        ms = timer.graph_ms(lambda: run_layers(plans)) / layers
        rec["layers_rel_err"] = max(rec["layers_rel_err"], max(rel_err(b["out"].float(), ref) for b in bufs))
        return ms

    ms = per_call_ms()
    rec.update(layers_ms=ms, layers_TBps=nbytes / ms / 1e9)
    pdl = pdl_supported(sh.dev)
    grids = call_grids(sh, cfg, max_pages)
    if pdl:
        plain = per_call_ms(pdl=False)
        rec.update(layers_ms_no_pdl=plain, layers_TBps_no_pdl=nbytes / plain / 1e9)
    if pdl and grids[3] and not cfg.get("warp_specialized"):
        # a chained Triton call prefetches its first pages by default: time the same graph without it
        bare = per_call_ms(prefetch_pages=0)
        rec.update(layers_ms_no_prefetch=bare, layers_TBps_no_prefetch=nbytes / bare / 1e9)
        if prefetch_pages:
            rec["layers_ms_by_prefetch_pages"] = {str(pages): per_call_ms(prefetch_pages=pages)
                                                  for pages in prefetch_pages}
    rec["layers_floor_ms"] = layer_floor_ms(timer, layers, *grids, pdl)
    return rec


def call_grids(sh: Shape, cfg: dict, max_pages: int) -> tuple[int, int, int, bool]:
    """(attention programs, their warps, split-merge programs or 0, whether the attention kernel is
    launched as a programmatic dependent of the kernel before it) of a sparse call with launch
    options cfg, as the plan launches them."""
    from gpu_kernels.attention_plan import chains_attention, launch_config, merge_rows_per_program

    ws = bool(cfg.get("warp_specialized"))
    config = launch_config(sh.batch, HQ, sh.t, D, HKV, sh.page, max_pages, sh.dev, options_of(cfg))
    programs = sh.batch * HKV * config.row_blocks * config.num_splits
    # The warp-specialised kernel's producer and consumers (12 warps with two consumers) are
    # rounded down to a power of two, the only counts a Triton launch takes: a floor stays a floor.
    warps = 4 + 4 * (config.block_m // 64) if ws else config.num_warps
    warps = 1 << (warps.bit_length() - 1)
    rows = sh.batch * HQ * sh.t
    merge = -(-rows // merge_rows_per_program(rows)) if config.num_splits > 1 else 0
    # the benchmark's K/V are GPU tensors of contiguous pages: the Triton kernel can prefetch them
    return programs, warps, merge, chains_attention(sh.dev, ws, config.row_blocks, prefetches=not ws)


def layer_attainable_fields(rec: dict, limits: dict) -> dict:
    """The best one call of the layer run could do: the layer run's floor per call plus the call's
    read bytes at the measured HBM read rate."""
    if "layers_floor_ms" not in rec:
        return {}
    best_ms = rec["layers_floor_ms"] + _stream_ms(rec, limits)
    return dict(layers_attainable_ms=best_ms, layers_attainable_TBps=rec["kv_bytes"] / best_ms / 1e9,
                layers_frac_of_attainable=best_ms / rec["layers_ms"])


def ws_configs(dev: torch.device, configs: list[dict]) -> list[dict]:
    """The warp-specialised kernel's sweep entry for the sparse rows (which ask for no scores), on
    devices that run it and unless the sweep already has one."""
    from gpu_kernels.features import warp_specialized_supported

    if not warp_specialized_supported(dev) or any(c.get("warp_specialized") for c in configs):
        return []
    return [dict(warp_specialized=True)]


def best_graph_ms_by_kernel(row: dict) -> dict:
    """{"triton": ms, "ws": ms}: the fastest graph replay of a sweep row's variants per kernel (a
    kernel with no timed variant is absent)."""
    best = {}
    for v in row.get("variants", []):
        if "graph_ms" in v:
            kind = "ws" if v.get("warp_specialized") else "triton"
            best[kind] = min(best.get(kind, float("inf")), v["graph_ms"])
    return best


def default_fields(timer, call, nbytes: int, ref: torch.Tensor) -> dict:
    """Graph replay of the call with no launch options: default_kernel ("warp_specialized" or
    "triton"), default_graph_splits, default_graph_ms, default_graph_TBps, default_rel_err."""
    plan = call.plan()
    bufs = preallocated(plan)
    ms = timer.graph_ms(lambda: call.run(plan, **bufs))
    return dict(default_kernel="warp_specialized" if plan.warp_specialized else "triton",
                default_graph_splits=plan.config.num_splits,
                default_graph_ms=ms, default_graph_TBps=nbytes / ms / 1e9,
                default_rel_err=rel_err(bufs["out"].float(), ref))


def sparse_pool(sh: Shape, frac: float) -> tuple:
    """A random `frac` of each (sequence, KV head) list's pages of sh's store, gathered into a pool
    in shuffled slots: (k_pool, v_pool [slots, page, D], table int32 [N, Hkv, pages per list],
    kv_len int32 [N, Hkv])."""
    dev, gen = sh.dev, sh.gen
    n, lists = sh.batch, sh.batch * HKV
    n_sel = max(1, round(frac * sh.num_pages))
    sel = torch.stack([torch.randperm(sh.num_pages, device=dev, generator=gen)[:n_sel] for _ in range(lists)])
    heads = (torch.arange(lists, device=dev) % HKV)[:, None].expand(lists, n_sel)
    # Slot perm[i] holds list entry i (list i // n_sel); shuffled so each list is scattered.
    perm = torch.randperm(lists * n_sel, device=dev, generator=gen)
    k_pool = torch.empty((lists * n_sel, sh.page, D), device=dev, dtype=sh.dtype)
    v_pool = torch.empty_like(k_pool)
    k_pool[perm] = sh.k[sel.reshape(-1), heads.reshape(-1)]
    v_pool[perm] = sh.v[sel.reshape(-1), heads.reshape(-1)]
    table = perm.reshape(n, HKV, n_sel).int()
    kv_len = torch.full((n, HKV), n_sel * sh.page, dtype=torch.int32, device=dev)
    return k_pool, v_pool, table, kv_len


def bench_sparse(timer, limits, sh: Shape, configs, frac: float, layers: int = 0,
                 prefetch_pages: tuple[int, ...] = ()) -> dict:
    """(c) a random `frac` of the pages per KV head, gathered into the pool layout; layers > 1 also
    times the graph-best variant as one of `layers` calls in one graph (`layer_run_fields`, with
    these prefetch_pages counts)."""
    from gpu_kernels.paged_attention import paged_attention_reference

    dev = sh.dev
    lists = sh.batch * HKV
    k_pool, v_pool, table, kv_len = sparse_pool(sh, frac)
    n_sel = table.shape[-1]
    ref = paged_attention_reference(sh.q, k_pool, v_pool, table, kv_len, scale=sh.scale)[0].float()
    call = Call(sh, k_pool, v_pool, table, kv_len)
    # Splits: the default's neighbours plus counts that fill whole waves of programs (a grid of
    # lists * splits programs runs in ceil(programs / resident slots) waves).
    sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 0
    waves = {s for s in range(1, 25) if sms and (lists * s) % sms == 0}
    sw = run_sweep(timer, call, ref, configs + ws_configs(dev, configs),
                   lambda cfg: sorted(set(split_candidates(sh.default_splits(cfg, n_sel))) | {1, 2, 4, 8, 16} | waves),
                   "sparse")
    nbytes = 2 * k_pool.numel() * k_pool.element_size()
    read_bytes = nbytes + sh.q.numel() * sh.q.element_size() + table.numel() * 4
    rec = dict(sh.base, mode=f"sparse_{round(frac * 100)}pct", l2=l2_state(timer.dirty_l2), kv_bytes=nbytes,
               read_bytes=read_bytes,
               tokens_per_head=n_sel * sh.page, default_splits=sh.default_splits({}, n_sel),
               max_rel_err=sw["max_rel_err"], variants=sw["variants"])
    # What a caller that passes no launch options gets (the kernel and split count the plan picks).
    rec.update(default_fields(timer, call, nbytes, ref))
    if sw["best"] is not None:
        cfg, ms = best_cfg(sw["best"]), sw["best"]["ms"]
        options = options_of(cfg)
        rec.update(best=cfg, ms=ms, TBps=nbytes / ms / 1e9,
                   hidden_launch_ms=timer.hidden_launch_ms(lambda: call(options)))
        rec.update(graph_fields(sw, nbytes))
        rec.update(attainable_fields(rec, limits))
        if "graph_best" in rec:  # the same replay after the other L2 flush (clean lines / dirty lines)
            gcfg = rec["graph_best"]
            graph_plan = call.plan(options_of(gcfg))
            bufs = preallocated(graph_plan)
            other_ms = timer.graph_ms(lambda: call.run(graph_plan, **bufs), dirty_l2=not timer.dirty_l2)
            for state, ms_l2 in ((l2_state(timer.dirty_l2), rec["graph_ms"]), (l2_state(not timer.dirty_l2), other_ms)):
                rec[f"graph_ms_{state}_l2"] = ms_l2
                rec[f"graph_TBps_{state}_l2"] = nbytes / ms_l2 / 1e9
            # the same pages, each list's table in ascending slot order (attention over a context is
            # order-free): a split then reads one narrow address range instead of pages all over the pool
            sorted_call = Call(sh, k_pool, v_pool, table.sort(dim=-1).values, kv_len)
            sorted_ms = timer.graph_ms(lambda: sorted_call.run(graph_plan, **bufs))
            rec.update(graph_ms_sorted_slots=sorted_ms, graph_TBps_sorted_slots=nbytes / sorted_ms / 1e9,
                       sorted_slots_rel_err=rel_err(bufs["out"].float(), ref))
            if gcfg["num_splits"] > 1:
                rec["split_path"] = split_path_ab(timer, call, gcfg, bufs, nbytes, ref)
            if layers > 1:
                rec.update(layer_run_fields(timer, sh, (k_pool, v_pool, table, kv_len), gcfg, n_sel, nbytes, ref,
                                            layers, prefetch_pages))
                rec.update(layer_attainable_fields(rec, limits))
        rec["target_ok"] = max(rec["TBps"], rec.get("graph_TBps", 0.0)) >= TARGETS["sparse_TBps"]
    return rec


def bench_uva(timer, limits, sh: Shape, configs) -> dict:
    """(b) the store in pinned host memory, read zero-copy by the kernel over PCIe."""
    from gpu_kernels._uva import HostPointer

    hk, hv = HostPointer(sh.k.cpu().pin_memory()), HostPointer(sh.v.cpu().pin_memory())
    call = Call(sh, hk, hv, sh.table, sh.kv_len)
    sw = run_sweep(timer, call, sh.ref_out, configs,
                   lambda cfg: split_candidates(sh.default_splits(cfg, sh.num_pages), (1, 2, 4)), "uva", graphs=False)
    rec = dict(sh.base, mode="uva_host", kv_bytes=sh.kv_bytes, max_rel_err=sw["max_rel_err"],
               variants=sw["variants"])
    if sw["best"] is not None:
        ms = sw["best"]["ms"]
        gbps = sh.kv_bytes / ms / 1e6
        rec.update(best=best_cfg(sw["best"]), ms=ms, GBps=gbps, frac_pinned=gbps / limits["pinned_h2d_GBps"],
                   target_ok=gbps / limits["pinned_h2d_GBps"] >= TARGETS["uva_frac_of_pinned"])
    return rec


def bench_shape(timer, limits, t, ctx, page, configs, quick, gen, dev: torch.device,
                modes=("resident", "sparse"), batch: int = 1, layers: int = 0,
                prefetch_pages: tuple[int, ...] = ()) -> list[dict]:
    """Every requested mode at one (T, context, page size); returns one record per mode."""
    sh = Shape(t, ctx, page, gen, dev, batch)
    rows = []
    if "resident" in modes:
        rows.append(bench_resident(timer, limits, sh, configs))
    if "sparse" in modes:
        rows.extend(bench_sparse(timer, limits, sh, configs, frac, layers, prefetch_pages) for frac in (0.05, 0.10))
    if "uva" in modes:
        uva_cfgs = configs[:1] if quick or len(configs) < 2 else configs[1:3]
        rows.append(bench_uva(timer, limits, sh, uva_cfgs))
    del sh
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def _cfg_str(b: dict) -> str:
    """(block_m, block_n, warps, stages, splits), "ws" first for the warp-specialised kernel; "-": its default."""
    ws = "ws," if b.get("warp_specialized") else ""
    return (f"({ws}{b.get('block_m', '-')},{b.get('block_n', '-')},{b.get('num_warps', '-')},"
            f"{b.get('num_stages', '-')},{b['num_splits']})")


def _row_label(r: dict) -> str:
    return r["mode"] + (f" N={r['N']}" if r.get("N", 1) > 1 else "")


def print_table(limits: dict, rows: list[dict]) -> None:
    fl = limits["launch_floor"]
    print(f"\npinned H2D {limits['pinned_h2d_GBps']:.1f} GB/s   HBM copy (r+w) "
          f"{limits['hbm_copy_rw_GBps'] / 1e3:.2f} TB/s   HBM read {limits.get('hbm_read_GBps', float('nan')) / 1e3:.2f} TB/s"
          f"   graph replay floor {1e3 * fl['graph_1_kernel_ms']:.1f} us "
          f"(1 kernel) / {1e3 * fl['graph_2_kernels_ms']:.1f} us (2 kernels)")
    print("launch ms: do_bench of the Python call (host work included); no-launch ms: the same "
          "call with the host's launch work hidden; graph ms: CUDA-graph replay with preallocated "
          "buffers (best variant by graph time, its config in the last column). Rates are over "
          "the K+V bytes (MB). scores+: extra time of return_page_scores (launch / graph).")
    head = (f"{'mode':<12}{'T':>4}{'ctx':>8}{'P':>4}{'MB':>7} {'launch ms':>9} {'rate':>11} {'vs ref':>14} "
            f"{'scores+':>11} {'no-launch':>9} {'graph ms':>8} {'graph rate':>10} "
            f"{'best launch (bm,bn,w,st,S)':>26} {'best graph':>18} {'max err':>9} ok")
    print(head)
    print("-" * len(head))
    for r in rows:
        label = _row_label(r)
        if "ms" not in r:
            print(f"{label:<12}{r['T']:>4}{r['context']:>8}{r['page_size']:>4}  all variants failed")
            continue
        if r["mode"] == "uva_host":
            rate, vs = f"{r['GBps']:.1f} GB/s", f"{r['frac_pinned']:.2f} of pinned"
        elif r["mode"] == "resident":
            rate = f"{r['TBps']:.2f} TB/s"
            vs = f"{r['frac_hbm']:.2f}HBM {r['vs_sdpa']:.1f}xSDPA"
        else:
            rate, vs = f"{r['TBps']:.2f} TB/s", ""
        sc = (f"{100 * r['scores_overhead']:+.0f}%/{100 * r['graph_scores_overhead']:+.0f}%"
              if "scores_overhead" in r else "")
        hl = f"{r['hidden_launch_ms']:.4f}" if "hidden_launch_ms" in r else ""
        gm = f"{r['graph_ms']:.4f}" if "graph_ms" in r else ""
        gr = f"{r['graph_TBps']:.2f} TB/s" if "graph_TBps" in r else ""
        gb = _cfg_str(r["graph_best"]) if "graph_best" in r else ""
        print(f"{label:<12}{r['T']:>4}{r['context']:>8}{r['page_size']:>4}{r['kv_bytes'] / 1e6:>7.1f} "
              f"{r['ms']:>9.4f} {rate:>11} {vs:>14} {sc:>11} {hl:>9} {gm:>8} {gr:>10} "
              f"{_cfg_str(r['best']):>26} {gb:>18} {r['max_rel_err']:>9.2e} {'yes' if r['target_ok'] else 'NO'}")
    bounded = [r for r in rows if "attainable_TBps" in r]
    if bounded:
        print("\nsparse rows against what a graph replay can reach: floor (the replay floor for the call's "
              "kernel count) + read bytes at the HBM read rate")
        print(f"{'mode':<12}{'T':>4}{'ctx':>8}{'P':>4}{'MB':>7} {'graph ms':>9} {'floor ms':>9} {'best ms':>8} "
              f"{'attainable':>11} {'of attainable':>13} {'dirty-L2 ms':>11} {'dirty-L2 rate':>13} "
              f"{'clean-L2 ms':>11} {'clean-L2 rate':>13} "
              f"{'sorted ms':>9} {'sorted rate':>11} {'layer-run ms':>12} {'layer-run rate':>14} "
              f"{'no-PDL layer-run ms':>19} {'no-prefetch layer-run ms':>24} {'layer floor ms':>14} "
              f"{'layer attainable':>16} {'of it':>6}")
        for r in bounded:
            label = _row_label(r)
            print(f"{label:<12}{r['T']:>4}{r['context']:>8}{r['page_size']:>4}{r['kv_bytes'] / 1e6:>7.1f} "
                  f"{r['graph_ms']:>9.4f} {r['floor_ms']:>9.4f} {r['attainable_ms']:>8.4f} "
                  f"{r['attainable_TBps']:>6.2f} TB/s {100 * r['frac_of_attainable']:>12.0f}% "
                  f"{r.get('graph_ms_dirty_l2', r['graph_ms']):>11.4f} {r.get('graph_TBps_dirty_l2', r['graph_TBps']):>8.2f} TB/s "
                  f"{r.get('graph_ms_clean_l2', float('nan')):>11.4f} {r.get('graph_TBps_clean_l2', float('nan')):>8.2f} TB/s "
                  f"{r.get('graph_ms_sorted_slots', float('nan')):>9.4f} "
                  f"{r.get('graph_TBps_sorted_slots', float('nan')):>6.2f} TB/s "
                  f"{r.get('layers_ms', float('nan')):>12.4f} {r.get('layers_TBps', float('nan')):>9.2f} TB/s "
                  f"{r.get('layers_ms_no_pdl', float('nan')):>19.4f} "
                  f"{r.get('layers_ms_no_prefetch', float('nan')):>24.4f} "
                  f"{r.get('layers_floor_ms', float('nan')):>14.4f} "
                  f"{r.get('layers_attainable_TBps', float('nan')):>11.2f} TB/s "
                  f"{100 * r.get('layers_frac_of_attainable', float('nan')):>5.0f}%")
        print("  dirty-L2: replayed after a flush that writes 256 MB, as do_bench does (the call's reads also pay the "
              "write-back of those lines); clean-L2: after a flush that reads them (a cold L2 of clean lines, as after "
              "the GEMMs and small activation writes before attention in a decoding step); graph ms is under --l2; "
              "sorted: the graph-best variant with each list's page table in ascending slot order; layer-run: the "
              "graph-best variant's share of one graph of --layers calls, each over its own copy of the pool (a "
              "decoding step's layers: one graph launch for all, every call reading its K/V from HBM); no-PDL: the "
              "same graph with the split merges launched plainly (each only after its attention kernel has ended); "
              "no-prefetch: the same graph without the chained attention's L2 prefetch of its first tiles; "
              "layer floor: per call, a graph of --layers empty calls (an empty kernel on the attention's grid, one "
              "on the merge's, launched the same way); layer attainable: that floor plus the read bytes at the HBM "
              "read rate")
    swept = [r for r in rows if "layers_ms_by_prefetch_pages" in r]
    if swept:
        counts = list(swept[0]["layers_ms_by_prefetch_pages"])
        print("\nlayer run per call (us) by prefetch_pages (pages per split prefetched into L2 before the chained "
              "wait; default: the shipped choice)")
        print(f"{'mode':<12}{'T':>4}{'ctx':>8}{'P':>4} {'default':>8} " + " ".join(f"{c:>7}" for c in counts))
        for r in swept:
            by = r["layers_ms_by_prefetch_pages"]
            print(f"{_row_label(r):<12}{r['T']:>4}{r['context']:>8}{r['page_size']:>4} {1e3 * r['layers_ms']:>8.2f} "
                  + " ".join(f"{1e3 * by[c]:>7.2f}" for c in counts))
    defaults = [r for r in rows if "default_graph_ms" in r]
    if defaults:
        print("\nsparse rows with no launch options (the kernel and split count paged_attention picks) against "
              "the Triton kernel's graph-best variant and the warp-specialised kernel's:")
        print(f"{'mode':<12}{'T':>4}{'ctx':>8}{'P':>4} {'default':>17} {'S':>3} {'graph ms':>9} {'rate':>10} "
              f"{'best triton ms':>14} {'best ws ms':>10}")
        for r in defaults:
            best = best_graph_ms_by_kernel(r)
            print(f"{_row_label(r):<12}{r['T']:>4}{r['context']:>8}{r['page_size']:>4} {r['default_kernel']:>17} "
                  f"{r['default_graph_splits']:>3} {r['default_graph_ms']:>9.4f} {r['default_graph_TBps']:>5.2f} TB/s "
                  f"{best.get('triton', float('nan')):>14.4f} {best.get('ws', float('nan')):>10.4f}")
    ab = [r for r in rows if "split_path" in r]
    if ab:
        names = list(SPLIT_PATH_VARIANTS)
        print("\nthe split path, graph-best variant replayed with each saving off (graph ms, and the "
              "shipped path's speedup over each):")
        print(f"{'mode':<12}{'T':>4}{'ctx':>8}{'S':>4} " + " ".join(f"{n:>22}" for n in names))
        for r in ab:
            label = _row_label(r)
            sp = r["split_path"]
            base = sp["shipped"]["graph_ms"]
            cells = [f"{sp[n]['graph_ms']:.4f} ({sp[n]['graph_ms'] / base:.2f}x)" for n in names]
            print(f"{label:<12}{r['T']:>4}{r['context']:>8}{r['graph_best']['num_splits']:>4} "
                  + " ".join(f"{c:>22}" for c in cells))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="32K context only, 3 configs (about a minute)")
    ap.add_argument("--sparse-only", action="store_true", help="only the sparse pool-layout rows")
    ap.add_argument("--out", default=os.environ.get("OUT", "./out"), help="folder for kernels.json (default $OUT or ./out)")
    ap.add_argument("--contexts", type=int, nargs="+", default=None, help="context lengths (default 32K 64K 128K)")
    ap.add_argument("--pages", type=int, nargs="+", default=[16, 64], help="page sizes (default 16 64)")
    ap.add_argument("--T", type=int, nargs="+", default=[16, 32], dest="ts", help="block sizes (default 16 32)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--extra-configs", type=json.loads, default=[],
                    help='JSON list of launch configs added to the sweep, e.g. \'[{"block_m": 128, "block_n": 128, '
                         '"num_warps": 8, "num_stages": 3}]\'')
    ap.add_argument("--configs", type=json.loads, default=None,
                    help="JSON list of launch configs to sweep instead of the built-in list (--extra-configs "
                         'are added to it), e.g. \'[{"warp_specialized": true, "num_stages": 4}]\'')
    ap.add_argument("--l2", choices=["clean", "dirty"], default="clean",
                    help="how graph replays flush L2 before each call: 'clean' reads 256 MB (a cold L2 of clean "
                         "lines: what a decoding step leaves before attention, whose GEMMs read weights and write "
                         "small activations), 'dirty' writes it (as do_bench does: the call's reads then also pay "
                         "the write-back of up to an L2 of someone else's data); sparse rows replay their best "
                         "variant under the other flush too (default clean)")
    ap.add_argument("--layers", type=int, default=8,
                    help="sparse rows: also time the graph-best variant as one of this many calls back to back "
                         "in one CUDA graph, each over its own copy of the pool (a decoding step's layers); "
                         "0 or 1: skip (default 8)")
    ap.add_argument("--prefetch-pages", type=int, nargs="+", default=[],
                    help="sparse rows whose attention is chained: also time the layer run with each of these "
                         "prefetch_pages counts (pages per split prefetched into L2 before the wait; 0: none)")
    ap.add_argument("--batch", type=int, default=1,
                    help="sequences per call (sparse rows only: each selects its own pages; >1 implies "
                         "--sparse-only)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.kernels needs a CUDA GPU (none found)")
    import triton

    contexts = args.contexts or ([32768] if args.quick else [32768, 65536, 131072])
    configs = (sweep_configs(args.quick) if args.configs is None else args.configs) + args.extra_configs
    timer = Timer(warmup_ms=10, rep_ms=30 if args.quick else 40, dirty_l2=args.l2 == "dirty")
    limits = copy_bandwidths(timer, (256 if args.quick else 1024) * 2**20)
    limits["launch_floor"] = launch_floor(timer)
    print(f"device {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}  "
          f"gpu_kernels from {kernels_source()}", flush=True)
    print(f"pinned H2D {limits['pinned_h2d_GBps']:.1f} GB/s, HBM copy {limits['hbm_copy_rw_GBps']:.0f} GB/s, "
          f"HBM read {limits['hbm_read_GBps']:.0f} GB/s, graph replays flush L2 {args.l2}", flush=True)
    gen = torch.Generator(device="cuda").manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "kernels.json")
    rows: list[dict] = []
    t_start = time.time()

    def save():
        with open(path, "w") as f:
            json.dump(dict(date=datetime.datetime.now().isoformat(timespec="seconds"),
                           device=torch.cuda.get_device_name(), torch=torch.__version__,
                           triton=triton.__version__, gpu_kernels=kernels_source(),
                           shape=dict(N=args.batch, Hq=HQ, Hkv=HKV, D=D, dtype="bf16"),
                           targets=TARGETS, limits=limits, seconds=time.time() - t_start, rows=rows),
                      f, indent=1)

    # UVA last: a fault reading host memory would end the process, so the rest is saved first.
    sparse_only = args.sparse_only or args.batch > 1
    mode_groups = ((("sparse",),) if sparse_only else (("resident", "sparse"), ("uva",)))
    for modes in mode_groups:
        for t in args.ts:
            for ctx in contexts:
                for page in args.pages:
                    new = bench_shape(timer, limits, t, ctx, page, configs, args.quick, gen,
                                      torch.device("cuda"), modes, args.batch, args.layers,
                                      tuple(args.prefetch_pages))
                    for r in new:
                        print(f"  T={t} ctx={ctx} P={page} {r['mode']}: ms={r.get('ms', float('nan')):.4f} "
                              f"max_err={r['max_rel_err']:.2e}", flush=True)
                    rows.extend(new)
                    save()
    print_table(limits, rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
