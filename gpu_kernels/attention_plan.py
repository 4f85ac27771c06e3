"""What a paged-attention call decides once per shape, held in an `AttentionPlan`.

`plan_attention` (or `plan_for`, from an `AttentionInputs`) makes the plan of a call's shapes,
layout and device and its tuning options (`AttentionOptions`), and caches it: calls of the same
shape get the same plan object back. A plan holds the launch configuration (tiles, warps, stages,
row blocks), the split count and the workspace its partials need, the partials' dtype, which
kernel runs (the Triton kernel or the warp-specialised Gluon kernel), whether the attention and
the merge are launched as programmatic dependents (PDL), how many pages each program prefetches
into L2 before its wait, and the merge's launch shape; `paged_attention.run_attention` launches it.

The defaults come from measurements, each cited where its constant is defined; every one can be
overridden through `AttentionOptions`, and an override the kernels cannot run is refused here,
saying what to change.
"""
from __future__ import annotations

import dataclasses
import functools
import types
from typing import Mapping

import torch
import triton

from .attention_inputs import AttentionInputs, KVTensor, describe_inputs
from .features import pdl_supported, warp_specialized_supported


@dataclasses.dataclass(frozen=True)
class AttentionOptions:
    """Tuning overrides of a paged-attention call; a field left None is decided by the plan.

    num_splits: split-KV factor (default: `default_num_splits`; counts that would start a split past
      the end are dropped).
    block_m / block_n / num_warps / num_stages: the attention kernel's tiles and launch options
      (default: `default_config`; block_n is raised to the page size).
    partial_dtype: dtype of the split partial outputs in the workspace (default: q's dtype for fp16,
      and for bf16 on the GPU, so the merge moves half the bytes; fp32 otherwise). Their lse stays
      fp32, so the merge's weights are exact; the partials round like the output does.
    pdl: launch the attention kernel (either one) as a programmatic dependent of the stream's
      previous kernel, and the merge as one of the attention kernel. Each waits for its predecessor
      before its first read, so only launches overlap: the merge's with the attention's last
      programs, and a layer's attention with the previous layer's merge. Default, where supported
      (`pdl_supported`): the merge always; the attention kernel where `chains_attention` says so.
    warp_specialized: run `paged_attention_ws`'s Gluon kernel (a cp.async producer warpgroup and one
      or two wgmma consumer warpgroups; sm_90 GPUs only, 16-bit q, head_dim 64 or 128, K/V in GPU
      memory in q's dtype (not fp8), no scores) or the Triton kernel; default: where `uses_warp_specialized` says so, with
      no tile overrides, no scores, no prefetch_pages and K/V in GPU memory.
    prefetch_pages: with the Triton kernel chained and K/V in GPU memory, each program first asks L2
      for its split's first this-many pages (K and V, one bulk prefetch each; at most 128 per warp
      of a row block), then waits for the kernel before it: HBM streams them while that kernel
      ends. A prefetch changes no value, so this is safe whatever that kernel writes. 0: none;
      default: `DEFAULT_PREFETCH_PAGES_PER_PROGRAM` per row block where chained and allowed.
    """
    num_splits: int | None = None
    block_m: int | None = None
    block_n: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None
    partial_dtype: torch.dtype | None = None
    pdl: bool | None = None
    warp_specialized: bool | None = None
    prefetch_pages: int | None = None


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """The attention kernel's tiles, grid and split workspace for one shape (`launch_config`)."""
    block_m: int  # query rows per program
    block_n: int  # K/V tokens per tile (a multiple of the page size)
    num_warps: int
    num_stages: int
    row_blocks: int  # programs per KV head and split: cdiv(G * T, block_m)
    num_splits: int  # the effective count: splits that would start past the end are dropped
    split_tokens: int  # tokens per split, a multiple of the page size
    workspace_numel: int  # fp32 elements of the split workspace (`workspace_numel`); 0 for one split


@dataclasses.dataclass(frozen=True)
class AttentionPlan:
    """Everything a paged-attention call decides before it launches, for one `AttentionInputs` and
    `AttentionOptions` (`plan_attention`); `paged_attention.run_attention` runs it over tensors that
    match `inputs`."""
    inputs: AttentionInputs
    warp_specialized: bool  # `paged_attention_ws`'s kernel, else the Triton kernel
    config: LaunchConfig
    partial_dtype: torch.dtype | None  # of the split partials; None with one split (no partials)
    chained: bool  # the attention is a programmatic dependent of the kernel before it (AFTER_PRIOR)
    merge_pdl: bool  # the merge is a programmatic dependent of the attention (USE_PDL)
    prefetch_pages: int  # pages per split prefetched into L2 before the chained wait (0: none)
    prefetch_width: int  # table entries per program the prefetch covers (PREFETCH_WIDTH; 0: off)
    merge_rows: int  # rows per merge program (`merge_rows_per_program`)

    # The kernels' compile-time arguments and launch options, built from the decisions above on a
    # plan's first run and kept, so that a run only binds its tensors.

    @functools.cached_property
    def attention_kwargs(self) -> Mapping[str, object]:
        """Keyword arguments of the attention kernel's launch (`attention_kernels.paged_attention_kernel`
        or `paged_attention_ws.ws_paged_attention_kernel`): its constexprs and launch options."""
        inputs, cfg = self.inputs, self.config
        kwargs = dict(HKV=inputs.hkv, G=inputs.hq // inputs.hkv, T=inputs.t, HEAD_DIM=inputs.head_dim,
                      ROW_BLOCKS=cfg.row_blocks, BLOCK_N=cfg.block_n, PAGE=inputs.page_size,
                      WRITE_FINAL=cfg.num_splits == 1, HAS_BLOCK=inputs.has_block, OFFSETS_64=inputs.offsets_64,
                      USE_PDL=self.merge_pdl, AFTER_PRIOR=self.chained)
        if self.warp_specialized:
            from .paged_attention_ws import CONSUMER_REGS, ROWS_PER_CONSUMER

            kwargs.update(STAGES=cfg.num_stages, CONSUMERS=cfg.block_m // ROWS_PER_CONSUMER,
                          CONSUMER_REGS=CONSUMER_REGS, num_warps=4)
        else:
            upcast = _interpreted(inputs.device)
            kwargs.update(BLOCK_D=_block_d(inputs.head_dim), BLOCK_M=cfg.block_m, PAGE_SCORES=inputs.page_scores,
                          TOKEN_SCORES=inputs.token_scores, UPCAST=upcast, KV_FP8=inputs.kv_fp8,
                          DOT_PRECISION="ieee" if (upcast or inputs.dtype == torch.float32) else "tf32",
                          PREFETCH_WIDTH=self.prefetch_width,
                          PAGE_BYTES=inputs.page_size * inputs.head_dim * (1 if inputs.kv_fp8 else inputs.dtype.itemsize)
                          if self.prefetch_width else 0,
                          num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        if self.chained:
            kwargs["launch_pdl"] = True
        return types.MappingProxyType(kwargs)

    @functools.cached_property
    def merge_kwargs(self) -> Mapping[str, object]:
        """Keyword arguments of the split merge's launch (`attention_kernels.merge_splits_kernel`)."""
        block_d = _block_d(self.inputs.head_dim)
        # A chunk's loads wait on memory together: up to 32 splits of one row (N=1's 16-32 splits
        # in one round trip), or 16 splits of 4 rows (for registers).
        chunk = min(triton.next_power_of_2(self.config.num_splits), 32 if self.merge_rows == 1 else 16)
        kwargs = dict(BLOCK_R=self.merge_rows, CHUNK_S=chunk, HEAD_DIM=self.inputs.head_dim, BLOCK_D=block_d,
                      USE_PDL=self.merge_pdl, num_warps=max(1, self.merge_rows * block_d // 256))
        if self.merge_pdl:
            kwargs["launch_pdl"] = True
        return types.MappingProxyType(kwargs)


# Below this many K/V tiles per SM (a KV head's tiles x N x Hkv / SMs: what one wave of 128-row
# programs would give each SM), blocks of 65-128 rows per KV head run as two 64-row, 4-warp row
# blocks instead of `default_config`'s 128 rows and 8 warps. H100, N=1 T=32, graph replays
# (benchmarks/RESULTS.md, 2026-12-06, eighteenth session): 64-row blocks were 13% / 12% / 4% / 1%
# faster over 5% and 10% of 32K and 128K (1.6-12.8 tiles per SM), and 2-3.5% slower over all of
# 32K and 128K (32-128 tiles per SM).
SHORT_WORK_TILES_PER_SM = 16

# Pages that each chained attention program prefetches into L2 before it waits, when not told
# (prefetch_pages None). H100, N=1 over 5-10% of 32K and 128K, 16-token pages, per call in a graph
# of 8 (benchmarks/RESULTS.md, 2026-12-06, nineteenth session; `benchmarks.kernels
# --prefetch-pages`): 2 per program was the best count or within 0.2 us of it in every row (T=32
# 128K 5%: 17.7 us against 18.6 without a prefetch); whole splits (64 pages) were 5-23% slower
# than 2 per program.
DEFAULT_PREFETCH_PAGES_PER_PROGRAM = 2

# A program's fixed cost (q load, pipeline fill, partial-output store), in K/V tiles: fitted to
# the H200 split sweeps of `benchmarks.kernels` (N=1 exact and sparse, and --batch 6 sparse, over
# 32K-128K, with the row-blocked merge): 4 picks the fastest measured count in 12 of 16 rows and
# one within 7% of it in the others.
_PROGRAM_OVERHEAD_TILES = 4
# The warp-specialised kernel's (three partitions to start, four stages to fill), fitted to its
# H100 split sweeps at batch 6 (T=32 and 64, 5% and 10% of 128K): 12 picks the fastest measured
# count at T=32 5% (2 splits) and at T=64 (4 splits), and at T=32 10% 5 splits, 4% slower than 2
# (no one constant picks all four: a one-wave grid that leaves SMs idle costs the memory-bound
# T=32 rows less than the wave model says).
_WS_PROGRAM_OVERHEAD_TILES = 12
# Tiles per split from which the plan runs the warp-specialised kernel by default: below it, its
# fixed cost per program outweighs the overlap (H100, N=1 T=32 over 5-10% of 128K, 16 splits of
# 6-13 tiles: 7-14% slower than the Triton kernel; batch 6, 26-103 tiles: 5-14% faster).
WS_MIN_TILES_PER_SPLIT = 16


def plan_attention(q: torch.Tensor, k_pages: KVTensor, v_pages: KVTensor, page_table: torch.Tensor,
                   kv_len: torch.Tensor, *, k_block: torch.Tensor | None = None, v_block: torch.Tensor | None = None,
                   page_scores: bool = False, token_scores: bool = False, k_scale: torch.Tensor | None = None,
                   v_scale: torch.Tensor | None = None,
                   options: AttentionOptions = AttentionOptions()) -> AttentionPlan:
    """The plan of a `paged_attention` call over these tensors (as that function takes them, fp8
    K/V with their scales), with page and/or token scores or not, under `options`; cached, so the
    same shapes get the same plan. Raises ValueError for tensors the kernels cannot take and for
    options they cannot run."""
    inputs, _ = describe_inputs(q, k_pages, v_pages, page_table, kv_len, k_block, v_block, page_scores,
                                token_scores, k_scale, v_scale)
    return plan_for(inputs, options)


@functools.lru_cache(maxsize=4096)
def plan_for(inputs: AttentionInputs, options: AttentionOptions) -> AttentionPlan:
    """The plan of `inputs` under `options` (cached: a call's only planning work is this lookup)."""
    dev = inputs.device
    if options.warp_specialized is None:
        options = dataclasses.replace(options, warp_specialized=_default_warp_specialized(inputs, options))
    ws = options.warp_specialized
    cfg = launch_config(inputs.n, inputs.hq, inputs.t, inputs.head_dim, inputs.hkv, inputs.page_size,
                        inputs.max_pages, dev, options)
    splits = cfg.num_splits
    partial_dtype = _partial_dtype(options.partial_dtype, inputs.dtype, _interpreted(dev)) if splits > 1 else None
    blocker = "the warp-specialised kernel does not prefetch (pass warp_specialized=False)" if ws else \
        inputs.prefetch_blocker
    if options.pdl is None:
        merge_pdl = splits > 1 and pdl_supported(dev)
        chained = chains_attention(dev, ws, cfg.row_blocks, prefetches=blocker is None)
    else:
        merge_pdl, chained = splits > 1 and options.pdl, options.pdl
    if options.pdl and not pdl_supported(dev):
        raise ValueError(f"pdl=True needs a CUDA device of compute capability 9.0+ and a Triton with "
                         f"launch_pdl; {dev} does not have both (pass pdl=None or False)")
    prefetch_pages, prefetch_width = _prefetch_pages(options.prefetch_pages, chained, blocker, inputs.page_size,
                                                     cfg)
    if ws:
        _check_warp_specialized(inputs, cfg)
    return AttentionPlan(inputs=inputs, warp_specialized=ws, config=cfg, partial_dtype=partial_dtype,
                         chained=bool(chained), merge_pdl=bool(merge_pdl), prefetch_pages=prefetch_pages,
                         prefetch_width=prefetch_width,
                         merge_rows=merge_rows_per_program(inputs.n * inputs.hq * inputs.t))


def default_config(rows: int, head_dim: int, page_size: int, device: torch.device,
                   tiles_per_sm: float | None = None) -> dict[str, int]:
    """The Triton kernel's default tiles and launch options: dict(block_m, block_n, num_warps,
    num_stages) (each can be overridden through `AttentionOptions`).

    rows = G * T queries per KV head. On the GPU: BLOCK_M covers the rows (at most 128 per
    program), BLOCK_N = 64 tokens (at least one page), 8 warps for 128-row tiles, 3 stages
    (fewer when a K+V tile is large: the stages share about 228 KB of shared memory on Hopper).
    tiles_per_sm (K/V tiles per KV head x N x Hkv / SMs): below `SHORT_WORK_TILES_PER_SM`, 65-128
    rows take two 64-row blocks of 4 warps, which fill the GPU with half the splits.
    """
    block_m = max(16, min(128, triton.next_power_of_2(rows)))
    block_n = max(64, page_size)
    if _interpreted(device):
        return dict(block_m=block_m, block_n=block_n, num_warps=4, num_stages=1)
    if tiles_per_sm is not None and tiles_per_sm < SHORT_WORK_TILES_PER_SM and 64 < rows <= 128:
        block_m = 64
    kv_tile_bytes = 2 * block_n * _block_d(head_dim) * 2
    stages = 3 if kv_tile_bytes <= 32768 else 2 if kv_tile_bytes <= 65536 else 1
    return dict(block_m=block_m, block_n=block_n, num_warps=8 if block_m >= 128 else 4,
                num_stages=stages)


def merge_rows_per_program(rows: int) -> int:
    """Rows per merge program. Many rows (batch 6: 6-12K): 4 rows of 128 dims over 2 warps, one
    16-byte load per thread per split. Few rows (N=1: 512-1024): one row per 1-warp program, so
    the grid still puts several warps on every SM to wait on the partials' loads (4 rows per
    program left one warp per scheduler: 12.6 us against 6 us for N=1's 26 splits, under ncu)."""
    return 4 if rows >= 4096 else 1


def default_num_splits(programs: int, max_tokens: int, block_n: int, rows: int,
                       num_sms: int | None, overhead_tiles: int = _PROGRAM_OVERHEAD_TILES) -> int:
    """Splits per (row, KV head, row block), chosen by a wave model of the grid.

    programs = N * Hkv * row_blocks (`launch_config` counts a pair of 64-row, 4-warp row blocks as
    one: they share an SM and read the same tiles); num_sms None means the CPU interpreter.
    The grid of programs * s programs runs in ceil(programs * s / num_sms) waves, each as long as
    one program: its tiles / s plus a fixed cost. The count with the shortest estimate wins (ties:
    fewer splits): one full wave for short lists (5% selections), several full waves for long ones
    (exact attention over 128K). A wave is one program per SM even where two fit (64-row tiles):
    co-resident programs share its issue slots and load pipes, and at N=1 over 5-10% of 128K the H200
    ran 16 splits (one wave) 18-39% faster than 32 (two programs on each SM). A split keeps at
    least max(2, 2 * rows / block_n) tiles: it writes rows * D partials that the merge reads back,
    which should not outweigh the (2-byte) K/V tiles it reads. When that leaves a single split,
    the kernel writes the final output itself (no merge launch). overhead_tiles: a program's fixed
    cost in tiles (the warp-specialised kernel's is larger: `_WS_PROGRAM_OVERHEAD_TILES`).
    """
    tiles = max(1, triton.cdiv(max_tokens, block_n))
    if num_sms is None:
        return min(2, tiles)
    min_tiles = max(2, triton.cdiv(2 * rows, block_n))
    most = max(1, tiles // min_tiles)
    num_sms, programs = max(1, num_sms), max(1, programs)

    def estimate(s: int) -> float:
        return triton.cdiv(programs * s, num_sms) * (tiles / s + overhead_tiles)

    return min(range(1, min(most, 4 * num_sms) + 1), key=lambda s: (estimate(s), s))


def launch_config(n: int, hq: int, t: int, head_dim: int, hkv: int, page_size: int, max_pages: int,
                  device: torch.device, options: AttentionOptions = AttentionOptions()) -> LaunchConfig:
    """The attention kernel's tiles, grid and workspace for q [n, hq, t, head_dim] over hkv KV heads
    and max_pages table entries of page_size tokens, under the overrides in `options`.

    options.warp_specialized True: the Gluon kernel's (`paged_attention_ws`): 64 rows per consumer
    warpgroup, one or two per program (block_m 64 or 128), num_warps 4 (its producer), 4 stages,
    and its own split model; None or False: the Triton kernel's (which kernel a call runs by
    default depends on its layout too: `plan_attention` decides, and its plan holds the config).
    """
    ws = bool(options.warp_specialized)
    block_m, block_n, num_warps, num_splits = options.block_m, options.block_n, options.num_warps, options.num_splits
    rows = hq // hkv * t
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else None
    max_tokens = max(1, max_pages * page_size)
    cfg = default_config(rows, head_dim, page_size, device)
    if ws:
        cfg = dict(block_m=64 if rows <= 64 else 128, block_n=max(64, page_size), num_warps=4, num_stages=4)
        if block_m not in (None, cfg["block_m"]):
            raise ValueError(f"warp_specialized takes block_m {cfg['block_m']} for {rows} rows per KV head "
                             f"(64 per consumer warpgroup); got {block_m}")
        if num_warps not in (None, 4):
            raise ValueError(f"warp_specialized runs num_warps=4 (its producer); got {num_warps}")
    bn = max(block_n or cfg["block_n"], page_size)
    if not ws and block_m is None and num_warps is None and sms is not None:
        tiles_per_sm = triton.cdiv(max_tokens, bn) * n * hkv / sms
        cfg = default_config(rows, head_dim, page_size, device, tiles_per_sm=tiles_per_sm)
    bm = block_m or cfg["block_m"]
    warps = num_warps or cfg["num_warps"]
    for name, val in (("block_m", bm), ("block_n", bn)):
        if val < 16 or val & (val - 1):
            raise ValueError(f"{name} must be a power of two >= 16 (tl.dot needs 16), got {val}")
    row_blocks = triton.cdiv(rows, bm)
    if num_splits is None:
        # A 64-row, 4-warp Triton program leaves room on its SM for a second, and the row blocks of
        # one split read the same K/V tiles (the second from L2), so the wave model counts each pair
        # of row blocks as one program (H100, N=1 T=32 over 5-10% of 128K: 16 splits of two 64-row
        # blocks beat 8 splits by 6-16%).
        paired = not ws and bm == 64 and warps == 4 and row_blocks > 1
        wave_programs = n * hkv * (triton.cdiv(row_blocks, 2) if paired else row_blocks)
        num_splits = default_num_splits(wave_programs, max_tokens, bn, rows, sms,
                                        _WS_PROGRAM_OVERHEAD_TILES if ws else _PROGRAM_OVERHEAD_TILES)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    # Splits start at pages, not tiles: a split then has as many tiles as with tile-aligned
    # bounds but no more tokens than it needs, and a requested count is kept (33 splits of 2048
    # pages stay 33; bounds at 64-token tiles would make them 32).
    split_tokens = triton.cdiv(triton.cdiv(max_tokens, num_splits), page_size) * page_size
    num_splits = triton.cdiv(max_tokens, split_tokens)
    return LaunchConfig(block_m=bm, block_n=bn, num_warps=warps, num_stages=options.num_stages or cfg["num_stages"],
                        row_blocks=row_blocks, num_splits=num_splits, split_tokens=split_tokens,
                        workspace_numel=workspace_numel(n, hq, t, head_dim, num_splits))


def workspace_numel(n: int, hq: int, t: int, head_dim: int, num_splits: int) -> int:
    """fp32 elements of the split workspace: partial out [rows, splits, D] then lse [rows, splits]."""
    return 0 if num_splits <= 1 else n * hq * t * num_splits * (head_dim + 1)


def uses_warp_specialized(n: int, hq: int, t: int, head_dim: int, hkv: int, page_size: int, max_pages: int,
                          device: torch.device, dtype: torch.dtype, num_splits: int | None = None) -> bool:
    """Whether the plan runs the warp-specialised kernel when not told (warp_specialized None),
    given no scores, K/V in GPU memory and no tile overrides: on sm_90, for 16-bit inputs of
    head_dim 64 or 128 with >= 128 query rows per KV head (two consumer warpgroups), when its
    config leaves each split at least `WS_MIN_TILES_PER_SPLIT` K/V tiles."""
    rows = hq // hkv * t
    if (rows < 128 or head_dim not in (64, 128) or dtype not in (torch.float16, torch.bfloat16)
            or not warp_specialized_supported(device)):
        return False
    cfg = launch_config(n, hq, t, head_dim, hkv, page_size, max_pages, device,
                        AttentionOptions(num_splits=num_splits, warp_specialized=True))
    return cfg.split_tokens >= WS_MIN_TILES_PER_SPLIT * cfg.block_n


def chains_attention(device: torch.device, warp_specialized: bool, row_blocks: int, prefetches: bool = False) -> bool:
    """Whether the plan (pdl None) launches the attention kernel as a programmatic dependent of the
    kernel before it: where PDL is supported, for the warp-specialised kernel, several row blocks,
    or a Triton kernel that can prefetch its first pages into L2 before its wait (prefetches: K/V
    in GPU memory, `AttentionInputs.prefetch_blocker`). Per call in a graph of 8 (H100,
    benchmarks/RESULTS.md, 2026-12-06): chained, 2-7% faster with two row blocks (N=1 T=32) and
    0.4-1% with the warp-specialised kernel (batch 6), but 2-3% slower with one row block (N=1
    T=16; eighteenth session). With the prefetch, one row block is 1-3% faster than unchained at
    32K and level at 128K (nineteenth session; as a graph's only call, 0.2-0.35 us slower)."""
    return pdl_supported(device) and (warp_specialized or row_blocks > 1 or prefetches)


def _interpreted(device: torch.device) -> bool:
    """Whether kernels on `device` run in Triton's CPU interpreter (whose bf16 is wrong: tiles go fp32)."""
    return device.type != "cuda"


def _block_d(head_dim: int) -> int:
    """head_dim rounded up to a power of two of at least 16 (tl.dot's smallest)."""
    return max(16, triton.next_power_of_2(head_dim))


def _default_warp_specialized(inputs: AttentionInputs, options: AttentionOptions) -> bool:
    """warp_specialized None: the Gluon kernel where `uses_warp_specialized` says so and nothing asked
    of the call is the Triton kernel's alone (tile overrides, a prefetch, scores, K/V in host memory)."""
    return (options.block_m is None and options.block_n is None and options.num_warps is None
            and options.num_stages is None and not options.prefetch_pages
            and not (inputs.page_scores or inputs.token_scores) and not inputs.host_kv and not inputs.kv_fp8
            and uses_warp_specialized(inputs.n, inputs.hq, inputs.t, inputs.head_dim, inputs.hkv, inputs.page_size,
                                      inputs.max_pages, inputs.device, inputs.dtype, options.num_splits))


def _check_warp_specialized(inputs: AttentionInputs, cfg: LaunchConfig) -> None:
    """Refuse, saying what to change, what `paged_attention_ws`'s kernel cannot run."""
    if not warp_specialized_supported(inputs.device):  # first: an older Triton cannot import that module
        raise ValueError(f"warp_specialized=True needs an sm_90 (Hopper) GPU for wgmma and Triton 3.6+'s Gluon; "
                         f"{inputs.device} with triton {triton.__version__} is not that (pass warp_specialized=False)")
    from .paged_attention_ws import ws_shared_bytes

    if inputs.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"warp_specialized=True takes bf16 or fp16 q/K/V, got {inputs.dtype}")
    if inputs.kv_fp8:
        raise ValueError("warp_specialized=True reads K/V in q's dtype, not fp8 pages with scales; pass "
                         "warp_specialized=False (or None: the Triton kernel dequantizes fp8 tiles as it loads them)")
    if inputs.head_dim not in (64, 128):
        raise ValueError(f"warp_specialized=True takes head_dim 64 or 128, got {inputs.head_dim}")
    if inputs.host_kv:
        raise ValueError("warp_specialized=True reads K/V from GPU memory; pass warp_specialized=False "
                         "to read the pinned host store over PCIe")
    if inputs.page_scores or inputs.token_scores:
        raise ValueError("warp_specialized=True computes no page or token scores; pass warp_specialized=False "
                         "for the scoring pass")
    if cfg.block_n % inputs.page_size or cfg.block_n not in (64, 128):
        raise ValueError(f"warp_specialized=True takes block_n 64 or 128, a multiple of the page size "
                         f"{inputs.page_size}; got {cfg.block_n}")
    smem = ws_shared_bytes(cfg.block_m // 64, cfg.block_n, inputs.head_dim, cfg.num_stages)
    if smem > 227 * 1024:
        raise ValueError(f"warp_specialized=True with block_n={cfg.block_n} and num_stages={cfg.num_stages} "
                         f"needs {smem} bytes of shared memory (227 KB per program); use fewer stages")


def _prefetch_pages(prefetch_pages: int | None, chained: bool, blocker: str | None, page_size: int,
                    cfg: LaunchConfig) -> tuple[int, int]:
    """The Triton kernel's L2 prefetch before its wait: (pages per split, PREFETCH_WIDTH: table
    entries per program; (0, 0) = off). Asked for (prefetch_pages > 0) where it cannot run, it
    refuses, saying what to change."""
    if prefetch_pages is not None and prefetch_pages < 0:
        raise ValueError(f"prefetch_pages must be >= 0 (0: none), got {prefetch_pages}")
    if prefetch_pages == 0:
        return 0, 0
    if not chained:
        blocker = "the attention kernel is not chained after the kernel before it (pass pdl=True)"
    if blocker is not None:
        if prefetch_pages is None:
            return 0, 0
        raise ValueError(f"prefetch_pages={prefetch_pages} cannot run here: {blocker}; pass prefetch_pages=0 or None")
    # Four entries per thread, most of them masked off: a smaller tensor would be replicated across
    # the program's threads (a load may give each thread up to 4 adjacent int32), and every copy
    # would issue its own prefetch.
    width = 4 * 32 * cfg.num_warps
    if prefetch_pages is None:
        prefetch_pages = DEFAULT_PREFETCH_PAGES_PER_PROGRAM * cfg.row_blocks
    pages = min(cfg.split_tokens // page_size, prefetch_pages, width * cfg.row_blocks)
    return pages, width if pages else 0


def _partial_dtype(requested: torch.dtype | None, q_dtype: torch.dtype, upcast: bool) -> torch.dtype:
    """The split partials' dtype: `requested`, else q's where it is 16-bit (bf16 only on the GPU:
    the CPU interpreter's bf16 is wrong), else fp32."""
    if requested is not None:
        if requested not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"partial_dtype must be float32, float16 or bfloat16, got {requested}")
        if upcast and requested == torch.bfloat16:
            raise ValueError("partial_dtype=bfloat16 needs CUDA (the CPU interpreter's bf16 is wrong); "
                             "use float16 or float32")
        return requested
    if q_dtype == torch.float16 or (q_dtype == torch.bfloat16 and not upcast):
        return q_dtype
    return torch.float32
