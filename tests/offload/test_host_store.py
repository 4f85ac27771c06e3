"""HostKVStore: page bookkeeping (hypothesis), writes/reads, memory refusal, and (GPU) pinned UVA writes
and memory returning to baseline across requests. Data checks are exact (tolerance 0): the store copies."""

import os

import psutil
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from gpu_kernels._uva import HostPointer  # noqa: E402
from gpu_kernels.page_copy import gather_pages, write_tokens  # noqa: E402
from offload.host_store import HostKVStore  # noqa: E402


def _store(num_pages=16, page_size=4, layers=2, hkv=2, d=8, dtype=torch.float32, pin=False):
    return HostKVStore(layers, hkv, d, page_size, num_pages, dtype=dtype, pin_memory=pin)


def _check_books(store: HostKVStore, expect_tokens: dict) -> None:
    """Every page is free or owned by exactly one sequence, and tables match token counts."""
    owned = []
    for sid, ntok in expect_tokens.items():
        table = store.page_table(sid).tolist()
        assert store.num_tokens(sid) == ntok
        assert len(table) == -(-ntok // store.page_size)
        owned += table
    free = list(store._free)
    assert len(set(owned)) == len(owned), "a page is owned twice"
    assert not set(owned) & set(free), "a page is both owned and free"
    assert sorted(owned + free) == list(range(store.num_pages)), "a page was lost"
    assert store.free_pages == store.num_pages - len(owned)


OPS = st.lists(
    st.tuples(st.sampled_from(["alloc", "extend", "free"]), st.integers(0, 5), st.integers(0, 40)),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(OPS)
def test_page_bookkeeping_random_ops(ops):
    store = _store(num_pages=16, page_size=4)
    expect: dict[int, int] = {}
    for op, sid, ntok in ops:
        before = (list(store._free), dict(expect))
        try:
            if op == "alloc":
                store.allocate(sid, ntok)
                expect[sid] = ntok
            elif op == "extend":
                store.extend(sid, ntok)
                expect[sid] = ntok
            else:
                store.free(sid)
                del expect[sid]
        except (ValueError, KeyError, RuntimeError) as err:
            # refused ops must be for a reason and must change nothing
            assert (op == "alloc" and sid in expect) or (op != "alloc" and sid not in expect) or (
                op == "extend" and ntok < expect[sid]) or "out of pages" in str(err), (op, sid, ntok, err)
            assert (list(store._free), expect) == before
        _check_books(store, expect)
    for sid in list(expect):
        store.free(sid)
    assert store.free_pages == store.num_pages


def test_errors_are_clear():
    store = _store(num_pages=4, page_size=4)
    store.allocate("a", 10)
    with pytest.raises(ValueError, match="already allocated"):
        store.allocate("a", 1)
    with pytest.raises(RuntimeError, match=r"needs 2 more pages .* only 1 of 4 are free"):
        store.allocate("b", 5)
    with pytest.raises(ValueError, match="shrink"):
        store.extend("a", 3)
    store.free("a")
    with pytest.raises(KeyError, match="double free"):
        store.free("a")
    with pytest.raises(KeyError, match="allocate it first"):
        store.page_table("a")
    assert store.free_pages == 4 and store.capacity_tokens == 16


def test_refuses_more_than_available_memory():
    avail = psutil.virtual_memory().available
    rss = psutil.Process().memory_info().rss
    huge_pages = 4 * avail // (2 * 36 * 8 * 16 * 128 * 2) + 1  # ~4x the host's available memory
    with pytest.raises(MemoryError) as err:
        HostKVStore(36, 8, 128, 16, huge_pages, dtype=torch.bfloat16, pin_memory=False)
    msg = str(err.value)
    assert "At most" in msg and "pages" in msg and "tokens" in msg and "GiB" in msg
    assert psutil.Process().memory_info().rss - rss < 64 * 2**20  # nothing was allocated


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_write_read_roundtrip_cpu(dtype):
    gen = torch.Generator().manual_seed(0)
    store = _store(num_pages=20, page_size=4, dtype=dtype)
    store.allocate("x", 6)
    store.allocate("y", 3)
    store.free("x")  # fragment the free list so tables are non-contiguous
    store.allocate("z", 9)
    store.extend("y", 17)
    kz = torch.randn(2, 9, 8, generator=gen).to(dtype)
    vz = torch.randn(2, 9, 8, generator=gen).to(dtype)
    store.write(1, store.page_tables(["z"]), torch.tensor([0]), kz[None], vz[None])
    # a block starting mid-page, spanning pages, for a batch of two rows
    kb = torch.randn(2, 2, 2, 5, 8, generator=gen).to(dtype)  # [L, N, Hkv, T, D]
    vb = torch.randn(2, 2, 2, 5, 8, generator=gen).to(dtype)
    store.write(None, store.page_tables(["y", "z"]), torch.tensor([11, 3]), kb, vb)
    k, v = store.read("y", 0, 11, 16)
    assert torch.equal(k, kb[0, 0]) and torch.equal(v, vb[0, 0])
    k, v = store.read("z", 1, 0, 9)
    assert torch.equal(k[:, :3], kz[:, :3]) and torch.equal(k[:, 3:8], kb[1, 1]) and torch.equal(k[:, 8:], kz[:, 8:])
    assert torch.equal(v[:, 3:8], vb[1, 1])
    with pytest.raises(ValueError, match=r"row 0 covers positions \[18, 21\) but its page table holds 5 pages"):
        store.write(0, store.page_tables(["y"]), torch.tensor([18]), kz[None, :, :3], vz[None, :, :3])
    with pytest.raises(ValueError, match="dims"):
        store.write(0, store.page_tables(["y"]), torch.tensor([0]), kb, vb)
    with pytest.raises(ValueError, match=r"need page_table \[1, pages\] and start \[1\]"):
        store.write(0, store.page_tables(["y", "z"]), torch.tensor([0]), kz[None], vz[None])


def test_unpinned_store_kernel_views_are_plain_tensors():
    store = _store(pin=False)
    assert not store.pinned and store.pin_method == "none"
    # nothing registered: kernels get the views themselves (the interpreter, or kernel_arg's own checks)
    # the same view (the store is uninitialised memory, which may hold NaN: compare identity, not values)
    kk, k = store.kernel_k(1), store.k(1)
    assert (kk.data_ptr(), kk.shape, kk.stride()) == (k.data_ptr(), k.shape, k.stride())
    assert store.kernel_v(0).data_ptr() == store.v(0).data_ptr()
    assert store.kernel_k_all.data_ptr() == store.k_all.data_ptr()
    assert store.kernel_v_all.shape == store.v_all.shape
    assert not isinstance(store.kernel_k(0), HostPointer)
    store.close()


def _thp_mode() -> str:
    path = "/sys/kernel/mm/transparent_hugepage/enabled"
    if not os.path.exists(path):
        return "absent"
    text = open(path).read()
    return text[text.index("[") + 1:text.index("]")]


@pytest.mark.parametrize("huge", [True, False])
def test_store_backing_pages_and_release(huge):
    """huge_pages=True: a 2 MiB-aligned mapping the OS backs with huge pages once touched (where THP is
    "always" or "madvise"); False: the allocator's pages. Either way the memory leaves with close()."""
    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    store = HostKVStore(2, 2, 64, 16, 4096, dtype=torch.float32, pin_memory=False, huge_pages=huge)  # 32 MiB
    assert store.huge_pages is huge
    assert store.k_all.data_ptr() % (2**21 if huge else 4096) == 0
    store.k_all.fill_(1.0)
    store.v_all.fill_(2.0)
    share = store.huge_page_share()
    if huge and _thp_mode() in ("always", "madvise"):
        # the kernel may fall back to 4 KiB pages when 2 MiB ones are not free: most must still be huge
        assert share is not None and share >= 0.5, share
    if not huge and _thp_mode() == "madvise":
        assert share == 0.0, share
    store.allocate("s", 20)
    store.write(0, store.page_tables(["s"]), torch.tensor([0]), torch.full((1, 2, 20, 64), 3.0),
                torch.full((1, 2, 20, 64), 4.0))
    k, v = store.read("s", 0, 0, 20)
    assert torch.equal(k, torch.full((2, 20, 64), 3.0)) and torch.equal(v, torch.full((2, 20, 64), 4.0))
    assert proc.memory_info().rss - rss0 >= 30 * 2**20  # touched: resident
    del k, v
    store.close()
    assert proc.memory_info().rss - rss0 < 8 * 2**20  # unmapped (huge) or returned to the OS (large malloc)


@pytest.mark.parametrize("huge", [True, False])
def test_fault_in_makes_the_buffer_resident_and_changes_nothing(huge, capsys):
    """What a pinned store runs before registration: every page touched, chunk by chunk, behind a
    progress bar; the memory stays all zeros."""
    from offload.host_store import _fault_in, host_buffer

    proc = psutil.Process()
    # 40 MiB and a few bytes (a ragged last chunk); above glibc's largest mmap threshold, so never
    # memory a freed block left resident
    raw, mapping = host_buffer(40 * 2**20 + 5, huge)
    rss0 = proc.memory_info().rss
    _fault_in(raw, progress=True, chunk_bytes=9 * 2**20)
    assert proc.memory_info().rss - rss0 >= 36 * 2**20
    assert "host KV store" in capsys.readouterr().err
    assert int(raw.count_nonzero()) == 0
    del raw, mapping


def test_close_and_reuse_without_reallocation():
    store = _store(num_pages=8)
    ptr = store.k(0).data_ptr()
    for i in range(50):  # many requests: same buffers, pages all come back
        store.allocate(i, 1 + i % 20)
        store.extend(i, 25)
        store.free(i)
    assert store.k(0).data_ptr() == ptr and store.free_pages == 8
    store.close()
    with pytest.raises(RuntimeError, match="closed"):
        store.allocate(0, 1)


# ---------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_pinned_store_gpu_write_bf16():
    store = HostKVStore(3, 8, 128, 16, 64, dtype=torch.bfloat16)
    # is_pinned() does not see cudaHostRegister'ed memory (torch 2.11): the store says so itself
    assert store.pinned and store.pin_method in ("cudaHostRegister", "torch_pinned_allocator"), store.pin_method
    if store.pin_method == "cudaHostRegister":
        assert isinstance(store.kernel_k(0), HostPointer) and store.kernel_k(0).registered
    store.allocate(1, 100)
    store.allocate(2, 70)
    k = torch.randn(3, 2, 8, 32, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    store.write(None, store.page_tables([1, 2]), torch.tensor([40, 9]), k, v)  # all layers, GPU -> pinned host (UVA)
    store.write(1, store.page_tables([2]).cuda(), torch.tensor([60], device="cuda"), k[1, 1:, :, :10],
                v[1, 1:, :, :10])
    for layer in range(3):
        rk, rv = store.read(1, layer, 40, 72)
        assert torch.equal(rk, k[layer, 0].cpu()) and torch.equal(rv, v[layer, 0].cpu())
    rk, _ = store.read(2, 1, 60, 70)
    assert torch.equal(rk, k[1, 1, :, :10].cpu())
    # a GPU kernel writes and reads the store through kernel_k/kernel_v (all layers, and one layer)
    table = store.page_tables([1]).cuda()
    start = torch.tensor([0], device="cuda")
    kw, vw = torch.randn_like(k[:, :1]), torch.randn_like(k[:, :1])
    write_tokens(store.kernel_k_all, store.kernel_v_all, table, start, kw, vw)
    torch.cuda.synchronize()
    for layer in range(3):
        rk, rv = store.read(1, layer, 0, 32)
        assert torch.equal(rk, kw[layer, 0].cpu()) and torch.equal(rv, vw[layer, 0].cpu())
    pages = store.page_table(1)[:2].long().repeat_interleave(8)  # first two pages, every head
    heads = torch.arange(8).repeat(2)
    slots = torch.randperm(16)
    pool_k = torch.full((16, 16, 128), float("nan"), device="cuda", dtype=torch.bfloat16)
    pool_v = pool_k.clone()
    gather_pages(store.kernel_k(2), store.kernel_v(2), pages.cuda(), heads.cuda(), pool_k, pool_v, slots.cuda())
    torch.cuda.synchronize()
    assert torch.equal(pool_k.cpu()[slots], store.k(2)[pages, heads])
    assert torch.equal(pool_v.cpu()[slots], store.v(2)[pages, heads])
    store.close()


@pytest.mark.gpu
@pytest.mark.parametrize("huge", [True, False])
def test_registered_store_on_huge_or_base_pages_gathers_exactly(huge):
    """Registration faults every page in, so a huge-page store is backed by 2 MiB pages from the start
    (where THP allows); the UVA gather reads either backing bit for bit, and close() unmaps it."""
    rss0 = psutil.Process().memory_info().rss
    store = HostKVStore(2, 8, 128, 16, 1024, dtype=torch.bfloat16, huge_pages=huge)  # 128 MiB
    assert store.pin_method == "cudaHostRegister" and store.huge_pages is huge
    if huge and _thp_mode() in ("always", "madvise"):
        assert store.huge_page_share() >= 0.5, store.huge_page_share()
    store.k_all.copy_(torch.randn(store.k_all.shape).to(torch.bfloat16))
    store.v_all.copy_(torch.randn(store.v_all.shape).to(torch.bfloat16))
    gen = torch.Generator().manual_seed(3)
    pages = torch.randint(0, 1024, (300,), generator=gen, dtype=torch.int32)
    heads = torch.randint(0, 8, (300,), generator=gen, dtype=torch.int32)
    slots = torch.randperm(300, generator=gen).to(torch.int32)
    pool_k = torch.full((300, 16, 128), float("nan"), device="cuda", dtype=torch.bfloat16)
    pool_v = torch.full_like(pool_k, float("nan"))
    gather_pages(store.kernel_k(1), store.kernel_v(1), pages.cuda(), heads.cuda(), pool_k, pool_v, slots.cuda())
    torch.cuda.synchronize()
    p, h, sl = pages.long(), heads.long(), slots.long()
    assert torch.equal(pool_k.cpu()[sl], store.k(1)[p, h]) and torch.equal(pool_v.cpu()[sl], store.v(1)[p, h])
    store.close()
    del store
    assert psutil.Process().memory_info().rss - rss0 < 64 * 2**20  # the 128 MiB went back


@pytest.mark.gpu
def test_memory_returns_to_baseline_across_requests():
    torch.cuda.synchronize()
    rss0 = psutil.Process().memory_info().rss
    store = HostKVStore(4, 8, 128, 16, 512, dtype=torch.bfloat16)  # 64 MiB
    ptrs = (store.k_all.data_ptr(), store.v_all.data_ptr())
    k = torch.randn(4, 1, 8, 32, 128, device="cuda", dtype=torch.bfloat16)
    sizes = [1000 + 37 * j for j in range(5)]  # page tables of 63..72 pages: 252..288 bytes

    def request(i):
        store.allocate(i, sizes[i % len(sizes)])
        store.write(None, store.page_tables([i]), torch.tensor([500]), k, k)
        store.extend(i, 2000)
        store.free(i)

    def host_pinned():
        return torch.cuda.host_memory_stats().get("allocated_bytes.current")

    # Warm-up round over every request size: the pinned staging blocks of the table uploads
    # (offload.uploads) and the device allocator's blocks exist afterwards.
    for i in range(len(sizes)):
        request(i)
    torch.cuda.synchronize()
    gpu0, host0 = torch.cuda.memory_allocated(), host_pinned()
    for rnd in range(2):  # equality after one round and again after a second: no per-request growth
        for i in range(200):
            request(1000 * (rnd + 1) + i)
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() == gpu0, f"round {rnd}"
        assert host_pinned() == host0, f"round {rnd}"
    assert (store.k_all.data_ptr(), store.v_all.data_ptr()) == ptrs and store.free_pages == 512
    store.close()
    del store
    assert psutil.Process().memory_info().rss - rss0 < 32 * 2**20  # the 64 MiB of pinned buffers went back


LOW_LOCKED_LIMIT = r"""
import json, sys
import psutil, torch
import offload.host_store as hs
from offload.host_store import HostKVStore
from runtime import Engine, EngineConfig
from runtime.config import SparseConfig

out = {"limit": hs.locked_memory_limit()}
# the CPU path locks no memory: a store and a herald engine run under any limit
store = HostKVStore(2, 2, 8, 4, 16, dtype=torch.float32, pin_memory=None)
out["cpu_store_pinned"] = store.pinned
store.close()
engine = Engine(EngineConfig(model_path=sys.argv[1], mode="herald", device="cpu", progress=False,
                             sparse=SparseConfig(source="cpu", budget_fraction=0.5)))
[result] = engine.generate(["under a low locked-memory limit"], max_new_tokens=4)
out["served"] = result.finish_reason
# the pinned path as a GPU machine takes it when the limit makes cudaHostRegister fail: the limit is
# real, the CUDA answers are stand-ins (cudaErrorMemoryAllocation; this machine has no GPU to ask)
torch.cuda.is_available = lambda: True
hs.host_register_error = lambda buf: 2
rss = psutil.Process().memory_info().rss
try:
    HostKVStore(4, 8, 128, 16, 256, dtype=torch.bfloat16, pin_memory=True, huge_pages=False)  # 64 MiB, faulted in
except MemoryError as err:
    out["error"] = str(err)
out["rss_growth"] = psutil.Process().memory_info().rss - rss
print(json.dumps(out))
"""


def test_a_low_locked_memory_limit_is_named_with_what_fits():
    """`ulimit -l` lowered in a subprocess: the CPU path is unaffected; a store that cannot be
    page-locked is refused saying what ran out, under which limit, and how many pages fit; the
    memory it touched before the refusal goes back."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    command = f"ulimit -l 1024 && exec {sys.executable} -c '{LOW_LOCKED_LIMIT}' {repo / 'checkpoints' / 'tiny-random'}"
    done = subprocess.run(["bash", "-c", command], cwd=repo, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(repo)})
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["limit"] == 1024 * 1024 and not out["cpu_store_pinned"] and out["served"] == "length"
    page_bytes = 2 * 4 * 8 * 16 * 128 * 2
    assert (f"HostKVStore could not page-lock 0.06 GiB for 256 pages x 16 tokens: cudaHostRegister failed with CUDA "
            f"error 2, and torch's pinned allocator failed too") in out["error"]
    assert (f"The locked-memory limit (ulimit -l) is 1.0 MiB, under which at most {2**20 // page_bytes} pages "
            f"({2**20 // page_bytes * 16} tokens) fit: raise it (ulimit -l unlimited") in out["error"]
    assert out["rss_growth"] < 16 * 2**20  # the 64 MiB faulted in for registration went back


class _RefusingCudart:
    """torch.cuda.cudart() as a GPU machine answers when cudaHostRegister is refused (error 2,
    cudaErrorMemoryAllocation): a stand-in, as this machine has no GPU to ask."""

    def __init__(self):
        self.registered: list[int] = []

    def cudaHostRegister(self, ptr: int, size: int, flags: int) -> int:
        self.registered.append(size)
        return 2


@pytest.mark.parametrize("limit", [None, 2**40])
def test_a_refused_pin_clears_the_cuda_error_and_says_what_fits_in_host_memory(monkeypatch, limit):
    """Where the locked-memory limit is not what refused the store (unlimited, or above the store),
    the refusal says the host could not lock the memory, how much is available and how many pages
    would fit; the refused cudaHostRegister's error is cleared at once, so that torch's next kernel
    launch does not raise it from an unrelated op."""
    import offload.host_store as hs

    class Available:  # 1 GiB available beyond the default reserve of this machine
        @staticmethod
        def virtual_memory():
            real = psutil.virtual_memory()
            return real._replace(available=max(512 * 2**20, real.total // 20) + 2**30)

    cudart, cleared = _RefusingCudart(), []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: cudart)
    monkeypatch.setattr(hs, "clear_cuda_error", lambda: cleared.append(len(cudart.registered)))
    monkeypatch.setattr(hs, "locked_memory_limit", lambda: limit)
    monkeypatch.setattr(hs, "psutil", Available)
    page_bytes = 2 * 4 * 8 * 16 * 128 * 2
    with pytest.raises(MemoryError) as refused:
        HostKVStore(4, 8, 128, 16, 64, dtype=torch.bfloat16, pin_memory=True, huge_pages=False)  # 16 MiB
    assert cudart.registered and cleared == [1]  # cleared right after the refusal, before the fallback
    message = str(refused.value)
    bound = "unlimited" if limit is None else "1024.00 GiB, above the store"
    assert ("HostKVStore could not page-lock 0.02 GiB for 64 pages x 16 tokens: cudaHostRegister failed with CUDA "
            "error 2, and torch's pinned allocator failed too") in message
    assert (f"The locked-memory limit (ulimit -l) is {bound}, so the host is short of memory it can lock (") in message
    assert (f"at most {2**30 // page_bytes} pages ({2**30 // page_bytes * 16} tokens) would fit beside the reserve; "
            "free host memory, or lower the batch or the context (num_pages).") in message


def test_clear_cuda_error_reads_the_loaded_runtimes_last_error(monkeypatch):
    """The clearing goes to the CUDA runtime this process loaded (its last error is per runtime
    instance), found in /proc/self/maps; without one, a tiny launch makes torch read it."""
    import offload.host_store as hs

    calls = []

    class Runtime:
        def cudaGetLastError(self):
            calls.append("cudaGetLastError")
            return 0

    monkeypatch.setattr(hs, "_loaded_cudart", lambda: Runtime())
    hs.clear_cuda_error()
    assert calls == ["cudaGetLastError"]
    monkeypatch.setattr(hs, "_loaded_cudart", lambda: None)
    monkeypatch.setattr(torch, "zeros", lambda *a, **k: calls.append(k["device"]) or (_ for _ in ()).throw(
        RuntimeError("CUDA error: out of memory")))
    hs.clear_cuda_error()  # the launch that reads the stale error raises it: swallowed, it is the one cleared
    assert calls == ["cudaGetLastError", "cuda"]
    monkeypatch.undo()
    assert hs._loaded_cudart() is None  # this CPU build loads no CUDA runtime


@pytest.mark.gpu
def test_a_real_refused_registration_leaves_no_cuda_error_behind():
    """A cudaHostRegister the driver really refuses (the range is registered already: error 712,
    cudaErrorHostMemoryAlreadyRegistered) returns its error to the store and nothing else: the
    next torch kernel launch, which reads the runtime's last error, runs, and the store still gathers."""
    import offload.host_store as hs

    store = HostKVStore(2, 2, 64, 16, 32, dtype=torch.float32, huge_pages=False)
    try:
        assert store.pin_method == "cudaHostRegister"
        error = hs.host_register_error(store.k_all.view(torch.uint8).view(-1))
        assert error not in (0, None), "registering a registered range again was not refused"
        assert torch.ones(8, device="cuda").sum().item() == 8.0  # raises the refusal's error if it was left set
        store.k_all.copy_(torch.randn(store.k_all.shape))
        pool = torch.zeros(4, 16, 64, device="cuda")
        pages, heads, slots = (torch.tensor(x, device="cuda") for x in ([3, 5, 7, 9], [0, 1, 0, 1], [2, 0, 3, 1]))
        gather_pages(store.kernel_k(1), store.kernel_v(1), pages, heads, pool, torch.zeros_like(pool), slots)
        torch.cuda.synchronize()
        assert torch.equal(pool.cpu()[slots.cpu()], store.k(1)[pages.cpu(), heads.cpu()])
    finally:
        store.close()


LOCKED_LIMIT_ON_GPU = r"""
import json, resource
import psutil, torch
import offload.host_store as hs
from offload.host_store import HostKVStore

torch.zeros(1, device="cuda")  # the CUDA context exists before the limit: it is the store's pinning under test
soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
resource.setrlimit(resource.RLIMIT_MEMLOCK, (2**20, hard))  # 1 MiB, lowered for this process alone
out = {"limit": hs.locked_memory_limit()}
rss = psutil.Process().memory_info().rss
try:
    store = HostKVStore(4, 8, 128, 16, 256, dtype=torch.bfloat16, huge_pages=False)  # 64 MiB
except MemoryError as err:
    out["error"] = str(err)
else:
    out["pin_method"] = store.pin_method
    store.k_all.copy_(torch.randn(store.k_all.shape).to(torch.bfloat16))
    gen = torch.Generator().manual_seed(0)
    pages = torch.randint(0, 256, (64,), generator=gen)
    heads = torch.randint(0, 8, (64,), generator=gen)
    slots = torch.randperm(64, generator=gen)
    pool = torch.zeros(64, 16, 128, device="cuda", dtype=torch.bfloat16)
    from gpu_kernels.page_copy import gather_pages
    gather_pages(store.kernel_k(2), store.kernel_v(2), pages.cuda(), heads.cuda(), pool, torch.zeros_like(pool),
                 slots.cuda())
    torch.cuda.synchronize()
    out["gathered_exactly"] = torch.equal(pool.cpu()[slots], store.k(2)[pages, heads])
    store.close()
    del store
# a refusal on the way (cudaHostRegister under the limit) must not surface at torch's next launch
out["torch_runs_after"] = torch.ones(8, device="cuda").sum().item() == 8.0
out["rss_growth"] = psutil.Process().memory_info().rss - rss
print(json.dumps(out))
"""


@pytest.mark.gpu
def test_a_low_locked_memory_limit_on_the_gpu_refuses_clearly_or_pins_regardless():
    """RLIMIT_MEMLOCK lowered to 1 MiB in a subprocess, then a 64 MiB store pinned for real. What the
    platform does is recorded, and each outcome is checked: refused (MemoryError naming the limit and
    the pages that fit under it), registered anyway (the NVIDIA driver pins outside the mlock
    accounting: then the store must gather exactly), or registered by torch's pinned allocator after
    cudaHostRegister was refused (then the refusal's CUDA error must not reach torch's next launch).
    In every case the memory goes back and CUDA keeps working."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", LOCKED_LIMIT_ON_GPU], cwd=repo, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(repo)})
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"under a 1 MiB locked-memory limit: {out}")  # which outcome this platform gives (pytest -s)
    assert out["limit"] == 2**20 and out["torch_runs_after"]
    if "error" in out:
        page_bytes = 2 * 4 * 8 * 16 * 128 * 2
        assert "HostKVStore could not page-lock 0.06 GiB for 256 pages x 16 tokens" in out["error"]
        assert (f"The locked-memory limit (ulimit -l) is 1.0 MiB, under which at most {2**20 // page_bytes} pages "
                f"({2**20 // page_bytes * 16} tokens) fit") in out["error"]
    else:
        assert out["pin_method"] in ("cudaHostRegister", "torch_pinned_allocator") and out["gathered_exactly"]
    assert out["rss_growth"] < 32 * 2**20  # the 64 MiB went back


def test_the_fault_hook_sees_every_transfer_and_a_refused_write_changes_nothing():
    from offload.host_store import TransferFault
    from offload.page_fetcher import PageFetcher

    store = _store(num_pages=8, page_size=4)
    assert store.fault_hook is None  # off unless a test sets it
    store.allocate("a", 8)
    store.allocate("b", 8)
    k = torch.randn(1, 2, 6, 8)
    seen = []

    def hook(op, layer, pages):
        seen.append((op, layer, sorted(pages.tolist())))
        if op == "write" and set(pages.tolist()) & set(store._tables["b"]):
            raise TransferFault(pages.tolist(), "injected")

    store.fault_hook = hook
    store.write(0, store.page_tables(["a"]), torch.tensor([1]), k, k)  # positions 1..6: pages 0 and 1 of "a"
    before = store.k_all.clone()
    with pytest.raises(TransferFault, match="injected") as err:
        store.write(0, store.page_tables(["b"]), torch.tensor([2]), k, k)
    assert torch.equal(store.k_all, before)  # refused before any byte moved
    assert store.owners(err.value.pages) == ["b"] and store.owners([]) == []
    fetcher = PageFetcher(store, max_rows=2, capacity=2, device="cpu")
    entries = torch.tensor([[[0, 1], [1, -1]]], dtype=torch.int32)  # row of "a": head 0 pages 0, 1; head 1 page 1
    fetcher.fetch(0, torch.tensor([0]), store.page_tables(["a"]), entries)
    table = store._tables["a"]
    assert seen == [("write", 0, table[:2]), ("write", 0, store._tables["b"]), ("gather", 0, sorted([*table[:2], table[1]]))]


def _fp8_store_roundtrip(device: str) -> None:
    """An fp8 store: half the bytes of bf16 (scales apart), writes quantize (one layer and all layers,
    a block starting mid-page), reads dequantize to within e4m3's step of each page's largest value,
    and the store's scales are the ones the reference write computes."""
    pin = device == "cuda"
    bf16 = HostKVStore(2, 2, 16, 4, 20, dtype=torch.bfloat16, pin_memory=pin)
    store = HostKVStore(2, 2, 16, 4, 20, dtype=torch.float8_e4m3fn, pin_memory=pin)
    assert store.fp8 and not bf16.fp8 and store.nbytes * 2 == bf16.nbytes and bf16.k_scale(0) is None
    assert store.scale_nbytes == 2 * 2 * 20 * 2 * 4 and store.k_scale(1).shape == (20, 2)
    assert store.k_scale(0).device.type == device
    bf16.close()
    gen = torch.Generator().manual_seed(2)
    store.allocate("y", 3)
    store.allocate("z", 9)
    store.extend("y", 17)
    kz, vz = torch.randn(2, 9, 16, generator=gen), torch.randn(2, 9, 16, generator=gen)
    store.write(1, store.page_tables(["z"]).to(device), torch.tensor([0]).to(device), kz[None].to(device),
                vz[None].to(device))
    kb, vb = torch.randn(2, 2, 2, 5, 16, generator=gen) * 3, torch.randn(2, 2, 2, 5, 16, generator=gen)
    store.write(None, store.page_tables(["y", "z"]).to(device), torch.tensor([11, 3]).to(device), kb.to(device),
                vb.to(device))
    k, v = store.read("z", 1, 0, 9)
    want_k = torch.cat([kz[:, :3], kb[1, 1], kz[:, 8:]], dim=1)
    # per page: within 1/16 of the largest magnitude of that page (two roundings of <= 1/32 each)
    for got, want in ((k, want_k), (v, torch.cat([vz[:, :3], vb[1, 1], vz[:, 8:]], dim=1))):
        for first in range(0, 9, 4):
            page_want = want[:, first:first + 4]
            assert float((got[:, first:first + 4] - page_want).abs().max()) <= page_want.abs().max() / 16
    k, _ = store.read("y", 0, 11, 16)
    assert float((k - kb[0, 0]).norm() / kb[0, 0].norm()) < 0.05
    with pytest.raises(ValueError, match="an fp8 store quantizes them"):
        store.write(0, store.page_tables(["y"]).to(device), torch.tensor([0]).to(device),
                    kb[0, :1].to(torch.float8_e4m3fn).to(device), kb[0, :1].to(torch.float8_e4m3fn).to(device))
    store.close()
    assert store._k_scale is None


def test_fp8_store_roundtrip_cpu():
    _fp8_store_roundtrip("cpu")


@pytest.mark.gpu
def test_fp8_store_roundtrip_pinned_gpu():
    """The same with the UVA write kernel into pinned memory and the scales on the GPU."""
    _fp8_store_roundtrip("cuda")
