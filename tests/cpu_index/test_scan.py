"""CPU scan of host keys and top-k page selection against plain-torch references.

Scores: relative error ||out - ref|| / ||ref|| over the finite entries < 1e-5 for every key dtype
(the reference widens the same stored values to fp32, so only summation order differs), and the
-inf pattern (pages/tokens at or beyond kv_len) must match exactly. Outputs are poisoned with NaN
first so that unwritten entries fail. Widening of bf16/fp16 keys is checked exactly (tolerance 0).
Top-k: identical index sets to the torch.topk reference on distinct scores.
"""

import math
import zlib

import pytest
import torch

from cpu_index import (AGGREGATES, AsyncScanner, host_page_scores, host_page_scores_reference,
                       host_token_scores, host_token_scores_reference, topk_pages, topk_pages_reference,
                       warmup)
from cpu_index.scan import _scan_kernel, _topk_emit, _topk_prepare

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TOL = 1e-5


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    finite = torch.isfinite(ref)
    assert torch.equal(finite, torch.isfinite(out)), "-inf pattern differs (or NaN left unwritten)"
    return float((out[finite] - ref[finite]).norm() / ref[finite].norm())


def _case(gen, lens, hkv, psize, dim, max_pages, dtype, extra_pages=3):
    """Keys in shuffled physical pages; rows' tables -1 padded past their own pages."""
    used = [-(-n // psize) for n in lens]
    num_pages = sum(used) + extra_pages
    keys = torch.randn(num_pages, hkv, psize, dim, generator=gen).to(dtype)
    perm = torch.randperm(num_pages, generator=gen)
    table = torch.full((len(lens), max_pages), -1, dtype=torch.int32)
    start = 0
    for n, u in enumerate(used):
        table[n, :u] = perm[start:start + u].int()
        start += u
    queries = torch.randn(len(lens), hkv, dim, generator=gen)
    return keys, table, torch.tensor(lens), queries


# (kv_len per row, Hkv, P, D, max_pages): partial last pages, a zero-length row, a full table,
# a single page, and a table wider than any row needs.
SHAPES = [
    ([37, 0, 64, 5], 2, 16, 32, 4),
    ([1], 1, 4, 8, 1),
    ([100, 7, 33], 3, 8, 16, 16),
    ([128, 128], 2, 64, 64, 2),
]


@pytest.fixture(scope="module", autouse=True)
def _compiled():
    warmup()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("aggregate", AGGREGATES)
@pytest.mark.parametrize("shape", SHAPES)
def test_page_scores_match_reference(dtype, aggregate, shape):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((str(dtype), aggregate, str(shape))).encode()))
    lens, hkv, psize, dim, max_pages = shape
    keys, table, kv_len, q = _case(gen, lens, hkv, psize, dim, max_pages, dtype)
    scale = 1 / math.sqrt(dim)
    out = torch.full((len(lens), hkv, max_pages), math.nan)
    got = host_page_scores(keys, table, kv_len, q, scale=scale, aggregate=aggregate, out=out)
    assert got is out
    ref = host_page_scores_reference(keys, table, kv_len, q, scale=scale, aggregate=aggregate)
    assert _rel_err(out, ref) < TOL
    for n, length in enumerate(lens):  # -inf exactly at pages at/after cdiv(kv_len, P)
        assert torch.isinf(out[n, :, -(-length // psize):]).all()
        assert torch.isfinite(out[n, :, : -(-length // psize)]).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("aggregate", AGGREGATES)
@pytest.mark.parametrize("shape", SHAPES[:3])
def test_query_sets_match_reference_and_single_queries(dtype, aggregate, shape):
    """[N, Hkv, R, D] queries (one per block position): a token scores the max over the R queries, so
    the token scan equals the max of R single-query scans, and the page scores match the reference."""
    gen = torch.Generator().manual_seed(zlib.crc32(repr(("sets", str(dtype), aggregate, str(shape))).encode()))
    lens, hkv, psize, dim, max_pages = shape
    keys, table, kv_len, _ = _case(gen, lens, hkv, psize, dim, max_pages, dtype)
    q = torch.randn(len(lens), hkv, 3, dim, generator=gen)
    scale = 1 / math.sqrt(dim)
    got = host_page_scores(keys, table, kv_len, q, scale=scale, aggregate=aggregate,
                           out=torch.full((len(lens), hkv, max_pages), math.nan))
    ref = host_page_scores_reference(keys, table, kv_len, q, scale=scale, aggregate=aggregate)
    assert _rel_err(got, ref) < TOL
    tokens = host_token_scores(keys, table, kv_len, q, scale=scale)
    single = torch.stack([host_token_scores(keys, table, kv_len, q[:, :, r], scale=scale) for r in range(3)])
    assert _rel_err(tokens, single.amax(0)) < TOL


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_token_scores_match_reference(dtype, shape):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((str(dtype), str(shape), "tok")).encode()))
    lens, hkv, psize, dim, max_pages = shape
    keys, table, kv_len, q = _case(gen, lens, hkv, psize, dim, max_pages, dtype)
    out = torch.full((len(lens), hkv, max_pages * psize), math.nan)
    host_token_scores(keys, table, kv_len, q, scale=0.7, out=out)
    ref = host_token_scores_reference(keys, table, kv_len, q, scale=0.7)
    assert _rel_err(out, ref) < TOL
    for n, length in enumerate(lens):
        assert torch.isinf(out[n, :, length:]).all() and torch.isfinite(out[n, :, :length]).all()


def test_mean_counts_only_valid_tokens():
    # Row kv_len 5 with P = 4: page 1 holds one valid token, so its mean is that token's score.
    gen = torch.Generator().manual_seed(3)
    keys, table, kv_len, q = _case(gen, [5], 1, 4, 8, 2, torch.float32)
    tok = host_token_scores(keys, table, kv_len, q, scale=1.0)
    page = host_page_scores(keys, table, kv_len, q, scale=1.0, aggregate="mean")
    assert torch.allclose(page[0, 0, 1], tok[0, 0, 4], rtol=1e-6, atol=0)
    assert torch.allclose(page[0, 0, 0], tok[0, 0, :4].mean(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_half_keys_widen_exactly(dtype):
    # A one-hot query with scale 1 makes each token score one stored key element: the kernel's
    # widening must equal torch's .float() bit for bit, over a wide range of magnitudes
    # (fp16 subnormals included).
    gen = torch.Generator().manual_seed(11)
    psize, dim = 8, 16
    mags = 10.0 ** torch.randint(-7, 4, (6, 1, psize, dim), generator=gen).float()
    keys = (torch.randn(6, 1, psize, dim, generator=gen) * mags).to(dtype)
    table = torch.arange(6, dtype=torch.int32)[None]
    for d in range(dim):
        q = torch.zeros(1, 1, dim)
        q[0, 0, d] = 1.0
        tok = host_token_scores(keys, table, [6 * psize], q, scale=1.0)
        expect = keys[:, 0, :, d].float().reshape(-1)
        assert torch.equal(tok[0, 0], expect), f"column {d} differs"


def test_threads_argument_gives_same_result():
    gen = torch.Generator().manual_seed(5)
    keys, table, kv_len, q = _case(gen, [90, 33], 2, 8, 32, 12, torch.bfloat16)
    one = host_page_scores(keys, table, kv_len, q, scale=0.2, threads=1)
    default = host_page_scores(keys, table, kv_len, q, scale=0.2)
    assert _rel_err(one, default) < TOL
    with pytest.raises(ValueError, match="threads"):
        host_page_scores(keys, table, kv_len, q, scale=0.2, threads=0)


def test_argument_errors():
    gen = torch.Generator().manual_seed(6)
    keys, table, kv_len, q = _case(gen, [20, 9], 2, 4, 8, 6, torch.float32)
    with pytest.raises(ValueError, match="page table has 6 columns"):
        host_page_scores(keys, table, torch.tensor([25, 9]), q, scale=1.0)
    bad = table.clone()
    bad[1, 1] = -1  # row 1 (kv_len 9) reads logical pages 0..2
    with pytest.raises(ValueError, match=r"page_table\[1, 1\]"):
        host_page_scores(keys, bad, kv_len, q, scale=1.0)
    bad[1, 1] = keys.shape[0]
    with pytest.raises(ValueError, match="not a page id"):
        host_page_scores(keys, bad, kv_len, q, scale=1.0)
    with pytest.raises(ValueError, match="contiguous"):
        host_page_scores(keys.transpose(2, 3), table, kv_len, q[..., :4], scale=1.0)
    with pytest.raises(ValueError, match="aggregate"):
        host_page_scores(keys, table, kv_len, q, scale=1.0, aggregate="sum")
    with pytest.raises(ValueError, match="queries"):
        host_page_scores(keys, table, kv_len, q[:, :1], scale=1.0)
    with pytest.raises(ValueError, match="out must be"):
        host_page_scores(keys, table, kv_len, q, scale=1.0, out=torch.empty(2, 2, 5))
    # entries past a row's pages are never read, whatever they hold
    junk = table.clone()
    junk[1, 3:] = 10**6
    assert torch.equal(host_page_scores(keys, junk, kv_len, q, scale=1.0),
                       host_page_scores(keys, table, kv_len, q, scale=1.0))


# ---------------------------------------------------------------------------------------------
# top-k

def _distinct_scores(gen, n_rows, hkv, m, lens_pages):
    """Distinct scores per (row, head) (a permutation), -inf past each row's pages."""
    s = torch.stack([torch.randperm(m, generator=gen).float() for _ in range(n_rows * hkv)]).view(n_rows, hkv, m)
    s = s * 0.37 - 5.0
    for n, used in enumerate(lens_pages):
        s[n, :, used:] = -math.inf
    return s


def _check_topk(pages, counts, ref_sets):
    n_rows, hkv, width = pages.shape
    assert pages.dtype == torch.int32 and counts.dtype == torch.int32
    for n in range(n_rows):
        for h in range(hkv):
            c = int(counts[n, h])
            row = pages[n, h]
            assert (row[c:] == -1).all() and (row[:c] >= 0).all()
            assert (row[:c][1:] > row[:c][:-1]).all(), "not ascending"
            assert set(row[:c].tolist()) == ref_sets[n][h]


@pytest.mark.parametrize("k", [0, 1, 5, 40, [3, 7, 50, 2]])
def test_topk_matches_reference(k):
    gen = torch.Generator().manual_seed(21)
    lens_pages = [30, 12, 5, 0]  # ragged rows, k larger than some rows' pages, an empty row
    s = _distinct_scores(gen, 4, 3, 32, lens_pages)
    pages, counts = topk_pages(s, k)
    ks = [k] * 4 if isinstance(k, int) else k
    assert counts.tolist() == [[min(kk, u)] * 3 for kk, u in zip(ks, lens_pages)]
    assert pages.shape[-1] == int(counts.max())
    _check_topk(pages, counts, topk_pages_reference(s, k))


@pytest.mark.parametrize("per_head", [False, True])
def test_topk_forced_pages_count_within_k(per_head):
    gen = torch.Generator().manual_seed(22)
    lens_pages = [40, 9, 3]
    s = _distinct_scores(gen, 3, 2, 48, lens_pages)
    if per_head:
        forced = torch.zeros(3, 2, 48, dtype=torch.bool)
        forced[0, 0, [0, 39]] = True
        forced[0, 1, [1, 2, 3, 4, 5, 6, 7]] = True  # 7 forced > k = 4: all of them, nothing else
        forced[1, 1, 8] = True
    else:
        forced = torch.zeros(3, 48, dtype=torch.bool)
        forced[0, [0, 1, 39]] = True
        forced[1, 8] = True
        forced[2, [0, 1, 2]] = True
    pages, counts = topk_pages(s, 4, forced)
    ref = topk_pages_reference(s, 4, forced)
    _check_topk(pages, counts, ref)
    f3 = forced if per_head else forced[:, None, :].expand(3, 2, 48)
    for n in range(3):
        for h in range(2):
            got = set(pages[n, h, : int(counts[n, h])].tolist())
            assert set(torch.nonzero(f3[n, h]).flatten().tolist()) <= got
            nf = int(f3[n, h].sum())
            assert int(counts[n, h]) == min(lens_pages[n], max(4, nf))


def test_topk_width_and_errors():
    gen = torch.Generator().manual_seed(23)
    s = _distinct_scores(gen, 2, 2, 16, [16, 6])
    pages, counts = topk_pages(s, 4, width=10)
    assert pages.shape == (2, 2, 10) and (pages[..., 4:] == -1).all()
    _check_topk(pages, counts, topk_pages_reference(s, 4))
    with pytest.raises(ValueError, match="width 3 is too small"):
        topk_pages(s, 4, width=3)
    forced = torch.zeros(2, 16, dtype=torch.bool)
    forced[1, 10] = True  # row 1 has 6 pages
    with pytest.raises(ValueError, match="beyond kv_len"):
        topk_pages(s, 4, forced)
    nan = s.clone()
    nan[0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        topk_pages(nan, 4)
    with pytest.raises(ValueError, match="k must be"):
        topk_pages(s, [1, 2, 3])
    with pytest.raises(ValueError, match="k must be >= 0"):
        topk_pages(s, -1)


def test_topk_on_scan_output():
    # End to end: the selected pages are the reference top-k of the reference scores.
    gen = torch.Generator().manual_seed(24)
    keys, table, kv_len, q = _case(gen, [200, 75, 0], 2, 8, 16, 26, torch.bfloat16)
    scores = host_page_scores(keys, table, kv_len, q, scale=0.25)
    pages, counts = topk_pages(scores, 6)
    ref_scores = host_page_scores_reference(keys, table, kv_len, q, scale=0.25)
    assert counts.tolist() == [[6, 6], [6, 6], [0, 0]]
    _check_topk(pages, counts, topk_pages_reference(ref_scores, 6))


# ---------------------------------------------------------------------------------------------
# async path and compilation

def test_async_scanner():
    gen = torch.Generator().manual_seed(31)
    keys, table, kv_len, q = _case(gen, [300, 41], 2, 16, 32, 20, torch.bfloat16)
    with AsyncScanner(threads=1) as scanner:
        assert scanner.warmup([torch.bfloat16]) >= 0.0
        fut = scanner.submit(keys, table, kv_len, q, scale=0.3, aggregate="lse")
        sel = scanner.submit_select(keys, table, kv_len, q, 5, scale=0.3, forced=torch.eye(2, 20, dtype=torch.bool))
        scores = fut.result(timeout=30)
        pages, counts = sel.result(timeout=30)
    ref = host_page_scores_reference(keys, table, kv_len, q, scale=0.3, aggregate="lse")
    assert _rel_err(scores, ref) < TOL
    expect = topk_pages(host_page_scores(keys, table, kv_len, q, scale=0.3), 5,
                        torch.eye(2, 20, dtype=torch.bool))
    assert torch.equal(pages, expect[0]) and torch.equal(counts, expect[1])
    err = AsyncScanner().submit(keys, table, torch.tensor([300, 500]), q, scale=0.3)
    with pytest.raises(ValueError, match="kv_len"):
        err.result(timeout=30)


def test_kernel_releases_gil_and_is_compiled():
    assert _scan_kernel.targetoptions.get("nogil") is True
    warmup()
    key_types = {str(sig[0].dtype) for sig in _scan_kernel.signatures}
    assert {"uint16", "int16", "float32"} <= key_types
    assert _topk_prepare.signatures and _topk_emit.signatures


def test_topk_ties_take_lowest_pages():
    s = torch.zeros(2, 2, 12)
    s[0, 1, 7] = 1.0  # one clear winner, then ties
    s[1, :, 9:] = -math.inf
    pages, counts = topk_pages(s, 3)
    assert pages.tolist() == [[[0, 1, 2], [0, 1, 7]], [[0, 1, 2], [0, 1, 2]]]
    assert counts.tolist() == [[3, 3], [3, 3]]
