"""CPU scan of the host KV store's keys: per-token and per-page scores of the selection queries of
each (row, KV head), top-k page selection, and a one-thread executor that overlaps the scan with GPU work.

Layouts:
- keys: one layer of the host store, ``[num_pages, Hkv, P, D]`` (bf16 in production, fp16/fp32 in
  tests), C-contiguous. It is read in place: bf16 is viewed as uint16 and widened in the kernel
  (``bits << 16`` reinterpreted as fp32), fp16 is viewed as int16 and widened with the CPU's
  half->float conversion, so the scan never copies the store.
- page_table: int32 ``[N, max_pages]``, logical page -> physical page, -1 padded. Only entries
  below ``cdiv(kv_len[n], P)`` are read, and those must be valid page ids.
- queries: ``[N, Hkv, D]``, one query per row and KV head (the block-mean query), or
  ``[N, Hkv, R, D]``, R per row and KV head (one per block position), widened to fp32.

score(token) = scale * q . k (the max over the R queries) over the row's first ``kv_len`` tokens; a page's score aggregates its
valid tokens (a partial last page counts only its valid tokens): ``max``, ``mean`` or ``lse``
(logsumexp). Pages (and tokens) at or beyond kv_len score -inf.

The numba kernels release the GIL (nogil), so a scan running in a Python thread leaves the main
thread free to drive the GPU. The parallel kernels run on numba's threading layer; its
``workqueue`` fallback must not be entered from two Python threads at once, so keep parallel numba
calls to one thread when neither OpenMP nor TBB is available (``numba.threading_layer()`` says).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

AGGREGATES = ("max", "mean", "lse")
_AGG_CODE = {name: i for i, name in enumerate(AGGREGATES)}
_KEY_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # compiled by default; float64 also works


# ---------------------------------------------------------------------------------------------
# element widening: one tiny function per storage format, passed to the kernel (numba compiles
# one kernel specialisation per function) so the inner dot product stays a branch-free loop.

@intrinsic
def _bf16_bits_as_f32(typingctx, bits):
    """uint16 bf16 bits -> float32: bf16 is the top half of an fp32, so widening is exact."""
    if not isinstance(bits, types.Integer) or bits.bitwidth != 16:
        return None

    def codegen(context, builder, sig, args):
        wide = builder.zext(args[0], ir.IntType(32))
        return builder.bitcast(builder.shl(wide, ir.Constant(ir.IntType(32), 16)), ir.FloatType())

    return types.float32(bits), codegen


@intrinsic
def _fp16_bits_as_f32(typingctx, bits):
    """int16 fp16 bits -> float32 through LLVM's half type (numba has no CPU float16 arrays)."""
    if not isinstance(bits, types.Integer) or bits.bitwidth != 16:
        return None

    def codegen(context, builder, sig, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(bits), codegen


# llvm.prefetch is mangled on its pointer type: "p0" with opaque pointers (newer llvmlite), "p0i8" before.
_I8_PTR = ir.IntType(8).as_pointer()
_PREFETCH_NAME = "llvm.prefetch.p0" if str(_I8_PTR) == "ptr" else "llvm.prefetch.p0i8"


@intrinsic
def _prefetch(typingctx, addr):
    """Read prefetch of the cache line at byte address ``addr`` into all cache levels."""
    if not isinstance(addr, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [_I8_PTR, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, _PREFETCH_NAME)
        # (address, read, locality 3 = keep in all levels, data cache)
        builder.call(fn, [builder.inttoptr(args[0], _I8_PTR), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return types.void(addr), codegen


@njit(inline="always", nogil=True)
def _widen_bf16(x):
    return _bf16_bits_as_f32(x)


@njit(inline="always", nogil=True)
def _widen_fp16(x):
    return _fp16_bits_as_f32(x)


@njit(inline="always", nogil=True)
def _widen_fp32(x):
    return x


@njit(inline="always", nogil=True)
def _widen_fp64(x):  # fp64 test models: scores in fp64, as their torch references compute them
    return x


_WIDEN = {torch.bfloat16: _widen_bf16, torch.float16: _widen_fp16, torch.float32: _widen_fp32,
          torch.float64: _widen_fp64}


# ---------------------------------------------------------------------------------------------
# the scan kernel

# Reassociation lets LLVM vectorise the dot-product reduction; the other fast-math flags (no-inf,
# no-nan) are left off because -inf marks pages beyond kv_len.
_FASTMATH = {"reassoc", "contract"}


@njit(parallel=True, nogil=True, fastmath=_FASTMATH, cache=False)
def _scan_kernel(keys, table, kv_len, q, scale, agg, out_page, out_tok, write_tok, widen):
    n_rows, max_pages = table.shape
    heads, psize, dim = keys.shape[1], keys.shape[2], keys.shape[3]
    n_queries = q.shape[2]
    neg_inf = np.float32(-np.inf)
    base = keys.ctypes.data
    row_bytes = dim * keys.itemsize
    page_bytes = heads * psize * row_bytes
    # One work item per (row, page) covering all KV heads: a physical page's heads are one
    # contiguous Hkv*P*D run, which streams better than per-head P*D slabs.
    for w in prange(n_rows * max_pages):
        n = w // max_pages
        p = w - n * max_pages
        valid = kv_len[n] - p * psize  # tokens of this page below kv_len
        if valid <= 0:
            for h in range(heads):
                out_page[n, h, p] = neg_inf
                if write_tok:
                    for t in range(psize):
                        out_tok[n, h, p * psize + t] = neg_inf
            continue
        ntok = min(valid, psize)
        page = table[n, p]
        # The row's next page is prefetched while this one is scored: pages are scattered in the
        # store, and the hardware prefetcher neither predicts the jump nor crosses 4 KiB pages.
        # Measured 1.4-2x on one thread (bf16, 16-token pages).
        nxt = table[n, p + 1] if p + 1 < max_pages and valid > psize else -1
        for h in range(heads):
            best = neg_inf
            total = np.float32(0.0)  # sum of scores (mean) or of exp(score - best) (lse)
            for t in range(ntok):
                if nxt >= 0:
                    line = base + nxt * page_bytes + (h * psize + t) * row_bytes
                    for c in range(0, row_bytes, 64):
                        _prefetch(line + c)
                x = neg_inf
                for r in range(n_queries):
                    acc = np.float32(0.0)
                    for d in range(dim):
                        acc += q[n, h, r, d] * widen(keys[page, h, t, d])
                    x = max(x, acc * scale)
                if write_tok:
                    out_tok[n, h, p * psize + t] = x
                if agg == 2:  # online logsumexp: rescale the running sum when the maximum moves
                    if x > best:
                        total = total * np.exp(best - x) + np.float32(1.0)
                        best = x
                    else:
                        total += np.exp(x - best)
                else:
                    best = max(best, x)
                    total += x
            if write_tok:
                for t in range(ntok, psize):
                    out_tok[n, h, p * psize + t] = neg_inf
            if agg == 0:
                out_page[n, h, p] = best
            elif agg == 1:
                out_page[n, h, p] = total / np.float32(ntok)
            else:
                out_page[n, h, p] = best + np.log(total)


# ---------------------------------------------------------------------------------------------
# argument checks and conversions (cheap: O(N * max_pages) on small index arrays)

def _keys_view(keys: torch.Tensor) -> tuple[np.ndarray, object]:
    """Zero-copy numpy view of the keys and the widening function for their dtype."""
    if not isinstance(keys, torch.Tensor):
        raise TypeError(f"keys must be a torch tensor [num_pages, Hkv, P, D], got {type(keys).__name__}")
    if keys.device.type != "cpu":
        raise ValueError(f"keys must be in host memory, got a tensor on {keys.device}")
    if keys.dim() != 4:
        raise ValueError(f"keys must be [num_pages, Hkv, P, D], got shape {tuple(keys.shape)}")
    if keys.dtype not in _WIDEN:
        raise ValueError(f"keys dtype must be one of {tuple(_WIDEN)}, got {keys.dtype}")
    if not keys.is_contiguous():
        raise ValueError("keys must be contiguous (a layer view of the host store is); "
                         "copying them here would duplicate the store")
    if keys.dtype == torch.bfloat16:
        arr = keys.view(torch.int16).numpy().view(np.uint16)
    elif keys.dtype == torch.float16:
        arr = keys.view(torch.int16).numpy()
    else:
        arr = keys.numpy()
    return arr, _WIDEN[keys.dtype]


def _as_numpy(x, dtype, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        if x.device.type != "cpu":
            raise ValueError(f"{name} must be in host memory, got a tensor on {x.device}")
        x = x.detach()
        if x.dtype == torch.bfloat16:  # numpy has no bf16
            x = x.float()
        x = x.numpy()
    return np.ascontiguousarray(x, dtype=dtype)


def _check_scan_args(keys_np, page_table, kv_len, queries):
    num_pages, heads, psize, dim = keys_np.shape
    table = _as_numpy(page_table, np.int32, "page_table")
    if table.ndim != 2:
        raise ValueError(f"page_table must be [N, max_pages], got shape {table.shape}")
    n_rows, max_pages = table.shape
    lens = _as_numpy(kv_len, np.int64, "kv_len").reshape(-1)
    if lens.shape[0] != n_rows:
        raise ValueError(f"kv_len has {lens.shape[0]} entries for {n_rows} page-table rows")
    if n_rows and lens.min() < 0:
        raise ValueError(f"kv_len must be >= 0, got {lens.min()}")
    if n_rows and lens.max() > max_pages * psize:
        n = int(lens.argmax())
        raise ValueError(f"kv_len[{n}] = {lens[n]} needs {-(-int(lens[n]) // psize)} pages of {psize} tokens; "
                         f"the page table has {max_pages} columns")
    q = _as_numpy(queries, np.float32, "queries")
    if q.ndim == 3:
        q = q[:, :, None]
    if q.ndim != 4 or q.shape[:2] != (n_rows, heads) or q.shape[2] < 1 or q.shape[3] != dim:
        raise ValueError(f"queries must be [N, Hkv, D] = {(n_rows, heads, dim)} or [N, Hkv, R>=1, D], "
                         f"got {q.shape}")
    used = np.arange(max_pages)[None, :] < -(-lens[:, None] // psize)
    bad = used & ((table < 0) | (table >= num_pages))
    if bad.any():
        n, p = (int(i[0]) for i in np.nonzero(bad))
        raise ValueError(f"page_table[{n}, {p}] = {table[n, p]} is not a page id in [0, {num_pages}) "
                         f"but row {n} has kv_len {lens[n]} and so reads logical page {p}")
    return table, lens, q


def _out_array(out: torch.Tensor | None, shape: tuple[int, ...]) -> tuple[torch.Tensor, np.ndarray]:
    if out is None:
        out = torch.empty(shape, dtype=torch.float32)
    elif (out.dtype != torch.float32 or tuple(out.shape) != shape or out.device.type != "cpu"
          or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous host float32 tensor of shape {shape}, "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}")
    return out, out.numpy()


def _scan(keys, page_table, kv_len, queries, scale, aggregate, out, threads, tokens: bool) -> torch.Tensor:
    """Checks the arguments, then runs the kernel writing page scores, or token scores if ``tokens``."""
    if aggregate not in _AGG_CODE:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
    keys_np, widen = _keys_view(keys)
    table, lens, q = _check_scan_args(keys_np, page_table, kv_len, queries)
    if threads is not None and not 1 <= int(threads) <= numba.config.NUMBA_NUM_THREADS:
        raise ValueError(f"threads must be in [1, {numba.config.NUMBA_NUM_THREADS}] "
                         f"(numba.config.NUMBA_NUM_THREADS), got {threads}")
    n_rows, max_pages = table.shape
    heads, psize = keys_np.shape[1], keys_np.shape[2]
    if tokens:
        out, out_tok = _out_array(out, (n_rows, heads, max_pages * psize))
        out_page = np.empty((n_rows, heads, max_pages), dtype=np.float32)
    else:
        out, out_page = _out_array(out, (n_rows, heads, max_pages))
        out_tok = np.empty((1, 1, 1), dtype=np.float32)  # unused; keeps one compiled signature
    args = (keys_np, table, lens, q, float(scale), _AGG_CODE[aggregate], out_page, out_tok, tokens, widen)
    if threads is None:
        _scan_kernel(*args)
        return out
    before = numba.get_num_threads()  # numba keeps the thread count per calling thread
    numba.set_num_threads(int(threads))
    try:
        _scan_kernel(*args)
    finally:
        numba.set_num_threads(before)
    return out


# ---------------------------------------------------------------------------------------------
# public scoring API

def host_page_scores(
    keys: torch.Tensor,
    page_table: torch.Tensor | np.ndarray,
    kv_len: torch.Tensor | np.ndarray | Sequence[int],
    queries: torch.Tensor | np.ndarray,
    *,
    scale: float,
    aggregate: str = "max",
    out: torch.Tensor | None = None,
    threads: int | None = None,
) -> torch.Tensor:
    """Per-page scores of host keys, ``[N, Hkv, max_pages]`` float32 (-inf beyond kv_len).

    Args:
        keys: ``[num_pages, Hkv, P, D]`` host tensor, bf16/fp16/fp32, contiguous (read in place).
        page_table: int ``[N, max_pages]``, -1 padded; entries below ``cdiv(kv_len, P)`` must be page ids.
        kv_len: ``[N]`` tokens per row (at most ``max_pages * P``).
        queries: ``[N, Hkv, D]`` one query per row and KV head, or ``[N, Hkv, R, D]`` (a token scores the
            max over the R queries); converted to fp32.
        scale: multiplies q . k (typically ``1/sqrt(D)``).
        aggregate: "max", "mean" (over the page's valid tokens) or "lse" (logsumexp over them).
        out: optional contiguous float32 ``[N, Hkv, max_pages]`` host tensor to write into.
        threads: numba threads for this call (default: numba's current setting for this thread).
    """
    return _scan(keys, page_table, kv_len, queries, scale, aggregate, out, threads, tokens=False)


def host_token_scores(
    keys: torch.Tensor,
    page_table: torch.Tensor | np.ndarray,
    kv_len: torch.Tensor | np.ndarray | Sequence[int],
    queries: torch.Tensor | np.ndarray,
    *,
    scale: float,
    out: torch.Tensor | None = None,
    threads: int | None = None,
) -> torch.Tensor:
    """Per-token scores ``[N, Hkv, max_pages * P]`` float32 (logical token order, -inf at and beyond
    kv_len). Arguments as ``host_page_scores``; ``topk_pages`` on the result gives a token top-k."""
    return _scan(keys, page_table, kv_len, queries, scale, "max", out, threads, tokens=True)


def host_token_scores_reference(keys, page_table, kv_len, queries, *, scale: float) -> torch.Tensor:
    """Plain-torch ``host_token_scores``: gathers each row's pages and scores them in fp32."""
    num_pages, heads, psize, dim = keys.shape
    table = torch.as_tensor(page_table).long()
    lens = torch.as_tensor(kv_len).long().reshape(-1)
    q = torch.as_tensor(queries).float()
    q = q[:, :, None] if q.dim() == 3 else q  # [N, Hkv, R, D]
    n_rows, max_pages = table.shape
    out = torch.full((n_rows, heads, max_pages * psize), -math.inf, dtype=torch.float32)
    for n in range(n_rows):
        used = -(-int(lens[n]) // psize)
        if used == 0:
            continue
        k = keys[table[n, :used]].float()  # [used, Hkv, P, D]
        s = scale * torch.einsum("hrd,phtd->hrpt", q[n], k).amax(1).reshape(heads, used * psize)
        out[n, :, : int(lens[n])] = s[:, : int(lens[n])]
    return out


def host_page_scores_reference(keys, page_table, kv_len, queries, *, scale: float,
                               aggregate: str = "max") -> torch.Tensor:
    """Plain-torch ``host_page_scores`` built on the token reference."""
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
    psize = keys.shape[2]
    tok = host_token_scores_reference(keys, page_table, kv_len, queries, scale=scale)
    n_rows, heads, _ = tok.shape
    tok = tok.view(n_rows, heads, -1, psize)
    valid = torch.isfinite(tok)
    if aggregate == "max":
        return tok.amax(-1)
    if aggregate == "lse":
        return torch.logsumexp(tok, -1)
    count = valid.sum(-1)
    mean = torch.where(valid, tok, 0.0).sum(-1) / count.clamp(min=1)
    return torch.where(count > 0, mean, -math.inf)


# ---------------------------------------------------------------------------------------------
# top-k

@njit(nogil=True, cache=False)
def _topk_prepare(scores, k, forced, has_forced, work, counts):
    """work = scores with forced pages raised to +inf; counts[n, h] = min(existing, max(k[n], forced)).
    Returns (flat index of a NaN score, flat index of a forced page scoring -inf), -1 for none."""
    n_rows, heads, m = scores.shape
    nan_at, bad_at = -1, -1
    for n in range(n_rows):
        for h in range(heads):
            hf = h if forced.shape[1] == heads else 0
            exist, nforced = 0, 0
            for p in range(m):
                x = scores[n, h, p]
                if x != x and nan_at < 0:
                    nan_at = (n * heads + h) * m + p
                if x > -np.inf:
                    exist += 1
                if has_forced and forced[n, hf, p]:
                    nforced += 1
                    if not x > -np.inf and bad_at < 0:
                        bad_at = (n * heads + h) * m + p
                    x = np.inf
                work[n, h, p] = x
            counts[n, h] = min(exist, max(k[n], nforced))
    return nan_at, bad_at


@njit(nogil=True, cache=False)
def _topk_emit(work, cut, counts, pages):
    """Writes each (row, head)'s pages scoring above its cut, then as many tied at the cut as
    counts[n, h] still needs (lowest ids first), in page order, so ascending; -1 after them."""
    n_rows, heads, m = work.shape
    width = pages.shape[2]
    for n in range(n_rows):
        for h in range(heads):
            c, t = counts[n, h], cut[n, h]
            above = 0
            for p in range(m):
                if work[n, h, p] > t:
                    above += 1
            ties = c - above
            j = 0
            for p in range(m):
                x = work[n, h, p]
                if x > t or (x == t and ties > 0 and x > -np.inf):
                    if not x > t:
                        ties -= 1
                    pages[n, h, j] = p
                    j += 1
            for i in range(j, width):
                pages[n, h, i] = -1


def topk_pages(
    page_scores: torch.Tensor | np.ndarray,
    k: int | Sequence[int] | torch.Tensor | np.ndarray,
    forced: torch.Tensor | np.ndarray | None = None,
    *,
    width: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k pages per (row, KV head), forced pages first.

    Args:
        page_scores: float ``[N, Hkv, M]``; -inf marks pages that do not exist (beyond kv_len). No NaN.
        k: pages per (row, head) in total, an int or ``[N]`` ints (>= 0).
        forced: optional bool ``[N, Hkv, M]`` or ``[N, M]`` (all heads): pages always selected (sinks,
            local window). They count within k: a (row, head) gets its forced pages, then the best
            other pages up to k in total; if more than k pages are forced, all of them and no others.
            A forced page must exist (score > -inf).
        width: output width K; default the largest count. Too small a width is an error.

    Returns:
        pages: int32 ``[N, Hkv, K]`` logical page ids, ascending, -1 padded.
        counts: int32 ``[N, Hkv]`` = min(existing pages, max(k, forced pages)).

    Of equal scores at the cut, the lower page ids are taken. Token-level top-k: pass token
    scores (``host_token_scores``) as ``page_scores``. Single-threaded.
    """
    s = _as_numpy(page_scores, np.float32, "page_scores")
    if s.ndim != 3:
        raise ValueError(f"page_scores must be [N, Hkv, M], got shape {s.shape}")
    n_rows, heads, m = s.shape
    k_arr = np.asarray(k.cpu() if isinstance(k, torch.Tensor) else k, dtype=np.int64)
    if k_arr.ndim == 0:
        k_arr = np.full(n_rows, int(k_arr), dtype=np.int64)
    if k_arr.shape != (n_rows,):
        raise ValueError(f"k must be an int or [N] = [{n_rows}] ints, got shape {k_arr.shape}")
    if n_rows and k_arr.min() < 0:
        raise ValueError(f"k must be >= 0, got {k_arr.min()}")
    has_forced = forced is not None
    if has_forced:
        force = _as_numpy(forced, np.bool_, "forced")
        if force.shape == (n_rows, m):
            force = force[:, None, :]
        if force.shape != (n_rows, heads, m) and force.shape != (n_rows, 1, m):
            raise ValueError(f"forced must be [N, Hkv, M] = {(n_rows, heads, m)} or [N, M] = {(n_rows, m)}, "
                             f"got {tuple(np.shape(forced))}")
    else:
        force = np.zeros((1, 1, 1), dtype=np.bool_)  # unused; keeps one compiled signature
    counts = np.empty((n_rows, heads), dtype=np.int32)
    work = np.empty_like(s)
    nan_at, bad_at = _topk_prepare(s, k_arr, force, has_forced, work, counts)
    if nan_at >= 0:
        n, h, p = np.unravel_index(nan_at, s.shape)
        raise ValueError(f"page_scores[{n}, {h}, {p}] is NaN; use -inf for pages that do not exist")
    if bad_at >= 0:
        n, h, p = np.unravel_index(bad_at, s.shape)
        raise ValueError(f"forced page {p} of row {n}, head {h} has score -inf (it is beyond kv_len)")
    need = int(counts.max()) if counts.size else 0
    if width is None:
        width = need
    elif width < need:
        n, h = np.unravel_index(int(counts.argmax()), counts.shape)
        raise ValueError(f"width {width} is too small: row {n}, head {h} selects {need} pages")
    # The cut of a (row, head) is its counts-th largest value, found for every distinct count in
    # one call of numpy's partition (SIMD: 10x faster than numba's). -inf pages rank below every
    # existing page; a count of 0 keeps the cut at +inf (nothing above it, no ties wanted).
    kth = m - counts.astype(np.int64)
    cut = np.full((n_rows, heads), np.inf, dtype=np.float32)
    if need:
        ranked = np.partition(work, np.unique(kth[kth < m]), axis=-1)
        some = kth < m
        cut[some] = np.take_along_axis(ranked, np.minimum(kth, m - 1)[..., None], -1)[..., 0][some]
    pages = np.empty((n_rows, heads, width), dtype=np.int32)
    _topk_emit(work, cut, counts, pages)
    return torch.from_numpy(pages), torch.from_numpy(counts)


def topk_pages_reference(page_scores, k, forced=None) -> list[list[set[int]]]:
    """Plain-torch ``topk_pages`` as sets per (row, head): forced pages, then torch.topk of the rest
    among existing pages until k in total."""
    s = torch.as_tensor(page_scores).float()
    n_rows, heads, m = s.shape
    ks = [int(k)] * n_rows if isinstance(k, int) else [int(x) for x in k]
    if forced is not None:
        forced = torch.as_tensor(forced).bool()
        if forced.dim() == 2:
            forced = forced[:, None, :].expand(n_rows, heads, m)
    out = []
    for n in range(n_rows):
        row = []
        for h in range(heads):
            f = forced[n, h] if forced is not None else torch.zeros(m, dtype=torch.bool)
            chosen = set(torch.nonzero(f).flatten().tolist())
            rest = s[n, h].masked_fill(f, -math.inf)
            avail = int(torch.isfinite(rest).sum())
            take = min(max(ks[n] - len(chosen), 0), avail)
            if take:
                chosen |= set(torch.topk(rest, take).indices.tolist())
            row.append(chosen)
        out.append(row)
    return out


# ---------------------------------------------------------------------------------------------
# compile ahead and overlap with GPU work

def warmup(dtypes: Sequence[torch.dtype] = _KEY_DTYPES) -> float:
    """Compile the scan kernel for each key dtype on tiny inputs (so compile time never lands in a
    measured block) and exercise top-k; returns the seconds it took."""
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    for dtype in dtypes:
        if dtype not in _WIDEN:
            raise ValueError(f"keys dtype must be one of {tuple(_WIDEN)}, got {dtype}")
        keys = torch.randn(2, 1, 2, 4, generator=gen).to(dtype)
        table = torch.tensor([[0, 1]], dtype=torch.int32)
        q = torch.randn(1, 1, 4, generator=gen)
        host_token_scores(keys, table, [3], q, scale=1.0)
        host_page_scores(keys, table, [3], q, scale=1.0)
    topk_pages(torch.tensor([[[0.5, -math.inf]]]), 1, forced=torch.tensor([[True, False]]))
    return time.perf_counter() - t0


class AsyncScanner:
    """Runs scans on one worker thread and hands back Futures, so the caller can start a scan,
    launch GPU work, then collect. The arrays passed in must stay alive and unchanged until the
    Future is done (the scan reads keys in place; tokens past kv_len may be written meanwhile).

    Args:
        threads: numba threads each scan uses (default: numba's default, all cores).
    """

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cpu-index-scan")

    def warmup(self, dtypes: Sequence[torch.dtype] = _KEY_DTYPES) -> float:
        """Compile the kernels now (in the caller's thread); returns the seconds it took."""
        return warmup(dtypes)

    def submit(self, keys, page_table, kv_len, queries, *, scale: float, aggregate: str = "max",
               out: torch.Tensor | None = None) -> Future:
        """``host_page_scores`` on the worker: Future of ``[N, Hkv, max_pages]`` float32."""
        return self._pool.submit(host_page_scores, keys, page_table, kv_len, queries, scale=scale,
                                 aggregate=aggregate, out=out, threads=self.threads)

    def submit_select(self, keys, page_table, kv_len, queries, k, *, scale: float, aggregate: str = "max",
                      forced=None, width: int | None = None) -> Future:
        """Scores then ``topk_pages`` on the worker: Future of ``(pages [N, Hkv, K], counts [N, Hkv])``."""
        def job():
            scores = host_page_scores(keys, page_table, kv_len, queries, scale=scale, aggregate=aggregate,
                                      threads=self.threads)
            return topk_pages(scores, k, forced, width=width)
        return self._pool.submit(job)

    def close(self) -> None:
        """Waits for submitted scans, then stops the worker."""
        self._pool.shutdown(wait=True)

    def __enter__(self) -> AsyncScanner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
