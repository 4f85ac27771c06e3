"""Compact quantized keys for selection: int8/int4 codes with per-group scales, scanned on the GPU (Triton).

Selection ranks context pages by the score of the selection queries of each (row, KV head) against
every key (one query, or several: a token then scores the max over them). Reading bf16 keys costs 2 bytes per element; a compact copy costs 1 (int8) or 1/2 (int4) plus
one scale per ``group_size`` elements, so the whole context's keys can stay resident on the GPU and
be scanned at HBM speed.

Quantization (symmetric, per group of ``group_size`` consecutive elements along D):
``scale = amax(|x|) / QMAX`` rounded to the scale dtype (fp16 by default, or fp32);
``code = round_half_away(x / scale)`` clamped to ``[-QMAX, QMAX]`` (QMAX = 127 for int8, 7 for int4;
an all-zero group gets scale 0 and codes 0); dequantized ``x ~= code * scale``.
Storage: bits=8 -> one int8 per element, ``[..., D]``; bits=4 -> uint8 ``[..., D/2]``, byte j holds
element 2j in its low nibble and 2j+1 in its high nibble, each as ``code + 8`` (1..15; a zero byte never
occurs, so it can mark unwritten memory in tests). Scales ``[..., D / group_size]``.

Paged compact store (same physical page ids as the host KV store, so its page tables index it):
codes ``[num_pages, Hkv, page_size, D or D/2]``, scales ``[num_pages, Hkv, page_size, D/group_size]``
(the last two dims contiguous). Logical page i of a row = positions ``i*P .. i*P+P-1``.

Kernels: `quantize_keys` / `quantize_into` (one kernel, flat or paged destination) and
`compact_page_scores` (the scan). Each has a plain-torch ``*_reference`` beside it. Arithmetic is
fp32 inside the kernels (fp16/bf16 inputs are upcast on load); divisions that decide codes use
IEEE-rounded division so the kernel's codes equal the reference's bit for bit.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

_QMAX = {8: 127, 4: 7}
_CODE_DTYPES = {8: torch.int8, 4: torch.uint8}
_SCALE_DTYPES = (torch.float16, torch.float32)
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INDEX_DTYPES = (torch.int32, torch.int64)


# ----------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _codes_of(x, s, QMAX: tl.constexpr):
    # x [.., G] fp32, s [.., 1] fp32 (already rounded to the storage dtype) -> int32 codes in [-QMAX, QMAX].
    # IEEE division (not the fast approximate one) so codes match the torch reference exactly.
    s = tl.broadcast_to(s, x.shape)
    ok = s > 0.0
    y = tl.where(ok, tl.math.div_rn(x, tl.where(ok, s, 1.0)), 0.0)
    c = (tl.abs(y) + 0.5).to(tl.int32)  # round half away from zero (truncation of a non-negative value)
    c = tl.minimum(c, QMAX)
    return tl.where(y < 0.0, -c, c)


@triton.jit(do_not_specialize=["num_rows", "T"])
def _quantize_kernel(
    k_ptr, codes_ptr, scales_ptr, pt_ptr, start_ptr,
    num_rows, T,
    stride_kn, stride_kh, stride_kt,
    stride_cp, stride_ch, stride_ct,
    stride_sp, stride_sh, stride_st,
    stride_ptn,
    HKV: tl.constexpr, HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, BITS: tl.constexpr, QMAX: tl.constexpr,
    PAGE: tl.constexpr, PAGED: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Rows r = (n, h, t) of k [N, HKV, T, HEAD_DIM] (r = (n * HKV + h) * T + t), BLOCK_R per program.

    PAGED: row (n, h, t) goes to position start[n] + t of row n's pages: page pt[n, pos // PAGE], slot
    pos % PAGE, head h. Otherwise it goes to codes[n, h, t] (a plain [N, HKV, T, .] output).
    """
    NG: tl.constexpr = HEAD_DIM // GROUP
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < num_rows
    t = r % T
    nh = r // T
    h = nh % HKV
    n = nh // HKV
    src = n * stride_kn + h * stride_kh + t * stride_kt
    if PAGED:
        pos = tl.load(start_ptr + n, mask=r_ok, other=0).to(tl.int64) + t
        page = tl.load(pt_ptr + n * stride_ptn + pos // PAGE, mask=r_ok, other=0).to(tl.int64)
        slot = pos % PAGE
    else:
        page = n
        slot = t
    dst_c = page * stride_cp + h * stride_ch + slot * stride_ct
    dst_s = page * stride_sp + h * stride_sh + slot * stride_st
    offs_g = tl.arange(0, NG)

    if BITS == 8:
        offs_d = tl.arange(0, HEAD_DIM)
        x = tl.load(k_ptr + src[:, None] + offs_d[None, :], mask=r_ok[:, None], other=0.0).to(tl.float32)
        xg = tl.reshape(x, (BLOCK_R, NG, GROUP))
        amax = tl.max(tl.abs(xg), axis=2)
        s = tl.math.div_rn(amax, tl.full((BLOCK_R, NG), QMAX, tl.float32))
        s = s.to(scales_ptr.dtype.element_ty).to(tl.float32)
        c = _codes_of(xg, s[:, :, None], QMAX)
        tl.store(codes_ptr + dst_c[:, None] + offs_d[None, :],
                 tl.reshape(c, (BLOCK_R, HEAD_DIM)).to(tl.int8), mask=r_ok[:, None])
    else:
        # Even and odd elements load as two half tiles: a group of GROUP elements is GROUP/2 of each,
        # and the two halves pack into one byte without an interleave.
        HALF: tl.constexpr = HEAD_DIM // 2
        offs_j = tl.arange(0, HALF)
        xa = tl.load(k_ptr + src[:, None] + 2 * offs_j[None, :], mask=r_ok[:, None], other=0.0).to(tl.float32)
        xb = tl.load(k_ptr + src[:, None] + 2 * offs_j[None, :] + 1, mask=r_ok[:, None], other=0.0).to(tl.float32)
        ga = tl.reshape(xa, (BLOCK_R, NG, GROUP // 2))
        gb = tl.reshape(xb, (BLOCK_R, NG, GROUP // 2))
        amax = tl.maximum(tl.max(tl.abs(ga), axis=2), tl.max(tl.abs(gb), axis=2))
        s = tl.math.div_rn(amax, tl.full((BLOCK_R, NG), QMAX, tl.float32))
        s = s.to(scales_ptr.dtype.element_ty).to(tl.float32)
        ca = tl.reshape(_codes_of(ga, s[:, :, None], QMAX), (BLOCK_R, HALF)) + 8
        cb = tl.reshape(_codes_of(gb, s[:, :, None], QMAX), (BLOCK_R, HALF)) + 8
        tl.store(codes_ptr + dst_c[:, None] + offs_j[None, :], (ca | (cb << 4)).to(tl.uint8),
                 mask=r_ok[:, None])
    tl.store(scales_ptr + dst_s[:, None] + offs_g[None, :], s.to(scales_ptr.dtype.element_ty),
             mask=r_ok[:, None])


@triton.jit
def _load_query(q_row, offs_c, sm_scale, BITS: tl.constexpr):
    """One selection query with the softmax scale folded in; bits=4 splits it into the even / odd
    elements that a byte's low / high nibble multiply."""
    if BITS == 8:
        qa = tl.load(q_row + offs_c).to(tl.float32) * sm_scale
        qb = qa
    else:
        qa = tl.load(q_row + 2 * offs_c).to(tl.float32) * sm_scale
        qb = tl.load(q_row + 2 * offs_c + 1).to(tl.float32) * sm_scale
    return qa, qb


@triton.jit
def _token_scores(ka, kb, qa, qb, sc, BITS: tl.constexpr, BLOCK_N: tl.constexpr, NG: tl.constexpr,
                  GW: tl.constexpr):
    """[BLOCK_N] scores of one query against a tile of codes (ka: the codes, or the low nibbles and
    kb the high ones) with their per-group scales sc [BLOCK_N, NG]."""
    if BITS == 8:
        prod = ka * qa[None, :]
    else:
        prod = ka * qa[None, :] + kb * qb[None, :]
    # One scale per group: sum the group's products first, then scale.
    part = tl.sum(tl.reshape(prod, (BLOCK_N, NG, GW)), axis=2)
    return tl.sum(part * sc, axis=1)


# max_pages, chunk_pages and the query count vary with every batch or block size: specialising on
# their divisibility would compile new variants in the middle of decoding.
@triton.jit(do_not_specialize=["max_pages", "chunk_pages", "num_queries", "stride_ptn"])
def _compact_scan_kernel(
    q_ptr, codes_ptr, scales_ptr, pt_ptr, kvlen_ptr, pscore_ptr, tscore_ptr,
    sm_scale, max_pages, chunk_pages, num_queries,
    stride_qn, stride_qh, stride_qr,
    stride_cp, stride_ch,
    stride_sp, stride_sh,
    stride_ptn, stride_pte,
    stride_ln, stride_lh,
    HKV: tl.constexpr, HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, BITS: tl.constexpr,
    PAGE: tl.constexpr, TILE_PAGES: tl.constexpr,
    PAGE_SCORES: tl.constexpr, TOKEN_SCORES: tl.constexpr,
    USE_DOT: tl.constexpr, R_PAD: tl.constexpr, DOT_FP16: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Grid (chunks, N * HKV). Program (c, n*HKV+h) scores table entries [c*chunk_pages, +chunk_pages)
    of row n, head h, TILE_PAGES pages (BLOCK_N tokens) per step. Token score = the max over the
    row's num_queries selection queries of sm_scale * q . dequant(k) (each tile is unpacked once for
    all of them); page score = max over its valid tokens; -inf at and beyond kv_len.
    USE_DOT: the queries (padded to R_PAD columns) multiply the dequantized tile on the tensor cores,
    as fp16 operands (DOT_FP16) or fp32 ones at DOT_PRECISION; else one query after the other on the
    CUDA cores."""
    NG: tl.constexpr = HEAD_DIM // GROUP
    BLOCK_N: tl.constexpr = TILE_PAGES * PAGE
    DC: tl.constexpr = HEAD_DIM * BITS // 8  # code bytes per token
    GW: tl.constexpr = GROUP * BITS // 8  # code bytes per group

    chunk = tl.program_id(0)
    nh = tl.program_id(1)
    h = nh % HKV
    n = (nh // HKV).to(tl.int64)
    max_tokens = max_pages * PAGE
    kvl = tl.load(kvlen_ptr + n * stride_ln + h * stride_lh)
    kvl = tl.minimum(tl.maximum(kvl, 0), max_tokens)
    lo = chunk * chunk_pages
    chunk_end = tl.minimum(lo + chunk_pages, max_pages)
    hi = tl.minimum(chunk_end, tl.cdiv(kvl, PAGE))  # entries holding at least one valid token
    tok_lim = tl.minimum(kvl, chunk_end * PAGE)  # never read another chunk's pages

    q_base = q_ptr + n * stride_qn + h.to(tl.int64) * stride_qh
    offs_c = tl.arange(0, DC)
    if USE_DOT:  # every query at once, as [DC, R_PAD] columns (the padding scores zero, masked below)
        offs_r = tl.arange(0, R_PAD)
        q_cols = q_base + offs_r[None, :] * stride_qr
        q_ok = offs_r[None, :] < num_queries
        if BITS == 8:
            qa_t = tl.load(q_cols + offs_c[:, None], mask=q_ok, other=0.0).to(tl.float32) * sm_scale
            qb_t = qa_t
        else:
            qa_t = tl.load(q_cols + 2 * offs_c[:, None], mask=q_ok, other=0.0).to(tl.float32) * sm_scale
            qb_t = tl.load(q_cols + 2 * offs_c[:, None] + 1, mask=q_ok, other=0.0).to(tl.float32) * sm_scale
        if DOT_FP16:
            qa_t = qa_t.to(tl.float16)
            qb_t = qb_t.to(tl.float16)
    else:
        qa, qb = _load_query(q_base, offs_c, sm_scale, BITS)  # the first query stays in registers

    offs_t = tl.arange(0, BLOCK_N)
    offs_e = tl.arange(0, TILE_PAGES)
    offs_g = tl.arange(0, NG)
    pt_base = pt_ptr + n * stride_ptn
    c_base = codes_ptr + h.to(tl.int64) * stride_ch
    s_base = scales_ptr + h.to(tl.int64) * stride_sh
    out_row = n * HKV + h
    # Page ids are loaded one tile ahead, so a tile's code loads do not wait on its table load.
    tok_next = lo * PAGE + offs_t
    page_next = tl.load(pt_base + (tok_next // PAGE) * stride_pte, mask=tok_next < tok_lim, other=0)
    for p0 in range(lo, hi, TILE_PAGES):
        tok = p0 * PAGE + offs_t
        tok_ok = tok < tok_lim
        page = page_next.to(tl.int64)
        tok_next = tok + BLOCK_N
        page_next = tl.load(pt_base + (tok_next // PAGE) * stride_pte, mask=tok_next < tok_lim, other=0)
        slot = tok % PAGE
        c_off = page * stride_cp + slot * DC
        s_off = page * stride_sp + slot * NG
        sc = tl.load(s_base + s_off[:, None] + offs_g[None, :], mask=tok_ok[:, None], other=0.0).to(tl.float32)
        if BITS == 8:
            ka = tl.load(c_base + c_off[:, None] + offs_c[None, :], mask=tok_ok[:, None], other=0).to(tl.float32)
            kb = ka
        else:
            byte = tl.load(c_base + c_off[:, None] + offs_c[None, :], mask=tok_ok[:, None], other=0).to(tl.int32)
            ka = ((byte & 15) - 8).to(tl.float32)
            kb = ((byte >> 4) - 8).to(tl.float32)
        if USE_DOT:
            sc_bytes = tl.reshape(tl.broadcast_to(sc[:, :, None], (BLOCK_N, NG, GW)), (BLOCK_N, DC))
            deq_a = ka * sc_bytes
            deq_b = kb * sc_bytes
            if DOT_FP16:
                deq_a = deq_a.to(tl.float16)
                deq_b = deq_b.to(tl.float16)
            acc = tl.dot(deq_a, qa_t, input_precision=DOT_PRECISION)
            if BITS == 4:
                acc = tl.dot(deq_b, qb_t, acc, input_precision=DOT_PRECISION)
            ts = tl.max(tl.where(offs_r[None, :] < num_queries, acc, float("-inf")), axis=1)
        else:
            ts = _token_scores(ka, kb, qa, qb, sc, BITS, BLOCK_N, NG, GW)
            for r in range(1, num_queries):
                qa_r, qb_r = _load_query(q_base + r * stride_qr, offs_c, sm_scale, BITS)
                ts = tl.maximum(ts, _token_scores(ka, kb, qa_r, qb_r, sc, BITS, BLOCK_N, NG, GW))
        ts = tl.where(tok_ok, ts, float("-inf"))
        if TOKEN_SCORES:
            tl.store(tscore_ptr + out_row * max_tokens + tok, ts, mask=tok < chunk_end * PAGE)
        if PAGE_SCORES:
            ps = tl.max(tl.reshape(ts, (TILE_PAGES, PAGE)), axis=1)
            entries = p0 + offs_e
            tl.store(pscore_ptr + out_row * max_pages + entries, ps, mask=entries < chunk_end)

    # Entries of this chunk past the last tile that held a valid token: -inf, nothing read.
    fill_lo = lo + tl.cdiv(tl.maximum(hi - lo, 0), TILE_PAGES) * TILE_PAGES
    for p0 in range(fill_lo, chunk_end, TILE_PAGES):
        if TOKEN_SCORES:
            tok = p0 * PAGE + offs_t
            tl.store(tscore_ptr + out_row * max_tokens + tok,
                     tl.full([BLOCK_N], float("-inf"), dtype=tl.float32), mask=tok < chunk_end * PAGE)
        if PAGE_SCORES:
            entries = p0 + offs_e
            tl.store(pscore_ptr + out_row * max_pages + entries,
                     tl.full([TILE_PAGES], float("-inf"), dtype=tl.float32), mask=entries < chunk_end)


# ----------------------------------------------------------------------------------------------
# geometry and checks


def kernel_interpreted() -> bool:
    """True when this module's kernels run in the Triton interpreter (TRITON_INTERPRET=1 was set before
    it was imported): then they take CPU tensors. Decided by the kernel object, not the environment."""
    return not isinstance(_compact_scan_kernel, triton.runtime.JITFunction)


def _is_pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def check_geometry(head_dim: int, bits: int, group_size: int, page_size: int | None = None) -> None:
    """Raise ValueError unless (head_dim, bits, group_size[, page_size]) is supported: bits 4 or 8,
    head_dim and group_size powers of two with 2 <= group_size <= head_dim (tile shapes are powers of
    two), page_size a power of two."""
    if bits not in _QMAX:
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if not _is_pow2(head_dim) or head_dim < 16:
        raise ValueError(f"head_dim must be a power of two >= 16 for the compact-key kernels, got {head_dim}")
    if not _is_pow2(group_size) or not 2 <= group_size <= head_dim:
        raise ValueError(f"group_size must be a power of two in [2, head_dim={head_dim}], got {group_size}")
    if page_size is not None and not _is_pow2(page_size):
        raise ValueError(f"page_size must be a power of two, got {page_size}")


def code_dim(head_dim: int, bits: int) -> int:
    """Bytes of codes per key vector: D for int8, D/2 for int4."""
    return head_dim if bits == 8 else head_dim // 2


def compact_bytes_per_token(head_dim: int, bits: int, group_size: int,
                            scale_dtype: torch.dtype = torch.float16) -> int:
    """Bytes one key vector (one token, one KV head) takes in the compact store: codes plus scales."""
    return code_dim(head_dim, bits) + (head_dim // group_size) * torch.empty(0, dtype=scale_dtype).element_size()


def _check_codes(codes: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int, name: str) -> int:
    """Checks a codes/scales pair (any leading dims); returns head_dim."""
    if bits not in _QMAX:
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if codes.dtype != _CODE_DTYPES[bits]:
        raise ValueError(f"{name} codes for bits={bits} must be {_CODE_DTYPES[bits]}, got {codes.dtype}")
    if scales.dtype not in _SCALE_DTYPES:
        raise ValueError(f"{name} scales must be float16 or float32, got {scales.dtype}")
    head_dim = codes.shape[-1] * (8 // bits)
    if codes.shape[:-1] != scales.shape[:-1] or scales.shape[-1] * group_size != head_dim:
        raise ValueError(
            f"{name}: codes {tuple(codes.shape)} (bits={bits}: head_dim {head_dim}) and scales "
            f"{tuple(scales.shape)} do not match group_size={group_size} "
            f"(expected scales [..., {head_dim // group_size}])")
    if codes.device != scales.device:
        raise ValueError(f"{name} codes ({codes.device}) and scales ({scales.device}) must share a device")
    return head_dim


def _check_paged(codes: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int) -> tuple[int, int, int]:
    """Checks the paged compact store; returns (num_kv_heads, page_size, head_dim)."""
    if codes.dim() != 4:
        raise ValueError(f"paged codes must be [num_pages, Hkv, page_size, D or D/2], got {tuple(codes.shape)}")
    head_dim = _check_codes(codes, scales, bits, group_size, "paged")
    _, hkv, page_size, dc = codes.shape
    check_geometry(head_dim, bits, group_size, page_size)
    for t, name in ((codes, "codes"), (scales, "scales")):
        if t.stride(-1) != 1 or t.stride(-2) != t.shape[-1]:
            raise ValueError(f"paged {name} must have its last two dims (page_size, .) contiguous; "
                             f"strides {t.stride()}")
    return hkv, page_size, head_dim


def _check_launchable(*tensors: torch.Tensor) -> None:
    if any(t.is_cuda for t in tensors):
        dev = next(t.device for t in tensors if t.is_cuda)
        bad = [t.device for t in tensors if t.device != dev]
        if bad:
            raise ValueError(f"all tensors must be on {dev}; found {bad[0]}")
        return
    if not kernel_interpreted():
        raise RuntimeError(
            "the compact-key Triton kernels got CPU tensors but are not running in the Triton interpreter: "
            "move the tensors to a CUDA device, set TRITON_INTERPRET=1 before importing the kernels, or use "
            "the *_reference functions")


def _buffer(buf: torch.Tensor | None, shape: tuple, dtype: torch.dtype, dev: torch.device, name: str) -> torch.Tensor:
    if buf is None:
        return torch.empty(shape, dtype=dtype, device=dev)
    if tuple(buf.shape) != tuple(shape) or buf.dtype != dtype or buf.device != dev or not buf.is_contiguous():
        raise ValueError(f"{name} buffer must be contiguous {tuple(shape)} {dtype} on {dev}; got "
                         f"{tuple(buf.shape)} {buf.dtype} on {buf.device} (contiguous={buf.is_contiguous()})")
    return buf


def _quantize_launch(k4, codes4, scales4, table, start, *, bits, group_size, page_size, paged, block_r):
    n, hkv, t, d = k4.shape
    rows = n * hkv * t
    if rows == 0:
        return
    if k4.stride(-1) != 1:
        k4 = k4.contiguous()
    if block_r is None:
        block_r = 16 if d <= 128 else 8
    if not _is_pow2(block_r):
        raise ValueError(f"block_r must be a power of two, got {block_r}")
    sk, sc, ss = k4.stride(), codes4.stride(), scales4.stride()
    _quantize_kernel[(triton.cdiv(rows, block_r),)](
        k4, codes4, scales4, table, start,
        rows, t,
        sk[0], sk[1], sk[2], sc[0], sc[1], sc[2], ss[0], ss[1], ss[2],
        table.stride(0),
        HKV=hkv, HEAD_DIM=d, GROUP=group_size, BITS=bits, QMAX=_QMAX[bits], PAGE=page_size, PAGED=paged,
        BLOCK_R=block_r,
        num_warps=4,
    )


# ----------------------------------------------------------------------------------------------
# quantization


def quantize_keys(
    k: torch.Tensor,
    bits: int,
    group_size: int,
    *,
    scale_dtype: torch.dtype = torch.float16,
    codes_out: torch.Tensor | None = None,
    scales_out: torch.Tensor | None = None,
    block_r: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize key vectors (Triton).

    k [..., D] fp32/fp16/bf16 (GPU, or CPU under the interpreter). Returns codes [..., D] int8 (bits=8)
    or [..., D/2] uint8 (bits=4, two elements per byte, see the module docstring) and scales
    [..., D/group_size] in ``scale_dtype``. ``codes_out``/``scales_out``: optional contiguous buffers of
    exactly those shapes and dtypes.
    """
    if k.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"k must be float32/float16/bfloat16, got {k.dtype}")
    if scale_dtype not in _SCALE_DTYPES:
        raise ValueError(f"scale_dtype must be float16 or float32, got {scale_dtype}")
    d = k.shape[-1]
    check_geometry(d, bits, group_size)
    lead = tuple(k.shape[:-1])
    codes = _buffer(codes_out, lead + (code_dim(d, bits),), _CODE_DTYPES[bits], k.device, "codes_out")
    scales = _buffer(scales_out, lead + (d // group_size,), scale_dtype, k.device, "scales_out")
    _check_launchable(k, codes, scales)
    rows = math.prod(lead)
    k4 = k.reshape(rows, 1, 1, d)
    dummy = torch.zeros(1, 1, dtype=torch.int32, device=k.device)  # table/start: unread when not paged
    _quantize_launch(k4, codes.view(rows, 1, 1, codes.shape[-1]), scales.view(rows, 1, 1, scales.shape[-1]),
                     dummy, dummy[0],
                     bits=bits, group_size=group_size, page_size=1, paged=False, block_r=block_r)
    return codes, scales


def quantize_keys_reference(
    k: torch.Tensor, bits: int, group_size: int, *, scale_dtype: torch.dtype = torch.float16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch `quantize_keys` (same codes and scales, bit for bit)."""
    if scale_dtype not in _SCALE_DTYPES:
        raise ValueError(f"scale_dtype must be float16 or float32, got {scale_dtype}")
    d = k.shape[-1]
    check_geometry(d, bits, group_size)
    qmax = _QMAX[bits]
    x = k.float().reshape(*k.shape[:-1], d // group_size, group_size)
    s = (x.abs().amax(dim=-1) / qmax).to(scale_dtype)
    sf = s.float().unsqueeze(-1)
    ok = sf > 0
    y = torch.where(ok, x / torch.where(ok, sf, torch.ones_like(sf)), torch.zeros_like(x))
    c = torch.clamp((y.abs() + 0.5).trunc(), max=qmax) * torch.sign(y)
    c = c.to(torch.int32).reshape(*k.shape)
    if bits == 8:
        codes = c.to(torch.int8)
    else:
        u = c + 8
        codes = (u[..., 0::2] | (u[..., 1::2] << 4)).to(torch.uint8)
    return codes, s


def dequantize_keys(codes: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """codes [..., D or D/2], scales [..., D/group_size] -> fp32 keys [..., D] (plain torch)."""
    d = _check_codes(codes, scales, bits, group_size, "dequantize_keys")
    if bits == 8:
        c = codes.to(torch.float32)
    else:
        b = codes.to(torch.int32)
        c = torch.stack(((b & 15) - 8, (b >> 4) - 8), dim=-1).reshape(*codes.shape[:-1], d).to(torch.float32)
    c = c.reshape(*codes.shape[:-1], d // group_size, group_size)
    return (c * scales.float().unsqueeze(-1)).reshape(*codes.shape[:-1], d)


def _check_rows(x: torch.Tensor, name: str, page_table: torch.Tensor) -> int:
    """x's dtype is a float one and page_table is [N, max_pages] integer for x's N rows; returns N."""
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32/float16/bfloat16, got {x.dtype}")
    n = x.shape[0]
    if page_table.dim() != 2 or page_table.shape[0] != n or page_table.dtype not in _INDEX_DTYPES:
        raise ValueError(f"page_table must be int32/int64 [N={n}, max_pages], got {page_table.dtype} "
                         f"{tuple(page_table.shape)}")
    return n


def _check_into_args(k_new, codes_pages, scale_pages, page_table, start_pos, bits, group_size):
    hkv, page_size, d = _check_paged(codes_pages, scale_pages, bits, group_size)
    if k_new.dim() != 4 or k_new.shape[1] != hkv or k_new.shape[3] != d:
        raise ValueError(f"k_new must be [N, Hkv={hkv}, T, D={d}], got {tuple(k_new.shape)}")
    n = _check_rows(k_new, "k_new", page_table)
    if start_pos.dim() != 1 or start_pos.shape[0] != n or start_pos.dtype not in _INDEX_DTYPES:
        raise ValueError(f"start_pos must be int32/int64 [N={n}], got {start_pos.dtype} {tuple(start_pos.shape)}")
    return hkv, page_size, d


def _validate_targets(page_table, start_pos, t, page_size, num_pages):
    """Every written position must lie in an allocated page: [0, num_pages)."""
    table = page_table.cpu().long()
    starts = start_pos.cpu().long()
    max_tokens = table.shape[1] * page_size
    for i in range(table.shape[0]):
        st = int(starts[i])
        if t == 0:
            continue
        if st < 0 or st + t > max_tokens:
            raise ValueError(f"row {i} writes positions [{st}, {st + t}) outside its table of "
                             f"{table.shape[1]} pages x {page_size} tokens")
        pages = table[i, st // page_size:(st + t - 1) // page_size + 1]
        if int(pages.min()) < 0 or int(pages.max()) >= num_pages:
            raise ValueError(f"row {i} writes positions [{st}, {st + t}) into page ids {pages.tolist()}; all must "
                             f"lie in [0, {num_pages}) (allocate/extend the sequence first)")


def quantize_into(
    k_new: torch.Tensor,
    codes_pages: torch.Tensor,
    scale_pages: torch.Tensor,
    page_table: torch.Tensor,
    start_pos: torch.Tensor,
    *,
    bits: int,
    group_size: int,
    validate: bool = True,
    block_r: int | None = None,
) -> None:
    """Quantize new keys into the paged compact store in place (Triton).

    k_new [N, Hkv, T, D] fp32/fp16/bf16; codes_pages [num_pages, Hkv, P, D or D/2] (int8 / uint8),
    scale_pages [num_pages, Hkv, P, D/group_size] fp16/fp32; page_table [N, max_pages] int32 (logical ->
    physical page, -1 padded); start_pos [N] int32. Writes positions start_pos[n] .. start_pos[n]+T-1
    of row n; nothing else changes. All on one CUDA device (or CPU under the interpreter).
    ``validate`` checks on the host that every written position has a real page (a device sync on
    CUDA); without it a bad table writes out of bounds.
    """
    hkv, page_size, d = _check_into_args(k_new, codes_pages, scale_pages, page_table, start_pos, bits, group_size)
    _check_launchable(k_new, codes_pages, scale_pages, page_table, start_pos)
    if page_table.numel() and page_table.stride(1) != 1:
        page_table = page_table.contiguous()
    if validate:
        _validate_targets(page_table, start_pos, k_new.shape[2], page_size, codes_pages.shape[0])
    _quantize_launch(k_new, codes_pages, scale_pages, page_table, start_pos, bits=bits, group_size=group_size,
                     page_size=page_size, paged=True, block_r=block_r)


def quantize_into_reference(
    k_new: torch.Tensor,
    codes_pages: torch.Tensor,
    scale_pages: torch.Tensor,
    page_table: torch.Tensor,
    start_pos: torch.Tensor,
    *,
    bits: int,
    group_size: int,
) -> None:
    """Plain-torch `quantize_into` (always validates the targets)."""
    hkv, page_size, d = _check_into_args(k_new, codes_pages, scale_pages, page_table, start_pos, bits, group_size)
    n, _, t, _ = k_new.shape
    _validate_targets(page_table, start_pos, t, page_size, codes_pages.shape[0])
    codes, scales = quantize_keys_reference(k_new, bits, group_size, scale_dtype=scale_pages.dtype)
    table = page_table.long().to(codes_pages.device)
    pos = start_pos.long().to(codes_pages.device)[:, None] + torch.arange(t, device=codes_pages.device)  # [N, T]
    pages = torch.gather(table, 1, pos // page_size)
    slots = pos % page_size
    # advanced indices (page, slot) around the head slice: the indexed view is [N, T, Hkv, .]
    codes_pages[pages, :, slots] = codes.transpose(1, 2).to(codes_pages.device)
    scale_pages[pages, :, slots] = scales.transpose(1, 2).to(scale_pages.device)


# ----------------------------------------------------------------------------------------------
# scan


def scan_launch_config(
    n: int, num_kv_heads: int, max_pages: int, page_size: int, *,
    num_sms: int | None,
    block_n: int | None = None,
    chunk_pages: int | None = None,
    num_warps: int | None = None,
) -> dict:
    """Launch shape of `compact_page_scores`.

    tile_pages: pages per loop step, block_n // page_size (at least 1; block_n default 64 tokens, so a
    step reads 64 x D int8 or 64 x D/2 uint8 plus scales). chunk_pages: pages per program; default on a
    GPU (``num_sms`` given) spreads the N * Hkv * max_pages entries over about 8 programs per SM (a
    scan of one row still fills the GPU), at least one tile; without ``num_sms`` (the interpreter) one
    chunk per (row, head). Returns tile_pages, chunk_pages, num_chunks, grid, num_warps.
    """
    if block_n is None:
        block_n = 64
    if not _is_pow2(block_n):
        raise ValueError(f"block_n must be a power of two, got {block_n}")
    tile_pages = max(1, block_n // page_size)
    if chunk_pages is None:
        if num_sms is None:
            chunk_pages = max(max_pages, 1)
        else:
            per = triton.cdiv(max(n * num_kv_heads * max_pages, 1), 8 * num_sms)
            chunk_pages = triton.cdiv(per, tile_pages) * tile_pages
        chunk_pages = max(min(chunk_pages, triton.cdiv(max(max_pages, 1), tile_pages) * tile_pages), tile_pages)
    if chunk_pages <= 0:
        raise ValueError(f"chunk_pages must be positive, got {chunk_pages}")
    num_chunks = triton.cdiv(max_pages, chunk_pages)
    if num_warps is None:
        num_warps = 4
    return dict(tile_pages=tile_pages, chunk_pages=chunk_pages, num_chunks=num_chunks,
                grid=(num_chunks, n * num_kv_heads), num_warps=num_warps)


def _check_scan_args(q, codes, scales, page_table, kv_len, bits, group_size):
    """Checks the arguments; returns (Hkv, P, D, q as [N, Hkv, R, D])."""
    hkv, page_size, d = _check_paged(codes, scales, bits, group_size)
    if q.dim() == 3:
        q = q[:, :, None]
    if q.dim() != 4 or q.shape[1] != hkv or q.shape[2] < 1 or q.shape[3] != d:
        raise ValueError(f"q must be [N, Hkv={hkv}, D={d}] or [N, Hkv={hkv}, R>=1, D={d}], got {tuple(q.shape)}")
    n = _check_rows(q, "q", page_table)
    if kv_len.dtype not in _INDEX_DTYPES or tuple(kv_len.shape) not in ((n,), (n, hkv)):
        raise ValueError(f"kv_len must be int32/int64 [N={n}] or [N, Hkv={hkv}], got {kv_len.dtype} "
                         f"{tuple(kv_len.shape)}")
    return hkv, page_size, d, q


def compact_page_scores(
    q: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    page_table: torch.Tensor,
    kv_len: torch.Tensor,
    *,
    bits: int,
    group_size: int,
    scale: float,
    return_token_scores: bool = False,
    out: torch.Tensor | None = None,
    token_out: torch.Tensor | None = None,
    block_n: int | None = None,
    chunk_pages: int | None = None,
    num_warps: int | None = None,
    use_dot: bool | None = None,
    dot_precision: str = "fp16",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Score every context token against the selection queries of each (row, KV head) from compact keys (Triton).

    q [N, Hkv, D] or [N, Hkv, R, D] fp32/fp16/bf16 (a token scores the max over the R queries); codes [num_pages, Hkv, P, D (int8, bits=8) or D/2 (uint8, bits=4)];
    scales [num_pages, Hkv, P, D/group_size] fp16/fp32; page_table [N, max_pages] int32 (entries at and
    beyond cdiv(kv_len, P) are never read, so -1 padding is fine); kv_len [N] (or [N, Hkv]) int32,
    clamped to [0, max_pages * P] in the kernel (not checked on the host: no device sync).
    Returns page_scores [N, Hkv, max_pages] fp32: max over each page's valid tokens of
    scale * q . dequant(k) (max over the queries), -inf for pages with no valid token; and, with ``return_token_scores`` (or
    ``token_out``), token_scores [N, Hkv, max_pages * P] fp32 (-inf at and beyond kv_len), else None.
    ``out``/``token_out``: optional contiguous output buffers (a call then allocates nothing).
    block_n/chunk_pages/num_warps: tuning overrides (see `scan_launch_config`). use_dot: several
    queries multiply each dequantized tile on the tensor cores instead of one after the other on the
    CUDA cores; None: when R > 1 and the tile shapes allow a dot (D * bits / 8 >= 16 code bytes per
    token, block_n >= 16). dot_precision: the dot's operands, "fp16" (the default: relative error
    about 1e-3, a small fraction of int4's own), "tf32", or "tf32x3" (fp32 as three TF32 products:
    close to fp32); IEEE fp32 under the interpreter, whatever is asked.
    """
    hkv, page_size, d, q = _check_scan_args(q, codes, scales, page_table, kv_len, bits, group_size)
    n, max_pages = q.shape[0], page_table.shape[1]
    dev = q.device
    want_tokens = return_token_scores or token_out is not None
    pscores = _buffer(out, (n, hkv, max_pages), torch.float32, dev, "out")
    tscores = _buffer(token_out, (n, hkv, max_pages * page_size), torch.float32, dev, "token_out") \
        if want_tokens else None
    _check_launchable(q, codes, scales, page_table, kv_len)
    if n == 0 or max_pages == 0:
        return pscores, tscores
    if q.stride(-1) != 1:
        q = q.contiguous()
    num_sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else None
    cfg = scan_launch_config(n, hkv, max_pages, page_size, num_sms=num_sms, block_n=block_n,
                             chunk_pages=chunk_pages, num_warps=num_warps)
    l_strides = (kv_len.stride(0), 0) if kv_len.dim() == 1 else kv_len.stride()
    r = q.shape[2]
    dot_fits = d * bits // 8 >= 16 and cfg["tile_pages"] * page_size >= 16
    if use_dot is None:
        use_dot = r > 1 and dot_fits
    elif use_dot and not dot_fits:
        raise ValueError(f"use_dot needs >= 16 code bytes per token (D={d}, bits={bits}) and block_n >= 16")
    if dot_precision not in ("tf32x3", "tf32", "fp16"):
        raise ValueError(f"dot_precision={dot_precision!r}; choose tf32x3, tf32 or fp16")
    interpreted = kernel_interpreted()
    _compact_scan_kernel[cfg["grid"]](
        q, codes, scales, page_table, kv_len,
        pscores, pscores if tscores is None else tscores,  # token buffer unread when off
        float(scale), max_pages, cfg["chunk_pages"], q.shape[2],
        q.stride(0), q.stride(1), q.stride(2),
        codes.stride(0), codes.stride(1),
        scales.stride(0), scales.stride(1),
        page_table.stride(0), page_table.stride(1),
        *l_strides,
        HKV=hkv, HEAD_DIM=d, GROUP=group_size, BITS=bits, PAGE=page_size, TILE_PAGES=cfg["tile_pages"],
        PAGE_SCORES=True, TOKEN_SCORES=want_tokens,
        USE_DOT=bool(use_dot), R_PAD=max(16, triton.next_power_of_2(r)) if use_dot else 16,
        DOT_FP16=dot_precision == "fp16" and not interpreted,
        DOT_PRECISION="ieee" if interpreted or dot_precision == "fp16" else dot_precision,
        num_warps=cfg["num_warps"],
    )
    return pscores, tscores


def compact_page_scores_reference(
    q: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    page_table: torch.Tensor,
    kv_len: torch.Tensor,
    *,
    bits: int,
    group_size: int,
    scale: float,
    return_token_scores: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Plain-torch `compact_page_scores`: gather each row's pages, dequantize, fp32 dot products.
    Checks that kv_len lies in [0, max_pages * P] and that every page holding a valid token is a real
    page id (ValueError otherwise)."""
    hkv, page_size, d, q = _check_scan_args(q, codes, scales, page_table, kv_len, bits, group_size)
    n, max_pages = q.shape[0], page_table.shape[1]
    max_tokens = max_pages * page_size
    dev = q.device
    lens = kv_len.to(dev).long()
    lens = lens[:, None].expand(n, hkv) if lens.dim() == 1 else lens  # [N, Hkv]
    if lens.numel() and (int(lens.min()) < 0 or int(lens.max()) > max_tokens):
        raise ValueError(f"kv_len must lie in [0, max_pages * page_size = {max_tokens}]; got "
                         f"[{int(lens.min())}, {int(lens.max())}]")
    table = page_table.to(dev).long()
    entry_ok = torch.arange(max_pages, device=dev)[None, None, :] * page_size < lens[:, :, None]  # [N, Hkv, E]
    needed = table[:, None, :].expand(n, hkv, max_pages)[entry_ok]
    if needed.numel() and (int(needed.min()) < 0 or int(needed.max()) >= codes.shape[0]):
        raise ValueError(f"page_table holds page ids outside [0, {codes.shape[0]}) for pages below kv_len")
    pages = table.clamp(0, max(codes.shape[0] - 1, 0))
    k = dequantize_keys(codes[pages].to(dev), scales[pages].to(dev), bits, group_size)  # [N, E, Hkv, P, D]
    k = k.permute(0, 2, 1, 3, 4).reshape(n, hkv, max_tokens, d)
    ts = torch.einsum("nhrd,nhtd->nhrt", q.float(), k).amax(2) * scale
    tok_ok = torch.arange(max_tokens, device=dev)[None, None, :] < lens[:, :, None]
    ts = torch.where(tok_ok, ts, torch.full_like(ts, float("-inf")))
    ps = ts.reshape(n, hkv, max_pages, page_size).amax(dim=-1)
    return ps, (ts if return_token_scores else None)
