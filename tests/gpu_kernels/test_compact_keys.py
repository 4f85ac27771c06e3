"""Compact-key quantization and scan kernels vs their plain-torch references.

Tolerances:
- quantization (kernel vs reference): exact, codes and scales bit for bit (both use IEEE division and
  round half away from zero), on CPU (interpreter) and GPU.
- quantization error (dequantized vs original, Gaussian keys, group 32): relative Frobenius error
  < 1% for int8 and < 15% for int4; elementwise |x - dequant(x)| <= scale / 2 (plus 1e-6 relative slack).
- scan (kernel vs reference on the same codes): relative error 1e-5 on the finite scores (fp32
  accumulation order differs), and exactly the same -inf entries.
- top-k: on data with a planted gap, the compact top-k page set equals the exact fp32 top-k set.

Poisoning: output buffers start as NaN (scores) or as a code that quantization never produces
(int8 -128, uint8 0); table entries past a row's pages point at a page whose scales are NaN, and
the scales of token slots past kv_len in a row's last partial page are NaN, so reading anything the
kernel must not read shows up as NaN.
"""
import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from gpu_kernels.compact_keys import (  # noqa: E402
    compact_bytes_per_token, compact_page_scores, compact_page_scores_reference, dequantize_keys,
    kernel_interpreted, quantize_into, quantize_into_reference, quantize_keys, quantize_keys_reference,
    scan_launch_config)

CPU = torch.device("cpu")
SCAN_TOL = 1e-5
CODE_POISON = {8: (torch.int8, -128), 4: (torch.uint8, 0)}  # values quantization never writes


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-30))


def random_keys(shape, gen, dtype=torch.float32):
    """Gaussian keys with a different magnitude per row (so scales vary) and one all-zero group."""
    x = torch.randn(shape, generator=gen) * torch.exp(torch.randn(shape[:-1], generator=gen))[..., None]
    x.view(-1, shape[-1])[0, :8] = 0.0  # zero group at group sizes <= 8; partial zeros otherwise
    return x.to(dtype)


def poisoned_codes(shape, bits, device=CPU):
    dtype, val = CODE_POISON[bits]
    return torch.full(shape, val, dtype=dtype, device=device)


# ----------------------------------------------------------------------------------------------
# quantization


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("d,group", [(64, 32), (128, 16), (64, 64)])
@pytest.mark.parametrize("in_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.float32])
def test_quantize_matches_reference(bits, d, group, in_dtype, scale_dtype):
    gen = torch.Generator().manual_seed(bits * 1000 + d + group)
    k = random_keys((7, 3, d), gen, in_dtype)  # 21 rows: not a multiple of the 16-row block
    k.view(-1, d)[1, :group] = 0.0  # one whole zero group: scale 0, codes 0
    dc = d if bits == 8 else d // 2
    codes = poisoned_codes((7, 3, dc), bits)
    scales = torch.full((7, 3, d // group), float("nan"), dtype=scale_dtype)
    c, s = quantize_keys(k, bits, group, scale_dtype=scale_dtype, codes_out=codes, scales_out=scales)
    cr, sr = quantize_keys_reference(k, bits, group, scale_dtype=scale_dtype)
    assert c.data_ptr() == codes.data_ptr() and s.data_ptr() == scales.data_ptr()
    assert torch.equal(c, cr)
    assert torch.equal(s, sr)
    assert float(s.view(-1, d // group)[1, 0]) == 0.0
    # allocated outputs give the same
    c2, s2 = quantize_keys(k, bits, group, scale_dtype=scale_dtype)
    assert torch.equal(c2, cr) and torch.equal(s2, sr)


@pytest.mark.parametrize("bits,bound", [(8, 0.01), (4, 0.15)])
def test_quantization_error_bound(bits, bound):
    gen = torch.Generator().manual_seed(bits)
    k = torch.randn(64, 128, generator=gen) * 3.0 + 0.5
    codes, scales = quantize_keys(k, bits, 32)
    deq = dequantize_keys(codes, scales, bits, 32)
    err = rel_err(deq, k)
    assert err < bound, f"int{bits} relative error {err:.4f} >= {bound}"
    assert err > 0.0  # quantization is lossy on random data: the check looked at real codes
    # round to nearest: every element within half a step of its group's scale
    half = (scales.float() / 2).repeat_interleave(32, dim=-1)
    assert bool(((deq - k).abs() <= half * (1 + 1e-6) + 1e-12).all())


def test_int4_packing_layout():
    # element 2j in the low nibble, 2j+1 in the high nibble, each stored as code + 8
    k = torch.zeros(1, 16)
    k[0, 0], k[0, 1], k[0, 2], k[0, 3] = 7.0, -7.0, 3.0, 0.0
    codes, scales = quantize_keys(k, 4, 16, scale_dtype=torch.float32)
    assert float(scales[0, 0]) == 1.0
    assert codes[0, :2].tolist() == [(7 + 8) | ((-7 + 8) << 4), (3 + 8) | (8 << 4)]
    assert torch.equal(codes, quantize_keys_reference(k, 4, 16, scale_dtype=torch.float32)[0])


def make_paged_store(num_pages, hkv, page, d, bits, group, device=CPU):
    dc = d if bits == 8 else d // 2
    codes = poisoned_codes((num_pages, hkv, page, dc), bits, device)
    scales = torch.full((num_pages, hkv, page, d // group), float("nan"), dtype=torch.float16, device=device)
    return codes, scales


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("page", [16, 32])
def test_quantize_into_paged(bits, page):
    gen = torch.Generator().manual_seed(bits + page)
    n, hkv, t, d, group, num_pages = 3, 2, 9, 64, 32, 12
    starts = torch.tensor([0, page - 4, 2 * page + 3], dtype=torch.int32)  # the 2nd row crosses a page boundary
    max_pages = 4
    table = torch.full((n, max_pages), -1, dtype=torch.int32)
    perm = torch.randperm(num_pages, generator=gen)
    used = 0
    for i in range(n):
        need = (int(starts[i]) + t + page - 1) // page
        table[i, :need] = perm[used:used + need].int()
        used += need
    k_new = random_keys((n, hkv, t, d), gen)
    codes, scales = make_paged_store(num_pages, hkv, page, d, bits, group)
    codes_r, scales_r = codes.clone(), scales.clone()
    quantize_into(k_new, codes, scales, table, starts, bits=bits, group_size=group)
    quantize_into_reference(k_new, codes_r, scales_r, table, starts, bits=bits, group_size=group)
    assert torch.equal(codes, codes_r)
    assert torch.equal(scales.isnan(), scales_r.isnan())
    assert torch.equal(scales.nan_to_num(), scales_r.nan_to_num())
    # written slots hold quantize_keys of the tokens; every other slot kept its poison
    cq, sq = quantize_keys_reference(k_new, bits, group)
    written = torch.zeros(num_pages, page, dtype=torch.bool)
    for i in range(n):
        for j in range(t):
            pos = int(starts[i]) + j
            pg, sl = int(table[i, pos // page]), pos % page
            written[pg, sl] = True
            assert torch.equal(codes[pg, :, sl], cq[i, :, j])
            assert torch.equal(scales[pg, :, sl], sq[i, :, j])
    dtype, val = CODE_POISON[bits]
    assert bool((codes.permute(0, 2, 1, 3)[~written] == val).all())
    assert bool(scales.permute(0, 2, 1, 3)[~written].isnan().all())


def test_quantize_into_refuses_unallocated_pages():
    codes, scales = make_paged_store(4, 1, 16, 64, 4, 32)
    table = torch.tensor([[2, -1]], dtype=torch.int32)
    k_new = torch.randn(1, 1, 4, 64)
    with pytest.raises(ValueError, match="page ids"):
        quantize_into(k_new, codes, scales, table, torch.tensor([14], dtype=torch.int32), bits=4, group_size=32)
    with pytest.raises(ValueError, match="outside its table"):
        quantize_into(k_new, codes, scales, table, torch.tensor([30], dtype=torch.int32), bits=4, group_size=32)
    # T = 0 writes nothing and is fine
    quantize_into(k_new[:, :, :0], codes, scales, table, torch.tensor([0], dtype=torch.int32), bits=4,
                  group_size=32)
    assert bool((codes == 0).all())


# ----------------------------------------------------------------------------------------------
# scan


def make_scan_case(n, hkv, d, page, kv_lens, bits, group, q_dtype, *, pad="poison", seed=0, device=CPU,
                   queries=None):
    """Random compact store and a table per row (distinct pages in random order). pad='poison': table
    entries past a row's pages point at an all-NaN-scale page; pad='neg': they are -1. queries=R:
    q is [N, Hkv, R, D] (R selection queries per row and head) instead of [N, Hkv, D]."""
    gen = torch.Generator().manual_seed(seed)
    kv_len = torch.tensor(kv_lens, dtype=torch.int32)
    need = [(int(x) + page - 1) // page for x in kv_lens]
    max_pages = max(need) + 1
    n_real = sum(need) + 3  # a few pages no row uses
    poison = n_real
    keys = random_keys((n_real + 1, hkv, page, d), gen)
    codes, scales = quantize_keys_reference(keys, bits, group)
    scales[poison] = float("nan")
    perm = torch.randperm(n_real, generator=gen)
    table = torch.full((n, max_pages), poison if pad == "poison" else -1, dtype=torch.int32)
    used = 0
    for i, cnt in enumerate(need):
        table[i, :cnt] = perm[used:used + cnt].int()
        used += cnt
        tail = int(kv_lens[i]) - (cnt - 1) * page
        if cnt and tail < page:
            scales[int(table[i, cnt - 1]), :, tail:] = float("nan")
    q = torch.randn(n, hkv, *(() if queries is None else (queries,)), d, generator=gen).to(q_dtype)
    to = dict(device=device)
    return q.to(**to), codes.to(**to), scales.to(**to), table.to(**to), kv_len.to(**to)


def check_scan(q, codes, scales, table, kv_len, bits, group, **launch):
    n, hkv = q.shape[:2]
    max_pages, page = table.shape[1], codes.shape[2]
    scale = 1.0 / math.sqrt(q.shape[-1])
    out = torch.full((n, hkv, max_pages), float("nan"), device=q.device)
    tok_out = torch.full((n, hkv, max_pages * page), float("nan"), device=q.device)
    ps, ts = compact_page_scores(q, codes, scales, table, kv_len, bits=bits, group_size=group, scale=scale,
                                 out=out, token_out=tok_out, **launch)
    pr, tr = compact_page_scores_reference(q, codes, scales, table, kv_len, bits=bits, group_size=group,
                                           scale=scale, return_token_scores=True)
    assert ps.data_ptr() == out.data_ptr() and ts.data_ptr() == tok_out.data_ptr()
    for got, ref in ((ps, pr), (ts, tr)):
        assert not got.isnan().any(), "an output was left unwritten or read poison"
        fin = torch.isfinite(ref)
        assert torch.equal(fin, torch.isfinite(got))
        assert bool((got[~fin] == float("-inf")).all())
        assert rel_err(got[fin], ref[fin]) < SCAN_TOL
    # page scores alone (no token buffer) agree too
    ps2, ts2 = compact_page_scores(q, codes, scales, table, kv_len, bits=bits, group_size=group, scale=scale,
                                   **launch)
    assert ts2 is None and torch.equal(ps2, ps)
    return ps, pr


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("page", [16, 32, 64])
@pytest.mark.parametrize("q_dtype", [torch.float32, torch.float16])
def test_scan_matches_reference(bits, page, q_dtype):
    # ragged: a partial last page, a zero-length row, a single token, whole pages
    kv_lens = [3 * page + 5, 0, 1, 2 * page]
    case = make_scan_case(4, 2, 64, page, kv_lens, bits, 32, q_dtype, seed=page + bits)
    check_scan(*case, bits, 32)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("queries", [1, 3, 8, 20])
@pytest.mark.parametrize("use_dot", [False, True])
def test_scan_query_sets_match_reference(bits, queries, use_dot):
    """[N, Hkv, R, D] queries: the kernel unpacks each tile once and keeps the max over the R queries
    (one after the other, or all at once as a dot with padded columns); it matches the reference,
    and equals the max of R single-query scans."""
    kv_lens = [5 * 16 + 3, 0, 1, 3 * 16]
    q, codes, scales, table, kv_len = make_scan_case(4, 2, 64, 16, kv_lens, bits, 32, torch.float32,
                                                     seed=queries + bits, queries=queries)
    ps, _ = check_scan(q, codes, scales, table, kv_len, bits, 32, block_n=32, chunk_pages=3, use_dot=use_dot)
    single = torch.stack([compact_page_scores(q[:, :, r], codes, scales, table, kv_len, bits=bits, group_size=32,
                                              scale=1.0 / math.sqrt(64), block_n=32, chunk_pages=3)[0]
                          for r in range(queries)])
    fin = torch.isfinite(ps)
    assert torch.equal(fin, torch.isfinite(single[0]))
    assert rel_err(ps[fin], single.amax(0)[fin]) < SCAN_TOL


@pytest.mark.parametrize("block_n,chunk_pages", [(16, 1), (32, 3), (64, 2), (128, 5)])
def test_scan_tiles_and_chunks(block_n, chunk_pages):
    # tiles of 1-8 pages, chunks that do not divide the table nor align with tiles
    kv_lens = [7 * 16 + 9, 16, 0, 5 * 16]
    case = make_scan_case(4, 3, 128, 16, kv_lens, 4, 32, torch.float32, seed=block_n)
    check_scan(*case, 4, 32, block_n=block_n, chunk_pages=chunk_pages)


def test_scan_negative_padding_and_per_head_lengths():
    q, codes, scales, table, kv_len = make_scan_case(3, 2, 64, 16, [40, 17, 0], 8, 16, torch.float32,
                                                     pad="neg", seed=5)
    check_scan(q, codes, scales, table, kv_len, 8, 16, chunk_pages=1)
    # kv_len [N, Hkv]: heads of a row see different lengths (within the row's pages)
    per_head = torch.tensor([[40, 21], [17, 3], [0, 0]], dtype=torch.int32)
    check_scan(q, codes, scales, table, per_head, 8, 16)


def test_scan_empty_shapes():
    q, codes, scales, table, kv_len = make_scan_case(2, 2, 64, 16, [20, 5], 4, 32, torch.float32)
    ps, ts = compact_page_scores(q[:0], codes, scales, table[:0], kv_len[:0], bits=4, group_size=32, scale=1.0,
                                 return_token_scores=True)
    assert ps.shape == (0, 2, table.shape[1]) and ts.shape == (0, 2, table.shape[1] * 16)
    ps, _ = compact_page_scores(q, codes, scales, table[:, :0], torch.zeros_like(kv_len), bits=4, group_size=32,
                                scale=1.0)
    assert ps.shape == (2, 2, 0)


@pytest.mark.parametrize("bits", [4, 8])
def test_topk_pages_agree_with_exact_scores(bits):
    """Planted high-scoring tokens in k pages per (row, head): the compact top-k page set must equal the
    exact fp32 one when the exact scores leave a gap larger than the quantization error."""
    gen = torch.Generator().manual_seed(11 + bits)
    n, hkv, d, page, pages, k_top, group = 2, 2, 128, 16, 48, 6, 32
    q = torch.randn(n, hkv, d, generator=gen)
    keys = torch.randn(n * pages, hkv, page, d, generator=gen)
    table = torch.arange(n * pages, dtype=torch.int32).reshape(n, pages)
    table = table[:, torch.randperm(pages, generator=gen)]
    planted = torch.zeros(n, hkv, pages, dtype=torch.bool)
    for b in range(n):
        for h in range(hkv):
            unit = q[b, h] / q[b, h].norm()
            for e in torch.randperm(pages, generator=gen)[:k_top].tolist():
                strength = 6.0 + 2.0 * float(torch.rand((), generator=gen))  # ordering inside the top-k varies
                slot = int(torch.randint(page, (), generator=gen))
                keys[int(table[b, e]), h, slot] += strength * unit * math.sqrt(d) / 2
                planted[b, h, e] = True
    kv_len = torch.full((n,), pages * page, dtype=torch.int32)
    scale = d ** -0.5
    exact = torch.einsum("nhd,nehtd->nhet", q, keys[table.long()]) * scale  # [N, Hkv, pages, P] fp32
    exact_pages = exact.amax(dim=-1)  # [N, Hkv, pages]
    codes, scales = quantize_keys(keys, bits, group)
    approx, _ = compact_page_scores(q, codes, scales, table, kv_len, bits=bits, group_size=group, scale=scale)
    top_exact = exact_pages.topk(k_top, dim=-1)
    # precondition: the data is well separated (planted pages are the exact top-k, with a gap)
    assert torch.equal(torch.zeros_like(planted).scatter_(-1, top_exact.indices, True), planted)
    sorted_exact = exact_pages.sort(dim=-1, descending=True).values
    gap = (sorted_exact[..., k_top - 1] - sorted_exact[..., k_top]).min()
    err = (approx - exact_pages).abs().max()
    assert gap > 2 * err, f"data not separated enough: gap {gap:.3f} vs max error {err:.3f}"
    top_approx = approx.topk(k_top, dim=-1).indices
    assert torch.equal(top_approx.sort(dim=-1).values, top_exact.indices.sort(dim=-1).values)


def test_dot_needs_sixteen_code_bytes_per_token():
    q, codes, scales, table, kv_len = make_scan_case(2, 2, 16, 16, [20, 5], 4, 16, torch.float32, queries=4)
    with pytest.raises(ValueError, match="use_dot needs"):
        compact_page_scores(q, codes, scales, table, kv_len, bits=4, group_size=16, scale=1.0, use_dot=True)
    check_scan(q, codes, scales, table, kv_len, 4, 16)  # auto: the loop over the queries


def test_argument_errors():
    q, codes, scales, table, kv_len = make_scan_case(2, 2, 64, 16, [20, 5], 4, 32, torch.float32)
    kw = dict(bits=4, group_size=32, scale=1.0)
    with pytest.raises(ValueError, match="must be torch.int8"):
        compact_page_scores(q, codes, scales, table, kv_len, **{**kw, "bits": 8})
    with pytest.raises(ValueError, match="group_size=16"):
        compact_page_scores(q, codes, scales, table, kv_len, **{**kw, "group_size": 16})
    with pytest.raises(ValueError, match="q must be"):
        compact_page_scores(q[:, :1], codes, scales, table, kv_len, **kw)
    with pytest.raises(ValueError, match="kv_len"):
        compact_page_scores(q, codes, scales, table, kv_len[:1], **kw)
    with pytest.raises(ValueError, match="out buffer"):
        compact_page_scores(q, codes, scales, table, kv_len, out=torch.empty(1), **kw)
    with pytest.raises(ValueError, match="head_dim must be a power of two"):
        quantize_keys(torch.randn(2, 96), 8, 32)
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        quantize_keys(torch.randn(2, 64), 2, 32)
    with pytest.raises(ValueError, match="kv_len must lie"):
        compact_page_scores_reference(q, codes, scales, table, kv_len + 1000, **kw)


def test_launch_config_and_sizes():
    cfg = scan_launch_config(1, 8, 8192, 16, num_sms=132)
    assert cfg["tile_pages"] == 4
    assert cfg["chunk_pages"] % cfg["tile_pages"] == 0
    assert cfg["num_chunks"] * cfg["chunk_pages"] >= 8192
    assert cfg["grid"][0] * cfg["grid"][1] >= 4 * 132  # a single 128K row still fills an H100
    assert scan_launch_config(2, 2, 10, 16, num_sms=None)["grid"] == (1, 4)  # interpreter: a row per program
    assert scan_launch_config(1, 1, 3, 128, num_sms=None)["tile_pages"] == 1
    # int4 with group 32 and fp16 scales: 64 code bytes + 4 scales x 2 bytes at D = 128
    assert compact_bytes_per_token(128, 4, 32) == 72
    assert compact_bytes_per_token(128, 8, 32, torch.float32) == 144


def test_interpreter_flag_matches_environment():
    assert kernel_interpreted() == (not torch.cuda.is_available())


# ----------------------------------------------------------------------------------------------
# GPU


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [8, 4])
def test_gpu_bf16_quantize_exact(bits):
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(bits)
    k = random_keys((4, 8, 100, 128), gen, torch.bfloat16).to(dev)
    c, s = quantize_keys(k, bits, 32)
    cr, sr = quantize_keys_reference(k, bits, 32)
    assert torch.equal(c, cr) and torch.equal(s, sr)
    # paged write of a block into a GPU compact store
    codes, scales = make_paged_store(64, 8, 16, 128, bits, 32, dev)
    codes_r, scales_r = codes.clone(), scales.clone()
    table = torch.randperm(64, generator=gen)[:4 * 16].reshape(4, 16).int().to(dev)
    starts = torch.tensor([0, 7, 100, 130], dtype=torch.int32, device=dev)
    blk = k[:, :, :32].contiguous()
    quantize_into(blk, codes, scales, table, starts, bits=bits, group_size=32)
    quantize_into_reference(blk, codes_r, scales_r, table, starts, bits=bits, group_size=32)
    assert torch.equal(codes, codes_r)
    assert torch.equal(scales.nan_to_num(), scales_r.nan_to_num()) and torch.equal(scales.isnan(), scales_r.isnan())


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("page", [16, 64])
@pytest.mark.parametrize("queries", [None, 4, 32])
def test_gpu_bf16_scan(bits, page, queries):
    dev = torch.device("cuda")
    kv_lens = [32768, 32768 - 7 * page - 3, 1, 0]
    case = make_scan_case(4, 8, 128, page, kv_lens, bits, 32, torch.bfloat16, seed=bits + page, device=dev,
                          queries=queries)
    check_scan(*case, bits, 32, dot_precision="tf32x3")  # near fp32; the others: test_gpu_scan_dot_precisions


@pytest.mark.gpu
def test_gpu_long_context_scan_default_launch():
    """128K tokens, one row, Qwen3-8B KV geometry: the default launch (many chunks per row) matches the
    reference and scores every page."""
    dev = torch.device("cuda")
    page, tokens = 16, 131072
    q, codes, scales, table, kv_len = make_scan_case(1, 8, 128, page, [tokens], 4, 32, torch.bfloat16, seed=3,
                                                     device=dev)
    ps, pr = check_scan(q, codes, scales, table, kv_len, 4, 32)
    assert bool(torch.isfinite(ps[..., :tokens // page]).all())


@pytest.mark.gpu
@pytest.mark.parametrize("precision,tol", [("tf32x3", SCAN_TOL), ("tf32", 3e-3), ("fp16", 3e-3)])
def test_gpu_scan_dot_precisions(precision, tol):
    """The dot path at each operand precision against the fp32 reference (tolerance per precision:
    TF32 and fp16 keep 10 mantissa bits; int4 itself errs by about 5%), 32 queries per head."""
    dev = torch.device("cuda")
    kv_lens = [8192, 8192 - 5 * 16 - 3, 1, 0]
    q, codes, scales, table, kv_len = make_scan_case(4, 8, 128, 16, kv_lens, 4, 32, torch.bfloat16, seed=11,
                                                     device=dev, queries=32)
    scale = 128 ** -0.5
    ps, _ = compact_page_scores(q, codes, scales, table, kv_len, bits=4, group_size=32, scale=scale,
                                use_dot=True, dot_precision=precision)
    pr, _ = compact_page_scores_reference(q, codes, scales, table, kv_len, bits=4, group_size=32, scale=scale)
    fin = torch.isfinite(pr)
    assert torch.equal(fin, torch.isfinite(ps)) and not ps.isnan().any()
    assert rel_err(ps[fin], pr[fin]) < tol
