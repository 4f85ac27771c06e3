"""A block's floor: the bytes it must read from GPU memory (HBM) and move over PCIe, and the time
they take at the rates measured in the same run.

`block_bytes` is the byte model of one block (S denoising passes + the commit pass, + herald's
LOOKAHEAD pass) for each mode; `floor_ms` turns it into milliseconds. The measured rates come from
`hbm_read_GBps` (a reduction over a buffer far larger than the L2) and `pinned_copy_GBps` (pinned
host-to-GPU copies). A floor counts bytes only: no FLOPs, no launch gaps, so a block that is
compute-bound somewhere (e.g. a 384-row GEMM) can only approach it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from benchmarks.timing import BusyWaitTimer
from gpu_kernels.compact_keys import compact_bytes_per_token
from runtime.config import ModelConfig, SparseConfig
from runtime.model import expected_tensor_shapes
from runtime.selection import plan_selection

MODES = ("dense", "mage", "quest", "herald")


@dataclass(frozen=True)
class BlockBytes:
    """Bytes of one block. hbm: per term (see `block_bytes`), read from GPU memory; pcie_read:
    host to GPU (herald's page fetches), pcie_write: GPU to host (herald's commit); overlapped: the
    transfers run beside the compute (herald's lookahead), so the floor is the larger of the two
    times instead of their sum."""

    hbm: dict[str, int]
    pcie_read: int = 0
    pcie_write: int = 0
    overlapped: bool = False

    @property
    def hbm_bytes(self) -> int:
        return sum(self.hbm.values())

    @property
    def pcie_bytes(self) -> int:
        return self.pcie_read + self.pcie_write


def weight_bytes(model: ModelConfig, dtype: torch.dtype, logits: bool) -> int:
    """Weight bytes one pass reads, the fused path's way (`runtime.model`, CUDA): with logits every
    layer, the final norm and the LM head (the embedding matrix when tied); without (a commit pass,
    the lookahead) the last layer stops after its attention, so its post-attention norm and MLP, the
    final norm and the LM head are not read. The embedding's table is not counted (a pass reads only
    its rows' N x T vectors). A MoE layer's routed experts count whole: an upper bound, close at the
    runtime's passes, where N x B tokens x k experts each touch most of them."""
    elem = torch.empty((), dtype=dtype).element_size()
    last = f"model.layers.{model.num_layers - 1}."
    total = 0
    for name, shape in expected_tensor_shapes(model).items():
        if name.startswith("model.embed_tokens") or name == "lm_head.weight":
            continue
        unread = name == "model.norm.weight" or name.startswith((last + "mlp.", last + "post_attention_layernorm."))
        if logits or not unread:
            total += elem * torch.Size(shape).numel()
    if logits:
        total += elem * model.vocab_size * model.hidden_size
    return total


def selected_pages(sparse: SparseConfig, context: int) -> int:
    """Pages one (row, sparse layer, KV head) selects at `context` committed tokens: the budget plus
    the forced pages (sinks, local window, last page), as the runtime plans them."""
    pages = -(-context // sparse.page_size)
    return int(plan_selection(torch.tensor([context]), pages, sparse, "cpu").keep[0])


def block_bytes(model: ModelConfig, mode: str, sparse: SparseConfig, batch: int, context: int, steps: int,
                block_size: int, dtype: torch.dtype, lookahead: bool = False, fetch_fraction: float = 1.0,
                commit_logits: bool = False, kv_dtype: torch.dtype | None = None) -> BlockBytes:
    """The bytes one block of `batch` rows at `context` committed tokens must read from HBM and move
    over PCIe in `mode` (dense, mage, quest, herald).

    Notation: N batch, C context, S steps, B block size, L layers (Ld of them exact: sparse.dense_layers,
    sparse modes only), Hkv KV heads, D head dim, e bytes per element of K/V as stored (`kv_dtype`:
    1 for fp8 pages, whose 4-byte scales per page and head, 1/(P D) of them, are left out; default
    `dtype`, the weights' dtype), kv = 2 Hkv D e bytes of K and V per token and layer, K = `selected_pages` (budget + forced pages
    of P = sparse.page_size tokens), sel = N (Ld C + (L - Ld) K P) kv: one sparse pass's KV reads.
    A block runs S denoising passes (with logits) and one commit pass (logits only with
    `commit_logits`, Fast-dLLM v2's token shift); herald with `lookahead` runs one more pass (no logits).

    HBM terms (bytes read; writes, activations, logits and the block's own B tokens of K/V are left
    out, all a few percent at most):
    - weights: S x `weight_bytes`(logits) + `weight_bytes`(commit_logits), + `weight_bytes`(no logits)
      for herald's lookahead pass;
    - kv: dense: (S + 1) N C L kv, every pass reads the whole context in every layer. mage: step 0 is
      exact (N C L kv; its page scores come from the same pass) and the S - 1 later steps and the
      commit read sel. quest: every pass (S + 1) reads sel. herald: the S + 1 passes, and the
      lookahead's, read sel (the selected pages in the GPU page cache, the exact layers' whole KV);
    - summaries (quest): every pass scores every page from fp32 min/max keys: (S + 1) N (L - Ld)
      ceil(C / P) Hkv D 8;
    - scan (herald, once per block: step 0's, or with the lookahead its pass's, which step 0 then
      takes): the compact key copy of the sparse layers, N (L - Ld) C Hkv c with c =
      `compact_bytes_per_token` (D x compact_bits / 8 codes + fp16 scales per group), times the share
      the GPU scans (gpu-compact 1, split 1 - split_cpu_fraction, cpu 0: a host scan reads host
      memory, outside this floor).
    PCIe (herald only): read = `fetch_fraction` x N (L - Ld) Hkv K pages of 2 P D e bytes (the share
    of the selection not already in the GPU page cache; 1: nothing reused, the runtime's timeline
    counts the real share); write = N B (L - Ld) kv, the commit's K/V to the host store (an fp8
    store's commit also reads back the partial pages it requantizes: at most one page per row, head
    and layer, left out).
    """
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}; choose one of {MODES}")
    if mode != "herald" and lookahead:
        raise ValueError("only herald has a lookahead pass")
    if not 0.0 <= fetch_fraction <= 1.0:
        raise ValueError(f"fetch_fraction={fetch_fraction} must be in [0, 1]")
    elem = torch.empty((), dtype=dtype if kv_dtype is None else kv_dtype).element_size()
    n, c, s, b = batch, context, steps, block_size
    big_l, hkv, d, p = model.num_layers, model.num_kv_heads, model.head_dim, sparse.page_size
    kv = 2 * hkv * d * elem
    with_logits, commit = weight_bytes(model, dtype, True), weight_bytes(model, dtype, commit_logits)
    weights = s * with_logits + commit
    if mode == "dense":
        return BlockBytes(dict(weights=weights, kv=(s + 1) * n * c * big_l * kv))
    exact = sparse.dense_layers
    sparse_layers = big_l - exact
    k = selected_pages(sparse, c)
    sel = n * (exact * c + sparse_layers * k * p) * kv
    if mode == "mage":
        return BlockBytes(dict(weights=weights, kv=n * c * big_l * kv + s * sel))
    if mode == "quest":
        summaries = (s + 1) * n * sparse_layers * -(-c // p) * hkv * d * 4 * 2
        return BlockBytes(dict(weights=weights, kv=(s + 1) * sel, summaries=summaries))
    gpu_share = {"gpu-compact": 1.0, "split": 1.0 - sparse.split_cpu_fraction, "cpu": 0.0}[sparse.source]
    per_key = compact_bytes_per_token(d, sparse.compact_bits, min(sparse.compact_group, d))
    scan = round(gpu_share * n * sparse_layers * c * hkv * per_key)
    passes = s + 1 + int(lookahead)
    hbm = dict(weights=weights + (weight_bytes(model, dtype, False) if lookahead else 0), kv=passes * sel, scan=scan)
    read = round(fetch_fraction * n * sparse_layers * hkv * k * 2 * p * d * elem)
    return BlockBytes(hbm, pcie_read=read, pcie_write=n * b * sparse_layers * kv, overlapped=lookahead)


def floor_ms(block: BlockBytes, hbm_GBps: float, pcie_GBps: float) -> dict:
    """The block's floor in ms from its bytes at the measured rates (GB/s, 1e9 bytes per second).

    HBM time = HBM bytes / hbm_GBps, PCIe time = (read + write) / pcie_GBps. Without the lookahead
    the two add up: step 0 fetches each layer's pages on the compute stream between its selection
    and its attention, and the commit writes each layer's K/V in line, so nothing overlaps a
    transfer. With it the fetches run on a side stream beside the block's steps and the floor is the
    larger of the two (the few pages step 0 still refetches and the commit's write are counted
    inside it: the max stays a lower bound)."""
    hbm = block.hbm_bytes / (hbm_GBps * 1e6)
    pcie = block.pcie_bytes / (pcie_GBps * 1e6) if block.pcie_bytes else 0.0
    return dict(hbm_ms=hbm, pcie_ms=pcie, floor_ms=max(hbm, pcie) if block.overlapped else hbm + pcie)


# ------------------------------------------------------------------------------------------------
# the rates, measured in the run


def pinned_copy_GBps(device: torch.device, nbytes: int = 256 * 2**20) -> float | None:
    """Measured pinned host-to-GPU copy bandwidth (the PCIe limit transfers are compared with)."""
    if device.type != "cuda":
        return None
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    for _ in range(2):
        dev.copy_(host, non_blocking=True)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        dev.copy_(host, non_blocking=True)
    end.record()
    end.synchronize()
    return 5 * nbytes / (start.elapsed_time(end) * 1e6)


def reduction_read_ms(src: torch.Tensor, time_ms: Callable[[Callable[[], object]], float]) -> float:
    """Milliseconds to read `src` (uint8, on the GPU) once: the faster of an fp32 sum and an int32 max
    over it, each timed by `time_ms` (a reduction writes one number, so its time is its read)."""
    return min(time_ms(lambda: src.view(torch.float32).sum()), time_ms(lambda: src.view(torch.int32).amax()))


def hbm_read_GBps(device: torch.device, nbytes: int = 512 * 2**20, reps: int = 5) -> float | None:
    """Measured HBM read rate: `reduction_read_ms` over `nbytes` (ten H100 L2s), each reduction's
    best of `reps` device times with the launch off the clock (`BusyWaitTimer`)."""
    if device.type != "cuda":
        return None
    with torch.cuda.device(device):
        src = torch.ones(nbytes, dtype=torch.uint8, device=device)
        timer = BusyWaitTimer()

        def best(fn: Callable[[], object]) -> float:
            fn()
            return min(timer(fn) for _ in range(reps))

        ms = reduction_read_ms(src, best)
        del src
    return nbytes / (ms * 1e6)
