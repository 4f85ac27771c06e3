"""GpuPageCache bookkeeping: plans, hits/misses, LRU-by-selection eviction, pinning, drops, invariants."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from offload.page_cache import GpuPageCache


def _cache(num_slots=8, layers=2):
    return GpuPageCache(layers, num_slots, page_size=4, head_dim=8, dtype=torch.float32, device="cpu")


def _resident_of_plan(cache, plan):
    """Check the plan's slot table against the directory, entry by entry."""
    st_, lp, cnt = plan.slot_table, plan.logical_pages, plan.num_selected
    slots = []
    for r, sid in enumerate(plan.seq_ids):
        for h in range(st_.shape[1]):
            n = int(cnt[r, h])
            assert (st_[r, h, n:] == -1).all() and (lp[r, h, n:] == -1).all()
            for j in range(n):
                assert cache.resident(sid, plan.layer, h, int(lp[r, h, j])) == int(st_[r, h, j])
                slots.append(int(st_[r, h, j]))
    assert len(set(slots)) == len(slots), "two selected pages share a slot"


def test_plan_hits_misses_and_tables():
    cache = _cache(num_slots=8)
    sel = [[[3, 0, 7], [1]], [[2], []]]  # 2 rows x 2 heads, ragged
    p1 = cache.plan(0, ["a", "b"], sel)
    assert (p1.hits, p1.misses) == (0, 5) and p1.slot_table.shape == (2, 2, 3)
    assert p1.logical_pages[0, 0].tolist() == [3, 0, 7] and p1.num_selected.tolist() == [[3, 1], [1, 0]]
    misses = set(zip(p1.miss_rows.tolist(), p1.miss_heads.tolist(), p1.miss_pages.tolist()))
    assert misses == {(0, 0, 3), (0, 0, 0), (0, 0, 7), (0, 1, 1), (1, 0, 2)}
    assert sorted(p1.miss_slots.tolist()) == sorted(p1.slot_table[p1.slot_table >= 0].tolist())
    _resident_of_plan(cache, p1)
    cache.release_plan(p1)
    # the same selection as a padded tensor: all hits, same slots, nothing to fetch
    t = torch.tensor([[[3, 0, 7], [1, -1, -1]], [[2, -1, -1], [-1, -1, -1]]])
    p2 = cache.plan(0, ["a", "b"], t)
    assert (p2.hits, p2.misses, p2.num_misses) == (5, 0, 0)
    assert torch.equal(p2.slot_table, p1.slot_table)
    st_, lp_, cnt_ = p2.device_tables("cpu")
    assert torch.equal(st_, p2.slot_table) and torch.equal(lp_, p2.logical_pages) and torch.equal(cnt_, p2.num_selected)
    # another layer is independent
    p3 = cache.plan(1, ["a"], [[[3]]])
    assert p3.misses == 1
    cache.check_invariants()
    assert cache.stats()["hits"] == 5 and cache.stats()["misses"] == 6


def test_lru_by_selection_evicts_oldest_unpinned():
    cache = _cache(num_slots=6, layers=1)
    cache.release_plan(cache.plan(0, ["s"], [[[0, 1, 2, 3]]]))
    cache.release_plan(cache.plan(0, ["s"], [[[2, 3, 4, 5]]]))  # 2, 3 re-selected: younger than 0, 1
    p = cache.plan(0, ["s"], [[[6, 7]]])
    assert p.misses == 2 and cache.resident("s", 0, 0, 0) is None and cache.resident("s", 0, 0, 1) is None
    assert all(cache.resident("s", 0, 0, i) is not None for i in (2, 3, 4, 5, 6, 7))
    cache.check_invariants()


def test_pinned_pages_are_not_evicted_and_failure_changes_nothing():
    cache = _cache(num_slots=6, layers=1)
    p1 = cache.plan(0, ["s"], [[[0, 1, 2, 3]]])
    with pytest.raises(RuntimeError, match=r"pinned by outstanding plans.*num_slots >= 7"):
        cache.plan(0, ["t"], [[[0, 1, 2]]])
    cache.check_invariants()
    assert all(cache.resident("s", 0, 0, i) is not None for i in range(4)) and cache.free_slots(0) == 2
    # double buffering: a second plan sharing pages pins them twice; releasing one keeps them pinned
    p2 = cache.plan(0, ["s"], [[[2, 3, 4, 5]]])
    cache.release_plan(p1)
    with pytest.raises(RuntimeError, match="pinned"):
        cache.plan(0, ["t"], [[[0, 1, 2]]])
    cache.release_plan(p2)
    assert cache.plan(0, ["t"], [[[0, 1, 2]]]).misses == 3
    with pytest.raises(ValueError, match="already released"):
        cache.release_plan(p2)
    cache.check_invariants()


def test_selection_larger_than_budget_and_bad_selections():
    cache = _cache(num_slots=4, layers=1)
    with pytest.raises(ValueError, match=r"needs 5 slots .* num_slots >= 5"):
        cache.plan(0, ["a"], [[[0, 1, 2], [0, 1]]])
    with pytest.raises(ValueError, match="twice"):
        cache.plan(0, ["a"], [[[1, 1]]])
    with pytest.raises(ValueError, match="negative"):
        cache.plan(0, ["a"], [[[-3]]])
    with pytest.raises(ValueError, match="duplicates"):
        cache.plan(0, ["a", "a"], [[[1]], [[2]]])
    cache.check_invariants()
    assert cache.free_slots(0) == 4


def test_drop_sequence_frees_everything_and_stale_release_is_safe():
    cache = _cache(num_slots=8)
    pa = cache.plan(0, ["a", "b"], [[[0, 1]], [[0]]])
    cache.plan(1, ["a"], [[[5, 6, 7]]])
    assert cache.drop_sequence("a") == 5
    assert cache.drop_sequence("a") == 0
    assert cache.used_slots(0) == 1 and cache.used_slots(1) == 0
    # the freed slots get reused, then the stale plan is released: it must not unpin the new owner
    pc = cache.plan(0, ["c"], [[[0, 1, 2, 3, 4, 5, 6]]])
    cache.release_plan(pa)
    assert cache.pinned_slots(0) == 7  # only b's slot was unpinned by the stale plan
    pd = cache.plan(0, ["d"], [[[0]]])  # evicts b's page, the one unpinned slot
    assert cache.resident("b", 0, 0, 0) is None
    with pytest.raises(RuntimeError, match="pinned"):
        cache.plan(0, ["e"], [[[0]]])
    cache.release_plan(pc)
    cache.release_plan(pd)
    cache.release_all()
    cache.check_invariants()


def test_plan_speed_at_benchmark_scale():
    # 5% of a 128K context at 32-token pages, 8 heads, one row: planning must be far below a layer's time
    import time

    rng = np.random.default_rng(0)
    cache = GpuPageCache(1, 4096, 32, 8, torch.float32, "cpu")
    sel = torch.from_numpy(np.stack([rng.choice(4096, 204, replace=False) for _ in range(8)])[None])
    cache.release_plan(cache.plan(0, [0], sel))
    t0 = time.perf_counter()
    for i in range(20):
        sel2 = sel.clone()
        sel2[0, :, :20] = torch.from_numpy(rng.choice(np.arange(4096, 8192), (8, 20), replace=False))
        cache.release_plan(cache.plan(0, [0], sel2))
    per_plan_ms = (time.perf_counter() - t0) / 20 * 1e3
    assert per_plan_ms < 20, per_plan_ms  # generous for a shared 2-core CI box; typically ~1 ms
    cache.check_invariants()


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("plan"), st.integers(0, 1), st.lists(st.integers(0, 3), min_size=1, max_size=3, unique=True),
                  st.lists(st.lists(st.integers(0, 11), max_size=4, unique=True), min_size=2, max_size=2)),
        st.tuples(st.just("release"), st.integers(0, 10)),
        st.tuples(st.just("drop"), st.integers(0, 3)),
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(OPS)
def test_random_plan_release_drop_keep_invariants(ops):
    cache = _cache(num_slots=10)
    tainted = set()  # plans with a sequence dropped after planning: their tables are stale by design
    for op in ops:
        if op[0] == "plan":
            _, layer, seqs, per_head = op
            sel = [[list(per_head[0]), list(per_head[1][: len(per_head[1]) - i % 2])] for i in range(len(seqs))]
            before = {(r, h, p): cache.resident(s, layer, h, p)
                      for r, s in enumerate(seqs) for h in range(2) for p in sel[r][h]}
            try:
                plan = cache.plan(layer, seqs, sel)
            except ValueError as err:
                assert "needs" in str(err) and sum(len(x) for row in sel for x in row) > 10
            except RuntimeError as err:
                assert "pinned" in str(err)
                after = {(r, h, p): cache.resident(s, layer, h, p)
                         for r, s in enumerate(seqs) for h in range(2) for p in sel[r][h]}
                assert after == before  # a refused plan changes nothing
            else:
                missed = {k for k, v in before.items() if v is None}
                got = set(zip(plan.miss_rows.tolist(), plan.miss_heads.tolist(), plan.miss_pages.tolist()))
                assert got == missed and plan.hits == len(before) - len(missed)
                for k, v in before.items():
                    if v is not None:
                        assert cache.resident(seqs[k[0]], layer, k[1], k[2]) == v  # hits stay put
                _resident_of_plan(cache, plan)
        elif op[0] == "release":
            plans = cache.open_plans
            if plans:
                cache.release_plan(plans[op[1] % len(plans)])
        else:
            cache.drop_sequence(op[1])
            assert op[1] not in cache.sequences
            tainted |= {p.plan_id for p in cache.open_plans if op[1] in p.seq_ids}
        cache.check_invariants()
        for plan in cache.open_plans:  # open plans' pages are still where their tables say
            if plan.plan_id not in tainted:
                _resident_of_plan(cache, plan)
