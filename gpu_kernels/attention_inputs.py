"""What a paged-attention call passes, checked and described: the shapes, dtype, device and layout
its plan is made for (`AttentionInputs`, hashable: the key of the plan cache) and its tensors in the
form the kernels take them (`Operands`).

Two layouts, told apart by K's rank:
- store: K, V [num_pages, Hkv, page_size, D], page table [N, max_pages] shared by the KV heads or
  [N, Hkv, max_pages] per head. The host store (read zero-copy over PCIe through UVA) and the dense
  GPU cache.
- pool: K, V [num_slots, page_size, D], one KV head's page per slot, page table [N, Hkv, max_pages].
  The sparse GPU page pool.
K/V are q's dtype, or float8_e4m3fn codes with fp32 scales per (page, KV head) (`gpu_kernels.kv_fp8`):
store [num_pages, Hkv], pool [num_slots], on q's device, K's and V's with the same strides.
Token t of table entry i is context position i * page_size + t; kv_len int32 [N, Hkv] (or [N]) says
how many positions of each list are valid.

A call's tensors are described on every call (a plan holds none: the same plan runs over new
tensors of the same shapes, as CUDA-graph replays do). Describing reads nothing from the device
and allocates nothing, except a copy of q when its last dim is strided.
"""
from __future__ import annotations

from typing import NamedTuple, Union

import torch

from ._uva import HostPointer, host_tensor, kernel_arg
from .kv_fp8 import check_scales, is_fp8

KVTensor = Union[torch.Tensor, HostPointer]  # a GPU tensor, or pinned host memory read over PCIe

# K/V offsets below this many elements are computed in 32 bits inside the attention kernel.
INT32_OFFSETS_BELOW = 2 ** 31


class AttentionInputs(NamedTuple):
    """What a plan depends on in a call's tensors (a NamedTuple: cheap to build on every call, and
    hashable for the plan cache). q is [n, hq, t, head_dim]; K/V of hkv heads in pages of page_size
    tokens, max_pages table entries per list."""
    n: int
    hq: int
    t: int
    head_dim: int
    hkv: int
    page_size: int
    max_pages: int
    dtype: torch.dtype
    device: torch.device
    pool: bool  # K/V [num_slots, page_size, D]; else the store [num_pages, Hkv, page_size, D]
    per_head_table: bool  # page table [N, Hkv, max_pages]; else [N, max_pages], shared by the heads
    host_kv: bool  # K/V in pinned host memory, read over PCIe
    offsets_64: bool  # K/V element offsets need 64 bits (`INT32_OFFSETS_BELOW`)
    prefetch_blocker: str | None  # why K/V pages cannot be prefetched into L2, or None
    has_block: bool  # the block's own K/V are attended too (k_block, v_block)
    page_scores: bool
    token_scores: bool
    kv_fp8: bool = False  # K/V are e4m3 codes read with their per-(page, head) scales


class Operands(NamedTuple):
    """A call's tensors as the kernels take them: q contiguous in head_dim, K/V as kernel arguments
    (pinned host memory wrapped in `HostPointer` on a GPU launch), kv_len [N, Hkv], fp8 K/V's scales
    (None for K/V in q's dtype)."""
    q: torch.Tensor
    k: KVTensor
    v: KVTensor
    page_table: torch.Tensor
    kv_len: torch.Tensor
    k_block: torch.Tensor | None
    v_block: torch.Tensor | None
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None


def describe_layout(q: torch.Tensor, k_pages: KVTensor, v_pages: KVTensor, page_table: torch.Tensor,
                    kv_len: torch.Tensor, k_scale: torch.Tensor | None = None,
                    v_scale: torch.Tensor | None = None) -> tuple[int, int, bool, bool, torch.Tensor]:
    """Check the shapes and dtypes of a call (the references' check too); returns (hkv, page_size,
    per_head_table, pool_layout, kv_len [N, Hkv])."""
    if q.dim() != 4:
        raise ValueError(f"q must be [N, Hq, T, D], got shape {tuple(q.shape)}")
    n, hq, t, d = q.shape
    k, v = host_tensor(k_pages), host_tensor(v_pages)
    if tuple(k.shape) != tuple(v.shape):
        raise ValueError(f"k_pages {tuple(k.shape)} and v_pages {tuple(v.shape)} differ in shape")
    if k.dtype != v.dtype or (k.dtype != q.dtype and not is_fp8(k.dtype)):
        raise ValueError(f"q, k_pages, v_pages must share a dtype (or K/V be float8_e4m3fn with scales); got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    check_scales(k, k_scale, "k_pages")
    check_scales(v, v_scale, "v_pages")
    if k_scale is not None and (k_scale.stride() != v_scale.stride() or k_scale.device != q.device
                                or v_scale.device != q.device):
        raise ValueError(f"k_scale and v_scale must share strides and sit on q's device {q.device}; got "
                         f"{k_scale.stride()} on {k_scale.device} and {v_scale.stride()} on {v_scale.device}")
    if page_table.dtype != torch.int32:
        raise ValueError(f"page_table must be int32, got {page_table.dtype}; use .to(torch.int32)")
    if k.dim() == 4:
        pool = False
        _, hkv, page_size, dk = k.shape
    elif k.dim() == 3:
        pool = True
        _, page_size, dk = k.shape
        if page_table.dim() != 3:
            raise ValueError("pool layout k_pages [num_slots, page_size, D] needs a per-head page "
                             f"table [N, Hkv, max_pages]; got table shape {tuple(page_table.shape)}")
        hkv = page_table.shape[1]
    else:
        raise ValueError("k_pages must be [num_pages, Hkv, page_size, D] (store) or "
                         f"[num_slots, page_size, D] (pool); got shape {tuple(k.shape)}")
    if dk != d:
        raise ValueError(f"head_dim of q ({d}) and k_pages ({dk}) differ")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"Hq={hq} must be a positive multiple of Hkv={hkv}")
    if page_size <= 0 or page_size & (page_size - 1):
        raise ValueError(f"page_size must be a power of two, got {page_size}")
    if page_table.dim() == 2:
        per_head = False
        if page_table.shape[0] != n:
            raise ValueError(f"page_table {tuple(page_table.shape)} must be [N={n}, max_pages]")
    elif page_table.dim() == 3:
        per_head = True
        if page_table.shape[0] != n or page_table.shape[1] != hkv:
            raise ValueError(f"page_table {tuple(page_table.shape)} must be [N={n}, Hkv={hkv}, max_pages]")
    else:
        raise ValueError(f"page_table must be [N, max_pages] or [N, Hkv, max_pages], got {tuple(page_table.shape)}")
    if kv_len.dtype != torch.int32:
        raise ValueError(f"kv_len must be int32, got {kv_len.dtype}; use .to(torch.int32)")
    if kv_len.dim() == 1 and kv_len.shape[0] == n:
        kv_len = kv_len[:, None].expand(n, hkv)
    if tuple(kv_len.shape) != (n, hkv):
        raise ValueError(f"kv_len must be [N={n}, Hkv={hkv}] (or [N]), got {tuple(kv_len.shape)}")
    return hkv, page_size, per_head, pool, kv_len


def describe_inputs(q: torch.Tensor, k_pages: KVTensor, v_pages: KVTensor, page_table: torch.Tensor,
                    kv_len: torch.Tensor, k_block: torch.Tensor | None, v_block: torch.Tensor | None,
                    page_scores: bool, token_scores: bool, k_scale: torch.Tensor | None = None,
                    v_scale: torch.Tensor | None = None) -> tuple[AttentionInputs, Operands]:
    """Check a call's tensors (shapes, dtypes, devices, strides; `paged_attention` says what each
    must be) and describe them: (AttentionInputs, Operands). page_scores / token_scores: whether the
    call computes them; k_scale / v_scale: fp8 K/V's scales."""
    hkv, page_size, per_head, pool, kv_len = describe_layout(q, k_pages, v_pages, page_table, kv_len, k_scale,
                                                             v_scale)
    dev = q.device
    if page_table.device != dev or kv_len.device != dev:
        raise ValueError(f"page_table ({page_table.device}) and kv_len ({kv_len.device}) must be on "
                         f"q's device {dev}")
    k, v = k_pages, v_pages
    if dev.type == "cuda":
        # Pinned host tensors are read zero-copy (wrapped here if the caller did not); pageable
        # ones are refused by kernel_arg with a message saying to pin them.
        k, v = kernel_arg(k, "k_pages", True), kernel_arg(v, "v_pages", True)
        for name, x in (("k_pages", k), ("v_pages", v)):
            if not isinstance(x, HostPointer) and x.device != dev:
                raise ValueError(f"{name} is on {x.device}; q is on {dev}")
    else:
        # The CPU interpreter reads host tensors directly; it cannot take the pointer wrapper.
        k, v = host_tensor(k), host_tensor(v)
        if k.device != dev or v.device != dev:
            raise ValueError(f"k_pages ({k.device}) and v_pages ({v.device}) must be on q's device {dev}")
    k_strides = k.stride()
    if k_strides != v.stride():
        raise ValueError(f"k_pages and v_pages must have the same strides (one store); got {k_strides} "
                         f"and {v.stride()}")
    if k_strides[-1] != 1:
        raise ValueError(f"k_pages / v_pages must be contiguous in head_dim (stride {k_strides[-1]})")
    if q.stride(-1) != 1:
        q = q.contiguous()
    has_block = _check_block(k_block, v_block, q, hkv)
    n, hq, t, d = q.shape
    inputs = AttentionInputs(
        n, hq, t, d, hkv, page_size, page_table.shape[-1], q.dtype, dev, pool, per_head, isinstance(k, HostPointer),
        _max_offset(host_tensor(k)) >= INT32_OFFSETS_BELOW, _kv_prefetch_blocker(k, page_size), has_block,
        page_scores, token_scores, k_scale is not None)
    return inputs, Operands(q, k, v, page_table, kv_len, k_block, v_block, k_scale, v_scale)


def _check_block(k_block: torch.Tensor | None, v_block: torch.Tensor | None, q: torch.Tensor, hkv: int) -> bool:
    """Whether a block part was given, after checking it against q [N, Hq, T, D]."""
    if k_block is None and v_block is None:
        return False
    if k_block is None or v_block is None:
        raise ValueError("give both k_block and v_block, or neither")
    n, _, t, d = q.shape
    want = (n, hkv, t, d)
    for name, x in (("k_block", k_block), ("v_block", v_block)):
        if tuple(x.shape) != want or x.dtype != q.dtype or x.device != q.device:
            raise ValueError(f"{name} must be {want} {q.dtype} on {q.device} (the block's own K/V); got "
                             f"{tuple(x.shape)} {x.dtype} on {x.device}")
        if x.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in head_dim (stride {x.stride(-1)})")
    if k_block.stride() != v_block.stride():
        raise ValueError(f"k_block and v_block must share strides; got {k_block.stride()} and {v_block.stride()}")
    return True


def _kv_prefetch_blocker(k: KVTensor, page_size: int) -> str | None:
    """Why these K/V pages could not be prefetched into L2 (one bulk prefetch per page, which needs
    the page in GPU memory as one contiguous, 16-byte aligned run), or None."""
    if isinstance(k, HostPointer):
        return "K/V are not in GPU memory"
    if k.shape[0] == 0:
        return "the store has no pages"  # no address to clamp stale table entries into
    size = k.element_size()
    if (k.stride(-2) != k.shape[-1] or (page_size * k.shape[-1] * size) % 16 or k.data_ptr() % 16
            or any((st * size) % 16 for st in k.stride()[:-2])):
        return "a page's K (or V) is not one contiguous, 16-byte aligned run"
    return None if k.is_cuda else "K/V are not in GPU memory"


def _max_offset(x: torch.Tensor) -> int:
    """The largest element offset from x's first element (any strides)."""
    return sum((size - 1) * stride for size, stride in zip(x.shape, x.stride()) if size > 0)
