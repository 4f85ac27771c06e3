"""Page-copy kernels between the paged KV store and the GPU page pool, with torch references.

Layouts (elements, last two dims contiguous):
- store (host or GPU), per layer: ``[num_pages, Hkv, P, D]``; several layers: ``[L, num_pages, Hkv, P, D]``.
- pool (GPU), per layer: ``[num_slots, P, D]``; several layers: ``[L, num_slots, P, D]``.
  One slot holds one KV head's page, so a (page, head) unit is one contiguous ``P*D`` chunk on both sides.

Either side may be a pinned host tensor, bare or in a ``HostPointer`` (memory registered with
cudaHostRegister must come wrapped: ``HostPointer(t, registered=True)``): the kernels then read/write
it zero-copy through unified addressing (see ``_uva``). Offsets are computed in int64 (a 128K-token store overflows int32).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._uva import HostPointer, host_tensor, kernel_arg, launch_device, needs_gpu_launch
from .kv_fp8 import check_scales, dequantize_units, fp8_round, fp8_unit_scale, is_fp8, quantize_units

_INDEX_DTYPES = (torch.int32, torch.int64)
_VEC_BYTES = 16  # widest global access; alignment hints aim for it


@triton.jit
def _gather_task(
    t, chunks, rows, num_units,
    page_ids, head_ids, slot_ids, layer_ids,
    s_src_layer, s_src_page, s_src_head, s_dst_layer, s_dst_slot,
    HAS_LAYER: tl.constexpr, UNITS: tl.constexpr, BLOCK: tl.constexpr, ALIGN: tl.constexpr,
):
    # Task t = chunk (t % chunks) of units [g*UNITS, g*UNITS + UNITS), g = t // chunks.
    # Returns per-unit source/destination element offsets [UNITS] (int64: a 128K-token store
    # overflows int32), the chunk index and the unit mask (tasks past the end are fully masked).
    g = t // chunks
    c = t % chunks
    u = g * UNITS + rows
    umask = u < num_units
    slot = tl.load(slot_ids + u, mask=umask, other=-1).to(tl.int64)
    umask = umask & (slot >= 0)  # a negative slot is a hole: nothing to copy (fixed-size unit lists)
    page = tl.load(page_ids + u, mask=umask, other=0).to(tl.int64)
    head = tl.load(head_ids + u, mask=umask, other=0).to(tl.int64)
    chunk_off = c.to(tl.int64) * BLOCK
    src_off = page * s_src_page + head * s_src_head + chunk_off
    dst_off = slot * s_dst_slot + chunk_off
    if HAS_LAYER:
        layer = tl.load(layer_ids + u, mask=umask, other=0).to(tl.int64)
        src_off += layer * s_src_layer
        dst_off += layer * s_dst_layer
    # Unit bases and BLOCK are multiples of ALIGN elements (the wrapper checks): 16-byte accesses.
    return tl.multiple_of(src_off, ALIGN), tl.multiple_of(dst_off, ALIGN), c, umask


# Counts vary with every selection: specialising on them would compile (and load, which
# synchronises the device) a new variant for new divisibilities in the middle of decoding.
@triton.jit(do_not_specialize=["num_units", "num_tasks", "chunks"])
def _gather_pages_kernel(
    src_k, src_v, dst_k, dst_v,
    page_ids, head_ids, slot_ids, layer_ids,
    num_units, num_tasks, chunks,
    s_src_layer, s_src_page, s_src_head,
    s_dst_layer, s_dst_slot,
    unit_elems,
    HAS_LAYER: tl.constexpr, UNITS: tl.constexpr, BLOCK: tl.constexpr, ALIGN: tl.constexpr,
    EVEN: tl.constexpr,
):
    # Persistent: program p copies tasks p, p + G, p + 2G, ... (G programs). A task is one BLOCK-element
    # chunk of UNITS units, K and V, as two [UNITS, BLOCK] tiles: all 2*UNITS loads of a task are in
    # flight before its stores wait on them, and the next task's ids (device memory) are loaded while
    # the current task's loads (host memory over PCIe) are outstanding. Few programs with many bytes
    # each keep PCIe busy while leaving most SMs to concurrent compute.
    rows = tl.arange(0, UNITS)
    cols = tl.max_contiguous(tl.multiple_of(tl.arange(0, BLOCK), BLOCK), BLOCK)
    src_off, dst_off, c, umask = _gather_task(
        tl.program_id(0), chunks, rows, num_units, page_ids, head_ids, slot_ids, layer_ids,
        s_src_layer, s_src_page, s_src_head, s_dst_layer, s_dst_slot, HAS_LAYER, UNITS, BLOCK, ALIGN)
    for t in tl.range(tl.program_id(0), num_tasks, tl.num_programs(0)):
        if EVEN:
            mask = tl.broadcast_to(umask[:, None], (UNITS, BLOCK))  # constant along a row: 16-byte vectors stay
        else:
            mask = umask[:, None] & ((c * BLOCK + cols)[None, :] < unit_elems)
        k = tl.load(src_k + src_off[:, None] + cols[None, :], mask=mask)
        v = tl.load(src_v + src_off[:, None] + cols[None, :], mask=mask)
        dst_cur = dst_off
        src_off, dst_off, c, umask = _gather_task(
            t + tl.num_programs(0), chunks, rows, num_units, page_ids, head_ids, slot_ids, layer_ids,
            s_src_layer, s_src_page, s_src_head, s_dst_layer, s_dst_slot, HAS_LAYER, UNITS, BLOCK, ALIGN)
        tl.store(dst_k + dst_cur[:, None] + cols[None, :], k, mask=mask)
        tl.store(dst_v + dst_cur[:, None] + cols[None, :], v, mask=mask)


@triton.jit
def _write_program(num_kv_heads, start_pos):
    # A write kernel's program (grid (N * Hkv, *, layers)): (its id along axis 1, layer, row, head,
    # the row's first written position), int64 but the id.
    rh = tl.program_id(0)
    row = (rh // num_kv_heads).to(tl.int64)
    start = tl.load(start_pos + row).to(tl.int64)
    return tl.program_id(1), tl.program_id(2).to(tl.int64), row, (rh % num_kv_heads).to(tl.int64), start


@triton.jit(do_not_specialize=["T"])  # a prefill chunk's length: any (see _gather_pages_kernel)
def _write_tokens_kernel(
    dst_k, dst_v, k_new, v_new, page_table, start_pos,
    T, num_kv_heads,
    s_dst_layer, s_dst_page, s_dst_head, s_dst_tok,
    s_new_layer, s_new_row, s_new_head, s_new_tok,
    s_vnew_layer, s_vnew_row, s_vnew_head, s_vnew_tok,
    s_pt_row,
    P: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    ALIGN: tl.constexpr,
):
    # One program writes BLOCK_T tokens x D of one (row, head) of one layer, K and V both.
    tb, layer, row, head, start = _write_program(num_kv_heads, start_pos)
    t = tb.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    tmask = t < T
    pos = start + t
    page = tl.load(page_table + row * s_pt_row + pos // P, mask=tmask, other=0).to(tl.int64)
    dst_row = layer * s_dst_layer + page * s_dst_page + head * s_dst_head + (pos % P) * s_dst_tok
    k_row = layer * s_new_layer + row * s_new_row + head * s_new_head + t * s_new_tok
    v_row = layer * s_vnew_layer + row * s_vnew_row + head * s_vnew_head + t * s_vnew_tok
    dst_row = tl.multiple_of(dst_row, ALIGN)
    k_row = tl.multiple_of(k_row, ALIGN)
    v_row = tl.multiple_of(v_row, ALIGN)
    mask = tmask[:, None] & (d[None, :] < D)
    k = tl.load(k_new + k_row[:, None] + d[None, :], mask=mask)
    v = tl.load(v_new + v_row[:, None] + d[None, :], mask=mask)
    tl.store(dst_k + dst_row[:, None] + d[None, :], k, mask=mask)
    tl.store(dst_v + dst_row[:, None] + d[None, :], v, mask=mask)


@triton.jit
def _requantize_unit(dst, dst_scale, new, unit_off, scale_off, new_off, s_dst_tok, s_new_tok, start, page_pos, T,
                     P: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr):
    # One fp8 unit (a KV head's page) rewritten whole: its tokens before `start` (written earlier,
    # dequantized with the unit's old scale), the new tokens that fall in it, 0 after them; a new
    # scale over all of them (gpu_kernels/kv_fp8.py).
    tok = tl.arange(0, P)
    d = tl.arange(0, BLOCK_D)
    d_ok = d[None, :] < D
    pos = page_pos + tok
    idx = pos - start  # the token's place in the new block
    is_new = (idx >= 0) & (idx < T)
    is_old = pos < start
    old_scale = tl.load(dst_scale + scale_off)
    old = tl.load(dst + unit_off + tok[:, None] * s_dst_tok + d[None, :], mask=is_old[:, None] & d_ok, other=0.0)
    # where(), not a product with a 0 code: a fresh unit's scale is whatever the memory held (NaN too)
    old = tl.where(is_old[:, None], old.to(tl.float32) * old_scale, 0.0)
    fresh = tl.load(new + new_off + idx[:, None] * s_new_tok + d[None, :], mask=is_new[:, None] & d_ok, other=0.0)
    x = tl.where(is_new[:, None], fresh.to(tl.float32), old)
    scale = fp8_unit_scale(tl.max(tl.max(tl.abs(x), axis=1), axis=0))
    codes = fp8_round(x / scale).to(dst.dtype.element_ty)
    tl.store(dst + unit_off + tok[:, None] * s_dst_tok + d[None, :], codes, mask=d_ok)
    tl.store(dst_scale + scale_off, scale)


@triton.jit(do_not_specialize=["T"])  # a prefill chunk's length: any (see _gather_pages_kernel)
def _write_fp8_units_kernel(
    dst_k, dst_v, dst_k_scale, dst_v_scale, k_new, v_new, page_table, start_pos,
    T, num_kv_heads,
    s_dst_layer, s_dst_page, s_dst_head, s_dst_tok,
    s_scale_layer, s_scale_page, s_scale_head,
    s_new_layer, s_new_row, s_new_head, s_new_tok,
    s_vnew_layer, s_vnew_row, s_vnew_head, s_vnew_tok,
    s_pt_row, pt_width,
    P: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Grid (N * Hkv, units a T-token write can touch, layers): program (row, head, j, layer)
    # requantizes the row's j-th touched page of that head, K and V; a row that touches fewer
    # pages leaves its last programs idle.
    j, layer, row, head, start = _write_program(num_kv_heads, start_pos)
    logical = start // P + j
    if (logical * P < start + T) & (logical < pt_width):
        page = tl.load(page_table + row * s_pt_row + logical).to(tl.int64)
        unit_off = layer * s_dst_layer + page * s_dst_page + head * s_dst_head
        scale_off = layer * s_scale_layer + page * s_scale_page + head * s_scale_head
        _requantize_unit(dst_k, dst_k_scale, k_new, unit_off, scale_off,
                         layer * s_new_layer + row * s_new_row + head * s_new_head, s_dst_tok, s_new_tok,
                         start, logical * P, T, P, D, BLOCK_D)
        _requantize_unit(dst_v, dst_v_scale, v_new, unit_off, scale_off,
                         layer * s_vnew_layer + row * s_vnew_row + head * s_vnew_head, s_dst_tok, s_vnew_tok,
                         start, logical * P, T, P, D, BLOCK_D)


# ----------------------------------------------------------------------------------------------
# helpers


def _pow2_align(values: list[int], elem_size: int) -> int:
    """Largest power of two (in elements, capped at 16 bytes) dividing every value."""
    cap = max(1, _VEC_BYTES // elem_size)
    g = 0
    for v in values:
        g = math.gcd(g, int(v))
    if g == 0:
        return cap
    a = 1
    while a < cap and g % (2 * a) == 0:
        a *= 2
    return a


def _check_index(t: torch.Tensor, name: str, length: int | None = None) -> None:
    if t.dtype not in _INDEX_DTYPES:
        raise ValueError(f"{name} must be int32 or int64, got {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if length is not None and t.numel() != length:
        raise ValueError(f"{name} has {t.numel()} entries, expected {length} (one per copied unit)")


def _check_range(t: torch.Tensor, name: str, upper: int) -> None:
    if t.numel() == 0:
        return
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= upper:
        raise ValueError(f"{name} must lie in [0, {upper}); got values in [{lo}, {hi}]")


def _check_pair(k: torch.Tensor, v: torch.Tensor, name: str) -> None:
    if k.shape != v.shape or k.stride() != v.stride() or k.dtype != v.dtype or k.device != v.device:
        raise ValueError(
            f"{name} K and V must share shape, strides, dtype and device; got K {tuple(k.shape)} {k.stride()} "
            f"{k.dtype} {k.device} vs V {tuple(v.shape)} {v.stride()} {v.dtype} {v.device}"
        )


def _check_inner_contiguous(t: torch.Tensor, name: str) -> None:
    d = t.shape[-1]
    if t.stride(-1) != 1 or t.stride(-2) != d:
        raise ValueError(
            f"{name} must have its last two dims (page_size, head_dim) contiguous; got strides {t.stride()}"
        )


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    # Small index tensors. A pageable host tensor is pinned first: a blocking copy would stall the host
    # until the current stream drains (e.g. a side stream waiting on compute). The pinned allocator
    # keeps the staging block alive until the copy has run.
    if t.device == device:
        return t
    if t.device.type == "cpu" and not t.is_pinned():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


# ----------------------------------------------------------------------------------------------
# gather_pages


def _gather_layout(src_k, dst_k, layer_ids):
    if src_k.dim() == 4 and dst_k.dim() == 3:
        if layer_ids is not None:
            raise ValueError("layer_ids given but src is a single layer [num_pages, Hkv, P, D]")
        return False
    if src_k.dim() == 5 and dst_k.dim() == 4:
        if layer_ids is None:
            raise ValueError("src [L, num_pages, Hkv, P, D] and dst [L, num_slots, P, D] need layer_ids [M]")
        if src_k.shape[0] != dst_k.shape[0]:
            raise ValueError(f"src has {src_k.shape[0]} layers but dst has {dst_k.shape[0]}")
        return True
    raise ValueError(
        "expected src [num_pages, Hkv, P, D] with dst [num_slots, P, D], or src [L, num_pages, Hkv, P, D] with "
        f"dst [L, num_slots, P, D]; got src {tuple(src_k.shape)} and dst {tuple(dst_k.shape)}"
    )


def _sm_count(dev: torch.device) -> int:
    return torch.cuda.get_device_properties(dev).multi_processor_count


def gather_launch_config(
    unit_elems: int,
    num_units: int,
    *,
    num_sms: int,
    block: int | None = None,
    num_warps: int | None = None,
    max_programs: int | None = None,
    units_per_program: int | None = None,
) -> dict:
    """The launch shape ``gather_pages`` uses for ``num_units`` units of ``unit_elems`` (P*D) elements.

    Defaults: ``block`` = min(P*D rounded up to a power of two, 4096) elements per chunk;
    ``units_per_program`` = 8192 // block (at least 1, at most 8), so one task moves 2 x 8192
    elements (32 KiB of bf16 K+V) with every load in flight at once; ``num_warps`` 8 for such tiles
    (4 for smaller); ``max_programs`` = 2 per SM (``num_sms``). Returns the resolved values plus
    ``tasks`` (units/UNITS x chunks), ``chunks`` and ``grid`` (programs launched).
    """
    if block is None:
        block = min(triton.next_power_of_2(unit_elems), 4096)
    if block <= 0 or block & (block - 1):
        raise ValueError(f"block must be a power of two, got {block}")
    if units_per_program is None:
        units_per_program = max(1, min(8, 8192 // block))
    if units_per_program <= 0 or units_per_program & (units_per_program - 1):
        raise ValueError(f"units_per_program must be a power of two, got {units_per_program}")
    if num_warps is None:
        num_warps = 8 if units_per_program * block >= 8192 else 4
    if num_warps <= 0 or num_warps & (num_warps - 1):
        raise ValueError(f"num_warps must be a power of two, got {num_warps}")
    if max_programs is None:
        max_programs = 2 * num_sms
    if max_programs <= 0:
        raise ValueError(f"max_programs must be positive, got {max_programs}")
    chunks = triton.cdiv(unit_elems, block)
    tasks = triton.cdiv(num_units, units_per_program) * chunks
    return {
        "block": block, "units_per_program": units_per_program, "num_warps": num_warps,
        "max_programs": max_programs, "chunks": chunks, "tasks": tasks, "grid": max(1, min(tasks, max_programs)),
    }


def gather_pages(
    src_k: torch.Tensor | HostPointer,
    src_v: torch.Tensor | HostPointer,
    page_ids: torch.Tensor,
    head_ids: torch.Tensor,
    dst_k: torch.Tensor | HostPointer,
    dst_v: torch.Tensor | HostPointer,
    slot_ids: torch.Tensor,
    layer_ids: torch.Tensor | None = None,
    *,
    validate: bool = True,
    block: int | None = None,
    num_warps: int | None = None,
    max_programs: int | None = None,
    units_per_program: int | None = None,
) -> None:
    """Copy (page, head) units of a paged store into pool slots, K and V in one launch.

    src_k, src_v: ``[num_pages, Hkv, P, D]`` (or ``[L, num_pages, Hkv, P, D]``), GPU or pinned host
    (a tensor or a ``HostPointer``).
    dst_k, dst_v: ``[num_slots, P, D]`` (or ``[L, num_slots, P, D]``), GPU or pinned host (likewise).
    page_ids, head_ids, slot_ids (and layer_ids for the multi-layer form): ``[M]`` int32/int64;
    unit m copies ``src[layer, page_ids[m], head_ids[m]]`` into ``dst[layer, slot_ids[m]]``; a unit
    whose slot id is negative is a hole and copies nothing (so a fixed-size list can carry a
    device-computed, variable set of misses without a host sync).

    Runs asynchronously on the current CUDA stream. ``validate`` checks id ranges first (this reads
    the ids: a device sync when they are on the GPU); out-of-range ids without it corrupt memory.
    Launch shape (see ``gather_launch_config`` for the defaults): a persistent grid of at most
    ``max_programs`` programs, each copying ``units_per_program`` units x ``block`` elements of K and
    V per step with ``num_warps`` warps. A small ``max_programs`` (e.g. 16) leaves the other SMs to
    compute running concurrently; each program then keeps its whole tile in flight over PCIe.
    Host index tensors are pinned (torch's pinned allocator) and uploaded on the current stream;
    callers on a hot path pass device tensors.
    """
    launch_args = (src_k, src_v, dst_k, dst_v)  # HostPointers stay wrapped for the launch
    src_k, src_v, dst_k, dst_v = (host_tensor(x) for x in launch_args)
    _check_pair(src_k, src_v, "src")
    _check_pair(dst_k, dst_v, "dst")
    multi = _gather_layout(src_k, dst_k, layer_ids)
    _check_inner_contiguous(src_k, "src")
    _check_inner_contiguous(dst_k, "dst")
    if src_k.shape[-2:] != dst_k.shape[-2:]:
        raise ValueError(f"src pages are {tuple(src_k.shape[-2:])} (P, D) but dst slots are {tuple(dst_k.shape[-2:])}")
    if src_k.dtype != dst_k.dtype:
        raise ValueError(f"src dtype {src_k.dtype} differs from dst dtype {dst_k.dtype}; copies do not convert")
    m = page_ids.numel()
    _check_index(page_ids, "page_ids")
    _check_index(head_ids, "head_ids", m)
    _check_index(slot_ids, "slot_ids", m)
    if multi:
        _check_index(layer_ids, "layer_ids", m)
    gpu = needs_gpu_launch(src_k, dst_k, page_ids)
    dev = launch_device(src_k, dst_k, page_ids, head_ids, slot_ids) if gpu else None
    p, d = src_k.shape[-2], src_k.shape[-1]
    unit = p * d
    # Without a GPU (the interpreter runs programs one after another) a few programs suffice.
    cfg = gather_launch_config(unit, m, num_sms=_sm_count(dev) if gpu else 2, block=block, num_warps=num_warps,
                               max_programs=max_programs, units_per_program=units_per_program)
    if m == 0:
        return
    num_pages, hkv = src_k.shape[-4], src_k.shape[-3]
    if validate:
        live = slot_ids >= 0  # holes are never read
        _check_range(page_ids[live.to(page_ids.device)], "page_ids", num_pages)
        _check_range(head_ids[live.to(head_ids.device)], "head_ids", hkv)
        _check_range(slot_ids[live], "slot_ids", dst_k.shape[-3])
        if multi:
            _check_range(layer_ids[live.to(layer_ids.device)], "layer_ids", src_k.shape[0])

    s_src_layer = src_k.stride(0) if multi else 0
    s_dst_layer = dst_k.stride(0) if multi else 0
    s_src_page, s_src_head = src_k.stride(-4), src_k.stride(-3)
    s_dst_slot = dst_k.stride(-3)
    align = _pow2_align([unit, cfg["block"], s_src_page, s_src_head, s_dst_slot, s_src_layer, s_dst_layer],
                        src_k.element_size())
    ids = [page_ids, head_ids, slot_ids] + ([layer_ids] if multi else [])
    if gpu:
        ids = [_to_device(t, dev) for t in ids]
    if not multi:
        ids.append(ids[0])  # unused layer_ids pointer (HAS_LAYER is off)
    args = [kernel_arg(t, n, gpu) for t, n in zip(launch_args, ("src_k", "src_v", "dst_k", "dst_v"))]
    block = cfg["block"]
    launch = lambda: _gather_pages_kernel[(cfg["grid"],)](  # noqa: E731
        *args, *ids, m, cfg["tasks"], cfg["chunks"],
        s_src_layer, s_src_page, s_src_head, s_dst_layer, s_dst_slot, unit,
        HAS_LAYER=multi, UNITS=cfg["units_per_program"], BLOCK=block, ALIGN=align, EVEN=(unit % block == 0),
        num_warps=cfg["num_warps"],
    )
    if gpu:
        with torch.cuda.device(dev):
            launch()
    else:
        launch()


def gather_pages_reference(
    src_k: torch.Tensor,
    src_v: torch.Tensor,
    page_ids: torch.Tensor,
    head_ids: torch.Tensor,
    dst_k: torch.Tensor,
    dst_v: torch.Tensor,
    slot_ids: torch.Tensor,
    layer_ids: torch.Tensor | None = None,
) -> None:
    """Torch-indexing version of ``gather_pages`` (same arguments, synchronous, any devices)."""
    src_k, src_v, dst_k, dst_v = (host_tensor(x) for x in (src_k, src_v, dst_k, dst_v))
    multi = _gather_layout(src_k, dst_k, layer_ids)
    sdev, ddev = src_k.device, dst_k.device
    live = slot_ids >= 0  # holes copy nothing
    page_ids, head_ids, slot_ids = page_ids[live.to(page_ids.device)], head_ids[live.to(head_ids.device)], slot_ids[live]
    p, h, s = page_ids.to(sdev).long(), head_ids.to(sdev).long(), slot_ids.to(ddev).long()
    for src, dst in ((src_k, dst_k), (src_v, dst_v)):
        if multi:
            lyr = layer_ids[live.to(layer_ids.device)].long()
            dst[lyr.to(ddev), s] = src[lyr.to(sdev), p, h].to(ddev)
        else:
            dst[s] = src[p, h].to(ddev)


# ----------------------------------------------------------------------------------------------
# write_tokens


def _write_layout(dst_k, k_new):
    if is_fp8(k_new.dtype):
        raise ValueError("k_new is fp8: write the model's K/V (bf16, fp16 or fp32); an fp8 store quantizes them")
    if dst_k.dim() == 4 and k_new.dim() == 4:
        return False
    if dst_k.dim() == 5 and k_new.dim() == 5:
        if dst_k.shape[0] != k_new.shape[0]:
            raise ValueError(f"dst has {dst_k.shape[0]} layers but k_new has {k_new.shape[0]}")
        return True
    raise ValueError(
        "expected dst [num_pages, Hkv, P, D] with k_new [N, Hkv, T, D], or dst [L, num_pages, Hkv, P, D] with "
        f"k_new [L, N, Hkv, T, D]; got dst {tuple(dst_k.shape)} and k_new {tuple(k_new.shape)}"
    )


def _check_write(dst_k, dst_v, page_table, start_pos, k_new, v_new, validate: bool) -> bool:
    _check_pair(dst_k, dst_v, "dst")
    if k_new.shape != v_new.shape or k_new.dtype != v_new.dtype or k_new.device != v_new.device:
        raise ValueError(
            f"k_new and v_new must share shape, dtype and device; got {tuple(k_new.shape)} {k_new.dtype} "
            f"{k_new.device} vs {tuple(v_new.shape)} {v_new.dtype} {v_new.device}"
        )
    multi = _write_layout(dst_k, k_new)
    n, hkv, t, d = k_new.shape[-4:]
    num_pages, dst_hkv, p, dst_d = dst_k.shape[-4:]
    if (hkv, d) != (dst_hkv, dst_d):
        raise ValueError(f"k_new has (Hkv, D) = {(hkv, d)} but dst has {(dst_hkv, dst_d)}")
    if k_new.dtype != dst_k.dtype and not is_fp8(dst_k.dtype):
        raise ValueError(f"k_new dtype {k_new.dtype} differs from dst dtype {dst_k.dtype}; writes do not convert "
                         "(only an fp8 store quantizes what it is given)")
    if page_table.dim() != 2 or page_table.shape[0] != n or page_table.dtype not in _INDEX_DTYPES:
        raise ValueError(f"page_table must be int32/int64 [N={n}, max_pages]; got {page_table.dtype} {tuple(page_table.shape)}")
    _check_index(start_pos, "start_pos", n)
    if validate and n > 0 and t > 0:
        sp = start_pos.long()
        lo, hi = int(sp.min()), int(sp.max())
        cap = page_table.shape[1] * p
        if lo < 0 or hi + t > cap:
            raise ValueError(
                f"blocks cover positions [{lo}, {hi + t}) but page tables [N, {page_table.shape[1]}] of {p}-token "
                f"pages reach only {cap} tokens"
            )
        first = sp // p
        span = (hi + t - 1) // p - lo // p + 1
        lps = (first[:, None] + torch.arange(span, device=sp.device)[None, :])
        last = (sp + t - 1) // p
        used = lps <= last[:, None]
        lps, used = lps.to(page_table.device), used.to(page_table.device)
        pages = page_table.long().gather(1, lps.clamp(max=page_table.shape[1] - 1))[used]
        _check_range(pages, "page ids in page_table for the written positions", num_pages)
    return multi


def write_tokens(
    dst_k: torch.Tensor | HostPointer,
    dst_v: torch.Tensor | HostPointer,
    page_table: torch.Tensor,
    start_pos: torch.Tensor,
    k_new: torch.Tensor | HostPointer,
    v_new: torch.Tensor | HostPointer,
    *,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    validate: bool = True,
) -> None:
    """Write a block of T new tokens per row into a paged store, K and V in one launch.

    dst_k, dst_v: ``[num_pages, Hkv, P, D]`` (or ``[L, num_pages, Hkv, P, D]``), GPU or pinned host
    (a tensor or a ``HostPointer``).
    page_table: ``[N, max_pages]`` int32/int64 (row i's logical page -> physical page).
    start_pos: ``[N]`` int; row i's tokens go to positions ``start_pos[i] .. start_pos[i]+T-1``
    (a block may start mid-page and span pages).
    k_new, v_new: ``[N, Hkv, T, D]`` (or ``[L, N, Hkv, T, D]``), GPU or pinned host (likewise), dst's
    dtype; for an fp8 dst (float8_e4m3fn), the model's K/V in any float dtype, quantized here.
    k_scale, v_scale: an fp8 dst's per-unit scales, ``[num_pages, Hkv]`` (or ``[L, num_pages, Hkv]``)
    fp32 on the launch device: every page the write touches is requantized whole, its earlier tokens
    included, under a new scale over old and new tokens (`gpu_kernels.kv_fp8`); positions after the
    block in its last page become 0 (they are written later, in order).

    Runs asynchronously on the current CUDA stream. ``validate`` checks positions and touched page ids
    (a device sync when page_table/start_pos are on the GPU).
    """
    launch_args = (dst_k, dst_v, k_new, v_new)  # HostPointers stay wrapped for the launch
    dst_k, dst_v, k_new, v_new = (host_tensor(x) for x in launch_args)
    multi = _check_write(dst_k, dst_v, page_table, start_pos, k_new, v_new, validate)
    check_scales(dst_k, k_scale, "dst_k")
    check_scales(dst_v, v_scale, "dst_v")
    n, hkv, t, d = k_new.shape[-4:]
    if n == 0 or t == 0 or (multi and k_new.shape[0] == 0):
        return
    p = dst_k.shape[-2]
    _check_inner_contiguous(dst_k, "dst")
    if is_fp8(dst_k.dtype):
        _write_fp8_units(launch_args, dst_k, k_scale, v_scale, page_table, start_pos, k_new, v_new, multi)
        return
    if k_new.stride(-1) != 1 or v_new.stride(-1) != 1:
        raise ValueError(
            f"k_new/v_new need a contiguous last (head_dim) dim; got strides {k_new.stride()}, {v_new.stride()}"
        )
    if page_table.stride(1) != 1:
        page_table = page_table.contiguous()
    layers = dst_k.shape[0] if multi else 1
    s_dst = (dst_k.stride(0) if multi else 0, dst_k.stride(-4), dst_k.stride(-3), dst_k.stride(-2))
    s_new = (k_new.stride(0) if multi else 0, k_new.stride(-4), k_new.stride(-3), k_new.stride(-2))
    s_vnew = (v_new.stride(0) if multi else 0, v_new.stride(-4), v_new.stride(-3), v_new.stride(-2))
    align = _pow2_align(list(s_dst) + list(s_new) + list(s_vnew), dst_k.element_size())
    block_d = triton.next_power_of_2(d)
    block_t = max(1, min(triton.next_power_of_2(t), 4096 // block_d))

    gpu = needs_gpu_launch(dst_k, k_new, page_table)
    if gpu:
        dev = launch_device(dst_k, k_new, page_table, start_pos)
        page_table, start_pos = _to_device(page_table, dev), _to_device(start_pos, dev)
    args = [kernel_arg(x, nm, gpu) for x, nm in zip(launch_args, ("dst_k", "dst_v", "k_new", "v_new"))]
    grid = (n * hkv, triton.cdiv(t, block_t), layers)
    launch = lambda: _write_tokens_kernel[grid](  # noqa: E731
        *args, page_table, start_pos, t, hkv, *s_dst, *s_new, *s_vnew, page_table.stride(0),
        P=p, D=d, BLOCK_T=block_t, BLOCK_D=block_d, ALIGN=align, num_warps=4,
    )
    if gpu:
        with torch.cuda.device(dev):
            launch()
    else:
        launch()


def _write_fp8_units(launch_args, dst_k, k_scale, v_scale, page_table, start_pos, k_new, v_new, multi) -> None:
    """`write_tokens` into an fp8 store: one program per (row, head, touched page, layer) requantizes
    that unit (`_write_fp8_units_kernel`)."""
    n, hkv, t, d = k_new.shape[-4:]
    p = dst_k.shape[-2]
    if k_new.stride(-1) != 1 or v_new.stride(-1) != 1:
        raise ValueError(
            f"k_new/v_new need a contiguous last (head_dim) dim; got strides {k_new.stride()}, {v_new.stride()}")
    if k_scale.stride() != v_scale.stride():
        raise ValueError(f"k_scale and v_scale must share strides; got {k_scale.stride()} and {v_scale.stride()}")
    if page_table.stride(1) != 1:
        page_table = page_table.contiguous()
    gpu = needs_gpu_launch(dst_k, k_new, page_table)
    if gpu:
        dev = launch_device(dst_k, k_new, page_table, start_pos)
        page_table, start_pos = _to_device(page_table, dev), _to_device(start_pos, dev)
        if k_scale.device != dev:
            raise ValueError(f"fp8 scales must be on the launch device {dev}; got {k_scale.device}")
    s_dst = (dst_k.stride(0) if multi else 0, dst_k.stride(-4), dst_k.stride(-3), dst_k.stride(-2))
    s_scale = (k_scale.stride(0) if multi else 0, k_scale.stride(-2), k_scale.stride(-1))
    s_new = (k_new.stride(0) if multi else 0, k_new.stride(-4), k_new.stride(-3), k_new.stride(-2))
    s_vnew = (v_new.stride(0) if multi else 0, v_new.stride(-4), v_new.stride(-3), v_new.stride(-2))
    args = [kernel_arg(x, nm, gpu) for x, nm in zip(launch_args, ("dst_k", "dst_v", "k_new", "v_new"))]
    grid = (n * hkv, triton.cdiv(t + p - 1, p), dst_k.shape[0] if multi else 1)
    launch = lambda: _write_fp8_units_kernel[grid](  # noqa: E731
        args[0], args[1], k_scale, v_scale, args[2], args[3], page_table, start_pos, t, hkv, *s_dst, *s_scale,
        *s_new, *s_vnew, page_table.stride(0), page_table.shape[1], P=p, D=d, BLOCK_D=triton.next_power_of_2(d),
        num_warps=4,
    )
    if gpu:
        with torch.cuda.device(dev):
            launch()
    else:
        launch()


def write_tokens_reference(
    dst_k: torch.Tensor,
    dst_v: torch.Tensor,
    page_table: torch.Tensor,
    start_pos: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    *,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Torch-indexing version of ``write_tokens`` (same arguments, synchronous, any devices)."""
    dst_k, dst_v, k_new, v_new = (host_tensor(x) for x in (dst_k, dst_v, k_new, v_new))
    multi = _write_layout(dst_k, k_new)
    check_scales(dst_k, k_scale, "dst_k")
    check_scales(dst_v, v_scale, "dst_v")
    if is_fp8(dst_k.dtype):
        _write_fp8_units_reference(dst_k, dst_v, k_scale, v_scale, page_table, start_pos, k_new, v_new, multi)
        return
    dev = dst_k.device
    t = k_new.shape[-2]
    p = dst_k.shape[-2]
    pos = start_pos.to(dev).long()[:, None] + torch.arange(t, device=dev)[None, :]  # [N, T]
    pages = page_table.to(dev).long().gather(1, pos // p)  # [N, T]
    offs = pos % p
    for dst, new in ((dst_k, k_new), (dst_v, v_new)):
        new = new.to(dev)
        if multi:
            # advanced indices split by a slice go first: dst[:, pages, :, offs] is [N, T, L, Hkv, D]
            dst[:, pages, :, offs] = new.permute(1, 3, 0, 2, 4)
        else:
            dst[pages, :, offs] = new.permute(0, 2, 1, 3)


def _write_fp8_units_reference(dst_k, dst_v, k_scale, v_scale, page_table, start_pos, k_new, v_new,
                               multi: bool) -> None:
    """Plain-torch `_write_fp8_units`: per row and touched page, the unit's old tokens dequantized,
    the new ones placed beside them, the whole unit quantized again (`kv_fp8.quantize_units`)."""
    if not multi:  # one code path: a single layer is a stack of one
        dst_k, dst_v, k_scale, v_scale, k_new, v_new = (x[None] for x in (dst_k, dst_v, k_scale, v_scale, k_new,
                                                                          v_new))
    p, t = dst_k.shape[-2], k_new.shape[-2]
    table, starts = page_table.cpu().long(), start_pos.cpu().long()
    tok = torch.arange(p)
    for row in range(k_new.shape[1]):
        start = int(starts[row])
        for logical in range(start // p, (start + t - 1) // p + 1):
            page = int(table[row, logical])
            pos = logical * p + tok
            is_new, is_old = (pos >= start) & (pos < start + t), pos < start
            for dst, scale, new in ((dst_k, k_scale, k_new), (dst_v, v_scale, v_new)):
                unit = dst[:, page]  # [L, Hkv, P, D]
                old = torch.where(is_old.to(unit.device)[:, None], dequantize_units(unit, scale[:, page]), 0.0)
                x = old.clone()
                x[:, :, is_new.to(x.device)] = new[:, row, :, (pos - start)[is_new]].to(x)
                codes, unit_scale = quantize_units(x)
                dst[:, page] = codes.to(dst.device)
                scale[:, page] = unit_scale.to(scale.device)
