"""PageFetcher: after each fetch every selected page's slot holds exactly that page's host copy,
only misses are gathered, and (GPU) side fetches on the gather stream land the same bytes."""
import pytest
import torch

from offload.host_store import HostKVStore
from offload.page_fetcher import PageFetcher
from tests.offload.selections import random_selection

CUDA = torch.cuda.is_available()


def filled_store(gen, layers, h, p, d, seqs, tokens, dtype, device):
    store = HostKVStore(layers, h, d, p, seqs * (tokens // p) + 3, dtype=dtype, pin_memory=device.type == "cuda")
    for s in range(seqs):
        store.allocate(s, tokens)
    written = (torch.bfloat16 if device.type == "cuda" else torch.float32) if store.fp8 else dtype
    for layer in range(layers):
        k = torch.randn(seqs, h, tokens, d, generator=gen).to(written)
        v = torch.randn(seqs, h, tokens, d, generator=gen).to(written)
        store.write(layer, store.page_tables(range(seqs)), torch.zeros(seqs, dtype=torch.int32), k.to(device),
                    v.to(device))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return store


def check_resident(store, fetcher, layer, rows, tables, entries, slot_table):
    for i, row_seq in enumerate(rows):
        for h in range(store.num_kv_heads):
            for j, page in enumerate(entries[i, h].tolist()):
                slot = int(slot_table[i, h, j])
                if page < 0:
                    assert slot == -1
                    continue
                physical = int(tables[i, page])
                for pool, pages in ((fetcher.k_pool(layer), store.k(layer)), (fetcher.v_pool(layer), store.v(layer))):
                    assert torch.equal(pool[slot].cpu().view(torch.uint8), pages[physical, h].view(torch.uint8))
                if store.fp8:  # and each slot's scale is its unit's
                    assert float(fetcher.k_scale_pool(layer)[slot]) == float(store.k_scale(layer)[physical, h])
                    assert float(fetcher.v_scale_pool(layer)[slot]) == float(store.v_scale(layer)[physical, h])


@pytest.mark.parametrize("fp8", [False, True], ids=["model_dtype", "fp8"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_fetched_slots_hold_their_pages_and_only_misses_move(device, fp8):
    """Also for an fp8 store: pools of e4m3 codes, each slot's scale copied beside its page."""
    if device == "cuda" and not CUDA:
        pytest.skip("needs CUDA")
    device = torch.device(device)
    dtype = torch.float8_e4m3fn if fp8 else torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(0)
    layers, h, p, d, seqs, tokens, k = 2, 2, 4, 8, 3, 40, 6
    store = filled_store(gen, layers, h, p, d, seqs, tokens, dtype, device)
    fetcher = PageFetcher(store, max_rows=seqs, capacity=k, device=device)
    seq_rows = [2, 0]  # two sequences in partitions 1 and 0
    rows = torch.tensor([1, 0], device=device)
    tables = store.page_tables(seq_rows)
    for step in range(5):
        layer = step % layers
        entries = random_selection(gen, 2, h, k, tokens // p)
        held_before = fetcher.directory.held[layer, rows].cpu()
        slot_table, fetched = fetcher.fetch(layer, rows, tables.to(device), entries.to(device))
        check_resident(store, fetcher, layer, seq_rows, tables, entries, slot_table.cpu())
        hits = sum(int(page in held_before[i, hh].tolist()) for i in range(2) for hh in range(h)
                   for page in entries[i, hh].tolist() if page >= 0)
        assert int(fetched) == int((entries >= 0).sum()) - hits
    again, fetched = fetcher.fetch(layer, rows, tables.to(device), entries.to(device))
    assert int(fetched) == 0 and torch.equal(again, slot_table)
    fetcher.close()
    store.close()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_side_fetches_on_the_gather_stream_land_behind_protected_slots():
    """A side fetch (the lookahead's) runs on the gather stream with capped programs, never takes a
    protected slot, and after its last layer the caller's stream is joined to it."""
    gen = torch.Generator().manual_seed(1)
    device = torch.device("cuda")
    layers, h, p, d, seqs, tokens, k = 3, 2, 16, 64, 2, 512, 5
    store = filled_store(gen, layers, h, p, d, seqs, tokens, torch.bfloat16, device)
    gather = torch.cuda.Stream(device)
    fetcher = PageFetcher(store, max_rows=seqs, capacity=2 * k, device=device, gather_stream=gather,
                          side_programs=2)
    rows = torch.tensor([0, 1], device=device)
    tables = store.page_tables([0, 1])
    side = torch.cuda.Stream(device)
    for layer in range(layers):
        current = random_selection(gen, 2, h, k, tokens // p)
        slots, _ = fetcher.fetch(layer, rows, tables.to(device), current.to(device))
        upcoming = random_selection(gen, 2, h, k, tokens // p)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            next_slots, _ = fetcher.fetch(layer, rows, tables.to(device), upcoming.to(device), protect=slots,
                                          side=True)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        check_resident(store, fetcher, layer, [0, 1], tables, upcoming, next_slots.cpu())
        check_resident(store, fetcher, layer, [0, 1], tables, current, slots.cpu())  # not overwritten


def test_a_pool_larger_than_the_gpu_is_refused_with_what_fits():
    if CUDA:
        device = torch.device("cuda")
        store = HostKVStore(1, 8, 128, 16, 4, dtype=torch.bfloat16)
        free, _ = torch.cuda.mem_get_info()
        capacity = free // (2 * 16 * 128 * 2 * 8) + 1
        with pytest.raises(MemoryError, match="rows would fit; lower the batch or the budget"):
            PageFetcher(store, max_rows=1, capacity=capacity, device=device)
    store = HostKVStore(1, 1, 8, 4, 4, dtype=torch.float32, pin_memory=False)
    with pytest.raises(ValueError, match="side_programs=0 must be >= 1"):
        PageFetcher(store, max_rows=1, capacity=2, device="cpu", side_programs=0)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_without_moving_pages_every_count_is_the_same_and_no_byte_lands(device):
    """move_pages=False (the timing reference): the same slots and counts as a real fetch, the pools
    untouched."""
    if device == "cuda" and not CUDA:
        pytest.skip("needs CUDA")
    device = torch.device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(2)
    store = filled_store(gen, 1, 2, 4, 8, 2, 40, dtype, device)
    real = PageFetcher(store, max_rows=2, capacity=6, device=device)
    reference = PageFetcher(store, max_rows=2, capacity=6, device=device, move_pages=False)
    reference.k_pool(0).fill_(float("nan"))
    rows, tables = torch.tensor([0, 1], device=device), store.page_tables([0, 1]).to(device)
    moved = 0
    for _ in range(3):
        entries = random_selection(gen, 2, 2, 6, 10).to(device)
        slots, fetched = real.fetch(0, rows, tables, entries)
        same_slots, same_count = reference.fetch(0, rows, tables, entries)
        assert torch.equal(slots, same_slots) and int(fetched) == int(same_count)
        moved += int(fetched)
    assert moved > 0 and bool(reference.k_pool(0).isnan().all())
