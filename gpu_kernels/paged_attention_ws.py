"""Warp-specialised split-KV paged attention for Hopper (Gluon, sm_90 only): the counterpart of
`attention_kernels.paged_attention_kernel` for blocks with many query rows per KV head.

With G * T >= 128 rows per KV head (T=32 or 64 blocks, 4 query heads per KV head), every K/V byte
carries 4 * rows flops, and the Triton kernel's loop (q . k, softmax, p . v in lockstep across the
program's warps, the K/V copies issued by the same warps) keeps the tensor cores busy about a
third of the time. Here a program is three warpgroups with one job each, as in FlashAttention-3:
- a producer (the default partition, 4 warps) copies each tile's K and V rows from their pages
  into a ring of shared-memory stages with cp.async, the page numbers loaded one tile ahead, and
  signals a `ready` mbarrier per stage;
- one or two consumers (worker partitions, 4 warps and 64 query rows each) wait on `ready`, issue
  q . k of tile j and p . v of tile j-1 as asynchronous wgmma, run tile j's softmax while the
  tensor cores work, and free the stage on an `empty` mbarrier once tile j-1's p . v is done.
  The two consumers share only the stages, so one's softmax can overlap the other's MMAs.
Each consumer writes its rows' output (or split partial) and lse in `paged_attention`'s layout,
so the same split merge follows (launched as a programmatic dependent, as after the Triton kernel). Same semantics as the Triton kernel for what it takes (store or
pool layout, per-head or shared table, the block's own K/V); no page or token scores.

Measured on an H100 (benchmarks/RESULTS.md, 2026-12-06, fifteenth session): 5-14% faster than the
Triton kernel at batch 6 over 5-10% of 128K (T=32 and 64), 7-14% slower at N=1, where a split
has too few tiles to pay for its start; the plan picks it by that
(`attention_plan.uses_warp_specialized`). 5-6 stages and 128-token tiles (launch options, timed in one run)
measured slower. Ping-pong turns between the consumers and a persistent grid (one program per SM
taking several items, the next item's q and tiles loading while the last one ends) were each timed
against a "HEAD" run that, through a PYTHONPATH mistake, ran the candidate again, so neither
comparison holds (benchmarks/RESULTS.md, 2026-12-06, eighteenth session). Against this kernel timed
in another call of the same session, the persistent grid was within 1% at T=32 and 1-2% faster at
T=64 at the split counts the default picks, and 3-13% faster at 8-16 splits: worth rebuilding and
timing properly.

The interpreter cannot run Gluon: tests/gpu_kernels/test_paged_attention_ws.py checks the kernel
against `paged_attention_reference` on an sm_90 GPU, and `compile_for_sm90` compiles it without one.
"""
from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    async_copy, fence_async_shared, mbarrier, warpgroup_mma, warpgroup_mma_wait)

from .attention_common import launch_dependents, program_split, wait_for_prior

# Triton 3.6 (the lent GPUs) names the pointer cp.async `async_copy_global_to_shared`; 3.7+ renamed
# it `async_load` and made the old name raise.
_cp_async = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared

ROWS_PER_CONSUMER = 64  # one warpgroup's wgmma M
_ROWS = gl.constexpr(ROWS_PER_CONSUMER)
# Registers per consumer thread (setmaxnreg); the producer warpgroup gets what is left of the
# 64K-register file: (64512 - 2 * 128 * 216) / 128 = 72 with two consumers (40 at 232 spilled
# its page prefetch to the stack).
CONSUMER_REGS = 216


def ws_shared_bytes(consumers: int, block_n: int, head_dim: int, stages: int, elem: int = 2) -> int:
    """Shared memory of one program: q for every consumer's rows plus `stages` K and V tiles."""
    return (consumers * ROWS_PER_CONSUMER + 2 * stages * block_n) * head_dim * elem + 2 * stages * 8


def compile_for_sm90(consumers: int = 2, block_n: int = 64, stages: int = 4, head_dim: int = 128,
                     has_block: bool = True, offsets_64: bool = False, consumer_regs: int = CONSUMER_REGS,
                     pdl: bool = True):
    """The kernel compiled for sm_90 as `paged_attention` launches it over bf16 K/V with 16-byte
    aligned strides, without a GPU (Triton's bundled ptxas); not under TRITON_INTERPRET, which
    cannot compile. pdl: as launched with PDL (AFTER_PRIOR: it waits for the kernel before it; USE_PDL:
    the merge after it is its programmatic dependent). Returns
    Triton's CompiledKernel (asm["ptx"], asm["cubin"], metadata.shared)."""
    import inspect

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    const = dict(HKV=8, G=4, T=16 * consumers, HEAD_DIM=head_dim, ROW_BLOCKS=1, BLOCK_N=block_n, PAGE=16,
                 STAGES=stages, CONSUMERS=consumers, CONSUMER_REGS=consumer_regs, WRITE_FINAL=False,
                 HAS_BLOCK=has_block, OFFSETS_64=offsets_64, USE_PDL=pdl, AFTER_PRIOR=pdl)
    aligned = {"stride_qn", "stride_qh", "stride_qt", "stride_kp", "stride_kh", "stride_kt", "stride_bn",
               "stride_bh", "stride_bt"}
    pointer_types = {"pt_ptr": "*i32", "kvlen_ptr": "*i32", "lse_ptr": "*fp32", "part_lse_ptr": "*fp32"}
    sig, attrs = {}, {}
    for i, name in enumerate(inspect.signature(ws_paged_attention_kernel.fn).parameters):
        if name in const:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name], attrs[(i,)] = pointer_types.get(name, "*bf16"), [["tt.divisibility", 16]]
        elif name == "sm_scale":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if name in aligned:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = GluonASTSource(ws_paged_attention_kernel, sig, constexprs=const, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))


@gluon.jit
def _tile_counts(split, lo, hi, T: gl.constexpr, BLOCK_N: gl.constexpr, HAS_BLOCK: gl.constexpr):
    """(context tiles, all tiles) of this split: the block's own keys are split 0's last tiles."""
    n_ctx = gl.cdiv(gl.maximum(hi - lo, 0), BLOCK_N)
    n_all = n_ctx
    if HAS_BLOCK:
        n_all = n_ctx + gl.where(split == 0, (T + BLOCK_N - 1) // BLOCK_N, 0)
    return n_ctx, n_all


@gluon.jit
def _producer(pt_base, k_base, v_base, kb_base, vb_base, k_smem, v_smem, ready, empty, lo, hi, split,
              stride_kp, stride_kt, stride_pte, stride_bt,
              T: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, PAGE: gl.constexpr,
              STAGES: gl.constexpr, HAS_BLOCK: gl.constexpr, OFFSETS_64: gl.constexpr):
    """Tile j's K and V rows into stage j % STAGES once the consumers have freed it: 16 bytes per
    cp.async, rows past the valid tokens zero-filled (their p is 0, and 0 * V must not be NaN)."""
    NW: gl.constexpr = gl.num_warps()
    TPR: gl.constexpr = HEAD_DIM // 8  # threads per row
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // TPR, TPR], [NW, 1], [1, 0])
    tok = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, layout))
    offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, layout))
    row_off = ((tok % PAGE) * stride_kt)[:, None] + offs_d[None, :]
    n_ctx, n_all = _tile_counts(split, lo, hi, T, BLOCK_N, HAS_BLOCK)
    # Each tile's page numbers are loaded one tile ahead, before the wait for a free stage: the
    # copies of tile j then never wait on the page table's latency.
    page_next = gl.load(pt_base + (lo // PAGE + tok // PAGE) * stride_pte, mask=tok < hi - lo, other=0)
    for j in range(n_all):
        s = j % STAGES
        start = lo + j * BLOCK_N
        page = page_next
        page_next = gl.load(pt_base + ((start + BLOCK_N) // PAGE + tok // PAGE) * stride_pte,
                            mask=tok < hi - start - BLOCK_N, other=0)
        # A fresh barrier counts as having completed the phase before its first: round 0 passes.
        mbarrier.wait(empty.index(s), ((j // STAGES) & 1) ^ 1)
        if j < n_ctx:
            ok = tok < hi - start
            if OFFSETS_64:
                kv_off = (page.to(gl.int64) * stride_kp)[:, None] + row_off
            else:
                kv_off = (page * stride_kp)[:, None] + row_off
            _cp_async(k_smem.index(s), k_base + kv_off, mask=ok[:, None])
            _cp_async(v_smem.index(s), v_base + kv_off, mask=ok[:, None])
        else:
            b = (j - n_ctx) * BLOCK_N + tok
            b_off = (b * stride_bt)[:, None] + offs_d[None, :]
            _cp_async(k_smem.index(s), kb_base + b_off, mask=(b < T)[:, None])
            _cp_async(v_smem.index(s), vb_base + b_off, mask=(b < T)[:, None])
        # Completes (per thread, without counting as a new arrival) once this thread's copies land.
        async_copy.mbarrier_arrive(ready.index(s), increment_count=False)


@gluon.jit
def _softmax_tile(s_acc, m_i, valid, qk_scale, BLOCK_N: gl.constexpr):
    """Tile of raw q . k scores [64, BLOCK_N] -> (p, new row max, rescale factor), exp2 domain;
    columns >= valid are masked (every tile has at least one valid column)."""
    if valid < BLOCK_N:  # only a split's last tile has masked columns: one select per score less
        cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_acc.type.layout))
        s_acc = gl.where((cols < valid)[None, :], s_acc, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s_acc, axis=1) * qk_scale)
    alpha = gl.exp2(m_i - m_new)
    p = gl.exp2(s_acc * qk_scale - m_new[:, None])
    return p, m_new, alpha


@gluon.jit
def _consumer(q_smem, k_smem, v_smem, ready, empty, lo, hi, split, qk_scale, row0, row_base,
              out_ptr, lse_ptr, part_ptr, part_lse_ptr, num_splits,
              G: gl.constexpr, T: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr,
              STAGES: gl.constexpr, HAS_BLOCK: gl.constexpr, WRITE_FINAL: gl.constexpr,
              USE_PDL: gl.constexpr):
    """One warpgroup's 64 query rows (q_smem), rows row0.. of its KV head's G * T. Per tile j:
    q . k(j) and p(j-1) . v(j-1) go to the tensor cores together; the softmax of tile j runs while
    the second is in flight as written; then the accumulator takes tile j's rescale. (ptxas
    schedules the wait for p . v(j-1) ahead of the softmax, so in the SASS the softmax overlaps
    only the other consumer's MMAs. Forcing the written order, and making the two consumers take
    turns to issue their MMAs, FlashAttention-3's ping-pong, were both built, but their A/B runs
    timed the candidate on both sides, so whether they help is not known; benchmarks/RESULTS.md,
    2026-12-06, fifteenth, sixteenth and eighteenth sessions.)"""
    NW: gl.constexpr = gl.num_warps()
    BLOCK_M: gl.constexpr = 16 * NW
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    dtype: gl.constexpr = q_smem.dtype
    n_ctx, n_all = _tile_counts(split, lo, hi, T, BLOCK_N, HAS_BLOCK)

    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([BLOCK_M], gl.float32, layout=gl.SliceLayout(1, s_layout))
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=o_layout)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
    p_prev = gl.zeros([BLOCK_M, BLOCK_N], dtype, layout=p_layout)

    if n_all > 0:  # tile 0: nothing to overlap its softmax with
        mbarrier.wait(ready.index(0), 0)
        fence_async_shared()  # the producer's cp.async wrote through the generic proxy
        s_tok = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        s_acc = warpgroup_mma_wait(0, deps=[s_tok])
        p, m_i, alpha = _softmax_tile(s_acc, m_i, gl.where(n_ctx > 0, hi - lo, T), qk_scale, BLOCK_N)
        l_i = gl.sum(p, axis=1)
        p_prev = gl.convert_layout(p.to(dtype), p_layout)
    for j in range(1, n_all):
        s = j % STAGES
        prev = (j - 1) % STAGES
        mbarrier.wait(ready.index(s), (j // STAGES) & 1)
        fence_async_shared()
        s_tok = warpgroup_mma(q_smem, k_smem.index(s).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        o_tok = warpgroup_mma(p_prev, v_smem.index(prev), acc, is_async=True)
        s_acc = warpgroup_mma_wait(1, deps=[s_tok])  # wgmma groups retire in order: q . k is done
        valid = gl.where(j < n_ctx, hi - lo - j * BLOCK_N, T - (j - n_ctx) * BLOCK_N)
        p, m_i, alpha = _softmax_tile(s_acc, m_i, valid, qk_scale, BLOCK_N)
        l_i = l_i * alpha + gl.sum(p, axis=1)
        acc = warpgroup_mma_wait(0, deps=[o_tok])
        mbarrier.arrive(empty.index(prev), count=1)  # after a barrier over this warpgroup
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
        p_prev = gl.convert_layout(p.to(dtype), p_layout)
    if n_all > 0:
        o_tok = warpgroup_mma(p_prev, v_smem.index((n_all - 1) % STAGES), acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=[o_tok])
    if USE_PDL:
        launch_dependents()  # the merge (PDL) may launch: once this program's tiles are done

    empty_row = l_i == 0.0  # no valid token in this split: out 0, lse -inf
    l_safe = gl.where(empty_row, 1.0, l_i)
    lse = gl.where(empty_row, float("-inf"), (m_i + gl.log2(l_safe)) * 0.6931471805599453)
    lse = gl.convert_layout(lse, gl.SliceLayout(1, o_layout))
    o = acc / gl.convert_layout(l_safe, gl.SliceLayout(1, o_layout))[:, None]
    rows = row0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, o_layout))
    cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    row_ok = rows < G * T
    row = row_base + rows  # rows = g * T + t of this KV head; row_base = its first (n, head, 0) row
    if WRITE_FINAL:
        gl.store(out_ptr + row[:, None] * HEAD_DIM + cols[None, :], o.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None])
        gl.store(lse_ptr + row, lse, mask=row_ok)
    else:
        wrow = row * num_splits + split
        gl.store(part_ptr + wrow[:, None] * HEAD_DIM + cols[None, :], o.to(part_ptr.dtype.element_ty),
                 mask=row_ok[:, None])
        gl.store(part_lse_ptr + wrow, lse, mask=row_ok)


@gluon.jit(do_not_specialize=["stride_ptn", "stride_pth", "max_pages", "split_tokens", "num_splits"])
def ws_paged_attention_kernel(
    q_ptr, k_ptr, v_ptr, pt_ptr, kvlen_ptr, kb_ptr, vb_ptr,
    out_ptr, lse_ptr, part_ptr, part_lse_ptr,
    sm_scale,
    stride_qn, stride_qh, stride_qt,
    stride_kp, stride_kh, stride_kt,
    stride_ptn, stride_pth, stride_pte,
    stride_ln, stride_lh,
    stride_bn, stride_bh, stride_bt,
    max_pages, split_tokens, num_splits,
    HKV: gl.constexpr, G: gl.constexpr, T: gl.constexpr, HEAD_DIM: gl.constexpr,
    ROW_BLOCKS: gl.constexpr, BLOCK_N: gl.constexpr, PAGE: gl.constexpr, STAGES: gl.constexpr,
    CONSUMERS: gl.constexpr, CONSUMER_REGS: gl.constexpr,
    WRITE_FINAL: gl.constexpr, HAS_BLOCK: gl.constexpr, OFFSETS_64: gl.constexpr, USE_PDL: gl.constexpr,
    AFTER_PRIOR: gl.constexpr,
):
    """Grid (N * HKV * ROW_BLOCKS, num_splits), num_warps=4 (the producer; the CONSUMERS
    warpgroups come on top). Arguments as `attention_kernels.paged_attention_kernel`'s (no score
    outputs)."""
    NW: gl.constexpr = gl.num_warps()
    BLOCK_M: gl.constexpr = _ROWS * CONSUMERS
    GT: gl.constexpr = G * T
    if AFTER_PRIOR:
        wait_for_prior()
    rb, kvh, n, split, lo, _, hi = program_split(kvlen_ptr, stride_ln, stride_lh, max_pages, split_tokens,
                                                 HKV, ROW_BLOCKS, PAGE)
    qk_scale = sm_scale * 1.4426950408889634  # exp2 domain

    # This row block's queries (g, t) -> query head kvh * G + g, into shared memory once.
    TPR: gl.constexpr = HEAD_DIM // 8
    ld_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // TPR, TPR], [NW, 1], [1, 0])
    offs_m = rb * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, ld_layout))
    offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, ld_layout))
    qh = kvh * G + offs_m // T
    q_ptrs = (q_ptr + n * stride_qn + (qh.to(gl.int64) * stride_qh + (offs_m % T) * stride_qt)[:, None]
              + offs_d[None, :])
    q = gl.load(q_ptrs, mask=(offs_m < GT)[:, None], other=0.0)
    dtype: gl.constexpr = q_ptr.dtype.element_ty
    q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD_DIM], dtype)
    kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)
    q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], q_layout, q)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=NW * 32)  # every producer thread, once its copies land
        mbarrier.init(empty.index(i), count=CONSUMERS)  # each consumer warpgroup, once its MMAs are done
    fence_async_shared()  # q (written through the generic proxy) before the first wgmma reads it

    pt_base = pt_ptr + n * stride_ptn + kvh.to(gl.int64) * stride_pth
    k_base = k_ptr + kvh.to(gl.int64) * stride_kh
    v_base = v_ptr + kvh.to(gl.int64) * stride_kh
    kb_base = kb_ptr + n * stride_bn + kvh.to(gl.int64) * stride_bh
    vb_base = vb_ptr + n * stride_bn + kvh.to(gl.int64) * stride_bh
    row_base = (n * (HKV * G) + kvh * G) * T
    # (Partition lists must be literal in the call, hence the two spellings.)
    if CONSUMERS == 1:
        gl.warp_specialize([
            (_producer, (pt_base, k_base, v_base, kb_base, vb_base, k_smem, v_smem, ready, empty, lo, hi, split,
                         stride_kp, stride_kt, stride_pte, stride_bt,
                         T, HEAD_DIM, BLOCK_N, PAGE, STAGES, HAS_BLOCK, OFFSETS_64)),
            (_consumer, (q_smem, k_smem, v_smem, ready, empty, lo, hi, split, qk_scale,
                         rb * BLOCK_M, row_base, out_ptr, lse_ptr, part_ptr, part_lse_ptr, num_splits,
                         G, T, HEAD_DIM, BLOCK_N, STAGES, HAS_BLOCK, WRITE_FINAL, USE_PDL)),
        ], [4], [CONSUMER_REGS])
    else:
        gl.warp_specialize([
            (_producer, (pt_base, k_base, v_base, kb_base, vb_base, k_smem, v_smem, ready, empty, lo, hi, split,
                         stride_kp, stride_kt, stride_pte, stride_bt,
                         T, HEAD_DIM, BLOCK_N, PAGE, STAGES, HAS_BLOCK, OFFSETS_64)),
            (_consumer, (q_smem.slice(0, _ROWS), k_smem, v_smem, ready, empty,
                         lo, hi, split, qk_scale, rb * BLOCK_M, row_base, out_ptr, lse_ptr, part_ptr, part_lse_ptr,
                         num_splits, G, T, HEAD_DIM, BLOCK_N, STAGES, HAS_BLOCK, WRITE_FINAL, USE_PDL)),
            (_consumer, (q_smem.slice(_ROWS, _ROWS), k_smem, v_smem, ready, empty,
                         lo, hi, split, qk_scale, rb * BLOCK_M + _ROWS, row_base, out_ptr, lse_ptr, part_ptr,
                         part_lse_ptr, num_splits, G, T, HEAD_DIM, BLOCK_N, STAGES, HAS_BLOCK, WRITE_FINAL, USE_PDL)),
        ], [4, 4], [CONSUMER_REGS, CONSUMER_REGS])
