"""Attention modes: the one interface between the model forward and whatever holds the KV cache.

The decoding loop plans each forward pass once (`mode.plan(batch)`) and every layer then calls
`mode.run(layer, q, k, v)`, as flashinfer does (plan once, run many). A mode owns its KV storage,
decides which context keys a query sees (all of them for `dense`; a selected subset for the sparse
modes) and writes new K/V when the phase asks for it. Adding a mode never changes the loop.

Phases of a forward pass over T new tokens per row:
- PREFILL: a chunk of the prompt; its K/V are written; inside the chunk tokens see each other
  block-causally (`visibility_block` = block size) or causally (`visibility_block` = 1).
- DENOISE: one denoising step of the current block; nothing is written; the block is bidirectional.
- COMMIT: the finished block, run once more so its K/V are those of its final tokens; written.
- LOOKAHEAD: a mode that asks for it (`wants_lookahead`) gets, after step 0 of a block, one pass
  over [the block's draft (step 0's argmax) ; the next block, all [MASK]], so the next block's
  selection and transfers can start while this block is still denoising (HERALD). Nothing is
  written; the 2B tokens see each other block-causally where the backend masks them.
"""
from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from gpu_kernels.kv_fp8 import dequantize_units, is_fp8, quantize_units
from gpu_kernels.page_copy import write_tokens, write_tokens_reference
from gpu_kernels.paged_attention import block_attention
from runtime.config import ATTENTION_BACKENDS, ModelConfig
from runtime.memory import gpu_free_bytes
from offload.uploads import upload, upload_into


class Phase(enum.Enum):
    PREFILL = "prefill"
    DENOISE = "denoise"
    COMMIT = "commit"
    LOOKAHEAD = "lookahead"  # [draft of this block ; next block all-[MASK]]: nothing written

    @property
    def writes_kv(self) -> bool:
        return self in (Phase.PREFILL, Phase.COMMIT)


@dataclass(frozen=True)
class ForwardBatch:
    """One forward pass: N rows (sequences), each with T new tokens after its committed context.

    context_lens: [N] int64 (CPU), committed KV tokens of each row before the new ones; the new
    tokens sit at positions context_lens[n] .. context_lens[n] + T - 1.
    """

    phase: Phase
    seq_ids: tuple[int, ...]
    context_lens: torch.Tensor
    num_new: int
    visibility_block: int
    step: int = 0
    # a PREFILL or COMMIT pass whose logits the loop reads too (Fast-dLLM v2's token shift decodes
    # the next block's first token from the last logits before it)
    wants_logits: bool = False

    @property
    def needs_logits(self) -> bool:
        return self.phase is Phase.DENOISE or self.wants_logits

    @property
    def num_rows(self) -> int:
        return len(self.seq_ids)

    def positions(self, device: torch.device | str) -> torch.Tensor:
        """[N, T] int64 absolute positions of the new tokens."""
        offsets = torch.arange(self.num_new, dtype=torch.int64)
        return upload(self.context_lens[:, None] + offsets[None, :], device)

    def new_token_mask(self) -> torch.Tensor:
        """[T, T] bool: which new tokens a new token sees (block-causal with `visibility_block`)."""
        block_of = torch.arange(self.num_new) // self.visibility_block
        return block_of[None, :] <= block_of[:, None]


class PlannedBuffers:
    """Which pass each set of a mode's fixed-address plan buffers was last filled for.

    The denoising passes after step 0 of a block usually plan the very rows, contexts and T the
    buffers already hold, so their plan may skip the host work that builds what it would upload,
    and the uploads (`offload.uploads`) themselves. Whatever a buffer's content depends on besides
    (seq_ids, context_lens, num_new), such as which KV slot or row a sequence holds, changes only
    when sequences come and go: call `forget` then.
    """

    def __init__(self) -> None:
        self._filled: dict[object, tuple] = {}

    def need_upload(self, buffers: object, batch: ForwardBatch) -> bool:
        """Whether the plan of `batch` must fill the buffer set `buffers` (any hashable name);
        records that it does. Only a DENOISE pass after step 0 is ever spared: the other passes
        fill as they always did."""
        content = (batch.seq_ids, tuple(batch.context_lens.tolist()), batch.num_new)
        if batch.phase is Phase.DENOISE and batch.step >= 1 and self._filled.get(buffers) == content:
            return False
        self._filled[buffers] = content
        return True

    def forget(self) -> None:
        self._filled.clear()


class RequestError(Exception):
    """A failure a mode can pin on some rows of a pass (a transfer of their pages failed, say).

    The loop ends only those rows' requests with finish_reason "error"; the pass's other rows run
    their block again. Any other exception from a pass fails every row of it.
    """

    def __init__(self, seq_ids: Iterable[int], message: str):
        super().__init__(message)
        self.seq_ids = frozenset(int(s) for s in seq_ids)


class AttentionMode(ABC):
    """KV storage plus the attention a layer runs over it."""

    name: str
    # whether the loop runs a LOOKAHEAD pass after each block's step 0 (see Phase.LOOKAHEAD)
    wants_lookahead: bool = False

    @abstractmethod
    def add_sequence(self, seq_id: int, max_tokens: int) -> None:
        """Reserve KV space for a sequence that will hold at most `max_tokens` tokens."""

    @abstractmethod
    def remove_sequence(self, seq_id: int) -> None:
        """Release everything the sequence holds, at any point: between blocks, mid-block, or
        after a pass over it raised halfway (the mode must stay usable for the other sequences)."""

    def restart_block(self, seq_ids: tuple[int, ...]) -> None:
        """A pass of the current block failed and the loop runs the block of these sequences again
        from step 0. Forget whatever the aborted block prepared that the rerun must not read.
        Nothing to do for a mode whose passes leave only K/V beyond the committed context (a
        commit that failed halfway), which the rerun's commit overwrites before anything reads it."""

    @property
    def timeline(self) -> list[dict]:
        """Per-block statistics of what the mode selected and moved (herald's; empty for the modes
        that move nothing)."""
        return []

    def occupancy(self) -> dict[str, int]:
        """What the mode holds for sequences now, as counts that are all 0 once every sequence has
        been removed (the leak checks of the soak benchmark and of the tests read it)."""
        raise NotImplementedError(f"{type(self).__name__} does not report its occupancy")

    @abstractmethod
    def plan(self, batch: ForwardBatch) -> None:
        """Prepare the next forward pass; called once before the layers run."""

    @abstractmethod
    def run(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention for one layer of the planned pass.

        q: [N, Hq, T, D]; k, v: [N, Hkv, T, D] of the new tokens (RoPE applied). Returns [N, Hq, T, D].
        """

    def load_random_context(self, seq_id: int, num_tokens: int, seed: int = 0) -> None:
        """Speed runs: make positions [0, num_tokens) hold random K/V, as if a prompt had been
        prefilled (attention's speed does not depend on the values; a 128K prefill per
        configuration would dominate a benchmark of decoding)."""
        raise NotImplementedError(f"{type(self).__name__} cannot load a random context")

    def graph_key(self, batch: ForwardBatch) -> object:
        """What else (beyond the pass's phase and shape) a captured graph of this pass depends on."""
        return None

    def replayable(self, batch: ForwardBatch) -> bool:
        """Whether this planned pass reads only fixed-address device buffers and never syncs with
        the host, so the loop may capture it once in a CUDA graph and replay it (see
        runtime/cuda_graphs.py). A replayable pass's `plan` must load everything that changes into
        those same buffers."""
        return False

    def pass_stream(self, batch: ForwardBatch) -> "torch.cuda.Stream | None":
        """A side stream this planned pass should run on, beside the main one (None: the current
        stream). Such a pass (herald's LOOKAHEAD) overlaps the passes that follow it; the mode
        orders it after what it reads and makes later passes wait where they need its results."""
        return None

    def close(self) -> None:
        """Free the mode's storage."""


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Plain softmax attention with a boolean visibility mask (GQA by head grouping).

    q: [N, Hq, T, D]; k, v: [N, Hkv, L, D]; mask: [N, T, L] or [T, L] bool (True = visible).
    """
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    if mask.dim() == 3:
        mask = mask[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def block_diffusion_mask(seq_len: int, prefix_len: int, block_size: int, prompt_causal: bool) -> torch.Tensor:
    """[L, L] bool visibility of a whole sequence as a block-diffusion model sees it.

    Positions below `prefix_len` (the prompt's prefilled part, a multiple of block_size) are causal or
    block-causal; every later block sees all earlier positions and itself bidirectionally.
    """
    if prefix_len % block_size:
        raise ValueError(f"prefix_len={prefix_len} must be a multiple of block_size={block_size}")
    pos = torch.arange(seq_len)
    block_of = pos // block_size
    mask = block_of[None, :] <= block_of[:, None]
    if prompt_causal:
        in_prefix = pos < prefix_len
        causal = pos[None, :] <= pos[:, None]
        mask = torch.where(in_prefix[:, None], causal, mask)
    return mask


class MaskedAttention(AttentionMode):
    """No cache: every forward sees exactly its own tokens under a given mask.

    Used for whole-sequence forwards: the reference decoder, parity tests and training.
    mask: [T, T] or [N, T, T] bool.
    """

    name = "masked"

    def __init__(self, mask: torch.Tensor):
        self.mask = mask

    def add_sequence(self, seq_id: int, max_tokens: int) -> None:
        pass

    def remove_sequence(self, seq_id: int) -> None:
        pass

    def occupancy(self) -> dict[str, int]:
        return {}  # holds no KV

    def plan(self, batch: ForwardBatch) -> None:
        pass

    def run(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return masked_attention(q, k, v, self.mask.to(q.device))


class DenseAttention(AttentionMode):
    """GPU-only inference as users run it today: the whole KV cache resident, exact attention.

    Storage is paged with the project's layout, per layer K and V `[num_pages, Hkv, P, D]`, each
    sequence owning a fixed run of `pages_per_seq` pages, so the same kernels read it as read the
    host store. kv_dtype float8_e4m3fn (dense-fp8, `EngineConfig.kv_format`): the pages hold e4m3
    codes with fp32 scales per (page, KV head) `[num_pages, Hkv]` per layer, in the format herald's
    host store keeps, written by the same requantizing write and read by the same kernels.
    """

    name = "dense"

    def __init__(self, model: ModelConfig, max_sequences: int, max_tokens: int, page_size: int,
                 dtype: torch.dtype, device: torch.device, backend: str = "torch",
                 kv_dtype: torch.dtype | None = None):
        if max_tokens < 1 or max_sequences < 1:
            raise ValueError(f"need max_tokens >= 1 and max_sequences >= 1, got {max_tokens}, {max_sequences}")
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"backend={backend!r}; choose one of {ATTENTION_BACKENDS}")
        # torch: gather + SDPA (what users run today). triton: the split-KV paged kernel for the
        # block phases (prefill stays on SDPA: it is compute-bound and needs a causal mask).
        self.backend = backend
        self.scale = model.head_dim ** -0.5
        self.page_size = page_size
        self.pages_per_seq = -(-max_tokens // page_size)
        self.max_tokens = self.pages_per_seq * page_size
        shape = (max_sequences * self.pages_per_seq, model.num_kv_heads, page_size, model.head_dim)
        kv_dtype = dtype if kv_dtype is None else kv_dtype
        self.fp8 = is_fp8(kv_dtype)
        nbytes = 2 * model.num_layers * torch.Size(shape).numel() * torch.tensor([], dtype=kv_dtype).element_size()
        nbytes += 2 * model.num_layers * shape[0] * shape[1] * 4 if self.fp8 else 0  # the scales
        if device.type == "cuda":
            free = gpu_free_bytes(device)
            if nbytes > free:
                fits = int(free // (nbytes / (max_sequences * self.max_tokens)))
                raise MemoryError(
                    f"dense KV cache for {max_sequences} sequences x {self.max_tokens} tokens needs "
                    f"{nbytes / 2**30:.2f} GiB, GPU has {free / 2**30:.2f} GiB free: about {fits} tokens "
                    "in all would fit; lower max_batch_size or the context, or use an offloading mode"
                )
        # Zeroed, not empty: the torch path pads rows to the longest context and multiplies masked
        # positions' values by a zero weight, and 0 * NaN garbage would still be NaN.
        self.k_cache = [torch.zeros(shape, dtype=kv_dtype, device=device) for _ in range(model.num_layers)]
        self.v_cache = [torch.zeros(shape, dtype=kv_dtype, device=device) for _ in range(model.num_layers)]
        # fp8: per layer [num_pages, Hkv] fp32 scales (ones: an unwritten unit dequantizes to 0); else None
        scales = [torch.ones(shape[:2], dtype=torch.float32, device=device) for _ in range(2 * model.num_layers)] \
            if self.fp8 else [None] * (2 * model.num_layers)
        self.k_scale, self.v_scale = scales[:model.num_layers], scales[model.num_layers:]
        self.max_sequences = max_sequences
        self.free_slots = list(range(max_sequences - 1, -1, -1))
        self.slot_of: dict[int, int] = {}
        self.batch: ForwardBatch | None = None
        self._slots: torch.Tensor | None = None
        # (rows, side pass) -> (table, kv_len); a LOOKAHEAD pass may run on a side stream beside the
        # denoising passes, so it reads tables of its own
        self._denoise_tables: dict[tuple[int, bool], tuple[torch.Tensor, torch.Tensor]] = {}
        # (rows, T) -> (page, offset) [rows, T] of each new token; fp8: (page table [rows, pages_per_seq]
        # int32, first position [rows] int32), what the requantizing write takes
        self._write_index: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._planned = PlannedBuffers()  # what the buffers above (and a subclass's) hold

    def add_sequence(self, seq_id: int, max_tokens: int) -> None:
        if seq_id in self.slot_of:
            raise ValueError(f"sequence {seq_id} already holds a KV slot")
        if max_tokens > self.max_tokens:
            raise ValueError(f"sequence {seq_id} needs {max_tokens} tokens; slots hold {self.max_tokens}")
        if not self.free_slots:
            raise RuntimeError(f"all {len(self.slot_of)} KV slots are taken; remove a sequence first")
        self.slot_of[seq_id] = self.free_slots.pop()
        self._planned.forget()

    def remove_sequence(self, seq_id: int) -> None:
        self.free_slots.append(self.slot_of.pop(seq_id))
        self._planned.forget()

    def occupancy(self) -> dict[str, int]:
        return dict(sequences=len(self.slot_of), slots_taken=self.max_sequences - len(self.free_slots))

    def plan(self, batch: ForwardBatch) -> None:
        end = int(batch.context_lens.max()) + batch.num_new
        if end > self.max_tokens:
            raise ValueError(f"forward reaches position {end}; the KV slots hold {self.max_tokens} tokens")
        self.batch = batch
        self._slots = torch.tensor([self.slot_of[s] for s in batch.seq_ids], dtype=torch.int64)
        dev = self.k_cache[0].device
        if batch.phase.writes_kv:  # where the new tokens go, at fixed addresses per (rows, T)
            pos = batch.positions("cpu")
            index = (self._slots[:, None] * self.pages_per_seq + pos // self.page_size, pos % self.page_size)
            if self.fp8:  # the requantizing write takes page tables and first positions instead
                table = self._slots[:, None] * self.pages_per_seq + torch.arange(self.pages_per_seq)[None, :]
                index = (table.to(torch.int32), batch.context_lens.to(torch.int32))
            key = (batch.num_rows, batch.num_new)
            if key not in self._write_index:
                self._write_index[key] = tuple(upload(t, dev) for t in index)
            else:
                for buf, t in zip(self._write_index[key], index):
                    upload_into(buf, t)
            self._write_at = self._write_index[key]
        if self._use_kernel(batch):
            if batch.phase is not Phase.PREFILL:  # fixed addresses and the full width: replayable
                n, key = batch.num_rows, (batch.num_rows, batch.phase is Phase.LOOKAHEAD)
                if key not in self._denoise_tables:
                    self._denoise_tables[key] = (torch.empty(n, self.pages_per_seq, dtype=torch.int32, device=dev),
                                                 torch.empty(n, dtype=torch.int32, device=dev))
                self._page_table, self._kv_len = self._denoise_tables[key]
                if self._planned.need_upload(("tables", key), batch):
                    self._page_table.copy_(self.store_table(self.pages_per_seq))
                    upload_into(self._kv_len, batch.context_lens)
            else:
                self._page_table = self.store_table(-(-int(batch.context_lens.max()) // self.page_size))
                self._kv_len = upload(batch.context_lens.to(torch.int32), dev)

    def replayable(self, batch: ForwardBatch) -> bool:
        return self._use_kernel(batch) and self.k_cache[0].is_cuda  # denoise and commit passes

    def load_random_context(self, seq_id: int, num_tokens: int, seed: int = 0) -> None:
        if num_tokens > self.max_tokens:
            raise ValueError(f"{num_tokens} tokens exceed the {self.max_tokens} a KV slot holds")
        pages = -(-num_tokens // self.page_size)
        slot = self.slot_of[seq_id]
        gen = torch.Generator(self.k_cache[0].device).manual_seed(seed)
        for cache, scales in zip((*self.k_cache, *self.v_cache), (*self.k_scale, *self.v_scale)):
            per_seq = cache.view(-1, self.pages_per_seq, *cache.shape[1:])
            if scales is None:
                per_seq[slot, :pages].normal_(generator=gen)
                continue
            units = torch.randn(per_seq[slot, :pages].shape, generator=gen, device=cache.device)
            per_seq[slot, :pages], scales.view(-1, self.pages_per_seq, scales.shape[1])[slot, :pages] = \
                quantize_units(units)

    def store_table(self, pages: int) -> torch.Tensor:
        """[N, max(pages, 1)] int32 physical pages of the planned rows' first `pages` logical pages."""
        table = self._slots[:, None] * self.pages_per_seq + torch.arange(max(1, pages))[None, :]
        return upload(table.to(torch.int32), self.k_cache[0].device)

    def _use_kernel(self, batch: ForwardBatch) -> bool:
        return self.backend == "triton" and batch.phase is not Phase.PREFILL

    def _rows(self, cache: torch.Tensor, scales: torch.Tensor | None, length: int) -> torch.Tensor:
        """[N, Hkv, length, D] of the planned rows' first `length` positions (fp8 pages dequantized
        with their scales [num_pages, Hkv] to fp32)."""
        pages = -(-length // self.page_size)
        _, hkv, p, d = cache.shape
        slots = self._slots.to(cache.device)
        per_seq = cache.view(-1, self.pages_per_seq, hkv, p, d)[slots, :pages]
        if scales is not None:
            per_seq = dequantize_units(per_seq, scales.view(-1, self.pages_per_seq, hkv)[slots, :pages])
        return per_seq.permute(0, 2, 1, 3, 4).reshape(len(self._slots), hkv, pages * p, d)[:, :, :length]

    def _write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k, v: [N, Hkv, T, D] of one layer at each row's positions context_lens .. +T
        (indices from plan); fp8 requantizes every page the write touches (`write_tokens`)."""
        if self.fp8:
            table, start = self._write_at
            write = write_tokens if k.is_cuda else write_tokens_reference
            kwargs = dict(validate=False) if k.is_cuda else {}
            write(self.k_cache[layer], self.v_cache[layer], table, start, k.contiguous(), v.contiguous(),
                  k_scale=self.k_scale[layer], v_scale=self.v_scale[layer], **kwargs)
            return
        page, offset = self._write_at
        for cache, new in ((self.k_cache[layer], k), (self.v_cache[layer], v)):
            cache[page, :, offset] = new.transpose(1, 2).to(cache.dtype)

    def run(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        batch = self.batch
        assert batch is not None, "plan() must precede run()"
        if self._use_kernel(batch):
            if batch.phase.writes_kv:  # written past kv_len: the kernel does not see them twice
                self._write(layer, k, v)
            out, _, _ = block_attention(q, k, v, self.k_cache[layer], self.v_cache[layer], self._page_table,
                                        self._kv_len, scale=self.scale, k_scale=self.k_scale[layer],
                                        v_scale=self.v_scale[layer])
            return out
        ctx_lens = batch.context_lens
        max_ctx = int(ctx_lens.max())
        t = batch.num_new
        ctx_k = self._rows(self.k_cache[layer], self.k_scale[layer], max_ctx)
        ctx_v = self._rows(self.v_cache[layer], self.v_scale[layer], max_ctx)
        if batch.phase.writes_kv:
            self._write(layer, k, v)
        keys = torch.cat([ctx_k, k.to(ctx_k.dtype)], dim=2)
        values = torch.cat([ctx_v, v.to(ctx_v.dtype)], dim=2)
        ctx_visible = torch.arange(max_ctx)[None, :] < ctx_lens[:, None]  # [N, max_ctx]
        mask = torch.cat([
            ctx_visible[:, None, :].expand(-1, t, -1),
            batch.new_token_mask()[None].expand(len(ctx_lens), -1, -1),
        ], dim=2)
        return masked_attention(q, keys.to(q.dtype), values.to(q.dtype), mask.to(q.device))

    def close(self) -> None:
        self._denoise_tables.clear()
        self._write_index.clear()
        self._planned.forget()
        self.k_cache.clear()
        self.v_cache.clear()
        self.k_scale.clear()
        self.v_scale.clear()
        self.slot_of.clear()


class ReplayTables:
    """Per-layer selection tables at fixed device addresses, one set per batch size, so that a
    captured CUDA graph reads each block's selection: tables [N, Hkv, width] int32 (-1 padded) and
    kv_len [N, Hkv] int32 per layer. `load` copies only when the selection or the rows changed."""

    def __init__(self, num_layers: int, num_kv_heads: int, width: int, device: torch.device):
        self.num_layers, self.num_kv_heads, self.width, self.device = num_layers, num_kv_heads, width, device
        self._buffers: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._loaded: dict[int, object] = {}

    def load(self, n: int, key: object,
             make: Callable[[], list[tuple[torch.Tensor, torch.Tensor] | None]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The buffers for `n` rows holding what `make()` returns: per layer (table [n, Hkv, K],
        kv_len [n, Hkv]) or None for layers that read none. `key` names that content: when it
        matches what the buffers hold, `make` is not called."""
        buffers = self._buffers.get(n)
        if buffers is None:
            buffers = self._buffers[n] = [
                (torch.full((n, self.num_kv_heads, self.width), -1, dtype=torch.int32, device=self.device),
                 torch.zeros(n, self.num_kv_heads, dtype=torch.int32, device=self.device))
                for _ in range(self.num_layers)]
        if self._loaded.get(n) != key:
            for entry, (table_buf, len_buf) in zip(make(), buffers):
                if entry is None:
                    continue
                table, kv_len = entry
                k = table.shape[-1]
                if k > self.width:
                    raise ValueError(f"a selection of {k} pages exceeds the replay tables' width {self.width}")
                table_buf[..., k:].fill_(-1)
                table_buf[..., :k].copy_(table)
                len_buf.copy_(kv_len)
            self._loaded[n] = key
        return buffers

    def clear(self) -> None:
        self._buffers.clear()
        self._loaded.clear()
