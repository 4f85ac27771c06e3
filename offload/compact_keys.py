"""The GPU-resident compact key index: an int8/int4 copy of every key of the host KV store.

Selection source ``gpu-compact``: every physical page of the host store (``HostKVStore``) has a twin
here with the same page id, so the store's page tables (``store.page_tables(seq_ids)``, moved to the
device) index both. Per layer: codes ``[num_pages, Hkv, P, D]`` int8 or ``[num_pages, Hkv, P, D/2]``
uint8 (int4, two per byte) and scales ``[num_pages, Hkv, P, D/group_size]`` (see
``gpu_kernels.compact_keys`` for the format). New tokens are quantized into it in place when they are
committed (``write``), and ``page_scores`` scans a layer's compact keys with the selection queries of
each (row, KV head) at HBM speed, giving the page scores selection ranks.

Size: ``L * num_pages * Hkv * P * (D * bits/8 + (D/group_size) * scale bytes)``; for Qwen3-8B geometry
(36 layers, 8 KV heads, D 128) at int4 with group 32 and fp16 scales that is 20.25 KiB per token,
about 1/7 of the bf16 KV (144 KiB per token).

Two paths compute the same results: the Triton kernels (CUDA, or CPU tensors under the Triton
interpreter) and the plain-torch references (any device). ``use_kernel=None`` picks the kernels on
CUDA or when the interpreter is active, the references otherwise.
"""

from __future__ import annotations

import psutil
import torch

from gpu_kernels.compact_keys import (
    check_geometry, code_dim, compact_bytes_per_token, compact_page_scores, compact_page_scores_reference,
    kernel_interpreted, quantize_into, quantize_into_reference)

_GIB = 2**30
_CODE_DTYPES = {8: torch.int8, 4: torch.uint8}


class CompactKeyIndex:
    """Quantized keys of every host-store page, resident on ``device``.

    Args: the host store's geometry (num_layers, num_kv_heads, head_dim, page_size, num_pages);
    bits 4 or 8; group_size (elements per scale, a power of two dividing head_dim); device;
    scale_dtype float16 (default) or float32; use_kernel (None: see the module docstring);
    reserve_bytes: device memory that must stay free after the allocation (activations, the page
    pool): the constructor raises MemoryError, saying how many pages would fit, when the device lacks
    ``nbytes + reserve_bytes`` of free memory.
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        page_size: int,
        num_pages: int,
        *,
        bits: int = 4,
        group_size: int = 32,
        device: torch.device | str = "cuda",
        scale_dtype: torch.dtype = torch.float16,
        use_kernel: bool | None = None,
        reserve_bytes: int = 0,
    ) -> None:
        check_geometry(head_dim, bits, group_size, page_size)
        for name, v in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("num_pages", num_pages)):
            if v <= 0:
                raise ValueError(f"{name} must be positive, got {v}")
        if scale_dtype not in (torch.float16, torch.float32):
            raise ValueError(f"scale_dtype must be float16 or float32, got {scale_dtype}")
        if reserve_bytes < 0:
            raise ValueError(f"reserve_bytes must be >= 0, got {reserve_bytes}")
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if use_kernel is None:
            use_kernel = device.type == "cuda" or kernel_interpreted()
        if use_kernel and device.type != "cuda" and not kernel_interpreted():
            raise ValueError(
                f"use_kernel=True on {device} needs the Triton interpreter (TRITON_INTERPRET=1 set before the "
                "kernels are imported); use device='cuda' or use_kernel=False (plain torch)")
        self.num_layers = int(num_layers)
        self.num_kv_heads = int(num_kv_heads)
        self.head_dim = int(head_dim)
        self.page_size = int(page_size)
        self.num_pages = int(num_pages)
        self.bits = int(bits)
        self.group_size = int(group_size)
        self.scale_dtype = scale_dtype
        self.device = device
        self.use_kernel = bool(use_kernel)

        need = self.nbytes_for(num_layers, num_kv_heads, head_dim, page_size, num_pages, bits=bits,
                               group_size=group_size, scale_dtype=scale_dtype)
        self._check_memory(need, reserve_bytes)
        shape = (self.num_layers, self.num_pages, self.num_kv_heads, self.page_size)
        try:
            # Zeros: a page never written scores 0 (scale 0), not garbage.
            self._codes = torch.zeros(shape + (code_dim(head_dim, bits),), dtype=_CODE_DTYPES[bits], device=device)
            self._scales = torch.zeros(shape + (head_dim // group_size,), dtype=scale_dtype, device=device)
        except torch.cuda.OutOfMemoryError as e:
            self._codes = self._scales = None
            raise MemoryError(self._fit_message(need, reserve_bytes, self._free_bytes()) +
                              f" (allocation failed: {e})") from None
        self._closed = False

    # ------------------------------------------------------------------------------------------
    # size

    @staticmethod
    def nbytes_for(num_layers: int, num_kv_heads: int, head_dim: int, page_size: int, num_pages: int, *,
                   bits: int = 4, group_size: int = 32, scale_dtype: torch.dtype = torch.float16) -> int:
        """Bytes an index of this geometry allocates (codes + scales)."""
        check_geometry(head_dim, bits, group_size, page_size)
        return (num_layers * num_pages * num_kv_heads * page_size
                * compact_bytes_per_token(head_dim, bits, group_size, scale_dtype))

    @property
    def bytes_per_page(self) -> int:
        """Bytes of one physical page over all layers and KV heads."""
        return self.nbytes_for(self.num_layers, self.num_kv_heads, self.head_dim, self.page_size, 1,
                               bits=self.bits, group_size=self.group_size, scale_dtype=self.scale_dtype)

    @property
    def nbytes(self) -> int:
        return self.num_pages * self.bytes_per_page

    def _free_bytes(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.mem_get_info(self.device)[0])
        return int(psutil.virtual_memory().available)

    def _fit_message(self, need: int, reserve: int, free: int) -> str:
        room = max(free - reserve, 0)
        per_page = self.bytes_per_page
        fit = room // per_page
        msg = (f"CompactKeyIndex needs {need / _GIB:.2f} GiB on {self.device} ({self.num_pages} pages x "
               f"{self.page_size} tokens x {self.num_layers} layers x {self.num_kv_heads} KV heads, int{self.bits}, "
               f"group {self.group_size}) but {free / _GIB:.2f} GiB is free and {reserve / _GIB:.2f} GiB must stay "
               f"free: at most {fit} pages ({fit * self.page_size} tokens) fit at int{self.bits}")
        if self.bits == 8:
            per4 = self.nbytes_for(self.num_layers, self.num_kv_heads, self.head_dim, self.page_size, 1, bits=4,
                                   group_size=self.group_size, scale_dtype=self.scale_dtype)
            msg += f", {room // per4} pages ({room // per4 * self.page_size} tokens) at int4 (bits=4)"
        return msg + ". Use fewer pages, bits=4, or the CPU index for this context."

    def _check_memory(self, need: int, reserve: int) -> None:
        free = self._free_bytes()
        if need + reserve > free:
            raise MemoryError(self._fit_message(need, reserve, free))

    # ------------------------------------------------------------------------------------------
    # data

    def _live(self) -> None:
        if self._closed:
            raise RuntimeError("CompactKeyIndex was closed")

    def _layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        self._live()
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} out of range for {self.num_layers} layers")
        return self._codes[layer], self._scales[layer]

    def codes(self, layer: int) -> torch.Tensor:
        """``[num_pages, Hkv, P, D or D/2]`` codes of ``layer`` (a view)."""
        return self._layer(layer)[0]

    def scales(self, layer: int) -> torch.Tensor:
        """``[num_pages, Hkv, P, D/group_size]`` scales of ``layer`` (a view)."""
        return self._layer(layer)[1]

    def _on_device(self, t: torch.Tensor, name: str) -> torch.Tensor:
        if t.device != self.device:
            raise ValueError(f"{name} is on {t.device}; the index lives on {self.device} (move it there first: "
                             "the index does not copy host tensors behind the caller's back)")
        return t

    def write(
        self,
        layer: int,
        page_table: torch.Tensor,
        start_pos: torch.Tensor | int,
        k_new: torch.Tensor,
        *,
        validate: bool | None = None,
    ) -> None:
        """Quantize keys of new tokens into the index in place.

        page_table [N, max_pages] int32 (the host store's table for the N rows, on the index's device);
        start_pos [N] int32 (or one int for all rows); k_new [N, Hkv, T, D] fp32/fp16/bf16: positions
        start_pos[n] .. start_pos[n]+T-1 of row n. ``validate`` (default: on CPU only, as it syncs a
        GPU) checks that every written position has a page id in [0, num_pages).
        """
        codes, scales = self._layer(layer)
        page_table = self._on_device(page_table, "page_table")
        k_new = self._on_device(k_new, "k_new")
        if isinstance(start_pos, int):
            start_pos = torch.full((k_new.shape[0],), start_pos, dtype=torch.int32, device=self.device)
        start_pos = self._on_device(start_pos, "start_pos")
        if validate is None:
            validate = self.device.type != "cuda"
        if self.use_kernel:
            quantize_into(k_new, codes, scales, page_table, start_pos, bits=self.bits, group_size=self.group_size,
                          validate=validate)
        else:
            quantize_into_reference(k_new, codes, scales, page_table, start_pos, bits=self.bits,
                                    group_size=self.group_size)

    def scores(
        self,
        layer: int,
        q: torch.Tensor,
        page_table: torch.Tensor,
        kv_len: torch.Tensor,
        scale: float,
        *,
        return_token_scores: bool = False,
        out: torch.Tensor | None = None,
        token_out: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(page_scores [N, Hkv, max_pages], token_scores [N, Hkv, max_pages * P] or None), fp32.

        q [N, Hkv, D] or [N, Hkv, R, D] (the selection queries of each row and KV head: a token scores
        the max over them); page_table [N, max_pages] int32;
        kv_len [N] int32 (or [N, Hkv]); scale multiplies q . k. Page score = max over the page's tokens
        below kv_len of scale * q . dequant(k); -inf for pages with no valid token. All on the index's
        device. ``out``/``token_out``: optional buffers (kernel path only)."""
        codes, scales = self._layer(layer)
        q = self._on_device(q, "q")
        page_table = self._on_device(page_table, "page_table")
        kv_len = self._on_device(kv_len, "kv_len")
        if self.use_kernel:
            return compact_page_scores(q, codes, scales, page_table, kv_len, bits=self.bits,
                                       group_size=self.group_size, scale=scale,
                                       return_token_scores=return_token_scores, out=out, token_out=token_out)
        if out is not None or token_out is not None:
            raise ValueError("out/token_out buffers are only taken by the kernel path (use_kernel=True)")
        return compact_page_scores_reference(q, codes, scales, page_table, kv_len, bits=self.bits,
                                             group_size=self.group_size, scale=scale,
                                             return_token_scores=return_token_scores)

    def page_scores(
        self,
        layer: int,
        q: torch.Tensor,
        page_table: torch.Tensor,
        kv_len: torch.Tensor,
        scale: float,
        *,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``[N, Hkv, max_pages]`` fp32 page scores (see ``scores``)."""
        return self.scores(layer, q, page_table, kv_len, scale, out=out)[0]

    # ------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Free the device memory. The index is unusable afterwards."""
        self._closed = True
        self._codes = self._scales = None  # type: ignore[assignment]

    def __enter__(self) -> CompactKeyIndex:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"CompactKeyIndex(L={self.num_layers}, Hkv={self.num_kv_heads}, D={self.head_dim}, "
                f"P={self.page_size}, pages={self.num_pages}, int{self.bits}/g{self.group_size}, "
                f"{self.nbytes / _GIB:.3f} GiB on {self.device}, kernel={self.use_kernel}, closed={self._closed})")
