"""The page directory: random selection sequences checked against a plain model of what must hold."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from offload.page_directory import PageDirectory
from tests.offload.selections import random_selection

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), capacity_extra=st.integers(0, 3))
def test_assign_keeps_hits_and_fills_misses(seed, capacity_extra):
    gen = torch.Generator().manual_seed(seed)
    layers, max_rows, h, k, num_pages = 2, 3, 2, 5, 12
    directory = PageDirectory(layers, max_rows, h, k + capacity_extra, DEV)
    c = directory.capacity
    for _ in range(6):
        layer = int(torch.randint(0, layers, (1,), generator=gen))
        n = int(torch.randint(1, max_rows + 1, (1,), generator=gen))
        rows = torch.randperm(max_rows, generator=gen)[:n]
        entries = random_selection(gen, n, h, k, num_pages)
        before = directory.held[layer].cpu().clone()
        a = directory.assign(layer, rows.to(DEV), entries.to(DEV))
        after = directory.held[layer].cpu()
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


def test_invalidate_and_reset():
    directory = PageDirectory(2, 2, 1, 4, DEV)
    entries = torch.tensor([[[0, 3, 5, 7]], [[1, 2, -1, -1]]], dtype=torch.int32, device=DEV)
    rows = torch.tensor([0, 1], device=DEV)
    for layer in range(2):
        directory.assign(layer, rows, entries)
    directory.invalidate(rows, torch.tensor([5, 0], device=DEV), torch.tensor([6, 1], device=DEV))
    assert sorted(directory.held[1, 0, 0].tolist()) == [-1, 0, 3, 7]
    assert sorted(directory.held[0, 1, 0].tolist()) == [-1, -1, -1, 2]
    again = directory.assign(0, rows, entries)
    assert (again.miss_slots >= 0).sum() == 2  # page 5 of row 0 and page 1 of row 1 come back
    directory.reset_rows(torch.tensor([0], device=DEV))
    assert (directory.held[:, 0] == -1).all() and (directory.held[0, 1] >= 0).any()


def test_too_long_a_selection_is_refused():
    directory = PageDirectory(1, 1, 1, 2, DEV)
    with pytest.raises(ValueError, match="does not fit"):
        directory.assign(0, torch.tensor([0], device=DEV), torch.zeros(1, 1, 3, dtype=torch.int32, device=DEV))


def test_protected_slots_are_not_reused():
    """The next block's misses never land in slots the current block still reads."""
    gen = torch.Generator().manual_seed(3)
    directory = PageDirectory(1, 2, 2, 10, DEV)
    rows = torch.tensor([0, 1], device=DEV)
    for _ in range(20):
        current = directory.assign(0, rows, random_selection(gen, 2, 2, 5, 30).to(DEV))
        nxt = directory.assign(0, rows, random_selection(gen, 2, 2, 5, 30).to(DEV), protect=current.slot_table)
        fetched = set(nxt.miss_slots[nxt.miss_slots >= 0].tolist())
        assert not fetched & set(current.slot_table[current.slot_table >= 0].tolist())
    with pytest.raises(ValueError, match="protected"):
        directory.assign(0, rows, random_selection(gen, 2, 2, 6, 30).to(DEV), protect=current.slot_table)
