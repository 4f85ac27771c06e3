"""The partitioned device-side page cache: random selection sequences checked against a plain model
of what must hold, and the pool's content after gathering the misses."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gpu_kernels.page_copy import gather_pages_reference
from offload.partitioned_cache import PartitionedPageCache

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def random_selection(gen, n, h, k, num_pages):
    """[n, h, k] sorted distinct pages, -1 padded (ragged counts, some empty lists)."""
    out = torch.full((n, h, k), -1, dtype=torch.int32)
    for r in range(n):
        for hh in range(h):
            count = int(torch.randint(0, k + 1, (1,), generator=gen))
            out[r, hh, :count] = torch.randperm(num_pages, generator=gen)[:count].sort().values.to(torch.int32)
    return out


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), capacity_extra=st.integers(0, 3))
def test_assign_keeps_hits_and_fills_misses(seed, capacity_extra):
    gen = torch.Generator().manual_seed(seed)
    layers, max_rows, h, k, num_pages = 2, 3, 2, 5, 12
    cache = PartitionedPageCache(layers, max_rows, h, k + capacity_extra, 4, 8, torch.float32, DEV)
    c = cache.capacity
    for _ in range(6):
        layer = int(torch.randint(0, layers, (1,), generator=gen))
        n = int(torch.randint(1, max_rows + 1, (1,), generator=gen))
        rows = torch.randperm(max_rows, generator=gen)[:n]
        entries = random_selection(gen, n, h, k, num_pages)
        before = cache.held[layer].cpu().clone()
        a = cache.assign(layer, rows.to(DEV), entries.to(DEV))
        after = cache.held[layer].cpu()
        table, miss_slots = a.slot_table.cpu(), a.miss_slots.cpu().view(n, h, k)
        for i, r in enumerate(rows.tolist()):
            for hh in range(h):
                base = (r * h + hh) * c
                pages = [p for p in entries[i, hh].tolist() if p >= 0]
                slots = table[i, hh, : len(pages)].tolist()
                assert (table[i, hh, len(pages):] == -1).all()
                assert len(set(slots)) == len(slots) and all(base <= s < base + c for s in slots)
                for j, (page, slot) in enumerate(zip(pages, slots)):
                    assert after[r, hh, slot - base] == page  # the slot holds the page now
                    was = before[r, hh].tolist()
                    if page in was:  # a hit stays where it was and is not fetched
                        assert slot - base == was.index(page) and miss_slots[i, hh, j] == -1
                    else:
                        assert miss_slots[i, hh, j] == slot
        # partitions of rows not planned are untouched
        others = [r for r in range(max_rows) if r not in rows.tolist()]
        assert torch.equal(after[others], before[others])


def test_gathered_pool_holds_the_selected_pages():
    gen = torch.Generator().manual_seed(0)
    num_pages, h, p, d = 20, 2, 4, 8
    store_k, store_v = torch.randn(num_pages, h, p, d, generator=gen), torch.randn(num_pages, h, p, d, generator=gen)
    page_table = torch.stack([torch.randperm(num_pages, generator=gen)[:10] for _ in range(2)])  # [rows, logical]
    cache = PartitionedPageCache(1, 2, h, 6, p, d, torch.float32, DEV)
    rows = torch.tensor([1, 0])
    for _ in range(4):
        entries = random_selection(gen, 2, h, 6, 10)
        a = cache.assign(0, rows.to(DEV), entries.to(DEV))
        phys = page_table[rows][a.miss_rows.cpu(), a.miss_pages.cpu()]
        gather_pages_reference(store_k, store_v, phys, a.miss_heads.cpu(), cache.k_pool(0), cache.v_pool(0),
                               a.miss_slots)
        for i in range(2):
            for hh in range(h):
                for j, page in enumerate(entries[i, hh].tolist()):
                    if page < 0:
                        continue
                    slot = int(a.slot_table[i, hh, j])
                    physical = int(page_table[rows[i], page])
                    assert torch.equal(cache.k_pool(0)[slot].cpu(), store_k[physical, hh])
                    assert torch.equal(cache.v_pool(0)[slot].cpu(), store_v[physical, hh])


def test_invalidate_and_reset():
    cache = PartitionedPageCache(2, 2, 1, 4, 4, 8, torch.float32, DEV)
    entries = torch.tensor([[[0, 3, 5, 7]], [[1, 2, -1, -1]]], dtype=torch.int32, device=DEV)
    rows = torch.tensor([0, 1], device=DEV)
    for layer in range(2):
        cache.assign(layer, rows, entries)
    cache.invalidate(rows, torch.tensor([5, 0], device=DEV), torch.tensor([6, 1], device=DEV))
    assert sorted(cache.held[1, 0, 0].tolist()) == [-1, 0, 3, 7]
    assert sorted(cache.held[0, 1, 0].tolist()) == [-1, -1, -1, 2]
    again = cache.assign(0, rows, entries)
    assert (again.miss_slots >= 0).sum() == 2  # page 5 of row 0 and page 1 of row 1 come back
    cache.reset_rows(torch.tensor([0], device=DEV))
    assert (cache.held[:, 0] == -1).all() and (cache.held[0, 1] >= 0).any()


def test_too_long_a_selection_is_refused():
    cache = PartitionedPageCache(1, 1, 1, 2, 4, 8, torch.float32, DEV)
    with pytest.raises(ValueError, match="does not fit"):
        cache.assign(0, torch.tensor([0], device=DEV), torch.zeros(1, 1, 3, dtype=torch.int32, device=DEV))


def test_protected_slots_are_not_reused():
    """The next block's misses never land in slots the current block still reads."""
    gen = torch.Generator().manual_seed(3)
    cache = PartitionedPageCache(1, 2, 2, 10, 4, 8, torch.float32, DEV)
    rows = torch.tensor([0, 1], device=DEV)
    for _ in range(20):
        current = cache.assign(0, rows, random_selection(gen, 2, 2, 5, 30).to(DEV))
        nxt = cache.assign(0, rows, random_selection(gen, 2, 2, 5, 30).to(DEV), protect=current.slot_table)
        fetched = set(nxt.miss_slots[nxt.miss_slots >= 0].tolist())
        assert not fetched & set(current.slot_table[current.slot_table >= 0].tolist())
    with pytest.raises(ValueError, match="protected"):
        cache.assign(0, rows, random_selection(gen, 2, 2, 6, 30).to(DEV), protect=current.slot_table)
