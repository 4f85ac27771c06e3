"""Prefetcher end to end: plan -> fetch -> the pool holds exactly the selected pages; commits land in the
store; drops wait for in-flight transfers; (GPU) wait(layer) orders only that layer and a fetch waits for
the compute that still reads the slots it overwrites. Copies are exact (tolerance 0).

The GPU ordering tests hold a stream with a spin kernel (a "gate") and check what has or has not run
while the gate is still closed, as observed by querying events afterwards: a check counts only if the
gate was still closed after it, so host delays (JIT, a slow CI host) make an attempt inconclusive (it is
retried with a longer gate) instead of failing or passing by luck."""

import functools
import os
import time

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from offload import GpuPageCache, HostKVStore, Prefetcher  # noqa: E402
from gpu_kernels.page_copy import gather_pages  # noqa: E402
from offload.prefetcher import DEFAULT_FETCH_PROGRAMS  # noqa: E402

L, HKV, D, P = 2, 2, 8, 4


def _setup(device="cpu", dtype=torch.float32, num_pages=64, num_slots=24, pin=None):
    store = HostKVStore(L, HKV, D, P, num_pages, dtype=dtype, pin_memory=pin)
    gen = torch.Generator().manual_seed(0)
    store.k_all.copy_(torch.randn(store.k_all.shape, generator=gen).to(dtype))
    store.v_all.copy_(torch.randn(store.v_all.shape, generator=gen).to(dtype))
    cache = GpuPageCache(L, num_slots, P, D, dtype, device)
    cache.k_all.fill_(float("nan"))
    cache.v_all.fill_(float("nan"))
    return store, cache, Prefetcher(store, cache, device)


def _warm_gather(store, cache, pf):
    """Compile and load every gather variant the timed tests hit before they park a stream in a
    sleep: loading a freshly compiled GPU module synchronises the device, which would let the
    sleep finish early and void the ordering the tests check."""
    k_dst, v_dst = torch.empty_like(cache.k_pool(0)), torch.empty_like(cache.v_pool(0))
    for units in range(1, 9):
        ids = torch.arange(units, device="cuda") % min(store.num_pages, cache.num_slots)
        gather_pages(store.kernel_k(0), store.kernel_v(0), ids, ids % HKV, k_dst, v_dst, ids, validate=False,
                     max_programs=pf.max_programs, units_per_program=pf.units_per_program)
    _sleep_cycles_per_ms()  # calibrate the gates' spin now, not in the middle of a test
    torch.cuda.synchronize()


def _assert_pool_holds(store, cache, plan, k_pool=None):
    """Every selected (row, head, logical page) sits in its slot, bit for bit (K and V of the cache's
    pools, or only K of a given ``k_pool`` copy ``[num_slots, P, D]``)."""
    v_pool = None
    if k_pool is None:
        k_pool, v_pool = cache.k_pool(plan.layer).cpu(), cache.v_pool(plan.layer).cpu()
    k_pool = k_pool.cpu()
    for r, sid in enumerate(plan.seq_ids):
        table = store.page_table(sid)
        for h in range(plan.slot_table.shape[1]):
            for j in range(int(plan.num_selected[r, h])):
                slot, lp = int(plan.slot_table[r, h, j]), int(plan.logical_pages[r, h, j])
                assert torch.equal(k_pool[slot], store.k(plan.layer)[int(table[lp]), h])
                if v_pool is not None:
                    assert torch.equal(v_pool[slot], store.v(plan.layer)[int(table[lp]), h])


def test_fetch_fills_pool_and_refetches_only_misses_cpu():
    store, cache, pf = _setup()
    store.allocate("a", 30)  # 8 pages
    store.allocate("junk", 9)
    store.allocate("b", 21)  # 6 pages, not contiguous with a's
    sel = [[[0, 5, 7], [2]], [[1, 4], [0, 3, 5]]]
    plan = cache.plan(1, ["a", "b"], sel)
    pf.fetch(1, ["a", "b"], plan)
    pf.wait(1)
    _assert_pool_holds(store, cache, plan)
    assert cache.k_pool(0).isnan().all()  # other layers untouched
    pf.release(plan)
    plan2 = cache.plan(1, ["a", "b"], [[[0, 6], [2, 3]], [[1], [5]]])
    assert plan2.misses == 2
    pf.fetch(1, ["a", "b"], plan2)
    _assert_pool_holds(store, cache, plan2)
    s = pf.stats()
    assert s["bytes_fetched"] == (9 + 2) * 2 * P * D * 4 and s["fetches"] == 2
    assert s["hidden_fraction"] == 0.0  # the CPU path is synchronous: nothing hidden


def test_commit_then_fetch_sees_new_tokens_cpu():
    store, cache, pf = _setup()
    store.allocate(7, 10)
    store.extend(7, 13)
    gen = torch.Generator().manual_seed(1)
    k = torch.randn(1, HKV, 5, D, generator=gen)
    v = torch.randn(1, HKV, 5, D, generator=gen)
    pf.commit([7], 0, 8, k, v)  # positions 8..12: mid page 2 into page 3
    plan = cache.plan(0, [7], [[[2, 3], [3]]])
    pf.fetch(0, [7], plan)
    _assert_pool_holds(store, cache, plan)
    rk, rv = store.read(7, 0, 8, 13)
    assert torch.equal(rk, k[0]) and torch.equal(rv, v[0])
    assert pf.stats()["bytes_committed"] == 2 * k.numel() * 4


def test_commit_block_writes_every_layer_cpu():
    store, cache, pf = _setup()
    store.allocate("a", 6)
    store.allocate("b", 3)
    store.extend("a", 14)
    store.extend("b", 9)
    gen = torch.Generator().manual_seed(2)
    k = torch.randn(L, 2, HKV, 6, D, generator=gen)
    v = torch.randn(L, 2, HKV, 6, D, generator=gen)
    pf.commit_block(["a", "b"], [7, 3], k, v)  # rows start mid-page, at different positions
    for layer in range(L):
        for r, (sid, s) in enumerate((("a", 7), ("b", 3))):
            rk, rv = store.read(sid, layer, s, s + 6)
            assert torch.equal(rk, k[layer, r]) and torch.equal(rv, v[layer, r])
    assert pf.stats()["commits"] == 1
    with pytest.raises(ValueError, match=r"\[L=2, N, Hkv, T, D\]"):
        pf.commit_block(["a"], 0, k[0, :1], v[0, :1])


def test_errors_and_drop_cpu():
    store, cache, pf = _setup()
    store.allocate("a", 8)  # 2 pages
    plan = cache.plan(0, ["a"], [[[0, 5], []]])
    with pytest.raises(ValueError, match="logical page 5 of 'a'"):
        pf.fetch(0, ["a"], plan)
    with pytest.raises(ValueError, match="does not match"):
        pf.fetch(1, ["a"], plan)
    assert pf.drop_sequence("a") is True
    assert not store.has("a") and cache.used_slots(0) == 0
    cache.check_invariants()
    with pytest.raises(ValueError, match="page_size"):
        Prefetcher(store, GpuPageCache(L, 4, P * 2, D, torch.float32, "cpu"), "cpu")


def test_many_requests_no_leak_cpu():
    store, cache, pf = _setup(num_pages=64, num_slots=16)
    rng = np.random.default_rng(0)
    for i in range(60):
        n = int(rng.integers(4, 60))
        store.allocate(i, n)
        pages = -(-n // P)
        for layer in range(L):
            sel = [[list(rng.choice(pages, min(pages, 3), replace=False)) for _ in range(HKV)]]
            plan = cache.plan(layer, [i], sel)
            pf.fetch(layer, [i], plan)
            pf.wait(layer)
            _assert_pool_holds(store, cache, plan)
            pf.release(plan)
        live = store.sequences
        if len(live) > 1 + i % 3:  # sequences finish out of order, some while others continue
            pf.drop_sequence(live[int(rng.integers(len(live)))])
    for s in list(store.sequences):
        pf.drop_sequence(s)
    pf.synchronize()
    assert store.free_pages == 64 and all(cache.used_slots(layer) == 0 for layer in range(L))
    cache.check_invariants()


# ---------------------------------------------------------------------------------------------- GPU

SLEEP_CYCLES = 2_000_000_000  # about a second of GPU spin: far longer than any host step below
GATE_MS = (1000.0, 2000.0, 4000.0)  # gate length per attempt: retried longer when the host was too slow


@functools.lru_cache(maxsize=None)
def _sleep_cycles_per_ms() -> float:
    """Clock cycles ``torch.cuda._sleep`` spins per millisecond on this GPU (timed once). The fastest of a
    few runs: the clock may still be ramping up in the first, and a gate sized from a slow run would be
    shorter than asked."""
    torch.cuda._sleep(1000)  # load the spin kernel now: a module load synchronises the device
    rates = []
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        cycles = 100_000_000
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
        rates.append(cycles / start.elapsed_time(end))
    return max(rates)


class _Gate:
    """Holds ``stream`` for about ``ms``: a spin kernel, then ``done``. Work queued on ``stream`` after
    it, and work waiting on that later work, cannot start before ``done`` completes."""

    def __init__(self, stream: torch.cuda.Stream, ms: float) -> None:
        self.ms, self.stream = ms, stream
        cycles = int(ms * _sleep_cycles_per_ms())
        self.done = torch.cuda.Event()
        self.t0 = time.perf_counter()  # the spin starts on the GPU no earlier than this
        with torch.cuda.stream(stream):
            torch.cuda._sleep(cycles)
            self.done.record(stream)

    def closed(self) -> bool:
        """Still spinning now (so it was at every earlier moment since it started)."""
        return not self.done.query()

    def closed_with_margin(self) -> bool:
        """Still spinning with at least ~3/4 of its length left (the spin started after ``t0`` and lasts
        ~``ms``; the calibration would have to be off by 4x for this to be wrong)."""
        return self.closed() and self.host_ms() < self.ms / 4

    def host_ms(self) -> float:
        return (time.perf_counter() - self.t0) * 1e3

    def inconclusive(self, what: str) -> str:
        why = ("less than half the gate passed on the host, so something on that path synchronised the device"
               if self.host_ms() < self.ms / 2 else "the host was slower than the gate")
        return f"{self.ms:.0f} ms gate over {self.host_ms():.0f} ms after it was enqueued, before {what} ({why})"


def _forget(pf, cache, seq_id):
    """Between attempts: drop ``seq_id``'s resident pages (keeping its host pages) and poison the pools
    again, so the next attempt's selections all miss."""
    pf.drop_sequence(seq_id, free_host=False)
    pf.synchronize()
    cache.k_all.fill_(float("nan"))
    cache.v_all.fill_(float("nan"))
    torch.cuda.synchronize()


@pytest.mark.gpu
def test_gpu_fetch_commit_roundtrip_bf16():
    store, cache, pf = _setup("cuda", torch.bfloat16, num_pages=256, num_slots=200)
    assert store.pinned, store.pin_method  # is_pinned() misses cudaHostRegister'ed memory (torch 2.11)
    store.allocate(0, 500)
    store.allocate(1, 333)
    k = torch.randn(L, 2, HKV, 32, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    pf.commit([0, 1], None, [200, 300], k, v)  # all layers, mid-page starts
    plans = []
    for layer in range(L):
        plan = cache.plan(layer, [0, 1], [[list(range(40, 60)), list(range(50, 90))], [list(range(70, 84)), [0]]])
        pf.fetch(layer, [0, 1], plan)  # pages 50..57 of seq 0 and 75..82 of seq 1 were just committed
        pf.wait(layer)
        pf.release(plan)
        plans.append(plan)
    pf.synchronize()
    for layer, plan in enumerate(plans):
        _assert_pool_holds(store, cache, plan)
        rk, _ = store.read(1, layer, 300, 332)
        assert torch.equal(rk, k[layer, 1].cpu())
    s = pf.stats()
    assert s["bytes_fetched"] > 0 and s["fetch_ms"] > 0 and s["commit_ms"] > 0


@pytest.mark.gpu
def test_gpu_streams_priorities_and_small_gather_grid():
    store, cache, pf = _setup("cuda", torch.bfloat16, num_pages=256, num_slots=200)
    # compute must outrank transfers (lower number = higher priority) for the block scheduler to favour it
    assert pf.compute_stream.priority < pf.fetch_stream.priority
    assert pf.commit_stream.priority == pf.fetch_stream.priority
    assert pf.max_programs == DEFAULT_FETCH_PROGRAMS
    store.allocate(0, 900)
    k = torch.randn(L, 1, HKV, 16, D, device="cuda", dtype=torch.bfloat16)
    with torch.cuda.stream(pf.compute_stream):
        pf.commit_block([0], 880, k, k)
        plan = cache.plan(1, [0], [[list(range(0, 225, 2)), list(range(100, 180))]])  # 113 + 80 <= 200 slots
        pf.fetch(1, [0], plan)
        pf.wait(1)
        pf.release(plan)
    pf.synchronize()
    _assert_pool_holds(store, cache, plan)
    rk, _ = store.read(0, 1, 880, 896)
    assert torch.equal(rk, k[1, 0].cpu())


@pytest.mark.gpu
def test_gpu_wait_orders_only_its_layer():
    """wait(0) on the compute stream must not wait for layer 1's fetch (held behind a gate on the fetch
    stream), and a read after wait(1) must see layer 1's fetched pages."""
    store, cache, pf = _setup("cuda", torch.bfloat16, num_pages=256, num_slots=200)
    _warm_gather(store, cache, pf)
    store.allocate(0, 900)
    sel0 = [[list(range(0, 50)), list(range(100, 150))]]
    sel1 = [[list(range(10, 60)), list(range(0, 30))]]
    notes = []
    for ms in GATE_MS:
        with torch.cuda.stream(pf.compute_stream):
            plan0 = cache.plan(0, [0], sel0)
            pf.fetch(0, [0], plan0)
            gate = _Gate(pf.fetch_stream, ms)  # layer 1's fetch queues behind this on the fetch stream
            plan1 = cache.plan(1, [0], sel1)
            pf.fetch(1, [0], plan1)
            fetched1 = pf._layer_event[1]
            pf.wait(0)
            got = cache.k_pool(0).clone()  # compute reads layer 0's pool
            done0 = torch.cuda.Event()
            done0.record()
            pf.wait(1)
            after = cache.k_pool(1).clone()  # compute reads layer 1's pool: must see the fetched pages
            pf.release(plan0)
            pf.release(plan1)
            margin = gate.closed_with_margin()  # everything above is enqueued with >= ms/2 of gate left
        done0.synchronize()
        layer1_pending = not fetched1.query()
        if gate.closed():  # queried last: the gate, hence layer 1's fetch, was pending at every check above
            assert layer1_pending, "layer 1's fetch finished before the gate it was queued behind"
            break
        # done0 finished only after the gate: wait(0) blocked on layer 1, unless the host was too slow
        assert not margin, (f"the compute stream's read of layer 0 was enqueued with ~{3 * ms / 4:.0f} ms of "
                            "the fetch-stream gate left but finished only after it: wait(0) waited on layer 1")
        notes.append(gate.inconclusive("the compute stream's read of layer 0 was enqueued"))
        _forget(pf, cache, 0)
    else:
        pytest.fail("no conclusive attempt: " + "; ".join(notes))
    torch.cuda.synchronize()
    _assert_pool_holds(store, cache, plan0)
    _assert_pool_holds(store, cache, plan1)
    assert torch.equal(got.view(torch.int16), cache.k_pool(0).view(torch.int16))  # bitwise: unfetched slots hold NaN
    # read after wait(1) while layer 1's fetch was still held: without the wait it would have read the NaNs
    assert torch.equal(after.view(torch.int16), cache.k_pool(1).view(torch.int16))


@pytest.mark.gpu
def test_gpu_fetch_waits_for_compute_that_reads_its_slots():
    """A fetch that overwrites slots of a released plan waits for the compute enqueued before the release
    (held behind a gate on the compute stream), so that compute still reads the old pages."""
    store, cache, pf = _setup("cuda", torch.bfloat16, num_pages=256, num_slots=60)
    _warm_gather(store, cache, pf)
    store.allocate(0, 900)
    sel_a = [[list(range(0, 30)), list(range(0, 30))]]  # 60 units: every slot of layer 0
    sel_b = [[list(range(100, 130)), list(range(100, 130))]]  # 60 other units: must reuse all of a's slots
    notes = []
    for ms in GATE_MS:
        with torch.cuda.stream(pf.compute_stream):
            plan_a = cache.plan(0, [0], sel_a)
            pf.fetch(0, [0], plan_a)
            pf.wait(0)
            gate = _Gate(pf.compute_stream, ms)  # plan a's attention is still running
            seen = cache.k_pool(0).clone()  # ... and reads plan a's slots after it
            pf.release(plan_a)
            plan_b = cache.plan(0, [0], sel_b)
            assert plan_b.num_misses == 60
            assert sorted(plan_b.miss_slots.tolist()) == sorted(plan_a.miss_slots.tolist())
            pf.fetch(0, [0], plan_b)
            fetched_b = pf._layer_event[0]
            time.sleep(0.05)  # ample time for an unordered fetch of 60 small units to run
            b_done = fetched_b.query()
            closed = gate.closed()  # queried last: closed at the query of fetched_b too
            pf.wait(0)
            pf.release(plan_b)
        if closed:
            break
        notes.append(gate.inconclusive("the second fetch was checked"))
        _forget(pf, cache, 0)
    else:
        pytest.fail("no conclusive attempt: " + "; ".join(notes))
    assert not b_done, "the fetch into plan a's slots ran while compute enqueued before release(plan a) was pending"
    torch.cuda.synchronize()
    _assert_pool_holds(store, cache, plan_a, k_pool=seen)  # the gated read saw a's pages, not b's
    _assert_pool_holds(store, cache, plan_b)


@pytest.mark.gpu
def test_gpu_stall_counter_sees_a_long_wait():
    store, cache, pf = _setup("cuda", torch.bfloat16, num_pages=256, num_slots=200)
    _warm_gather(store, cache, pf)
    store.allocate(0, 900)
    with torch.cuda.stream(pf.fetch_stream):
        torch.cuda._sleep(SLEEP_CYCLES)
    plan = cache.plan(0, [0], [[list(range(0, 50)), list(range(100, 150))]])
    pf.fetch(0, [0], plan)
    pf.wait(0)
    torch.cuda.synchronize()
    assert pf.stats()["stall_ms"] > 100  # the compute stream sat in wait(0) behind the sleep


@pytest.mark.gpu
def test_gpu_drop_deferred_until_transfer_done_and_commit_keeps_source_alive():
    store, cache, pf = _setup("cuda", torch.bfloat16, num_pages=256, num_slots=200)
    _warm_gather(store, cache, pf)
    store.allocate(5, 400)
    store.allocate(6, 400)
    sel = [[list(range(20)), list(range(30, 60))]]
    notes = []
    for ms in GATE_MS:
        if not store.has(5):
            store.allocate(5, 400)
        with torch.cuda.stream(pf.compute_stream):
            gate = _Gate(pf.fetch_stream, ms)  # the fetch below queues behind this on the fetch stream
            plan = cache.plan(0, [5], sel)
            pf.fetch(0, [5], plan)
            pf.wait(0)
            pf.release(plan)
            dropped_now = pf.drop_sequence(5)
        if gate.closed():  # queried after the drop: the fetch was still pending when it polled
            break
        notes.append(gate.inconclusive("drop_sequence returned"))
        pf.synchronize()  # completes this attempt's drop
    else:
        pytest.fail("no conclusive attempt: " + "; ".join(notes))
    assert dropped_now is False  # fetch still in flight: nothing freed yet
    assert store.has(5) and cache.used_slots(0) == 50 and 5 in pf.pending_drops
    with pytest.raises(ValueError, match="being dropped"):
        pf.commit([5], 0, 0, torch.zeros(1, HKV, 1, D, device="cuda", dtype=torch.bfloat16),
                  torch.zeros(1, HKV, 1, D, device="cuda", dtype=torch.bfloat16))
    pf.synchronize()
    assert not store.has(5) and cache.used_slots(0) == 0 and not pf.pending_drops
    cache.check_invariants()
    # commit: the source is freed right after the call; the allocator must not hand its memory out
    # again (same stream, same size: its first pick) before the copy, held behind a gate, has run
    notes = []
    for ms in GATE_MS:
        with torch.cuda.stream(pf.compute_stream):
            k = torch.randn(1, HKV, 64, D, device="cuda", dtype=torch.bfloat16)
            v = torch.randn_like(k)
            expect_k = k.cpu()
            src_ptrs = {k.data_ptr(), v.data_ptr()}
            gate = _Gate(pf.commit_stream, ms)
            pf.commit([6], 1, 100, k, v)
            del k, v
            junk = [torch.full((1, HKV, 64, D), 7.0, device="cuda", dtype=torch.bfloat16) for _ in range(8)]
            junk_ptrs = {j.data_ptr() for j in junk}
        closed = gate.closed()
        pf.synchronize()
        rk, _ = store.read(6, 1, 100, 164)
        assert torch.equal(rk, expect_k[0])
        if closed:
            assert not src_ptrs & junk_ptrs, "k/v's memory was handed out again while the commit copy was pending"
            break
        notes.append(gate.inconclusive("the junk tensors were allocated"))
    else:
        pytest.fail("no conclusive attempt: " + "; ".join(notes))


@pytest.mark.gpu
def test_gpu_memory_returns_to_baseline_across_requests():
    store, cache, pf = _setup("cuda", torch.bfloat16, num_pages=256, num_slots=200)
    k = torch.randn(L, 1, HKV, 32, D, device="cuda", dtype=torch.bfloat16)
    ptrs = (store.k_all.data_ptr(), cache.k_all.data_ptr())

    def request(i):
        store.allocate(i, 600)
        pf.commit([i], None, 100, k, k)
        for layer in range(L):
            plan = cache.plan(layer, [i], [[list(range(0, 60, 3)), list(range(40))]])
            pf.fetch(layer, [i], plan)
            pf.wait(layer)
            pf.release(plan)
        pf.drop_sequence(i)  # usually deferred: the fetches are still in flight
        pf.synchronize()  # completes the drop, so the next request finds the pages free

    request(-1)  # every request has the same sizes: one warm-up request covers them
    pf.synchronize()
    gpu0 = torch.cuda.memory_allocated()
    host0 = torch.cuda.host_memory_stats().get("allocated_bytes.current")
    for rnd in range(2):  # equal after one round and after a second: no per-request growth
        for i in range(100):
            request(1000 * rnd + i)
        pf.synchronize()
        assert torch.cuda.memory_allocated() == gpu0, f"round {rnd}"
        assert torch.cuda.host_memory_stats().get("allocated_bytes.current") == host0, f"round {rnd}"
    assert store.free_pages == 256 and cache.used_slots(0) == 0 and not pf.pending_drops
    assert (store.k_all.data_ptr(), cache.k_all.data_ptr()) == ptrs
    cache.check_invariants()
