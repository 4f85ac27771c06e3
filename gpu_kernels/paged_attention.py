"""Split-KV paged attention of a block of queries over a paged KV context (Triton), with references.

One kernel serves two layouts, told apart only by strides:
- store layout: K, V ``[num_pages, Hkv, page_size, D]``, page table ``[N, max_pages]`` shared by the
  KV heads (head stride of the table 0). This is the host store (read zero-copy through UVA via
  ``HostPointer``) and the dense GPU cache.
- pool layout: K, V ``[num_slots, page_size, D]``, one KV head's page per slot, page table
  ``[N, Hkv, max_pages]`` (head stride of K/V 0). This is the sparse GPU page pool.
A store with a per-head table ``[N, Hkv, max_pages]`` also works (per-head selections read straight
from the store).

Token t of table entry i is context position i * page_size + t; ``kv_len [N, Hkv]`` (int32) says how
many positions of each list are valid. One program handles the G*T queries of one KV head (G query
heads per KV head, T block positions), so each K/V tile is read once per KV head; the token range
is cut into splits (flash-decoding) that start at page boundaries, and whose partial (out, lse) a
second kernel merges: one or four rows per program, a chunk of up to 32 splits loaded at once and
folded in elementwise by each thread. With one split the attention kernel writes the final output
itself and there is no second launch (`default_num_splits` sizes the grid in whole waves).
Given the block's own K/V as well (`block_attention`), split 0 attends to them after its context
tiles, so attention over [context, block] is this one kernel (and the merge).

The same pass can score every context token with the block-mean query (mean of the G*T query
vectors of a KV head): token score = scale * q_mean . k, page score = max over a page's valid
tokens. Selection (top-k pages or tokens per KV head) reads these. They come from the K tile the
attention already holds: the column means of the q . k tile when one program holds all G*T
queries, else one small extra MMA of q_mean against the tile; K is never read twice.

On sm_90 GPUs, `paged_attention_ws` holds a second kernel for the same call: warp-specialised
(Gluon; a cp.async producer warpgroup, wgmma consumer warpgroups), for blocks with >= 128 query
rows per KV head whose splits are long; `paged_attention` picks it there unless told
(`warp_specialized`), and otherwise runs the Triton kernel below.

Launched as a programmatic dependent of the kernel before it (PDL; `chains_attention`), each program
first asks L2 for a page or two of its split (bulk prefetches, `_prefetch_pages_l2`) and only then
waits for that kernel, so its first tiles are on their way while that kernel ends: 0.85-0.95 us of
an 18.5 us call at N=1 T=32 over 5% of 128K on an H100, in a graph of 8 calls. A prefetch changes
no value, so this holds whatever the kernel before writes.

Per call the host validates shapes and launches; nothing syncs with the device. With `out`, `lse`,
score buffers and `workspace` passed in, a call allocates nothing and can be captured in a CUDA
graph (`launch_config` says how large the workspace must be).
"""
from __future__ import annotations

import functools
from typing import Union

import torch
import triton
import triton.language as tl

from .features import pdl_supported, warp_specialized_supported
from ._uva import HostPointer, kernel_arg

_LOG2E = 1.4426950408889634

KVTensor = Union[torch.Tensor, HostPointer]  # a GPU tensor, or pinned host memory read over PCIe


@triton.jit
def _load_kv(k_ptrs, v_ptrs, mask, UPCAST: tl.constexpr):
    """A K and a V tile (0 where masked); fp32 under UPCAST (the CPU interpreter's bf16 is wrong)."""
    k = tl.load(k_ptrs, mask=mask, other=0.0)
    v = tl.load(v_ptrs, mask=mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    return k, v


@triton.jit
def _softmax_update(s, v, m_i, l_i, acc, qk_scale, DOT_PRECISION: tl.constexpr):
    """One tile of the online softmax: s [BLOCK_M, BLOCK_N] raw q . k scores (-inf where masked,
    at least one finite per row), qk_scale > 0 the softmax scale times log2(e), v [BLOCK_N, BLOCK_D].
    The scale is applied inside the exponent (one FMA per score) and to the row max, which a
    positive scale commutes with. Returns (m_i, l_i, acc), m_i in the scaled exp2 domain."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s * qk_scale - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _launch_dependents():
    """Let the kernel launched after this one as a programmatic dependent (the split merge) launch,
    once every program has called this or exited; a no-op outside such a launch. A scalar helper,
    so `paged_attention_ws`'s Gluon kernel calls it too."""
    tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _wait_for_prior():
    """Wait until the kernel before this one in the stream has ended and its writes are visible; a
    no-op unless this kernel was launched as its programmatic dependent. A scalar helper, so
    `paged_attention_ws`'s Gluon kernel calls it too."""
    tl.extra.cuda.gdc_wait()


@triton.jit
def _program_place(max_pages, split_tokens, HKV: tl.constexpr, ROW_BLOCKS: tl.constexpr, PAGE: tl.constexpr):
    """This program's place in the grid (N * HKV * ROW_BLOCKS, num_splits), from its ids alone (no
    memory read, so it may run before the wait for the kernel before): (row block, KV head,
    sequence n as int64, split, lo, split_end), [lo, split_end) the split's share of the table's
    max_pages * PAGE tokens."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    rb = pid % ROW_BLOCKS
    nh = pid // ROW_BLOCKS
    kvh = nh % HKV
    n = (nh // HKV).to(tl.int64)
    lo = split * split_tokens
    split_end = tl.minimum(lo + split_tokens, max_pages * PAGE)
    return rb, kvh, n, split, lo, split_end


@triton.jit
def _valid_end(kvlen_ptr, stride_ln, stride_lh, n, kvh, max_pages, split_end, PAGE: tl.constexpr):
    """hi = min(split_end, kv_len of list (n, kvh)): where the split's valid tokens end."""
    kvl = tl.load(kvlen_ptr + n * stride_ln + kvh * stride_lh)
    kvl = tl.minimum(tl.maximum(kvl, 0), max_pages * PAGE)
    return tl.minimum(split_end, kvl)


@triton.jit
def _program_split(kvlen_ptr, stride_ln, stride_lh, max_pages, split_tokens,
                   HKV: tl.constexpr, ROW_BLOCKS: tl.constexpr, PAGE: tl.constexpr):
    """`_program_place` plus hi (`_valid_end`): (row block, KV head, n, split, lo, split_end, hi).
    Scalar code, so `paged_attention_ws`'s Gluon kernel calls it too."""
    rb, kvh, n, split, lo, split_end = _program_place(max_pages, split_tokens, HKV, ROW_BLOCKS, PAGE)
    return rb, kvh, n, split, lo, split_end, _valid_end(kvlen_ptr, stride_ln, stride_lh, n, kvh, max_pages,
                                                        split_end, PAGE)


@triton.jit
def _prefetch_pages_l2(pt_base, stride_pte, k_base, v_base, stride_kp, num_kv_pages, lo, split_end, prefetch_pages,
                       rb, ROW_BLOCKS: tl.constexpr, PAGE: tl.constexpr, PREFETCH_WIDTH: tl.constexpr,
                       PAGE_BYTES: tl.constexpr):
    """Ask L2 for the K and V of the split's first prefetch_pages pages (row block rb takes every
    ROW_BLOCKS-th, PREFETCH_WIDTH of them at most): one bulk prefetch per page, which holds no
    registers and is not waited for. Meant to run before the wait for the kernel before, so these
    reads overlap its end. That is safe whatever that kernel writes: a prefetch changes no value
    (L2 is where every SM's writes meet), and the page table is read here only to aim it (volatile,
    so the loop's reads of the table after the wait are never merged with these; stale entries are
    clamped into the store, so no address is outside it)."""
    entries = lo // PAGE + rb + ROW_BLOCKS * tl.arange(0, PREFETCH_WIDTH)
    ok = entries < tl.minimum(split_end, lo + prefetch_pages * PAGE) // PAGE
    page = tl.load(pt_base + entries * stride_pte, mask=ok, other=0, volatile=True)
    page = tl.minimum(tl.maximum(page, 0), num_kv_pages - 1).to(tl.int64)
    nbytes = tl.full([PREFETCH_WIDTH], PAGE_BYTES, tl.int32)
    flag = ok.to(tl.int32)
    for base in tl.static_range(2):
        addr = ((k_base if base == 0 else v_base) + page * stride_kp).to(tl.int64)
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $3; mov.b32 $0, 0; }",
            "=r,l,r,r", [addr, flag, nbytes], dtype=tl.int32, is_pure=False, pack=1)


# Lengths and the page table's row strides change with every context and selection: specialising
# on them (== 1, divisible by 16) would compile, and load, new variants in the middle of decoding.
@triton.jit(do_not_specialize=["stride_ptn", "stride_pth", "max_pages", "split_tokens", "num_splits",
                               "num_kv_pages", "prefetch_pages"])
def _paged_attention_kernel(
    q_ptr, k_ptr, v_ptr, pt_ptr, kvlen_ptr, kb_ptr, vb_ptr,
    out_ptr, lse_ptr, part_ptr, part_lse_ptr, pscore_ptr, tscore_ptr,
    sm_scale,
    stride_qn, stride_qh, stride_qt,
    stride_kp, stride_kh, stride_kt,
    stride_ptn, stride_pth, stride_pte,
    stride_ln, stride_lh,
    stride_bn, stride_bh, stride_bt,
    max_pages, split_tokens, num_splits, num_kv_pages, prefetch_pages,
    HKV: tl.constexpr, G: tl.constexpr, T: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, ROW_BLOCKS: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
    WRITE_FINAL: tl.constexpr, HAS_BLOCK: tl.constexpr,
    PAGE_SCORES: tl.constexpr, TOKEN_SCORES: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_PDL: tl.constexpr, AFTER_PRIOR: tl.constexpr,
    OFFSETS_64: tl.constexpr, PREFETCH_WIDTH: tl.constexpr, PAGE_BYTES: tl.constexpr,
):
    """Grid (N * HKV * ROW_BLOCKS, num_splits). q, K and V are contiguous in the head dim; K and V
    share their strides (one store).

    HAS_BLOCK: the block's own K/V (kb/vb [N, HKV, T, D], strides stride_b*) are T more keys,
    seen by every query (bidirectional), taken by split 0 after its context tiles: the result is
    attention over [context, block] with no second pass and no merge in torch. Scores stay
    context-only.

    WRITE_FINAL (one split): writes the final out (q's dtype) and lse to out_ptr / lse_ptr, rows
    (n, h, t) contiguous with HEAD_DIM elements each; nothing else runs after this kernel.
    Otherwise writes the normalised partial out at part[(row * num_splits + split) * HEAD_DIM]
    (in part_ptr's dtype: fp32, or q's 16-bit dtype, which halves the bytes the merge moves) and its
    lse (fp32) at part_lse[row * num_splits + split], merged by `_merge_splits_kernel`.

    USE_PDL (Hopper+, with the merge launched as a programmatic dependent): each program lets the
    merge launch once its own tiles are done, so the merge's programs are launched while the
    grid's last programs write their partials rather than after the grid has ended.

    AFTER_PRIOR (launched as a programmatic dependent of the stream's previous kernel): every
    program first waits for that kernel (its q, K/V and tables may come from it), so only the
    launch and the programs' start overlap its end.

    PREFETCH_WIDTH > 0 (with AFTER_PRIOR; K/V pages of PAGE_BYTES contiguous bytes in GPU memory, of
    num_kv_pages pages or slots): before that wait, each program asks L2 for its split's first
    prefetch_pages pages (`_prefetch_pages_l2`), so HBM streams them while the kernel before ends.

    OFFSETS_64: K/V element offsets need 64 bits (a store of 2^31 elements or more); otherwise they
    are 32-bit. With the loop-invariant offsets below, that takes the loop from 640 to 458 sm_90
    instructions per tile at 64-row tiles (513 to 417 at 128 rows; `scripts/dev/sass_attention_loop.py`).
    The N=1 sparse time did not move with it (H100, 2026-12-06: within 1-2% of the 640-instruction
    loop): on a clean L2 that case streams its tiles at about 90% of HBM's read rate, and the rest
    is a fixed cost per program and the split merge.
    """
    SCORES: tl.constexpr = PAGE_SCORES or TOKEN_SCORES
    # One row block holds every query of its KV head: the block-mean query's scores are the
    # column means of the score tile the softmax computes anyway (no extra pass, no extra MMA).
    MEAN_FROM_S: tl.constexpr = ROW_BLOCKS == 1
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    GT: tl.constexpr = G * T
    HQ: tl.constexpr = HKV * G

    rb, kvh, n, split, lo, split_end = _program_place(max_pages, split_tokens, HKV, ROW_BLOCKS, PAGE)
    pt_base = pt_ptr + n * stride_ptn + kvh.to(tl.int64) * stride_pth
    k_base = k_ptr + kvh.to(tl.int64) * stride_kh
    v_base = v_ptr + kvh.to(tl.int64) * stride_kh
    if PREFETCH_WIDTH > 0:
        _prefetch_pages_l2(pt_base, stride_pte, k_base, v_base, stride_kp, num_kv_pages, lo, split_end,
                           prefetch_pages, rb, ROW_BLOCKS, PAGE, PREFETCH_WIDTH, PAGE_BYTES)
    if AFTER_PRIOR:
        _wait_for_prior()
    hi = _valid_end(kvlen_ptr, stride_ln, stride_lh, n, kvh, max_pages, split_end, PAGE)
    qk_scale = sm_scale * 1.4426950408889634  # exp2 domain
    max_tokens = max_pages * PAGE

    # Rows of this program: query (g, t) of KV head kvh, i.e. query head kvh * G + g.
    offs_m = rb * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < GT
    qh = kvh * G + offs_m // T
    qt = offs_m % T
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q_ptrs = (q_ptr + n * stride_qn + qh[:, None].to(tl.int64) * stride_qh
              + qt[:, None] * stride_qt + offs_d[None, :])
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    score_base = (n * HKV + kvh).to(tl.int64)
    # Every row block sees the same tokens; only the first writes the scores. A split starts at a
    # page, not at a tile, so its last tile may reach into the next split: it writes no score there.
    tok_lim = tl.where(rb == 0, split_end, 0)
    page_lim = tok_lim // PAGE

    if SCORES and not MEAN_FROM_S:
        # Several row blocks: this program sees only some of the queries, so it scores with the
        # block-mean query itself, as a 16-row MMA operand (row 0 = q_mean rounded to the input
        # dtype, row 1 = the rounding remainder, so the pair keeps fp32 accuracy) against the
        # K tile already in shared memory.
        q_sum = tl.zeros([BLOCK_D], dtype=tl.float32)
        for r0 in tl.static_range(0, GT, BLOCK_M):
            rows = r0 + tl.arange(0, BLOCK_M)
            rq_ptrs = (q_ptr + n * stride_qn + (kvh * G + rows // T)[:, None].to(tl.int64) * stride_qh
                       + (rows % T)[:, None] * stride_qt + offs_d[None, :])
            rq = tl.load(rq_ptrs, mask=(rows < GT)[:, None] & d_ok[None, :], other=0.0)
            q_sum += tl.sum(rq.to(tl.float32), axis=0)
        q_mean = q_sum / GT
        qm_row = tl.arange(0, 16)[:, None]
        if UPCAST:
            qm = tl.where(qm_row == 0, q_mean[None, :], 0.0)
        else:
            qm_hi = q_mean.to(q.dtype)
            qm_lo = (q_mean - qm_hi.to(tl.float32)).to(q.dtype)
            qm = tl.where(qm_row == 0, qm_hi[None, :], qm_lo[None, :])
            qm = tl.where(qm_row < 2, qm, tl.zeros_like(qm))

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Per-token page lookup (a tile spans BLOCK_N // PAGE table entries), loaded one tile ahead:
    # with the index load in the same iteration as the K/V loads that use it, Triton's pipeliner
    # keeps only two K/V buffers whatever num_stages says; loop-carried, it keeps num_stages.
    # The lookup is bounded by the table, not by kv_len, so the first one goes out together with
    # the kv_len load instead of after it (one memory latency less before the first K/V tile);
    # entries past kv_len are loaded but only address masked-off tokens.
    # Splits and tiles start at pages, so a token's table entry and its row inside the page depend on
    # its place in the tile alone: those offsets are loop-invariant (hoisted), and the bounds are
    # compared as tile positions against one scalar each (no per-token add before the compares).
    tile_tok = tl.arange(0, BLOCK_N)
    tile_entry = tile_tok // PAGE
    row_off = (tile_tok % PAGE)[:, None] * stride_kt + offs_d[None, :]
    page_next = tl.load(pt_base + (lo // PAGE + tile_entry) * stride_pte, mask=tile_tok < split_end - lo,
                        other=0)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tile_tok
        tok_ok = tile_tok < hi - start
        if OFFSETS_64:
            page = page_next.to(tl.int64)
        else:
            page = page_next
        page_next = tl.load(pt_base + ((start + BLOCK_N) // PAGE + tile_entry) * stride_pte,
                            mask=tile_tok < split_end - start - BLOCK_N, other=0)
        kv_off = page[:, None] * stride_kp + row_off
        if EVEN_D:
            kv_mask = tok_ok[:, None]
        else:
            kv_mask = tok_ok[:, None] & d_ok[None, :]
        k, v = _load_kv(k_base + kv_off, v_base + kv_off, kv_mask, UPCAST)

        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # raw q . k, fp32
        if SCORES:
            if MEAN_FROM_S:
                # Padding rows of q are 0, so the column sum over BLOCK_M rows is over the GT queries.
                ts = tl.sum(s, axis=0) * (sm_scale / GT)
            else:
                ts = tl.sum(tl.dot(qm, tl.trans(k), input_precision=DOT_PRECISION), axis=0) * sm_scale
            ts = tl.where(tok_ok, ts, float("-inf"))
            if TOKEN_SCORES:
                tl.store(tscore_ptr + score_base * max_tokens + offs_n, ts, mask=offs_n < tok_lim)
            if PAGE_SCORES:
                ps = tl.max(tl.reshape(ts, (BLOCK_N // PAGE, PAGE)), axis=1)
                entries = start // PAGE + tl.arange(0, BLOCK_N // PAGE)
                tl.store(pscore_ptr + score_base * max_pages + entries, ps, mask=entries < page_lim)

        # Every tile of this loop holds >= 1 valid token, so m_new is finite and exp2 never sees
        # (-inf) - (-inf).
        s = tl.where(tok_ok[None, :], s, float("-inf"))
        m_i, l_i, acc = _softmax_update(s, v, m_i, l_i, acc, qk_scale, DOT_PRECISION)

    if HAS_BLOCK:
        # The block's own keys, in split 0 only (a range that is empty for the other splits).
        kb_base = kb_ptr + n * stride_bn + kvh.to(tl.int64) * stride_bh
        vb_base = vb_ptr + n * stride_bn + kvh.to(tl.int64) * stride_bh
        blk_hi = tl.where(split == 0, T, 0)
        for start in range(0, blk_hi, BLOCK_N):
            offs_b = start + tl.arange(0, BLOCK_N)
            b_ok = offs_b < T
            b_off = offs_b[:, None] * stride_bt + offs_d[None, :]
            kb, vb = _load_kv(kb_base + b_off, vb_base + b_off, b_ok[:, None] & d_ok[None, :], UPCAST)
            s = tl.dot(q, tl.trans(kb), input_precision=DOT_PRECISION)
            s = tl.where(b_ok[None, :], s, float("-inf"))  # every block tile has a valid key
            m_i, l_i, acc = _softmax_update(s, vb, m_i, l_i, acc, qk_scale, DOT_PRECISION)

    if SCORES:
        # Entries of this split beyond kv_len and past its last tile: -inf, so selection never
        # picks them (the last tile already wrote -inf for its tokens beyond kv_len).
        tail_lo = lo + tl.cdiv(tl.maximum(hi - lo, 0), BLOCK_N) * BLOCK_N
        for start in range(tail_lo, split_end, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            if TOKEN_SCORES:
                tl.store(tscore_ptr + score_base * max_tokens + offs_n,
                         tl.full([BLOCK_N], float("-inf"), dtype=tl.float32),
                         mask=offs_n < tok_lim)
            if PAGE_SCORES:
                entries = start // PAGE + tl.arange(0, BLOCK_N // PAGE)
                tl.store(pscore_ptr + score_base * max_pages + entries,
                         tl.full([BLOCK_N // PAGE], float("-inf"), dtype=tl.float32),
                         mask=entries < page_lim)

    if USE_PDL:
        # Only now: merge programs launched earlier sit on the SMs for the whole split, which made
        # N=1 calls 2-16% slower on the H200 than no PDL at all.
        _launch_dependents()
    empty = l_i == 0.0  # no valid token in this split (or kv_len 0): out 0, lse -inf
    l_safe = tl.where(empty, 1.0, l_i)
    o = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    row = (n * HQ + qh) * T + qt  # (n, query head, t) row of out / workspace
    o_mask = row_ok[:, None] & d_ok[None, :]
    if WRITE_FINAL:
        tl.store(out_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], o.to(out_ptr.dtype.element_ty),
                 mask=o_mask)
        tl.store(lse_ptr + row, lse, mask=row_ok)
    else:
        wrow = row * num_splits + split
        tl.store(part_ptr + wrow[:, None] * HEAD_DIM + offs_d[None, :], o.to(part_ptr.dtype.element_ty),
                 mask=o_mask)
        tl.store(part_lse_ptr + wrow, lse, mask=row_ok)


@triton.jit(do_not_specialize=["rows", "num_splits"])
def _merge_splits_kernel(
    part_ptr, part_lse_ptr, out_ptr, lse_ptr, rows, num_splits,
    BLOCK_R: tl.constexpr, CHUNK_S: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """Grid (cdiv(rows, BLOCK_R),): log-sum-exp merge of BLOCK_R rows' splits (layout: see the
    attention kernel).

    The splits of a chunk are unrolled (CHUNK_S of them), so their loads are all in flight at once,
    and each is folded in elementwise with a running max: every thread merges its own elements, with
    no reduction across threads. (Reducing a [splits, D] tile over its split axis, one row per
    program, went through shared memory with 8-10-way bank conflicts: 37 us for 12 MB of partials
    on the H200.) USE_PDL: launched as a programmatic dependent of the attention kernel, it waits
    for that kernel's writes here, before its first load, and then lets the kernel after it launch.
    """
    offs_r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = offs_r < rows
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    base = offs_r * num_splits
    if USE_PDL:
        _wait_for_prior()
        # The next call's attention, launched as this kernel's programmatic dependent, may launch now
        # and start its programs while the merge runs (it waits for the merge before its first read).
        _launch_dependents()
    m = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    den = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for c in range(0, num_splits, CHUNK_S):
        for j in tl.static_range(CHUNK_S):
            split = c + j
            ok = r_ok & (tl.zeros_like(offs_r) + split < num_splits)
            lse_s = tl.load(part_lse_ptr + base + split, mask=ok, other=float("-inf"))
            o = tl.load(part_ptr + (base + split)[:, None] * HEAD_DIM + offs_d[None, :],
                        mask=ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            m_new = tl.maximum(m, lse_s)
            # All splits so far empty: shift by 0, so exp(-inf - 0) = 0 instead of exp(nan).
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m - shift)
            w = tl.exp(lse_s - shift)
            den = den * alpha + w
            acc = acc * alpha[:, None] + w[:, None] * o
            m = m_new
    empty = den == 0.0
    den_safe = tl.where(empty, 1.0, den)
    tl.store(out_ptr + offs_r[:, None] * HEAD_DIM + offs_d[None, :],
             (acc / den_safe[:, None]).to(out_ptr.dtype.element_ty), mask=r_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + offs_r, tl.where(empty, float("-inf"), m + tl.log(den_safe)), mask=r_ok)


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------

def _unwrap(x):
    return x.tensor if isinstance(x, HostPointer) else x


def _describe_layout(q, k_pages, v_pages, page_table, kv_len):
    """Validate shapes; return (hkv, page_size, per_head_table, pool_layout, kv_len [N, Hkv])."""
    if q.dim() != 4:
        raise ValueError(f"q must be [N, Hq, T, D], got shape {tuple(q.shape)}")
    n, hq, t, d = q.shape
    k, v = _unwrap(k_pages), _unwrap(v_pages)
    if tuple(k.shape) != tuple(v.shape):
        raise ValueError(f"k_pages {tuple(k.shape)} and v_pages {tuple(v.shape)} differ in shape")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k_pages, v_pages must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if page_table.dtype != torch.int32:
        raise ValueError(f"page_table must be int32, got {page_table.dtype}; use .to(torch.int32)")
    if k.dim() == 4:
        pool = False
        _, hkv, page_size, dk = k.shape
    elif k.dim() == 3:
        pool = True
        _, page_size, dk = k.shape
        if page_table.dim() != 3:
            raise ValueError("pool layout k_pages [num_slots, page_size, D] needs a per-head page "
                             f"table [N, Hkv, max_pages]; got table shape {tuple(page_table.shape)}")
        hkv = page_table.shape[1]
    else:
        raise ValueError("k_pages must be [num_pages, Hkv, page_size, D] (store) or "
                         f"[num_slots, page_size, D] (pool); got shape {tuple(k.shape)}")
    if dk != d:
        raise ValueError(f"head_dim of q ({d}) and k_pages ({dk}) differ")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"Hq={hq} must be a positive multiple of Hkv={hkv}")
    if page_size <= 0 or page_size & (page_size - 1):
        raise ValueError(f"page_size must be a power of two, got {page_size}")
    if page_table.dim() == 2:
        per_head = False
        if page_table.shape[0] != n:
            raise ValueError(f"page_table {tuple(page_table.shape)} must be [N={n}, max_pages]")
    elif page_table.dim() == 3:
        per_head = True
        if page_table.shape[0] != n or page_table.shape[1] != hkv:
            raise ValueError(f"page_table {tuple(page_table.shape)} must be [N={n}, Hkv={hkv}, max_pages]")
    else:
        raise ValueError(f"page_table must be [N, max_pages] or [N, Hkv, max_pages], got {tuple(page_table.shape)}")
    if kv_len.dtype != torch.int32:
        raise ValueError(f"kv_len must be int32, got {kv_len.dtype}; use .to(torch.int32)")
    if kv_len.dim() == 1 and kv_len.shape[0] == n:
        kv_len = kv_len[:, None].expand(n, hkv)
    if tuple(kv_len.shape) != (n, hkv):
        raise ValueError(f"kv_len must be [N={n}, Hkv={hkv}] (or [N]), got {tuple(kv_len.shape)}")
    return hkv, page_size, per_head, pool, kv_len


# Below this many K/V tiles per SM (a KV head's tiles x N x Hkv / SMs: what one wave of 128-row
# programs would give each SM), blocks of 65-128 rows per KV head run as two 64-row, 4-warp row
# blocks instead of `default_config`'s 128 rows and 8 warps. H100, N=1 T=32, graph replays
# (benchmarks/RESULTS.md, 2026-12-06, eighteenth session): 64-row blocks were 13% / 12% / 4% / 1%
# faster over 5% and 10% of 32K and 128K (1.6-12.8 tiles per SM), and 2-3.5% slower over all of
# 32K and 128K (32-128 tiles per SM).
SHORT_WORK_TILES_PER_SM = 16


def default_config(rows: int, head_dim: int, page_size: int, device: torch.device,
                   tiles_per_sm: float | None = None) -> dict:
    """Tile sizes and launch options for `paged_attention` (each can be overridden by keyword).

    rows = G * T queries per KV head. On the GPU: BLOCK_M covers the rows (at most 128 per
    program), BLOCK_N = 64 tokens (at least one page), 8 warps for 128-row tiles, 3 stages
    (fewer when a K+V tile is large: the stages share about 228 KB of shared memory on Hopper).
    tiles_per_sm (K/V tiles per KV head x N x Hkv / SMs): below `SHORT_WORK_TILES_PER_SM`, 65-128
    rows take two 64-row blocks of 4 warps, which fill the GPU with half the splits.
    """
    block_m = max(16, min(128, triton.next_power_of_2(rows)))
    block_n = max(64, page_size)
    if device.type != "cuda":
        return dict(block_m=block_m, block_n=block_n, num_warps=4, num_stages=1)
    if tiles_per_sm is not None and tiles_per_sm < SHORT_WORK_TILES_PER_SM and 64 < rows <= 128:
        block_m = 64
    block_d = max(16, triton.next_power_of_2(head_dim))
    kv_tile_bytes = 2 * block_n * block_d * 2
    stages = 3 if kv_tile_bytes <= 32768 else 2 if kv_tile_bytes <= 65536 else 1
    return dict(block_m=block_m, block_n=block_n, num_warps=8 if block_m >= 128 else 4,
                num_stages=stages)


# Pages that each chained attention program prefetches into L2 before it waits (`_prefetch_pages_l2`),
# when not told (prefetch_pages None). H100, N=1 over 5-10% of 32K and 128K, 16-token pages, per
# call in a graph of 8 (benchmarks/RESULTS.md, 2026-12-06, nineteenth session; `benchmarks.kernels
# --prefetch-pages`): 2 per program was the best count or within 0.2 us of it in every row (T=32
# 128K 5%: 17.7 us against 18.6 without a prefetch); whole splits (64 pages) were 5-23% slower
# than 2 per program.
DEFAULT_PREFETCH_PAGES_PER_PROGRAM = 2

# K/V offsets below this many elements are computed in 32 bits inside the attention kernel.
INT32_OFFSETS_BELOW = 2 ** 31


def merge_rows_per_program(rows: int) -> int:
    """Rows per merge program. Many rows (batch 6: 6-12K): 4 rows of 128 dims over 2 warps, one
    16-byte load per thread per split. Few rows (N=1: 512-1024): one row per 1-warp program, so
    the grid still puts several warps on every SM to wait on the partials' loads (4 rows per
    program left one warp per scheduler: 12.6 us against 6 us for N=1's 26 splits, under ncu)."""
    return 4 if rows >= 4096 else 1


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
# Tiles per split from which `paged_attention` runs the warp-specialised kernel by default: below
# it, its fixed cost per program outweighs the overlap (H100, N=1 T=32 over 5-10% of 128K, 16
# splits of 6-13 tiles: 7-14% slower than the Triton kernel; batch 6, 26-103 tiles: 5-14% faster).
WS_MIN_TILES_PER_SPLIT = 16


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
                  device: torch.device, *, num_splits: int | None = None, block_m: int | None = None,
                  block_n: int | None = None, num_warps: int | None = None,
                  num_stages: int | None = None, warp_specialized: bool = False) -> dict:
    """Everything `paged_attention` decides before launching, for callers that preallocate
    (CUDA graphs) or tune. Returns dict(block_m, block_n, num_warps, num_stages, row_blocks,
    num_splits (the effective count: splits that would start past the end are dropped),
    split_tokens (a multiple of page_size), workspace_numel (fp32 elements of the split workspace; 0 for one split)).
    warp_specialized: the Gluon kernel's plan (`paged_attention_ws`): 64 rows per consumer
    warpgroup, one or two per program (block_m 64 or 128), num_warps 4 (its producer), 4 stages,
    and its own split model. Pass what `paged_attention` runs: `uses_warp_specialized` says what
    its default (None) picks."""
    # Cached: eager callers (a herald block's step 0) pay this on every layer's call.
    return dict(_plan(n, hq, t, head_dim, hkv, page_size, max_pages, device, num_splits, block_m, block_n,
                      num_warps, num_stages, warp_specialized))


@functools.lru_cache(maxsize=4096)
def _plan(n: int, hq: int, t: int, head_dim: int, hkv: int, page_size: int, max_pages: int, device: torch.device,
          num_splits: int | None, block_m: int | None, block_n: int | None, num_warps: int | None,
          num_stages: int | None, warp_specialized: bool) -> dict:
    rows = hq // hkv * t
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else None
    max_tokens = max(1, max_pages * page_size)
    cfg = default_config(rows, head_dim, page_size, device)
    if warp_specialized:
        cfg = dict(block_m=64 if rows <= 64 else 128, block_n=max(64, page_size), num_warps=4, num_stages=4)
        if block_m not in (None, cfg["block_m"]):
            raise ValueError(f"warp_specialized takes block_m {cfg['block_m']} for {rows} rows per KV head "
                             f"(64 per consumer warpgroup); got {block_m}")
        if num_warps not in (None, 4):
            raise ValueError(f"warp_specialized runs num_warps=4 (its producer); got {num_warps}")
    bn = max(block_n or cfg["block_n"], page_size)
    if not warp_specialized and block_m is None and num_warps is None and sms is not None:
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
        paired = not warp_specialized and bm == 64 and warps == 4 and row_blocks > 1
        wave_programs = n * hkv * (triton.cdiv(row_blocks, 2) if paired else row_blocks)
        num_splits = default_num_splits(wave_programs, max_tokens, bn, rows, sms,
                                        _WS_PROGRAM_OVERHEAD_TILES if warp_specialized else _PROGRAM_OVERHEAD_TILES)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    # Splits start at pages, not tiles: a split then has as many tiles as with tile-aligned
    # bounds but no more tokens than it needs, and a requested count is kept (33 splits of 2048
    # pages stay 33; bounds at 64-token tiles would make them 32).
    split_tokens = triton.cdiv(triton.cdiv(max_tokens, num_splits), page_size) * page_size
    num_splits = triton.cdiv(max_tokens, split_tokens)
    return dict(block_m=bm, block_n=bn, num_warps=warps,
                num_stages=num_stages or cfg["num_stages"], row_blocks=row_blocks,
                num_splits=num_splits, split_tokens=split_tokens,
                workspace_numel=workspace_numel(n, hq, t, head_dim, num_splits))


@functools.lru_cache(maxsize=4096)
def uses_warp_specialized(n: int, hq: int, t: int, head_dim: int, hkv: int, page_size: int, max_pages: int,
                          device: torch.device, dtype: torch.dtype, num_splits: int | None = None) -> bool:
    """Whether `paged_attention` runs the warp-specialised kernel when not told (warp_specialized
    None), given no scores, K/V in GPU memory and no tile overrides: on sm_90, for 16-bit inputs
    of head_dim 64 or 128 with >= 128 query rows per KV head (two consumer warpgroups), when its
    plan leaves each split at least `WS_MIN_TILES_PER_SPLIT` K/V tiles."""
    rows = hq // hkv * t
    if (rows < 128 or head_dim not in (64, 128) or dtype not in (torch.float16, torch.bfloat16)
            or not warp_specialized_supported(device)):
        return False
    plan = launch_config(n, hq, t, head_dim, hkv, page_size, max_pages, device, num_splits=num_splits,
                         warp_specialized=True)
    return plan["split_tokens"] >= WS_MIN_TILES_PER_SPLIT * plan["block_n"]


def chains_attention(device: torch.device, warp_specialized: bool, row_blocks: int, prefetches: bool = False) -> bool:
    """Whether `paged_attention` (pdl None) launches its attention kernel as a programmatic
    dependent of the kernel before it: where PDL is supported, for the warp-specialised kernel,
    several row blocks, or a Triton kernel that can prefetch its first pages into L2 before its
    wait (prefetches: K/V in GPU memory, `_prefetch_blocker`). Per call in a graph of 8 (H100,
    benchmarks/RESULTS.md, 2026-12-06): chained, 2-7% faster with two row blocks (N=1 T=32) and
    0.4-1% with the warp-specialised kernel (batch 6), but 2-3% slower with one row block (N=1
    T=16; eighteenth session). With the prefetch, one row block is 1-3% faster than unchained at
    32K and level at 128K (nineteenth session; as a graph's only call, 0.2-0.35 us slower)."""
    return pdl_supported(device) and (warp_specialized or row_blocks > 1 or prefetches)


def workspace_numel(n: int, hq: int, t: int, head_dim: int, num_splits: int) -> int:
    """fp32 elements of the split workspace: partial out [rows, splits, D] then lse [rows, splits]."""
    return 0 if num_splits <= 1 else n * hq * t * num_splits * (head_dim + 1)


def paged_attention(
    q: torch.Tensor,
    k_pages: KVTensor,
    v_pages: KVTensor,
    page_table: torch.Tensor,
    kv_len: torch.Tensor,
    *,
    scale: float,
    return_page_scores: bool = False,
    return_token_scores: bool = False,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    page_scores: torch.Tensor | None = None,
    token_scores: torch.Tensor | None = None,
    workspace: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    k_block: torch.Tensor | None = None,
    v_block: torch.Tensor | None = None,
    partial_dtype: torch.dtype | None = None,
    pdl: bool | None = None,
    warp_specialized: bool | None = None,
    prefetch_pages: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Attention of a block of queries over a paged context (no causal mask inside the context),
    and optionally over the block's own keys too.

    q [N, Hq, T, D] (bf16/fp16/fp32; Hq = G * Hkv, query head h uses KV head h // G).
    k_pages, v_pages: store layout [num_pages, Hkv, page_size, D] or pool layout
      [num_slots, page_size, D]; GPU tensors, or pinned host tensors (bare or in `HostPointer`),
      read zero-copy over PCIe. Same dtype as q, same strides as each other, last dim contiguous.
    page_table int32: [N, max_pages] (store, shared by heads) or [N, Hkv, max_pages] (per head;
      required for the pool). Entries at and beyond cdiv(kv_len, page_size) may be loaded, but no
      K/V is read through them.
    kv_len int32 [N, Hkv] (or [N]): valid tokens per list; clamped to [0, max_pages * page_size]
      inside the kernel (not checked on the host, which would need a device sync).
    scale: softmax scale, > 0 (usually D ** -0.5).
    return_page_scores / return_token_scores (or passing the buffers): also compute, per KV head,
      the block-mean query's scores: token_scores [N, Hkv, max_pages * page_size] fp32 =
      scale * q_mean . k, page_scores [N, Hkv, max_pages] fp32 = max over each page's valid
      tokens; -inf beyond kv_len.
    num_splits: split-KV factor (default: `default_num_splits`). out/lse/page_scores/token_scores:
      optional contiguous output buffers. workspace: optional fp32 buffer of at least
      `launch_config(...)["workspace_numel"]` elements for the split partials (with all buffers
      given, a call allocates nothing, so it can be captured in a CUDA graph and replayed).
      block_m/block_n/num_warps/num_stages: tuning overrides (block_n is raised to page_size).
    k_block, v_block: [N, Hkv, T, D] on q's device, q's dtype: the block's own K/V, T more keys
      every query sees (bidirectional), attended in the same launch; out and lse then cover
      [context, block]. The scores stay context-only.
    partial_dtype: dtype of the split partial outputs in the workspace (default: q's dtype for
      fp16, and for bf16 on the GPU, so the merge moves half the bytes; fp32 otherwise). Their lse
      stays fp32, so the merge's weights are exact; the partials round like the output does.
    pdl: launch the attention kernel (either one: the Triton kernel or `paged_attention_ws`'s) as a
      programmatic dependent of the stream's previous kernel, and the merge as one of the attention
      kernel. Each waits for its predecessor before its first read, so only launches overlap: the
      merge's with the attention's last programs, and a layer's attention with the previous layer's
      merge, which lets it launch once it has waited. Default (None), where supported
      (`pdl_supported`): the merge always; the attention kernel when it is the warp-specialised one,
      has several row blocks, or prefetches (below; `chains_attention`: where that measured faster).
    warp_specialized: run the attention as `paged_attention_ws`'s Gluon kernel (a cp.async producer
      warpgroup and one or two wgmma consumer warpgroups; sm_90 GPUs only, 16-bit q, head_dim 64
      or 128, K/V in GPU memory, no scores), True or False; None (default): where
      `uses_warp_specialized` says so (long splits of >= 128 rows per KV head, no tuning overrides).

    prefetch_pages: with the Triton attention kernel chained (above) and K/V in GPU memory, each
      program first asks L2 for its split's first this-many pages (K and V, one bulk prefetch
      each; at most 128 per warp of a row block), then waits for the kernel before it: HBM
      streams them while that kernel ends. A prefetch changes no value, so this is safe whatever
      that kernel writes. 0: none; None (default): `DEFAULT_PREFETCH_PAGES_PER_PROGRAM` per row
      block where chained and allowed, else none. Passing it (> 0) also picks the Triton kernel
      when warp_specialized is None.

    Host work per call: shape checks, one (or, with splits, two) kernel launches; no device sync.
    Returns (out [N, Hq, T, D] in q's dtype, lse [N, Hq, T] fp32 natural log (-inf for an empty
    context, where out is 0), page_scores or None, token_scores or None).
    """
    hkv, page_size, per_head, pool, kv_len = _describe_layout(q, k_pages, v_pages, page_table, kv_len)
    if not scale > 0:
        raise ValueError(f"scale must be positive (usually head_dim ** -0.5), got {scale}")
    n, hq, t, d = q.shape
    dev = q.device
    max_pages = page_table.shape[-1]
    want_pages = return_page_scores or page_scores is not None
    want_tokens = return_token_scores or token_scores is not None

    if page_table.device != dev or kv_len.device != dev:
        raise ValueError(f"page_table ({page_table.device}) and kv_len ({kv_len.device}) must be on "
                         f"q's device {dev}")
    k, v = k_pages, v_pages
    if dev.type == "cuda":
        # Pinned host tensors are read zero-copy (wrapped here if the caller did not); pageable
        # ones are refused by kernel_arg with a message saying to pin them.
        if not isinstance(k, HostPointer):
            k = kernel_arg(k, "k_pages", True)
        if not isinstance(v, HostPointer):
            v = kernel_arg(v, "v_pages", True)
        for name, x in (("k_pages", k), ("v_pages", v)):
            if not isinstance(x, HostPointer) and x.device != dev:
                raise ValueError(f"{name} is on {x.device}; q is on {dev}")
    else:
        # The CPU interpreter reads host tensors directly; it cannot take the pointer wrapper.
        k, v = _unwrap(k), _unwrap(v)
        if k.device != dev or v.device != dev:
            raise ValueError(f"k_pages ({k.device}) and v_pages ({v.device}) must be on q's device {dev}")
    k_strides = k.stride()
    if k_strides != v.stride():
        raise ValueError(f"k_pages and v_pages must have the same strides (one store); got {k_strides} "
                         f"and {v.stride()}")
    if k_strides[-1] != 1:
        raise ValueError(f"k_pages / v_pages must be contiguous in head_dim (stride {k_strides[-1]})")
    if q.stride(-1) != 1:
        q = q.contiguous()
    has_block = _check_block(k_block, v_block, q, hkv)

    out = _buffer(out, (n, hq, t, d), q.dtype, dev, "out")
    lse = _buffer(lse, (n, hq, t), torch.float32, dev, "lse")
    pscores = _buffer(page_scores, (n, hkv, max_pages), torch.float32, dev, "page_scores") \
        if want_pages else None
    tscores = _buffer(token_scores, (n, hkv, max_pages * page_size), torch.float32, dev,
                      "token_scores") if want_tokens else None
    if n == 0 or t == 0:
        return out, lse, pscores, tscores
    if max_pages == 0 and not has_block:
        out.zero_()
        lse.fill_(float("-inf"))
        return out, lse, pscores, tscores

    if warp_specialized is None:
        warp_specialized = (block_m is None and block_n is None and num_warps is None and num_stages is None
                            and not prefetch_pages and not (want_pages or want_tokens)
                            and not isinstance(k, HostPointer)
                            and uses_warp_specialized(n, hq, t, d, hkv, page_size, max_pages, dev, q.dtype,
                                                      num_splits))
    cfg = launch_config(n, hq, t, d, hkv, page_size, max_pages, dev, num_splits=num_splits,
                        block_m=block_m, block_n=block_n, num_warps=num_warps, num_stages=num_stages,
                        warp_specialized=warp_specialized)
    splits = cfg["num_splits"]
    upcast = dev.type != "cuda"
    if splits > 1:
        need = cfg["workspace_numel"]
        if workspace is None:
            workspace = torch.empty(need, dtype=torch.float32, device=dev)
        elif (workspace.dtype != torch.float32 or workspace.device != dev or not workspace.is_contiguous()
              or workspace.numel() < need):
            raise ValueError(f"workspace must be a contiguous fp32 tensor on {dev} with >= {need} elements "
                             f"({splits} splits); got {workspace.numel()} {workspace.dtype} on {workspace.device}")
        partials, partial_lse = _split_workspace(workspace, n * hq * t, splits, d,
                                                 _partial_dtype(partial_dtype, q.dtype, upcast))
    else:
        partials = partial_lse = lse  # never dereferenced: the kernel writes the final output itself
    prefetch_blocker = _prefetch_blocker(k, page_size, warp_specialized)
    if pdl is None:
        use_pdl = splits > 1 and pdl_supported(dev)
        chain = chains_attention(dev, warp_specialized, cfg["row_blocks"], prefetches=prefetch_blocker is None)
    else:
        use_pdl, chain = splits > 1 and pdl, pdl
    if pdl and not pdl_supported(dev):
        raise ValueError(f"pdl=True needs a CUDA device of compute capability 9.0+ and a Triton with "
                         f"launch_pdl; {dev} does not have both (pass pdl=None or False)")
    block_d = max(16, triton.next_power_of_2(d))
    if pool:
        k_strides = (k_strides[0], 0, k_strides[1])
    else:
        k_strides = k_strides[:3]
    pt_strides = page_table.stride()
    if not per_head:
        pt_strides = (pt_strides[0], 0, pt_strides[1])
    q_strides = q.stride()
    b_strides = k_block.stride()[:3] if has_block else (0, 0, 0)
    offsets_64 = _max_offset(_unwrap(k_pages)) >= INT32_OFFSETS_BELOW
    attention_pdl = dict(launch_pdl=True) if chain else {}
    prefetch = _prefetch_plan(prefetch_pages, chain, prefetch_blocker, k, page_size, cfg)
    if warp_specialized:
        _check_warp_specialized(q, k, want_pages or want_tokens, page_size, cfg)
        from .paged_attention_ws import CONSUMER_REGS, ROWS_PER_CONSUMER, ws_paged_attention_kernel

        ws_paged_attention_kernel[(n * hkv * cfg["row_blocks"], splits)](
            q, k, v, page_table, kv_len,
            k_block if has_block else q, v_block if has_block else q,
            out, lse, partials, partial_lse, float(scale),
            q_strides[0], q_strides[1], q_strides[2], *k_strides, *pt_strides,
            kv_len.stride(0), kv_len.stride(1), *b_strides,
            max_pages, cfg["split_tokens"], splits,
            HKV=hkv, G=hq // hkv, T=t, HEAD_DIM=d, ROW_BLOCKS=cfg["row_blocks"], BLOCK_N=cfg["block_n"],
            PAGE=page_size, STAGES=cfg["num_stages"], CONSUMERS=cfg["block_m"] // ROWS_PER_CONSUMER,
            CONSUMER_REGS=CONSUMER_REGS, WRITE_FINAL=splits == 1, HAS_BLOCK=has_block, OFFSETS_64=offsets_64,
            USE_PDL=use_pdl, AFTER_PRIOR=chain, num_warps=4, **attention_pdl,
        )
    else:
        _paged_attention_kernel[(n * hkv * cfg["row_blocks"], splits)](
            q, k, v, page_table, kv_len,
            k_block if has_block else q, v_block if has_block else q,  # unread without a block
            out, lse, partials, partial_lse,
            lse if pscores is None else pscores, lse if tscores is None else tscores,  # unread if off
            float(scale),
            q_strides[0], q_strides[1], q_strides[2], *k_strides, *pt_strides,
            kv_len.stride(0), kv_len.stride(1), *b_strides,
            max_pages, cfg["split_tokens"], splits, _unwrap(k).shape[0], prefetch["pages"],
            HKV=hkv, G=hq // hkv, T=t, HEAD_DIM=d, BLOCK_D=block_d,
            BLOCK_M=cfg["block_m"], ROW_BLOCKS=cfg["row_blocks"], BLOCK_N=cfg["block_n"], PAGE=page_size,
            WRITE_FINAL=splits == 1, HAS_BLOCK=has_block, PAGE_SCORES=want_pages, TOKEN_SCORES=want_tokens,
            UPCAST=upcast, DOT_PRECISION="ieee" if (upcast or q.dtype == torch.float32) else "tf32",
            USE_PDL=use_pdl, AFTER_PRIOR=chain, OFFSETS_64=offsets_64, PREFETCH_WIDTH=prefetch["width"],
            PAGE_BYTES=prefetch["page_bytes"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
            **attention_pdl,
        )
    if splits > 1:
        pdl_kwargs = dict(launch_pdl=True) if use_pdl else {}
        rows = n * hq * t
        block_r = merge_rows_per_program(rows)
        # A chunk's loads wait on memory together: up to 32 splits of one row (N=1's 16-32 splits
        # in one round trip), or 16 splits of 4 rows (for registers).
        chunk = min(triton.next_power_of_2(splits), 32 if block_r == 1 else 16)
        _merge_splits_kernel[(triton.cdiv(rows, block_r),)](
            partials, partial_lse, out, lse, rows, splits,
            BLOCK_R=block_r, CHUNK_S=chunk,
            HEAD_DIM=d, BLOCK_D=block_d, USE_PDL=use_pdl, num_warps=max(1, block_r * block_d // 256),
            **pdl_kwargs,
        )
    return out, lse, pscores, tscores


def _check_warp_specialized(q: torch.Tensor, k: KVTensor, scores: bool, page_size: int, cfg: dict) -> None:
    """Refuse, saying what to change, what `paged_attention_ws`'s kernel cannot run."""
    if not warp_specialized_supported(q.device):  # first: an older Triton cannot import that module
        raise ValueError(f"warp_specialized=True needs an sm_90 (Hopper) GPU for wgmma and Triton 3.6+'s Gluon; "
                         f"{q.device} with triton {triton.__version__} is not that (pass warp_specialized=False)")
    from .paged_attention_ws import ws_shared_bytes

    if q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"warp_specialized=True takes bf16 or fp16 q/K/V, got {q.dtype}")
    if q.shape[-1] not in (64, 128):
        raise ValueError(f"warp_specialized=True takes head_dim 64 or 128, got {q.shape[-1]}")
    if isinstance(k, HostPointer):
        raise ValueError("warp_specialized=True reads K/V from GPU memory; pass warp_specialized=False "
                         "to read the pinned host store over PCIe")
    if scores:
        raise ValueError("warp_specialized=True computes no page or token scores; pass warp_specialized=False "
                         "for the scoring pass")
    if cfg["block_n"] % page_size or cfg["block_n"] not in (64, 128):
        raise ValueError(f"warp_specialized=True takes block_n 64 or 128, a multiple of the page size "
                         f"{page_size}; got {cfg['block_n']}")
    smem = ws_shared_bytes(cfg["block_m"] // 64, cfg["block_n"], q.shape[-1], cfg["num_stages"])
    if smem > 227 * 1024:
        raise ValueError(f"warp_specialized=True with block_n={cfg['block_n']} and num_stages={cfg['num_stages']} "
                         f"needs {smem} bytes of shared memory (227 KB per program); use fewer stages")


def _prefetch_blocker(k: KVTensor, page_size: int, warp_specialized: bool) -> str | None:
    """Why the attention kernel could not prefetch K/V pages into L2 (`_prefetch_pages_l2`), or None."""
    if warp_specialized:
        return "the warp-specialised kernel does not prefetch (pass warp_specialized=False)"
    if isinstance(k, HostPointer):
        return "K/V are not in GPU memory"
    if k.shape[0] == 0:
        return "the store has no pages"  # no address to clamp stale table entries into
    # One bulk prefetch per page: the page's tokens must be one contiguous run of 16-byte units.
    size = k.element_size()
    if (k.stride(-2) != k.shape[-1] or (page_size * k.shape[-1] * size) % 16 or k.data_ptr() % 16
            or any((st * size) % 16 for st in k.stride()[:-2])):
        return "a page's K (or V) is not one contiguous, 16-byte aligned run"
    return None if k.is_cuda else "K/V are not in GPU memory"


def _prefetch_plan(prefetch_pages: int | None, chain: bool, blocker: str | None, k: KVTensor, page_size: int,
                   cfg: dict) -> dict:
    """The Triton kernel's L2 prefetch before its wait (`_prefetch_pages_l2`): dict(pages (per
    split), width (PREFETCH_WIDTH: entries per program; 0 = off), page_bytes). Asked for
    (prefetch_pages > 0) where it cannot run, it refuses, saying what to change."""
    off = dict(pages=0, width=0, page_bytes=0)
    if prefetch_pages is not None and prefetch_pages < 0:
        raise ValueError(f"prefetch_pages must be >= 0 (0: none), got {prefetch_pages}")
    if prefetch_pages == 0:
        return off
    if not chain:
        blocker = "the attention kernel is not chained after the kernel before it (pass pdl=True)"
    if blocker is not None:
        if prefetch_pages is None:
            return off
        raise ValueError(f"prefetch_pages={prefetch_pages} cannot run here: {blocker}; pass prefetch_pages=0 or None")
    # Four entries per thread, most of them masked off: a smaller tensor would be replicated across
    # the program's threads (a load may give each thread up to 4 adjacent int32), and every copy
    # would issue its own prefetch.
    width = 4 * 32 * cfg["num_warps"]
    if prefetch_pages is None:
        prefetch_pages = DEFAULT_PREFETCH_PAGES_PER_PROGRAM * cfg["row_blocks"]
    pages = min(cfg["split_tokens"] // page_size, prefetch_pages, width * cfg["row_blocks"])
    return dict(pages=pages, width=width if pages else 0, page_bytes=page_size * k.shape[-1] * k.element_size())


def _max_offset(x: torch.Tensor) -> int:
    """The largest element offset from x's first element (any strides)."""
    return sum((size - 1) * stride for size, stride in zip(x.shape, x.stride()) if size > 0)


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


def _split_workspace(workspace: torch.Tensor, rows: int, splits: int, head_dim: int,
                     dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(partials [rows * splits * head_dim] in dtype, lse [rows * splits] fp32) inside the fp32
    workspace: the partials at its start (16-bit ones fill half their fp32 region), the lse after
    that region, so one workspace size (`workspace_numel`) serves every partial dtype."""
    region = rows * splits * head_dim
    partials = workspace[:region]
    if dtype != torch.float32:
        partials = partials.view(dtype)[:region]
    return partials, workspace[region:region + rows * splits]


def _check_block(k_block: torch.Tensor | None, v_block: torch.Tensor | None, q: torch.Tensor, hkv: int) -> bool:
    """Whether a block part was given, after checking it against q [N, Hq, T, D]."""
    if k_block is None and v_block is None:
        return False
    if k_block is None or v_block is None:
        raise ValueError("give both k_block and v_block, or neither")
    n, _, t, d = q.shape
    want = (n, hkv, t, d)
    for name, x in (("k_block", k_block), ("v_block", v_block)):
        if tuple(x.shape) != want or x.dtype != q.dtype or x.device != q.device:
            raise ValueError(f"{name} must be {want} {q.dtype} on {q.device} (the block's own K/V); got "
                             f"{tuple(x.shape)} {x.dtype} on {x.device}")
        if x.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in head_dim (stride {x.stride(-1)})")
    if k_block.stride() != v_block.stride():
        raise ValueError(f"k_block and v_block must share strides; got {k_block.stride()} and {v_block.stride()}")
    return True


def _buffer(buf, shape, dtype, dev, name):
    """buf checked against (shape, dtype, device, contiguous), or a new empty tensor."""
    if buf is None:
        return torch.empty(shape, dtype=dtype, device=dev)
    if buf.shape != shape or buf.dtype != dtype or buf.device != dev or not buf.is_contiguous():
        raise ValueError(f"{name} buffer must be contiguous {tuple(shape)} {dtype} on {dev}; got "
                         f"{tuple(buf.shape)} {buf.dtype} on {buf.device}")
    return buf


def _gather_context(k_pages, v_pages, page_table, kv_len, n, h, page_size, pool, per_head, device):
    """K, V [L, D] of list (n, h) in context order (reference helper)."""
    k, v = _unwrap(k_pages), _unwrap(v_pages)
    length = int(kv_len[n, h])
    n_pages = -(-length // page_size)
    entries = (page_table[n, h] if per_head else page_table[n])[:n_pages].long().to(k.device)
    if pool:
        kc, vc = k[entries], v[entries]
    else:
        kc, vc = k[entries, h], v[entries, h]
    d = kc.shape[-1]
    return kc.reshape(-1, d)[:length].to(device), vc.reshape(-1, d)[:length].to(device)


def paged_attention_reference(
    q: torch.Tensor,
    k_pages: KVTensor,
    v_pages: KVTensor,
    page_table: torch.Tensor,
    kv_len: torch.Tensor,
    *,
    scale: float,
    return_page_scores: bool = False,
    return_token_scores: bool = False,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Plain-torch `paged_attention`: gather each list's pages, softmax in fp32. num_splits is ignored."""
    hkv, page_size, per_head, pool, kv_len = _describe_layout(q, k_pages, v_pages, page_table, kv_len)
    n, hq, t, d = q.shape
    g = hq // hkv
    max_pages = page_table.shape[-1]
    max_tokens = max_pages * page_size
    lengths = kv_len.cpu()
    if lengths.numel() and (int(lengths.min()) < 0 or int(lengths.max()) > max_tokens):
        raise ValueError(f"kv_len must lie in [0, max_pages * page_size = {max_tokens}]; got "
                         f"[{int(lengths.min())}, {int(lengths.max())}]")
    table = page_table.cpu()
    out = torch.zeros(n, hq, t, d, dtype=torch.float32, device=q.device)
    lse = torch.full((n, hq, t), float("-inf"), dtype=torch.float32, device=q.device)
    tscores = torch.full((n, hkv, max_tokens), float("-inf"), dtype=torch.float32, device=q.device)
    for b in range(n):
        for h in range(hkv):
            length = int(lengths[b, h])
            if length == 0:
                continue
            kc, vc = _gather_context(k_pages, v_pages, table, lengths, b, h, page_size, pool, per_head,
                                     q.device)
            qg = q[b, h * g:(h + 1) * g].float()  # [G, T, D]
            s = torch.matmul(qg, kc.float().T) * scale  # [G, T, L]
            lse[b, h * g:(h + 1) * g] = torch.logsumexp(s, dim=-1)
            out[b, h * g:(h + 1) * g] = torch.matmul(torch.softmax(s, dim=-1), vc.float())
            q_mean = qg.reshape(-1, d).mean(dim=0)
            tscores[b, h, :length] = (kc.float() @ q_mean) * scale
    pscores = tscores.reshape(n, hkv, max_pages, page_size).amax(dim=-1) if max_pages else \
        torch.empty(n, hkv, 0, device=q.device)
    return (out.to(q.dtype), lse, pscores if return_page_scores else None,
            tscores if return_token_scores else None)


def block_attention(
    q: torch.Tensor,
    k_block: torch.Tensor,
    v_block: torch.Tensor,
    k_pages: KVTensor,
    v_pages: KVTensor,
    page_table: torch.Tensor,
    kv_len: torch.Tensor,
    *,
    scale: float,
    return_page_scores: bool = False,
    return_token_scores: bool = False,
    **kernel_kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Attention of a block's queries over [paged context, the block's own K/V] (bidirectional),
    in one kernel launch (plus the split merge): the block's keys are the last tile of split 0.

    q [N, Hq, T, D]; k_block, v_block [N, Hkv, T, D]; the paged arguments as in
    `paged_attention` (kernel_kwargs go to it: num_splits, block_n, ...). Returns
    (out [N, Hq, T, D] in q's dtype, page_scores or None, token_scores or None); the scores cover
    the context only.
    """
    if k_block.stride(-1) != 1 or k_block.stride() != v_block.stride():
        k_block, v_block = k_block.contiguous(), v_block.contiguous()
    out, _, pscores, tscores = paged_attention(
        q, k_pages, v_pages, page_table, kv_len, scale=scale,
        return_page_scores=return_page_scores, return_token_scores=return_token_scores,
        k_block=k_block, v_block=v_block, **kernel_kwargs)
    return out, pscores, tscores


def block_attention_reference(
    q: torch.Tensor,
    k_block: torch.Tensor,
    v_block: torch.Tensor,
    k_pages: KVTensor,
    v_pages: KVTensor,
    page_table: torch.Tensor,
    kv_len: torch.Tensor,
    *,
    scale: float,
    return_page_scores: bool = False,
    return_token_scores: bool = False,
    **_ignored,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Plain torch `block_attention`: one softmax over [gathered context keys, block keys]."""
    hkv, page_size, per_head, pool, kv_len = _describe_layout(q, k_pages, v_pages, page_table, kv_len)
    n, hq, t, d = q.shape
    g = hq // hkv
    lengths, table = kv_len.cpu(), page_table.cpu()
    out = torch.empty(n, hq, t, d, dtype=torch.float32, device=q.device)
    for b in range(n):
        for h in range(hkv):
            kc, vc = _gather_context(k_pages, v_pages, table, lengths, b, h, page_size, pool, per_head,
                                     q.device)
            keys = torch.cat([kc.float(), k_block[b, h].float()])
            vals = torch.cat([vc.float(), v_block[b, h].float()])
            s = torch.matmul(q[b, h * g:(h + 1) * g].float(), keys.T) * scale
            out[b, h * g:(h + 1) * g] = torch.matmul(torch.softmax(s, dim=-1), vals)
    _, _, pscores, tscores = paged_attention_reference(
        q, k_pages, v_pages, page_table, kv_len, scale=scale,
        return_page_scores=return_page_scores, return_token_scores=return_token_scores)
    return out.to(q.dtype), pscores, tscores


__all__ = [
    "HostPointer", "paged_attention", "paged_attention_reference", "block_attention",
    "block_attention_reference",
    "chains_attention", "default_config", "default_num_splits", "launch_config", "merge_rows_per_program",
    "pdl_supported", "workspace_numel",
]
