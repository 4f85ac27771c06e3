"""The Triton kernels of split-KV paged attention: the attention kernel and the merge of its splits.

`paged_attention_kernel` attends a block of queries to a paged KV context. One kernel serves the
store layout (K, V [num_pages, Hkv, page_size, D], table [N, max_pages] or [N, Hkv, max_pages]) and
the pool layout (K, V [num_slots, page_size, D], table [N, Hkv, max_pages]), told apart only by
strides (a pool's head stride is 0, so is a shared table's). One program handles the G*T queries of
one KV head (or a row block of them), so each K/V tile is read once per KV head; the token range is
cut into splits (flash-decoding) that start at page boundaries. With one split the kernel writes the
final (out, lse) itself; with more, `merge_splits_kernel` merges the partial (out, lse) of the splits.

The same pass can score every context token with the block-mean query (mean of the G*T query
vectors of a KV head): token score = scale * q_mean . k, page score = max over a page's valid
tokens, taken from the K tile the attention already holds (K is never read twice).

`gpu_kernels.attention_plan` decides every constexpr and launch option below once per shape;
`gpu_kernels.paged_attention` launches them (and holds their plain-torch references).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .attention_common import launch_dependents, program_place, valid_end, wait_for_prior
from .kv_fp8 import fp8_dequantize


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
def paged_attention_kernel(
    q_ptr, k_ptr, v_ptr, pt_ptr, kvlen_ptr, kb_ptr, vb_ptr,
    out_ptr, lse_ptr, part_ptr, part_lse_ptr, pscore_ptr, tscore_ptr, ks_ptr, vs_ptr,
    sm_scale,
    stride_qn, stride_qh, stride_qt,
    stride_kp, stride_kh, stride_kt,
    stride_ptn, stride_pth, stride_pte,
    stride_ln, stride_lh,
    stride_bn, stride_bh, stride_bt,
    max_pages, split_tokens, num_splits, num_kv_pages, prefetch_pages,
    stride_sp, stride_sh,
    HKV: tl.constexpr, G: tl.constexpr, T: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, ROW_BLOCKS: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
    WRITE_FINAL: tl.constexpr, HAS_BLOCK: tl.constexpr,
    PAGE_SCORES: tl.constexpr, TOKEN_SCORES: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_PDL: tl.constexpr, AFTER_PRIOR: tl.constexpr,
    OFFSETS_64: tl.constexpr, PREFETCH_WIDTH: tl.constexpr, PAGE_BYTES: tl.constexpr, KV_FP8: tl.constexpr,
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
    lse (fp32) at part_lse[row * num_splits + split], merged by `merge_splits_kernel`.

    USE_PDL (Hopper+, with the merge launched as a programmatic dependent): each program lets the
    merge launch once its own tiles are done, so the merge's programs are launched while the
    grid's last programs write their partials rather than after the grid has ended.

    AFTER_PRIOR (launched as a programmatic dependent of the stream's previous kernel): every
    program first waits for that kernel (its q, K/V and tables may come from it), so only the
    launch and the programs' start overlap its end.

    PREFETCH_WIDTH > 0 (with AFTER_PRIOR; K/V pages of PAGE_BYTES contiguous bytes in GPU memory, of
    num_kv_pages pages or slots): before that wait, each program asks L2 for its split's first
    prefetch_pages pages (`_prefetch_pages_l2`), so HBM streams them while the kernel before ends.

    KV_FP8: K and V pages hold e4m3 codes (`gpu_kernels.kv_fp8`) with fp32 scales per (page, KV
    head) at ks/vs[page * stride_sp + kvh * stride_sh] (a pool's head stride is 0): every tile is
    dequantized as it is loaded (`fp8_dequantize`, one scale per token's page), to q's dtype, and
    the rest of the kernel runs as for 16-bit K/V. The block's own K/V stay in q's dtype.

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

    rb, kvh, n, split, lo, split_end = program_place(max_pages, split_tokens, HKV, ROW_BLOCKS, PAGE)
    pt_base = pt_ptr + n * stride_ptn + kvh.to(tl.int64) * stride_pth
    k_base = k_ptr + kvh.to(tl.int64) * stride_kh
    v_base = v_ptr + kvh.to(tl.int64) * stride_kh
    ks_base = ks_ptr + kvh.to(tl.int64) * stride_sh
    vs_base = vs_ptr + kvh.to(tl.int64) * stride_sh
    if PREFETCH_WIDTH > 0:
        _prefetch_pages_l2(pt_base, stride_pte, k_base, v_base, stride_kp, num_kv_pages, lo, split_end,
                           prefetch_pages, rb, ROW_BLOCKS, PAGE, PREFETCH_WIDTH, PAGE_BYTES)
    if AFTER_PRIOR:
        wait_for_prior()
    hi = valid_end(kvlen_ptr, stride_ln, stride_lh, n, kvh, max_pages, split_end, PAGE)
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
        if KV_FP8:
            k, v = _load_kv(k_base + kv_off, v_base + kv_off, kv_mask, False)
            k = fp8_dequantize(k, tl.load(ks_base + page * stride_sp, mask=tok_ok, other=0.0), q.dtype)
            v = fp8_dequantize(v, tl.load(vs_base + page * stride_sp, mask=tok_ok, other=0.0), q.dtype)
        else:
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
        launch_dependents()
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
def merge_splits_kernel(
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
        wait_for_prior()
        # The next call's attention, launched as this kernel's programmatic dependent, may launch now
        # and start its programs while the merge runs (it waits for the merge before its first read).
        launch_dependents()
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
