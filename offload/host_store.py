"""The paged KV store in host memory: all layers' K and V, allocated once and reused across requests.

Layout: one buffer ``[2, L, num_pages, Hkv, P, D]`` holds K (``k_all``) and V (``v_all``), each
``[L, num_pages, Hkv, P, D]``; ``k(layer)`` is the per-layer view ``[num_pages, Hkv, P, D]`` the
page-copy kernels take. Sequences own pages through page tables
(logical page i = positions ``i*P .. i*P+P-1`` -> physical page id) drawn from one free list.

Pinning: the buffer is allocated as plain memory and page-locked with ``cudaHostRegister``, which
locks exactly the (page-rounded) bytes asked for and gives them back on ``close``. torch's pinned
allocator rounds every block up to a power of two (an 18 GiB store would lock 32 GiB) and keeps
freed blocks cached, so it is only the fallback. The registered range is page-aligned inside an
over-allocated block so that no other allocation shares its pages (a second registration of a
shared page would fail).

Huge pages: by default the buffer is an anonymous mapping advised ``MADV_HUGEPAGE`` before it is
first touched, so the kernel backs it with 2 MiB pages where transparent huge pages are enabled
("always" or "madvise"). The GPU's UVA gather reads 4 KiB units scattered over tens of GiB; with 4
KiB pages each unit is its own page to translate, and on an H200 that cost ~10% of the gather rate
(5% selection of a 8 GiB store: 39.0 -> 44.4 GB/s, `scripts/dev/probe_hugepage_gather.py`).

fp8 (``dtype=torch.float8_e4m3fn``, `gpu_kernels.kv_fp8`): the pages hold e4m3 codes, half the host
memory and half the PCIe bytes of bf16, and every (layer, page, KV head) unit of K and of V has an
fp32 scale. The scales (``k_scale``/``v_scale``, ``[L, num_pages, Hkv]``, 1/512 of the codes at
16 x 128 units) live on ``scale_device``, the GPU where the kernels that read the pages run: the
page fetcher copies a unit's scale into its pool slot there, and no scale ever crosses PCIe. A write
quantizes what it is given (the only place K/V enter the store).

``tensor.is_pinned()`` does not see registered memory on every torch version, so kernels take the
buffers through ``kernel_k``/``kernel_v`` (``HostPointer(view, registered=True)`` for registered
memory) and ``pinned`` says whether the buffer is page-locked.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import re
import resource
import weakref
from collections.abc import Callable, Hashable, Iterable, Sequence
from pathlib import Path

import psutil
import torch
from tqdm.auto import tqdm

from gpu_kernels._uva import HostPointer
from gpu_kernels.kv_fp8 import dequantize_units, is_fp8
from gpu_kernels.page_copy import write_tokens, write_tokens_reference

from .uploads import upload

_GIB = 2**30
_HUGE_PAGE = 2 * 2**20
_SMAPS_RANGE = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) ")
_CUDA_HOST_REGISTER_PORTABLE_MAPPED = 1 | 2  # portable to all contexts, mapped into the device address space


def host_buffer(nbytes: int, huge_pages: bool) -> tuple[torch.Tensor, mmap.mmap | None]:
    """``nbytes`` rounded up to whole pages of page-aligned host memory (2 MiB-aligned and advised
    MADV_HUGEPAGE when ``huge_pages`` and the platform has it) as a uint8 tensor, and the mapping
    that owns it (None for torch's allocator). Not yet touched: the kernel picks page sizes at the
    first fault, so the advice must come first."""
    if huge_pages and hasattr(mmap, "MADV_HUGEPAGE"):
        span = -(-nbytes // _HUGE_PAGE) * _HUGE_PAGE
        region = mmap.mmap(-1, span + _HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        try:
            region.madvise(mmap.MADV_HUGEPAGE)
        except OSError:  # a kernel built without THP: base pages, same layout
            pass
        raw = torch.frombuffer(region, dtype=torch.uint8)
        return raw[(-raw.data_ptr()) % _HUGE_PAGE:][:span], region
    page = mmap.PAGESIZE
    span = -(-nbytes // page) * page
    raw = torch.empty(span + page, dtype=torch.uint8)
    return raw[(-raw.data_ptr()) % page:][:span], None  # the view keeps raw's storage alive


def _fault_in(buf: torch.Tensor, progress: bool, chunk_bytes: int = _GIB) -> None:
    """Touch one byte of every page of ``buf`` (uint8), chunk by chunk, so that the memory is resident
    before cudaHostRegister pins it: the same work registration would do, but in steps a progress
    bar can follow (registering 100 GiB is otherwise one silent call of a minute)."""
    page = mmap.PAGESIZE
    total = buf.numel()
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="host KV store",
               disable=not progress or total < chunk_bytes, leave=False)
    with bar:
        for start in range(0, total, chunk_bytes):
            chunk = buf[start:start + chunk_bytes]
            chunk[::page].zero_()  # fresh anonymous memory reads as zeros: this changes no value
            bar.update(chunk.numel())


def register_host_memory(buf: torch.Tensor) -> bool:
    """Page-lock ``buf`` in place with cudaHostRegister (mapped into every device's address space);
    False if this torch build or the driver cannot (`host_register_error` says why)."""
    return host_register_error(buf) == 0


def host_register_error(buf: torch.Tensor) -> int | None:
    """cudaHostRegister of ``buf``: 0 on success, else CUDA's error code (2: out of memory, which is
    what a low locked-memory limit gives), None where this torch build has no cudaHostRegister."""
    cudart = torch.cuda.cudart()
    if not hasattr(cudart, "cudaHostRegister"):
        return None
    error = int(cudart.cudaHostRegister(buf.data_ptr(), buf.numel(), _CUDA_HOST_REGISTER_PORTABLE_MAPPED))
    if error != 0:
        clear_cuda_error()
    return error


def _loaded_cudart() -> ctypes.CDLL | None:
    """The CUDA runtime library this process loaded (torch's), through ctypes; None where it is not a
    shared library of its own (a static build) or the platform has no /proc/self/maps."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        return None
    for line in maps.read_text().splitlines():
        path = line.split()[-1]
        if "/libcudart.so" in path:
            return ctypes.CDLL(path)  # the loaded copy (dlopen returns it): the same runtime instance
    return None


def clear_cuda_error() -> None:
    """Reset the CUDA runtime's last error after a runtime call whose failure was handled here.

    A failed call (cudaHostRegister refused: out of memory, already registered) leaves the error
    as the thread's last error; torch reads that after its next kernel launch
    (C10_CUDA_KERNEL_LAUNCH_CHECK calls cudaGetLastError) and would raise it there, from whatever
    op ran next, long after the store fell back to torch's pinned allocator or refused with its
    own message. torch's CUDA allocator clears the error the same way after a failed cudaMalloc.
    torch's cudart bindings lack cudaGetLastError: the loaded runtime is called through ctypes;
    without it, one tiny kernel launch reads (and so clears) the error, which is dropped."""
    cudart = _loaded_cudart()
    if cudart is not None:
        cudart.cudaGetLastError()
        return
    with contextlib.suppress(RuntimeError):
        torch.zeros(1, device="cuda")


def locked_memory_limit() -> int | None:
    """The soft RLIMIT_MEMLOCK (`ulimit -l`) in bytes; None: unlimited."""
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return None if soft == resource.RLIM_INFINITY else soft


class TransferFault(RuntimeError):
    """A transfer between the host store and the GPU failed for the host pages it names.

    Raised by `HostKVStore.fault_hook` (a test hook: nothing in production sets it; a real CUDA
    copy error is sticky and cannot be pinned on pages). The attention mode that owns the store
    turns it into a `runtime.RequestError` for the sequences owning those pages (`owners`), so
    that only their requests fail."""

    def __init__(self, pages: Iterable[int], message: str):
        super().__init__(message)
        self.pages = frozenset(int(p) for p in pages)


# fault_hook(op, layer, pages): op "write" (K/V into the store; layer None: every layer) or
# "gather" (pages to the GPU page cache); pages: [n] int64 host-store pages the transfer carries.
FaultHook = Callable[[str, "int | None", torch.Tensor], None]


def huge_page_bytes(address: int, length: int) -> int | None:
    """Bytes of the mappings overlapping ``[address, address + length)`` that the kernel backs with
    transparent huge pages (AnonHugePages in /proc/self/smaps); None where that file does not exist."""
    smaps = Path("/proc/self/smaps")
    if not smaps.exists():
        return None
    lo_buf, hi_buf = address, address + length
    total, inside = 0, False
    for line in smaps.read_text().splitlines():
        head = _SMAPS_RANGE.match(line)
        if head:
            lo, hi = int(head.group(1), 16), int(head.group(2), 16)
            inside = lo < hi_buf and hi > lo_buf
        elif inside and line.startswith("AnonHugePages:"):
            total += int(line.split()[1]) * 1024
    return total


def _unregister(buf: torch.Tensor) -> None:
    # Runs from close() or the finalizer; at interpreter exit CUDA may already be gone, so errors are ignored.
    try:
        if int(torch.cuda.cudart().cudaHostUnregister(buf.data_ptr())) != 0:
            clear_cuda_error()  # a refusal must not surface at torch's next kernel launch
    except Exception:
        pass


def _pow2_ceil(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class HostKVStore:
    """All layers' paged K/V in (pinned) host memory plus per-sequence page tables.

    Args:
        num_layers, num_kv_heads, head_dim, page_size: the geometry; pages hold ``page_size`` tokens.
        num_pages: physical pages (each spans all layers, K and V).
        dtype: element type (bf16 for the models, fp16/fp32 in tests), or torch.float8_e4m3fn for
            e4m3 pages with per-(page, head) scales.
        scale_device: where fp8 pages' scales live (default: CUDA when the store is pinned, else the CPU).
        pin_memory: None pins when CUDA is available; True requires CUDA; False never pins.
        huge_pages: back the buffer with 2 MiB transparent huge pages where the OS grants them
            (faster scattered GPU reads); False: the allocator's 4 KiB pages.
        progress: show a progress bar while a pinned buffer's pages are faulted in (tens of seconds
            for 100 GiB, more when the kernel must first compact memory into huge pages).
        reserve_bytes: host memory left free for everything else (default: 5% of RAM, at least 512 MiB).
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        page_size: int,
        num_pages: int,
        dtype: torch.dtype = torch.bfloat16,
        pin_memory: bool | None = None,
        reserve_bytes: int | None = None,
        huge_pages: bool = True,
        progress: bool = False,
        scale_device: torch.device | str | None = None,
    ) -> None:
        for name, val in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                          ("page_size", page_size), ("num_pages", num_pages)):
            if int(val) <= 0:
                raise ValueError(f"{name} must be positive, got {val}")
        if pin_memory is None:
            pin_memory = torch.cuda.is_available()
        if pin_memory and not torch.cuda.is_available():
            raise RuntimeError("pin_memory=True needs CUDA; pass pin_memory=None or False on a machine without a GPU")
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.page_size, self.num_pages, self.dtype = page_size, num_pages, dtype
        elem = torch.empty((), dtype=dtype).element_size()
        self.page_bytes = 2 * num_layers * num_kv_heads * page_size * head_dim * elem  # K+V, all layers
        self.nbytes = self.page_bytes * num_pages
        self._check_memory(reserve_bytes, self.nbytes)

        shape = (2, num_layers, num_pages, num_kv_heads, page_size, head_dim)
        self.pin_method = "none"
        raw, self._mapping = host_buffer(self.nbytes, huge_pages)
        self.huge_pages = self._mapping is not None  # asked for and advised; huge_page_share() says if granted
        buf = raw[: self.nbytes].view(dtype).view(shape)
        if pin_memory:
            _fault_in(raw, progress)
            register_error = host_register_error(raw)
            if register_error == 0:
                self.pin_method = "cudaHostRegister"
                self._finalizer = weakref.finalize(self, _unregister, raw)
            else:
                del raw, buf
                self._mapping = None
                self.huge_pages = False
                # torch's pinned allocator rounds the block up to a power of two: check that size too.
                self._check_memory(reserve_bytes, _pow2_ceil(self.nbytes))
                try:
                    buf = torch.empty(shape, dtype=dtype, pin_memory=True)
                except RuntimeError as err:
                    raise self._pinning_failed(register_error, err, reserve_bytes) from err
                self.pin_method = "torch_pinned_allocator"
        # a test hook (see FaultHook, TransferFault); None in production: the hot paths test only this
        self.fault_hook: FaultHook | None = None
        self._k, self._v = buf[0], buf[1]
        self._k_scale = self._v_scale = None
        self.scale_nbytes = 0  # fp8: the scales' bytes on scale_device
        if is_fp8(dtype):
            if scale_device is None:
                scale_device = "cuda" if self.pinned else "cpu"
            # ones: a unit never written dequantizes to 0 (its codes are 0), never to NaN
            self._k_scale = torch.ones(shape[1:4], dtype=torch.float32, device=scale_device)
            self._v_scale = torch.ones_like(self._k_scale)
            self.scale_nbytes = 2 * self._k_scale.numel() * 4
        self._free: list[int] = list(range(num_pages - 1, -1, -1))  # stack: pops 0, 1, 2, ...
        self._tables: dict[Hashable, list[int]] = {}
        self._ntok: dict[Hashable, int] = {}
        self._table_t: dict[Hashable, torch.Tensor] = {}  # cached int32 tables (hot path: every fetch)
        self._closed = False

    # ------------------------------------------------------------------------------------------
    # sizing

    def _usable_bytes(self, reserve_bytes: int | None) -> tuple[int, int, int]:
        """(usable, available, reserve): host memory the store may take now, beside the reserve."""
        vm = psutil.virtual_memory()
        reserve = max(512 * 2**20, vm.total // 20) if reserve_bytes is None else int(reserve_bytes)
        return max(0, vm.available - reserve), vm.available, reserve

    def _check_memory(self, reserve_bytes: int | None, need: int) -> None:
        usable, available, reserve = self._usable_bytes(reserve_bytes)
        if need > usable:
            fit_pages = usable // self.page_bytes
            raise MemoryError(
                f"HostKVStore needs {need / _GIB:.2f} GiB for {self.num_pages} pages x {self.page_size} tokens "
                f"({self.num_pages * self.page_size} tokens, {self.page_bytes} B/page over {self.num_layers} layers) "
                f"but only {usable / _GIB:.2f} GiB is usable ({available / _GIB:.2f} GiB available minus "
                f"{reserve / _GIB:.2f} GiB reserve). At most {fit_pages} pages ({fit_pages * self.page_size} tokens) "
                "fit: lower num_pages or free host memory."
            )

    def _pinning_failed(self, register_error: int | None, err: Exception, reserve_bytes: int | None) -> MemoryError:
        """What a store that could not be page-locked tells its user: what ran out (locked memory,
        under which limit, or host memory the driver could lock) and what would fit."""
        limit = locked_memory_limit()
        how = ("this torch build has no cudaHostRegister" if register_error is None
               else f"cudaHostRegister failed with CUDA error {register_error}")
        if limit is not None and limit < self.nbytes:
            pages = limit // self.page_bytes
            fits = (f"the locked-memory limit (ulimit -l) is {limit / 2**20:.1f} MiB, under which at most {pages} "
                    f"pages ({pages * self.page_size} tokens) fit: raise it (ulimit -l unlimited; in a container "
                    "--ulimit memlock=-1)")
        else:
            # the limit (none, or above the store) did not refuse it: the host could not lock that much
            usable, available, _ = self._usable_bytes(reserve_bytes)
            pages = usable // self.page_bytes
            bound = "unlimited" if limit is None else f"{limit / _GIB:.2f} GiB, above the store"
            fits = (f"the locked-memory limit (ulimit -l) is {bound}, so the host is short of memory it can lock "
                    f"({available / _GIB:.2f} GiB available now): at most {pages} pages ({pages * self.page_size} "
                    "tokens) would fit beside the reserve; free host memory")
        return MemoryError(
            f"HostKVStore could not page-lock {self.nbytes / _GIB:.2f} GiB for {self.num_pages} pages x "
            f"{self.page_size} tokens: {how}, and torch's pinned allocator failed too ({err}). {fits[0].upper()}"
            f"{fits[1:]}, or lower the batch or the context (num_pages).")

    def owners(self, pages: Iterable[int]) -> list[Hashable]:
        """The sequences whose page tables hold any of ``pages`` (a fault's victims)."""
        wanted = {int(p) for p in pages}
        return [seq for seq, table in self._tables.items() if wanted.intersection(table)]

    def _written_pages(self, page_table: torch.Tensor, start: torch.Tensor, num_new: int) -> torch.Tensor:
        """[n] int64: the store pages a write of ``num_new`` tokens per row at ``start`` touches
        (for the fault hook only: it reads device tables back to the host)."""
        table, start = page_table.cpu().long(), start.cpu().long()
        pages = []
        for row in range(table.shape[0]):
            first, last = int(start[row]) // self.page_size, (int(start[row]) + num_new - 1) // self.page_size
            pages.append(table[row, first:last + 1])
        return torch.cat(pages) if pages else torch.zeros(0, dtype=torch.int64)

    @property
    def pinned(self) -> bool:
        """True when the buffer is page-locked (cudaHostRegister or torch's pinned allocator): GPU
        kernels can read and write it through ``kernel_k``/``kernel_v``."""
        return self.pin_method != "none"

    def huge_page_share(self) -> float | None:
        """Share of the buffer backed by 2 MiB pages, memory not yet touched counting as not backed
        (None where the OS does not say). Reads /proc/self/smaps: for reports, not hot paths."""
        self._live()
        huge = huge_page_bytes(self._k.data_ptr(), self.nbytes)
        return None if huge is None else min(1.0, huge / self.nbytes)

    @property
    def capacity_tokens(self) -> int:
        return self.num_pages * self.page_size

    @property
    def free_pages(self) -> int:
        return len(self._free)

    @property
    def used_pages(self) -> int:
        return self.num_pages - len(self._free)

    def pages_for(self, num_tokens: int) -> int:
        return -(-int(num_tokens) // self.page_size)

    # ------------------------------------------------------------------------------------------
    # sequences

    def _live(self) -> None:
        if self._closed:
            raise RuntimeError("HostKVStore was closed")

    def _table(self, seq_id: Hashable) -> list[int]:
        try:
            return self._tables[seq_id]
        except KeyError:
            raise KeyError(f"sequence {seq_id!r} has no pages in the host store (allocate it first)") from None

    def _take(self, n: int, why: str) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(
                f"host KV store out of pages: {why} needs {n} more pages ({n * self.page_size} tokens) but only "
                f"{len(self._free)} of {self.num_pages} are free ({len(self._free) * self.page_size} of "
                f"{self.capacity_tokens} tokens, {self.page_size}-token pages). Free finished sequences or build "
                "the store with more num_pages."
            )
        taken = self._free[len(self._free) - n:][::-1]
        del self._free[len(self._free) - n:]
        return taken

    def allocate(self, seq_id: Hashable, num_tokens: int) -> torch.Tensor:
        """Give a new sequence pages for ``num_tokens`` tokens; returns its page table (int32)."""
        self._live()
        if seq_id in self._tables:
            raise ValueError(f"sequence {seq_id!r} is already allocated ({self._ntok[seq_id]} tokens); use extend()")
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        self._tables[seq_id] = self._take(self.pages_for(num_tokens), f"allocating {num_tokens} tokens for {seq_id!r}")
        self._ntok[seq_id] = int(num_tokens)
        return self.page_table(seq_id)

    def extend(self, seq_id: Hashable, new_total_tokens: int) -> torch.Tensor:
        """Grow a sequence to ``new_total_tokens`` tokens (adds pages as needed); returns its page table."""
        self._live()
        table = self._table(seq_id)
        cur = self._ntok[seq_id]
        if new_total_tokens < cur:
            raise ValueError(f"extend({seq_id!r}, {new_total_tokens}) would shrink the sequence from {cur} tokens")
        extra = self.pages_for(new_total_tokens) - len(table)
        if extra > 0:
            table.extend(self._take(extra, f"extending {seq_id!r} from {cur} to {new_total_tokens} tokens"))
            self._table_t.pop(seq_id, None)
        self._ntok[seq_id] = int(new_total_tokens)
        return self.page_table(seq_id)

    def free(self, seq_id: Hashable) -> None:
        """Return a sequence's pages to the free list. Freeing an unknown (or already freed) id is an error."""
        self._live()
        if seq_id not in self._tables:
            raise KeyError(f"free({seq_id!r}): sequence is not allocated (double free, or never allocated)")
        self._free.extend(reversed(self._tables.pop(seq_id)))
        del self._ntok[seq_id]
        self._table_t.pop(seq_id, None)

    def has(self, seq_id: Hashable) -> bool:
        return seq_id in self._tables

    @property
    def sequences(self) -> list[Hashable]:
        return list(self._tables)

    def num_tokens(self, seq_id: Hashable) -> int:
        self._table(seq_id)
        return self._ntok[seq_id]

    def page_table(self, seq_id: Hashable) -> torch.Tensor:
        """``[num_pages_of_seq]`` int32: logical page -> physical page (a copy)."""
        return self._cached_table(seq_id).clone()

    def _cached_table(self, seq_id: Hashable) -> torch.Tensor:
        t = self._table_t.get(seq_id)
        if t is None:
            t = self._table_t[seq_id] = torch.tensor(self._table(seq_id), dtype=torch.int32)
        return t

    def page_tables(self, seq_ids: Sequence[Hashable], max_pages: int | None = None) -> torch.Tensor:
        """``[N, max_pages]`` int32, row i = seq_ids[i]'s table padded with -1."""
        tables = [self._cached_table(s) for s in seq_ids]
        width = max((t.numel() for t in tables), default=0) if max_pages is None else max_pages
        out = torch.full((len(tables), width), -1, dtype=torch.int32)
        for i, t in enumerate(tables):
            if t.numel() > width:
                raise ValueError(f"sequence {seq_ids[i]!r} has {t.numel()} pages, more than max_pages={width}")
            out[i, : t.numel()] = t
        return out

    # ------------------------------------------------------------------------------------------
    # data

    def k(self, layer: int) -> torch.Tensor:
        """``[num_pages, Hkv, P, D]`` view of layer ``layer``'s keys."""
        self._live()
        return self._k[layer]

    def v(self, layer: int) -> torch.Tensor:
        self._live()
        return self._v[layer]

    @property
    def fp8(self) -> bool:
        """Whether the pages hold e4m3 codes with per-(page, head) scales."""
        return self._k_scale is not None

    def k_scale(self, layer: int) -> torch.Tensor | None:
        """``[num_pages, Hkv]`` fp32 scales of layer ``layer``'s key units on scale_device (None unless fp8)."""
        self._live()
        return None if self._k_scale is None else self._k_scale[layer]

    def v_scale(self, layer: int) -> torch.Tensor | None:
        self._live()
        return None if self._v_scale is None else self._v_scale[layer]

    @property
    def k_all(self) -> torch.Tensor:
        """``[L, num_pages, Hkv, P, D]``: every layer's keys (for multi-layer kernel launches)."""
        self._live()
        return self._k

    @property
    def v_all(self) -> torch.Tensor:
        self._live()
        return self._v

    def _kernel_view(self, view: torch.Tensor) -> torch.Tensor | HostPointer:
        # Registered memory is invisible to is_pinned(), so the store, which registered it, vouches for it.
        return HostPointer(view, registered=True) if self.pin_method == "cudaHostRegister" else view

    def kernel_k(self, layer: int) -> torch.Tensor | HostPointer:
        """``k(layer)`` as a page-copy / attention kernel argument: ``HostPointer(view, registered=True)``
        when the buffer is registered with cudaHostRegister, else the view itself (torch-pinned or
        unpinned memory, which the kernels check themselves)."""
        return self._kernel_view(self.k(layer))

    def kernel_v(self, layer: int) -> torch.Tensor | HostPointer:
        """``v(layer)`` as a kernel argument (see ``kernel_k``)."""
        return self._kernel_view(self.v(layer))

    @property
    def kernel_k_all(self) -> torch.Tensor | HostPointer:
        """``k_all`` ``[L, num_pages, Hkv, P, D]`` as a kernel argument (see ``kernel_k``)."""
        return self._kernel_view(self.k_all)

    @property
    def kernel_v_all(self) -> torch.Tensor | HostPointer:
        """``v_all`` as a kernel argument (see ``kernel_k``)."""
        return self._kernel_view(self.v_all)

    def write(self, layer: int | None, page_table: torch.Tensor, start: torch.Tensor, k_new: torch.Tensor,
              v_new: torch.Tensor) -> None:
        """Write T new tokens per row at positions ``start[n] .. start[n]+T-1`` of the rows whose
        page tables are ``page_table`` (allocate or extend them first).

        page_table: ``[N, pages]`` int32 (``page_tables(seq_ids)``, or a device copy of it);
        start: ``[N]`` int; k_new, v_new: ``[N, Hkv, T, D]`` of one layer, or ``[L, N, Hkv, T, D]``
        with ``layer=None`` (every layer at once), in the store's dtype (an fp8 store takes the
        model's K/V in any float dtype and requantizes every page the write touches). From the GPU
        into a pinned store: the UVA write kernel, asynchronously on the current stream (a CUDA
        graph may capture it; host tables are uploaded first); otherwise torch indexing. Positions are checked
        against the tables where they are on the host; device tables are not read (a sync).
        """
        self._live()
        want = 4 + int(layer is None)
        if k_new.dim() != want or v_new.shape != k_new.shape:
            raise ValueError(f"write expects k_new/v_new of {want} dims ({'[L, ]' if layer is None else ''}"
                             f"[N, Hkv, T, D]); got {tuple(k_new.shape)} and {tuple(v_new.shape)}")
        n, hkv, t, d = k_new.shape[-4:]
        if (hkv, d) != (self.num_kv_heads, self.head_dim):
            raise ValueError(f"k_new has (Hkv, D) = {(hkv, d)}, store has {(self.num_kv_heads, self.head_dim)}")
        if page_table.dim() != 2 or page_table.shape[0] != n or tuple(start.shape) != (n,):
            raise ValueError(f"{n} rows of K/V need page_table [{n}, pages] and start [{n}]; got "
                             f"{tuple(page_table.shape)} and {tuple(start.shape)}")
        if layer is not None and not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} out of range for {self.num_layers} layers")
        if layer is None and k_new.shape[0] != self.num_layers:
            raise ValueError(f"layer=None writes all {self.num_layers} layers; k_new has {k_new.shape[0]}")
        if k_new.dtype != self.dtype and not self.fp8:
            raise ValueError(f"k_new dtype {k_new.dtype} differs from the store's {self.dtype}")
        if not page_table.is_cuda and not start.is_cuda:
            self._check_positions(page_table, start, t)
        if self.fault_hook is not None:  # before any byte moves: a refused write leaves the store as it was
            self.fault_hook("write", layer, self._written_pages(page_table, start, t))
        dst_k, dst_v = (self._k, self._v) if layer is None else (self._k[layer], self._v[layer])
        scales = {}
        if self.fp8:
            scales = dict(k_scale=self._k_scale, v_scale=self._v_scale) if layer is None else \
                dict(k_scale=self._k_scale[layer], v_scale=self._v_scale[layer])
        if k_new.is_cuda and self.pinned:
            page_table, start = (x if x.is_cuda else upload(x, k_new.device) for x in (page_table, start))
            write_tokens(self._kernel_view(dst_k), self._kernel_view(dst_v), page_table, start, k_new, v_new,
                         validate=False, **scales)
        else:
            write_tokens_reference(dst_k, dst_v, page_table, start, k_new, v_new, **scales)

    def _check_positions(self, page_table: torch.Tensor, start: torch.Tensor, num_new: int) -> None:
        """Every written position lies on an allocated page of its row's (host) table."""
        pages = (page_table >= 0).sum(dim=1)
        start = start.long()
        beyond = (start < 0) | (start + num_new > pages * self.page_size)
        if bool(beyond.any()):
            row = int(beyond.nonzero()[0])
            first, held = int(start[row]), int(pages[row])
            raise ValueError(f"write of row {row} covers positions [{first}, {first + num_new}) but its page table "
                             f"holds {held} pages ({held * self.page_size} tokens): allocate or extend first")
        if bool((page_table >= self.num_pages).any()):
            raise ValueError(f"a page table names pages beyond the store's {self.num_pages}")

    def read(self, seq_id: Hashable, layer: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of positions ``[start, end)``: two ``[Hkv, end-start, D]`` host tensors (copies;
        an fp8 store's dequantized to fp32).

        Synchronizes the GPU first when the store is pinned, so kernel writes are visible.
        """
        self._live()
        have = self.num_tokens(seq_id)
        if not 0 <= start <= end <= have:
            raise ValueError(f"read [{start}, {end}) of {seq_id!r} outside its {have} tokens")
        if self.pinned:
            torch.cuda.synchronize()
        table = torch.tensor(self._table(seq_id), dtype=torch.int64)
        pos = torch.arange(start, end)
        pages, offs = table[pos // self.page_size], pos % self.page_size
        if self.fp8:  # whole units [T, Hkv, P, D] dequantized, then each token's row picked: [T, Hkv, D]
            k, v = (dequantize_units(codes[layer][pages], scales[layer][pages.to(scales.device)].cpu())
                    [torch.arange(len(pos)), :, offs].transpose(0, 1).contiguous()
                    for codes, scales in ((self._k, self._k_scale), (self._v, self._v_scale)))
            return k, v
        # advanced indices split by the head slice: result is [T, Hkv, D]
        return (self._k[layer][pages, :, offs].transpose(0, 1).contiguous(),
                self._v[layer][pages, :, offs].transpose(0, 1).contiguous())

    # ------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Release the host buffers (unpinning them). The store is unusable afterwards."""
        if self._closed:
            return
        if self.pin_method == "cudaHostRegister":
            self._finalizer()  # unregisters exactly once
        self._closed = True
        self._k = self._v = None  # type: ignore[assignment]
        self._k_scale = self._v_scale = None
        self._mapping = None  # unmapped once the last view of it is gone
        self._tables.clear()
        self._ntok.clear()
        self._table_t.clear()
        self._free = []

    def __enter__(self) -> HostKVStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"HostKVStore(L={self.num_layers}, Hkv={self.num_kv_heads}, D={self.head_dim}, P={self.page_size}, "
                f"pages={self.num_pages}, {self.nbytes / _GIB:.2f} GiB, pinned={self.pin_method}, "
                f"free={self.free_pages})")
