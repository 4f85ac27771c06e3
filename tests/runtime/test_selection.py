"""Selection: top-k with forced pages against a brute-force reference, and sparse attention over a
selection against plain masked attention over the same keys."""
import math

import pytest
import torch

from gpu_kernels.paged_attention import block_attention
from runtime.attention import masked_attention
from runtime.config import SparseConfig
from runtime.selection import (forced_pages, gather_token_scores, page_scores_from_tokens, select_pages,
                               query_sets, select_tokens, selection_queries, table_attention_torch)


def brute_force_pages(scores, lens, cfg):
    """Per (row, head): forced pages, plus the budget's best others; sorted."""
    n, h, m = scores.shape
    out = []
    for r in range(n):
        c = int(lens[r])
        valid = -(-c // cfg.page_size)
        forced = {i for i in range(valid) if i * cfg.page_size < cfg.sink_tokens
                  or (i + 1) * cfg.page_size > c - cfg.local_window or i == valid - 1}
        keep = min(cfg.budget_pages(c) + len(forced), valid) if c else 0
        row = []
        for hh in range(h):
            rest = sorted((i for i in range(valid) if i not in forced), key=lambda i: -float(scores[r, hh, i]))
            row.append(sorted(forced | set(rest[: keep - len(forced)])))
        out.append(row)
    return out


@pytest.mark.parametrize("lens,page,budget", [
    ([100, 37, 64], 4, dict(budget_fraction=0.2)),
    ([1000, 513, 16], 16, dict(budget_tokens=128)),
    ([5, 0, 33], 4, dict(budget_fraction=1.0)),
    ([260, 250], 8, dict(budget_fraction=0.05)),
])
def test_select_pages_matches_brute_force(lens, page, budget):
    cfg = SparseConfig(page_size=page, sink_tokens=page, local_window=2 * page, **budget)
    lens_t = torch.tensor(lens)
    m = -(-max(lens) // page)
    scores = torch.randn(len(lens), 3, m, generator=torch.Generator().manual_seed(sum(lens)))  # distinct: no ties
    sel = select_pages(scores, lens_t, cfg)
    want = brute_force_pages(scores, lens_t, cfg)
    for r, c in enumerate(lens):
        for h in range(3):
            got = sel.entries[r, h, : sel.counts[r, h]].tolist()
            assert got == want[r][h]
            assert (sel.entries[r, h, sel.counts[r, h]:] == -1).all()
            assert int(sel.kv_len[r, h]) == (0 if not got else (len(got) - 1) * page + c - got[-1] * page)


def test_budget_pages_and_forced():
    cfg = SparseConfig(budget_fraction=0.05, page_size=16, sink_tokens=16, local_window=64)
    assert cfg.budget_pages(128 * 1024) == math.ceil(0.05 * 128 * 1024 / 16)
    assert cfg.budget_pages(10) == 1
    assert SparseConfig(budget_tokens=512).budget_pages(100) == 7  # never beyond the context
    forced = forced_pages(torch.tensor([200]), 13, cfg, "cpu")[0]
    assert forced.nonzero().flatten().tolist() == [0, 8, 9, 10, 11, 12]


@pytest.mark.parametrize("bad", [dict(budget_fraction=0.0), dict(budget_fraction=1.5),
                                 dict(budget_tokens=0),
                                 dict(page_size=12), dict(source="gpu"), dict(query="max")])
def test_bad_sparse_config_is_refused(bad):
    with pytest.raises(ValueError):
        SparseConfig(**bad)


def test_select_tokens_keeps_sinks_window_and_the_best():
    cfg = SparseConfig(budget_tokens=8, page_size=4, sink_tokens=2, local_window=3)
    scores = torch.full((1, 1, 40), -5.0)
    scores[0, 0, [10, 20]] = 3.0
    sel = select_tokens(scores, torch.tensor([30]), cfg)
    got = sel.entries[0, 0, : sel.counts[0, 0]].tolist()
    # 2 sinks + 3 window tokens forced, plus the budget's 8 best others (10 and 20 first)
    assert got[:2] == [0, 1] and got[-3:] == [27, 28, 29] and {10, 20} <= set(got) and len(got) == 5 + 8


def test_page_scores_from_tokens_aggregates():
    t = torch.tensor([[[1.0, 3.0, float("-inf"), float("-inf"), 0.0, 0.0, 0.0, 0.0]]])
    assert page_scores_from_tokens(t, 4, "max").tolist() == [[[3.0, 0.0]]]
    assert page_scores_from_tokens(t, 4, "mean").tolist() == [[[2.0, 0.0]]]
    lse = page_scores_from_tokens(t, 4, "lse")
    assert torch.allclose(lse, torch.tensor([[[math.log(math.e + math.e ** 3), math.log(4.0)]]]))


def test_selection_queries():
    q = torch.randn(2, 6, 5, 8)  # Hq = 6, Hkv = 3, T = 5
    mean = selection_queries(q, 3, "mean")
    assert torch.allclose(mean[1, 2], q[1, 4:6].mean(dim=(0, 1)))
    center = selection_queries(q, 3, "center")
    assert torch.allclose(center[0, 1], q[0, 2:4, 2].mean(0))
    positions = selection_queries(q, 3, "positions")  # [N, Hkv, T, D]: one query per block position
    assert positions.shape == (2, 3, 5, 8)
    assert torch.allclose(positions[1, 2, 3], q[1, 4:6, 3].mean(0))
    assert torch.allclose(positions[:, :, 2], center)
    with pytest.raises(ValueError, match="positions"):
        selection_queries(q, 3, "middle")


def test_query_sets_score_the_max_over_their_queries():
    """gather_token_scores of [N, Hkv, R, D] queries equals the max of R single-query scans."""
    g = torch.Generator().manual_seed(3)
    k_pages = torch.randn(9, 2, 4, 8, generator=g)
    table = torch.tensor([[3, 0, 7], [5, 1, -1]], dtype=torch.int32)
    lens = torch.tensor([10, 6])
    q = torch.randn(2, 2, 3, 8, generator=g)
    got = gather_token_scores(q, k_pages, table, lens, 0.5)
    single = torch.stack([gather_token_scores(q[:, :, r], k_pages, table, lens, 0.5) for r in range(3)])
    assert torch.equal(torch.isfinite(got), torch.isfinite(single[0]))
    assert torch.allclose(got, single.amax(0))
    assert torch.equal(query_sets(q[:, :, 0]), q[:, :, :1])
    with pytest.raises(ValueError, match="selection queries"):
        query_sets(q[0, 0])


def _store(n_pages, hkv, p, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_pages, hkv, p, d, generator=g), torch.randn(n_pages, hkv, p, d, generator=g)


@pytest.mark.parametrize("pool", [False, True])
def test_table_attention_equals_masked_attention(pool):
    """Sparse attention over listed pages == softmax over exactly those tokens plus the block."""
    n, hkv, g, t, d, p = 2, 2, 3, 4, 8, 4
    k_store, v_store = _store(12, hkv, p, d)
    lens = [19, 10]
    lists = [[[0, 2, 4], [1, 4]], [[0, 2], [1, 2]]]  # row 0 page 4 and row 1 page 2 are partial last pages
    width = 3
    table = torch.full((n, hkv, width), -1, dtype=torch.int32)
    kv_len = torch.zeros(n, hkv, dtype=torch.int32)
    for r in range(n):
        for h in range(hkv):
            table[r, h, : len(lists[r][h])] = torch.tensor(lists[r][h])
            kv_len[r, h] = (len(lists[r][h]) - 1) * p + lens[r] - lists[r][h][-1] * p
    if pool:  # one head's page per slot
        k_pages = k_store.permute(1, 0, 2, 3).reshape(-1, p, d)
        v_pages = v_store.permute(1, 0, 2, 3).reshape(-1, p, d)
        slot = table.clone()
        for h in range(hkv):
            slot[:, h] = torch.where(table[:, h] >= 0, table[:, h] + h * 12, -1)
    else:
        k_pages, v_pages, slot = k_store, v_store, table
    q = torch.randn(n, hkv * g, t, d)
    kb, vb = torch.randn(n, hkv, t, d), torch.randn(n, hkv, t, d)
    got = table_attention_torch(q, kb, vb, k_pages, v_pages, slot, kv_len, d ** -0.5)
    for r in range(n):
        for h in range(hkv):
            keys = torch.cat([k_store[pg, h] for pg in lists[r][h]])[: kv_len[r, h]]
            vals = torch.cat([v_store[pg, h] for pg in lists[r][h]])[: kv_len[r, h]]
            keys, vals = torch.cat([keys, kb[r, h]]), torch.cat([vals, vb[r, h]])
            qh = q[r, h * g:(h + 1) * g][None]
            want = masked_attention(qh, keys[None, None], vals[None, None], torch.ones(t, keys.shape[0], dtype=torch.bool))
            assert torch.allclose(got[r, h * g:(h + 1) * g], want[0], atol=1e-5)
    # the Triton kernel (interpreted here) reads the same table the same way; rel err < 1e-4 in fp32
    kern, _, _ = block_attention(q, kb, vb, k_pages, v_pages, slot, kv_len, scale=d ** -0.5)
    assert float((kern - got).norm() / got.norm()) < 1e-4


def test_gather_token_scores():
    k_store, _ = _store(6, 2, 4, 8)
    q_sel = torch.randn(1, 2, 8)
    table = torch.tensor([[3, 1, 5]], dtype=torch.int32)
    scores = gather_token_scores(q_sel, k_store, table, torch.tensor([10]), 0.5)
    keys = torch.cat([k_store[3], k_store[1], k_store[5]], dim=1)  # [Hkv, 12, D]
    want = 0.5 * torch.einsum("hd,hld->hl", q_sel[0], keys)
    assert torch.allclose(scores[0, :, :10], want[:, :10], atol=1e-6)
    assert torch.isinf(scores[0, :, 10:]).all()
