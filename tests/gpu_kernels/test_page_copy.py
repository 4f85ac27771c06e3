"""gather_pages / write_tokens vs their torch references.

Copies must be exact: tolerance 0 (bitwise equal, NaN poison included). Destinations are poisoned
with NaN, so an element the kernel should have written but did not, or wrote where it should not,
differs from the reference run on an identically poisoned copy.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from gpu_kernels._uva import HostPointer, kernel_arg  # noqa: E402
from gpu_kernels.page_copy import (  # noqa: E402
    gather_launch_config,
    gather_pages,
    gather_pages_reference,
    write_tokens,
    write_tokens_reference,
)

CPU_DTYPES = [torch.float32, torch.float16]
# Under the interpreter everything is on the CPU; on a GPU machine the same tests run on the GPU.
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _dev(*tensors):
    return [t.to(DEV) for t in tensors]


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality, NaN == NaN (a NaN where the reference has data fails)."""
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))


def _poisoned(shape, dtype, device="cpu"):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def _units(gen, num_pages, hkv, num_slots, m):
    """m distinct (page, head) units in random order, into m distinct random slots."""
    flat = torch.randperm(num_pages * hkv, generator=gen)[:m]
    pages, heads = flat // hkv, flat % hkv
    slots = torch.randperm(num_slots, generator=gen)[:m]
    return pages, heads, slots


# (num_pages, Hkv, P, D, num_slots, M): ragged P and D, M not a power of two, single head
GATHER_SHAPES = [(13, 3, 4, 16, 20, 17), (9, 1, 16, 8, 11, 5), (6, 2, 3, 24, 12, 7), (40, 4, 8, 32, 9, 9)]


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("shape", GATHER_SHAPES)
def test_gather_pages_matches_reference(dtype, shape):
    num_pages, hkv, p, d, num_slots, m = shape
    gen = torch.Generator().manual_seed(hash(shape) % 2**31)
    src_k = torch.randn(num_pages, hkv, p, d, generator=gen).to(dtype)
    src_v = torch.randn(num_pages, hkv, p, d, generator=gen).to(dtype)
    pages, heads, slots = _units(gen, num_pages, hkv, num_slots, m)
    pages = pages.to(torch.int32)  # mixed index dtypes are allowed
    out_k, out_v = _poisoned((num_slots, p, d), dtype, DEV), _poisoned((num_slots, p, d), dtype, DEV)
    ref_k, ref_v = out_k.clone(), out_v.clone()
    src_k, src_v, pages, heads, slots = _dev(src_k, src_v, pages, heads, slots)
    gather_pages(src_k, src_v, pages, heads, out_k, out_v, slots)
    gather_pages_reference(src_k, src_v, pages, heads, ref_k, ref_v, slots)
    assert _same(out_k, ref_k) and _same(out_v, ref_v)
    assert not out_k[slots].isnan().any() and out_k.isnan().sum() == (num_slots - m) * p * d


@pytest.mark.parametrize("multi", [False, True])
def test_gather_pages_skips_holes(multi):
    """Units with a negative slot copy nothing, whatever their page ids say (even out of range)."""
    gen = torch.Generator().manual_seed(5)
    layers, num_pages, hkv, p, d, num_slots, m = 2, 10, 2, 4, 16, 12, 9
    shape = (layers, num_pages, hkv, p, d) if multi else (num_pages, hkv, p, d)
    src_k, src_v = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    pages, heads, slots = _units(gen, num_pages, hkv, num_slots, m)
    holes = torch.tensor([1, 4, 5, 8])
    slots[holes] = -1
    pages[holes] = 10_000  # never read
    layer_ids = torch.randint(0, layers, (m,), generator=gen) if multi else None
    dst = (layers, num_slots, p, d) if multi else (num_slots, p, d)
    out_k, out_v = _poisoned(dst, torch.float32, DEV), _poisoned(dst, torch.float32, DEV)
    ref_k, ref_v = out_k.clone(), out_v.clone()
    src_k, src_v, pages, heads, slots = _dev(src_k, src_v, pages, heads, slots)
    layer_ids = None if layer_ids is None else layer_ids.to(DEV)
    gather_pages(src_k, src_v, pages, heads, out_k, out_v, slots, layer_ids)
    gather_pages_reference(src_k, src_v, pages, heads, ref_k, ref_v, slots, layer_ids)
    assert _same(out_k, ref_k) and _same(out_v, ref_v)
    written = (~out_k.isnan()).sum() // (p * d)
    assert written == m - len(holes)


@pytest.mark.parametrize(
    "block,max_programs,units",
    [(None, None, None), (16, None, 1), (32, 3, 2), (64, 1, 4), (128, 2, 8), (16, 5, 16)],
)
def test_gather_pages_block_sizes_and_strided_views(block, max_programs, units):
    # P*D = 72: every block leaves a masked tail; max_programs < tasks makes programs loop over tasks;
    # units (per program step) that do not divide M = 8 or exceed it leave masked rows
    gen = torch.Generator().manual_seed(7)
    L, num_pages, hkv, p, d, num_slots, m = 3, 10, 2, 3, 24, 12, 8
    store_k = torch.randn(L, num_pages, hkv, p, d, generator=gen, dtype=torch.float16)
    store_v = torch.randn(L, num_pages, hkv, p, d, generator=gen, dtype=torch.float16)
    pool_k = _poisoned((L, num_slots, p, d), torch.float16, DEV)
    pool_v = pool_k.clone()
    ref_k, ref_v = pool_k.clone(), pool_v.clone()
    pages, heads, slots = _dev(*_units(gen, num_pages, hkv, num_slots, m))
    store_k, store_v = _dev(store_k, store_v)
    # per-layer views of larger tensors: non-trivial outer strides and storage offsets
    gather_pages(store_k[1], store_v[1], pages, heads, pool_k[2], pool_v[2], slots,
                 block=block, num_warps=1 if block else None, max_programs=max_programs, units_per_program=units)
    gather_pages_reference(store_k[1], store_v[1], pages, heads, ref_k[2], ref_v[2], slots)
    assert _same(pool_k, ref_k) and _same(pool_v, ref_v)


@pytest.mark.parametrize("units,max_programs", [(1, 1), (2, 3), (4, 2), (8, None)])
def test_gather_pages_even_chunks_persistent_multi_layer(units, max_programs):
    # P*D = 64 split into 4 chunks of 16 (EVEN, no column mask); 13 units over 3 layers, so several
    # tasks per program and a last group with masked rows
    gen = torch.Generator().manual_seed(units)
    L, num_pages, hkv, p, d, num_slots, m = 3, 9, 2, 4, 16, 7, 13
    src_k = torch.randn(L, num_pages, hkv, p, d, generator=gen, dtype=torch.float16)
    src_v = torch.randn(L, num_pages, hkv, p, d, generator=gen, dtype=torch.float16)
    flat = torch.randperm(L * num_slots, generator=gen)[:m]  # distinct (layer, slot) targets
    layers, slots = flat // num_slots, flat % num_slots
    pages = torch.randint(0, num_pages, (m,), generator=gen)
    heads = torch.randint(0, hkv, (m,), generator=gen)
    out_k, out_v = _poisoned((L, num_slots, p, d), torch.float16, DEV), _poisoned((L, num_slots, p, d), torch.float16, DEV)
    ref_k, ref_v = out_k.clone(), out_v.clone()
    src_k, src_v, pages, heads, slots, layers = _dev(src_k, src_v, pages, heads, slots, layers)
    gather_pages(src_k, src_v, pages, heads, out_k, out_v, slots, layers, block=16, num_warps=1,
                 max_programs=max_programs, units_per_program=units)
    gather_pages_reference(src_k, src_v, pages, heads, ref_k, ref_v, slots, layers)
    assert _same(out_k, ref_k) and _same(out_v, ref_v)
    assert out_k.isnan().sum() == (L * num_slots - m) * p * d


def test_gather_launch_config_defaults_and_errors():
    # 16-token pages of D=128: 4 units x 2048 elements per step, 8 warps, 2 programs per SM
    cfg = gather_launch_config(16 * 128, 1000, num_sms=132)
    assert (cfg["block"], cfg["units_per_program"], cfg["num_warps"], cfg["chunks"]) == (2048, 4, 8, 1)
    assert cfg["tasks"] == 250 and cfg["grid"] == 250  # min(250 tasks, 2 x 132 programs)
    cfg = gather_launch_config(128 * 128, 10, num_sms=132, max_programs=16)
    assert (cfg["block"], cfg["units_per_program"], cfg["chunks"], cfg["tasks"], cfg["grid"]) == (4096, 2, 4, 20, 16)
    for kw, msg in ((dict(units_per_program=3), "units_per_program"), (dict(num_warps=6), "num_warps"),
                    (dict(max_programs=0), "max_programs"), (dict(block=100), "block")):
        with pytest.raises(ValueError, match=msg):
            gather_launch_config(64, 4, num_sms=2, **kw)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_gather_pages_multi_layer(dtype):
    gen = torch.Generator().manual_seed(11)
    L, num_pages, hkv, p, d, num_slots = 3, 8, 2, 4, 8, 10
    src_k = torch.randn(L, num_pages, hkv, p, d, generator=gen).to(dtype)
    src_v = torch.randn(L, num_pages, hkv, p, d, generator=gen).to(dtype)
    units = []
    for layer, m in zip(range(L), (4, 0, 7)):  # ragged per layer, one layer with nothing
        pg, hd, sl = _units(gen, num_pages, hkv, num_slots, m)
        units.append((torch.full((m,), layer), pg, hd, sl))
    layers, pages, heads, slots, src_k, src_v = _dev(*(torch.cat(x) for x in zip(*units)), src_k, src_v)
    out_k, out_v = _poisoned((L, num_slots, p, d), dtype, DEV), _poisoned((L, num_slots, p, d), dtype, DEV)
    ref_k, ref_v = out_k.clone(), out_v.clone()
    gather_pages(src_k, src_v, pages, heads, out_k, out_v, slots, layers)
    gather_pages_reference(src_k, src_v, pages, heads, ref_k, ref_v, slots, layers)
    assert _same(out_k, ref_k) and _same(out_v, ref_v)
    assert out_k[1].isnan().all()


def test_gather_pages_empty_and_errors():
    src = torch.randn(4, 2, 4, 8)
    dst = _poisoned((5, 4, 8), torch.float32)
    empty = torch.zeros(0, dtype=torch.int64)
    gather_pages(src, src, empty, empty, dst, dst.clone(), empty)
    assert dst.isnan().all()
    one = torch.zeros(1, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"page_ids must lie in \[0, 4\)"):
        gather_pages(src, src, one + 4, one, dst, dst.clone(), one)
    with pytest.raises(ValueError, match=r"slot_ids must lie in \[0, 5\)"):
        gather_pages(src, src, one, one, dst, dst.clone(), one + 5)
    with pytest.raises(ValueError, match="dtype"):
        gather_pages(src, src, one, one, dst.half(), dst.half(), one)
    with pytest.raises(ValueError, match="contiguous"):
        gather_pages(src.transpose(-1, -2), src.transpose(-1, -2), one, one, dst, dst.clone(), one)
    with pytest.raises(ValueError, match="layer_ids"):
        gather_pages(src[None], src[None], one, one, dst[None], dst[None].clone(), one)
    with pytest.raises(ValueError, match="power of two"):
        gather_pages(src, src, one, one, dst, dst.clone(), one, block=48)


def test_unpinned_host_tensor_is_refused_for_gpu_launch():
    host = torch.randn(4, 8)
    with pytest.raises(ValueError, match="pageable host tensor"):
        kernel_arg(host, "src_k", gpu_launch=True)
    with pytest.raises(ValueError, match="pinned"):
        HostPointer(host)
    assert kernel_arg(host, "src_k", gpu_launch=False) is host  # interpreter: plain tensors


def test_registered_host_pointer_skips_pin_check_and_passes_through():
    # cudaHostRegister'ed memory is not is_pinned() on torch 2.11: its owner vouches with registered=True.
    host = torch.randn(4, 8)
    ptr = HostPointer(host, registered=True)
    assert ptr.registered and ptr.tensor is host and ptr.data_ptr() == host.data_ptr()
    assert ptr.shape == host.shape and ptr.stride() == host.stride() and ptr.dtype == host.dtype
    assert kernel_arg(ptr, "src_k", gpu_launch=True) is ptr  # no re-wrap, no pin check
    assert kernel_arg(ptr, "src_k", gpu_launch=False) is host  # the interpreter needs the tensor
    with pytest.raises(ValueError, match="host tensors"):
        HostPointer(torch.randn(2, device="meta"), registered=True)


@pytest.mark.parametrize("multi", [False, True])
def test_page_copy_accepts_host_pointers(multi):
    # Store buffers reach the kernels as HostPointer(registered=True); the wrappers must read their shapes.
    # On a GPU the memory is really pinned (so the vouch is true); under the interpreter it is unwrapped.
    gen = torch.Generator().manual_seed(3)
    L, num_pages, hkv, p, d, num_slots, m, n, t = 2, 9, 2, 4, 8, 10, 6, 2, 5
    shape = (L, num_pages, hkv, p, d) if multi else (num_pages, hkv, p, d)
    store_k, store_v = (torch.randn(shape, generator=gen, dtype=torch.float16) for _ in range(2))
    if torch.cuda.is_available():
        store_k, store_v = store_k.pin_memory(), store_v.pin_memory()
    hk, hv = HostPointer(store_k, registered=True), HostPointer(store_v, registered=True)
    # write_tokens into the store through the pointers
    lead = (L,) if multi else ()
    k_new, v_new = _dev(*(torch.randn(*lead, n, hkv, t, d, generator=gen, dtype=torch.float16) for _ in range(2)))
    table = torch.tensor([[3, 0, 7], [5, 1, 2]], dtype=torch.int32)
    start = torch.tensor([2, 6], dtype=torch.int64)
    ref_k, ref_v = store_k.clone(), store_v.clone()
    write_tokens(hk, hv, table, start, k_new, v_new)
    write_tokens_reference(ref_k, ref_v, table, start, k_new, v_new)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    assert _same(store_k, ref_k) and _same(store_v, ref_v)
    # gather_pages out of the store through the pointers
    pages, heads, slots = _dev(*_units(gen, num_pages, hkv, num_slots, m))
    layers = _dev(torch.arange(m) % L)[0] if multi else None
    pool_shape = (L, num_slots, p, d) if multi else (num_slots, p, d)
    out_k, out_v = _poisoned(pool_shape, torch.float16, DEV), _poisoned(pool_shape, torch.float16, DEV)
    exp_k, exp_v = out_k.clone(), out_v.clone()
    gather_pages(hk, hv, pages, heads, out_k, out_v, slots, layers)
    gather_pages_reference(store_k, store_v, pages, heads, exp_k, exp_v, slots, layers)
    assert _same(out_k, exp_k) and _same(out_v, exp_v)


# (num_pages, Hkv, P, D, N, T): blocks start mid-page, span 2-4 pages, T below / above P, ragged D
WRITE_SHAPES = [(16, 2, 4, 16, 3, 7), (12, 1, 8, 8, 2, 3), (20, 3, 3, 24, 2, 10), (9, 2, 16, 8, 1, 32)]


def _write_case(gen, shape, dtype, layers=None):
    num_pages, hkv, p, d, n, t = shape
    per_row = -(-(p - 1 + t) // p) + 1  # enough pages for a start anywhere inside the first page
    assert n * per_row <= num_pages
    perm = torch.randperm(num_pages, generator=gen)[: n * per_row]
    table = perm.view(n, per_row).to(torch.int32)  # random, non-contiguous physical pages
    start = torch.randint(0, p, (n,), generator=gen) + torch.randint(0, 2, (n,), generator=gen) * p
    start = start.clamp(max=per_row * p - t)
    lead = () if layers is None else (layers,)
    k_new = torch.randn(*lead, n, hkv, t, d, generator=gen).to(dtype)
    v_new = torch.randn(*lead, n, hkv, t, d, generator=gen).to(dtype)
    dst = _poisoned((*lead, num_pages, hkv, p, d), dtype)
    return table, start, k_new, v_new, dst


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("shape", WRITE_SHAPES)
def test_write_tokens_matches_reference(dtype, shape):
    gen = torch.Generator().manual_seed(hash(shape) % 2**31 + 1)
    table, start, k_new, v_new, dst_k = _dev(*_write_case(gen, shape, dtype))
    dst_v = dst_k.clone()
    ref_k, ref_v = dst_k.clone(), dst_v.clone()
    write_tokens(dst_k, dst_v, table, start, k_new, v_new)
    write_tokens_reference(ref_k, ref_v, table, start, k_new, v_new)
    assert _same(dst_k, ref_k) and _same(dst_v, ref_v)
    n, hkv, t, d = k_new.shape
    assert (~dst_k.isnan()).sum() == n * hkv * t * d  # exactly the block was written
    # spot-check one token through the page table independently of the reference
    p = dst_k.shape[-2]
    pos = int(start[-1]) + t - 1
    assert torch.equal(dst_k[int(table[-1, pos // p]), :, pos % p], k_new[-1, :, t - 1])


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_write_tokens_multi_layer_and_strided_source(dtype):
    gen = torch.Generator().manual_seed(5)
    table, start, k_new, v_new, dst_k = _dev(*_write_case(gen, (16, 2, 4, 8, 2, 6), dtype, layers=3))
    dst_v = dst_k.clone()
    ref_k, ref_v = dst_k.clone(), dst_v.clone()
    # source as a head-major view of a token-major tensor: non-contiguous rows
    k_tok = k_new.transpose(-2, -3).contiguous().transpose(-2, -3)
    write_tokens(dst_k, dst_v, table, start, k_tok, v_new)
    write_tokens_reference(ref_k, ref_v, table, start, k_new, v_new)
    assert _same(dst_k, ref_k) and _same(dst_v, ref_v)


def test_write_tokens_errors():
    dst = _poisoned((6, 2, 4, 8), torch.float32)
    k = torch.randn(1, 2, 5, 8)
    table = torch.tensor([[0, 1]], dtype=torch.int32)
    with pytest.raises(ValueError, match="reach only 8 tokens"):
        write_tokens(dst, dst.clone(), table, torch.tensor([4]), k, k)
    with pytest.raises(ValueError, match=r"must lie in \[0, 6\)"):
        write_tokens(dst, dst.clone(), torch.tensor([[0, 9]], dtype=torch.int32), torch.tensor([0]), k, k)
    with pytest.raises(ValueError, match="dtype"):
        write_tokens(dst, dst.clone(), table, torch.tensor([0]), k.half(), k.half())
    assert dst.isnan().all()


# ---------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("host_src", [False, True])
@pytest.mark.parametrize("p", [16, 128])
@pytest.mark.parametrize("max_programs,units", [(None, None), (8, 8), (3, 1)])
def test_gather_pages_bf16_gpu(host_src, p, max_programs, units):
    gen = torch.Generator().manual_seed(p)
    num_pages, hkv, d, num_slots, m = 300, 8, 128, 500, 400
    src_k = torch.randn(num_pages, hkv, p, d, generator=gen).to(torch.bfloat16)
    src_v = torch.randn(num_pages, hkv, p, d, generator=gen).to(torch.bfloat16)
    if host_src:
        src_k, src_v = src_k.pin_memory(), src_v.pin_memory()
    else:
        src_k, src_v = src_k.cuda(), src_v.cuda()
    pages, heads, slots = _units(gen, num_pages, hkv, num_slots, m)
    out_k = _poisoned((num_slots, p, d), torch.bfloat16, "cuda")
    out_v = out_k.clone()
    ref_k, ref_v = out_k.clone(), out_v.clone()
    gather_pages(src_k, src_v, pages.cuda(), heads.cuda(), out_k, out_v, slots.cuda(),
                 max_programs=max_programs, units_per_program=units)
    gather_pages_reference(src_k.cuda(), src_v.cuda(), pages, heads, ref_k, ref_v, slots)
    torch.cuda.synchronize()
    assert _same(out_k, ref_k) and _same(out_v, ref_v)


@pytest.mark.gpu
def test_gather_pages_into_pinned_host_and_unpinned_refused():
    gen = torch.Generator().manual_seed(3)
    src = torch.randn(10, 2, 16, 64, generator=gen).to(torch.bfloat16).cuda()
    dst = _poisoned((6, 16, 64), torch.bfloat16).pin_memory()
    pages, heads, slots = _units(gen, 10, 2, 6, 5)
    gather_pages(src, src, pages, heads, dst, dst, slots)  # GPU -> pinned host through UVA
    torch.cuda.synchronize()
    ref = _poisoned((6, 16, 64), torch.bfloat16)
    gather_pages_reference(src.cpu(), src.cpu(), pages, heads, ref, ref, slots)
    assert _same(dst, ref)
    with pytest.raises(ValueError, match="pageable host tensor"):
        gather_pages(src.cpu(), src.cpu(), pages, heads, dst.cuda(), dst.cuda(), slots)


@pytest.mark.gpu
@pytest.mark.parametrize("host_dst", [False, True])
def test_write_tokens_bf16_gpu(host_dst):
    gen = torch.Generator().manual_seed(21)
    table, start, k_new, v_new, dst_k = _write_case(gen, (64, 8, 16, 128, 4, 32), torch.bfloat16, layers=2)
    dst_v = dst_k.clone()
    ref_k, ref_v = dst_k.clone(), dst_v.clone()
    write_tokens_reference(ref_k, ref_v, table, start, k_new, v_new)
    if host_dst:
        dst_k, dst_v = dst_k.pin_memory(), dst_v.pin_memory()
    else:
        dst_k, dst_v = dst_k.cuda(), dst_v.cuda()
    write_tokens(dst_k, dst_v, table.cuda(), start.cuda(), k_new.cuda(), v_new.cuda())
    torch.cuda.synchronize()
    assert _same(dst_k.cpu(), ref_k) and _same(dst_v.cpu(), ref_v)


# ---------------------------------------------------------------------------------- fp8 writes


def _fp8_write_sequence(device: str, host_dst: bool, layers: int, multi: bool, head_dim: int, dtype: torch.dtype):
    """Two rows written block after block (5, 4, 20, 3, 7 tokens: starts mid-page, spans pages) into
    an fp8 store, by the kernel and by the reference on copies; scales start as NaN (fresh memory).
    Returns (kernel store, reference store, every written K [L, N, Hkv, 39, D]), each store (k, v,
    k_scale, v_scale) on the CPU."""
    gen = torch.Generator().manual_seed(4)
    pages, hkv, page = 10, 2, 16
    k_dst = torch.zeros(layers, pages, hkv, page, head_dim, dtype=torch.float8_e4m3fn)
    k_scale = torch.full((layers, pages, hkv), float("nan"))
    store = [k_dst, k_dst.clone(), k_scale, k_scale.clone()]
    ref = [x.clone() for x in store]
    if host_dst:
        store[:2] = [x.pin_memory() for x in store[:2]]
    else:
        store[:2] = [x.to(device) for x in store[:2]]
    store[2:] = [x.to(device) for x in store[2:]]
    table = torch.tensor([[3, 1, 7, 0], [2, 5, 4, 9]], dtype=torch.int32)
    start = torch.zeros(2, dtype=torch.int32)
    written = []
    for t in (5, 4, 20, 3, 7):
        k_new = torch.randn(layers, 2, hkv, t, head_dim, generator=gen) * (1 + 5 * torch.rand(1, generator=gen))
        v_new = torch.randn(layers, 2, hkv, t, head_dim, generator=gen)
        k_new, v_new = k_new.to(dtype), v_new.to(dtype)
        written.append(k_new.float())
        for layer in ([slice(None)] if multi else range(layers)):
            kernel_args = [x[layer] for x in store[:2]] + [table.to(device), start.to(device)]
            write_tokens(*kernel_args, k_new[layer].to(device), v_new[layer].to(device), k_scale=store[2][layer],
                         v_scale=store[3][layer])
            write_tokens_reference(ref[0][layer], ref[1][layer], table, start, k_new[layer], v_new[layer],
                                   k_scale=ref[2][layer], v_scale=ref[3][layer])
        start += t
    if device == "cuda":
        torch.cuda.synchronize()
    return [x.cpu() for x in store], ref, torch.cat(written, dim=3)


@pytest.mark.parametrize("multi", [False, True])
def test_write_tokens_fp8_requantizes_pages_as_the_reference(multi):
    """Every page a block touches is rewritten whole under a scale over its old and new tokens:
    the kernel's codes and scales equal the reference's bit for bit (pages no row owns untouched),
    and the pages hold the written keys to e4m3's precision: half a step of the top binade
    (256-448 codes: step 32, 16/448 = 3.6% of the page's largest value) per rounding, and a token
    is rounded once per write into its page (here up to four), each error a fraction of a step."""
    store, ref, written = _fp8_write_sequence(DEV, False, 2, multi, 24, torch.float32)
    _assert_same_fp8_store(store, ref)
    k, k_scale = store[0], store[2]
    pages_of_row0 = (k.float() * k_scale[..., None, None])[:, [3, 1, 7]]  # [L, 3, Hkv, P, D]
    held = pages_of_row0.permute(0, 2, 1, 3, 4).reshape(2, 2, 48, 24)[:, :, :39]
    page_amax = written[:, 0].abs().reshape(2, 2, 39 * 24).amax(dim=-1)  # per (layer, head): an upper bound
    assert bool(((held - written[:, 0]).abs().amax(dim=(-2, -1)) <= 0.08 * page_amax).all())
    assert float((held - written[:, 0]).norm() / written[:, 0].norm()) < 0.05


def _assert_same_fp8_store(store: list[torch.Tensor], ref: list[torch.Tensor]) -> None:
    """The pages rows own (codes bitwise, scales exactly) agree; the others were never written."""
    used = [3, 1, 7, 2, 5, 4]
    for got, want in zip(store, ref):
        got, want = got[:, used], want[:, used]
        if got.element_size() == 1:
            got, want = got.view(torch.uint8), want.view(torch.uint8)
        assert _same(got.float(), want.float())


def test_write_tokens_fp8_refuses_missing_scales_and_fp8_inputs():
    dst = torch.zeros(4, 1, 16, 16, dtype=torch.float8_e4m3fn)
    table, start = torch.tensor([[0, 1]], dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
    new = torch.randn(1, 1, 4, 16)
    with pytest.raises(ValueError, match="pass their per-\\(page, head\\) scales"):
        write_tokens(dst, dst.clone(), table, start, new, new)
    with pytest.raises(ValueError, match="an fp8 store quantizes them"):
        write_tokens(dst, dst.clone(), table, start, new.to(torch.float8_e4m3fn), new.to(torch.float8_e4m3fn),
                     k_scale=torch.ones(4, 1), v_scale=torch.ones(4, 1))


@pytest.mark.gpu
@pytest.mark.parametrize("host_dst", [False, True])
def test_write_tokens_fp8_gpu(host_dst):
    """bf16 K/V into an fp8 store in GPU memory or pinned host memory (UVA, scales on the GPU):
    bit for bit the reference's codes and scales."""
    store, ref, _ = _fp8_write_sequence("cuda", host_dst, 2, True, 128, torch.bfloat16)
    _assert_same_fp8_store(store, ref)
