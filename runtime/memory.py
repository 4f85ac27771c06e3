"""The memory planner: will a batch fit, in GPU memory and in host memory, before anything is allocated?

Each mode's footprint, from the geometry alone:
- dense, mage: the whole KV on the GPU (quest adds fp32 min/max key summaries per page);
- herald: the whole KV in pinned host memory; on the GPU a page cache of the selection budget, the
  full KV of the dense (exact) first layers and, for the gpu-compact and split sources, the compact
  key copy (bits/8 of a key byte, plus scales).
Every mode also needs working memory for the largest forward pass (a prefill chunk), estimated here
from the activations it keeps alive, and the weights (every routed and shared
expert of a MoE model too), which the engine checks against the GPU before loading them
(`check_weights_fit`) and which are resident when it plans batches. Free memory is read at
planning time (CUDA's mem_get_info, psutil for the host).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import psutil
import torch

from gpu_kernels.kv_fp8 import FP8_DTYPE, is_fp8
from runtime.config import KV_FORMATS, ModelConfig, SparseConfig
from runtime.parallel import TensorParallel, local_config

GiB = 2**30


@dataclass(frozen=True)
class MemoryPlan:
    mode: str
    batch: int
    max_tokens: int
    gpu_kv_bytes: int  # KV, caches, indexes the mode keeps on the GPU
    gpu_work_bytes: int  # activations of the largest pass
    host_bytes: int  # pinned host memory (herald)
    gpu_free_bytes: int
    host_free_bytes: int
    # tensor parallelism: the GPU figures are one rank's; host_bytes counts every rank of the host
    ranks: int = 1
    weight_bytes: int = 0  # one rank's weights (resident when the engine plans: not in gpu_bytes)

    @property
    def gpu_bytes(self) -> int:
        return self.gpu_kv_bytes + self.gpu_work_bytes

    @property
    def fits(self) -> bool:
        return self.gpu_bytes <= self.gpu_free_bytes and self.host_bytes <= self.host_free_bytes

    def as_dict(self) -> dict:
        return dict(asdict(self), gpu_bytes=self.gpu_bytes, fits=self.fits)

    def describe(self) -> str:
        gpu = "the GPU" if self.ranks == 1 else f"each of {self.ranks} GPUs (beside {self.weight_bytes / GiB:.2f} GiB of weights)"
        host = "" if self.ranks == 1 else f", all {self.ranks} ranks"
        return (f"{self.mode}: {self.batch} x {self.max_tokens} tokens needs {self.gpu_bytes / GiB:.2f} GiB on {gpu} "
                f"({self.gpu_free_bytes / GiB:.2f} free) and {self.host_bytes / GiB:.2f} GiB of host memory{host} "
                f"({self.host_free_bytes / GiB:.2f} available)")


def kv_bytes_per_token(model: ModelConfig, dtype: torch.dtype) -> int:
    """K and V of one token over all layers, stored as dtype (fp8 K/V: their codes; scales apart,
    `fp8_scale_bytes`)."""
    return 2 * model.num_layers * model.num_kv_heads * model.head_dim * torch.empty((), dtype=dtype).element_size()


def kv_storage_dtype(kv_format: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype K/V are stored in under `EngineConfig.kv_format`: the model's, or e4m3 codes."""
    if kv_format not in KV_FORMATS:
        raise ValueError(f"kv_format={kv_format!r}; choose one of {KV_FORMATS}")
    return FP8_DTYPE if kv_format == "fp8_e4m3" else dtype


def fp8_scale_bytes(model: ModelConfig, units: int) -> int:
    """fp32 scales of K and V for `units` (page, KV head) units in every layer (fp8 K/V)."""
    return 2 * 4 * model.num_layers * units


def check_weights_fit(weights: tuple[int, int], dtype: torch.dtype, gpu_free: int, where: str) -> None:
    """Refuse, before a weight is read, a model whose weights alone exceed the GPU memory it may use.

    weights: (all, routed experts) in bytes (runtime.model.weight_bytes)."""
    total, experts = weights
    if total <= gpu_free:
        return
    detail = f", {experts / GiB:.1f} GiB of them routed experts" if experts else ""
    raise MemoryError(f"the weights of {where} take {total / GiB:.1f} GiB at {str(dtype).removeprefix('torch.')}"
                      f"{detail}, more than the {gpu_free / GiB:.1f} GiB of GPU memory the engine may use: use a "
                      "larger GPU (or raise gpu_memory_gib), or a smaller dtype")


def selected_pages_bound(sparse: SparseConfig, max_tokens: int) -> int:
    """Most pages one (row, layer, KV head) can select: the budget plus the forced pages."""
    p = sparse.page_size
    forced = -(-sparse.sink_tokens // p) + -(-sparse.local_window // p) + 2
    return min(-(-max_tokens // p), sparse.budget_pages(max_tokens) + forced)


def work_bytes(model: ModelConfig, batch: int, block_size: int, prefill_chunk: int, dtype: torch.dtype) -> int:
    """Activations of the largest pass: a prefill chunk (one row) or a block of every row.

    Per token: hidden states, q/k/v, the MLP's gate/up/act; the chunk's own attention scores in fp32
    (herald's prefill computes them explicitly); the block pass's fp32 logits.
    """
    elem = torch.empty((), dtype=dtype).element_size()
    mlp = 3 * model.intermediate_size  # gate/up and their product
    if model.moe is not None:  # each of a token's k expert rows: its input copy, gate/up, product; the shared MLP
        moe = model.moe
        routed = moe.experts_per_token * (3 * moe.expert_intermediate_size + model.hidden_size)
        mlp = max(mlp, routed + 3 * moe.shared_intermediate_size)
    per_token = elem * (4 * model.hidden_size + (model.num_heads + 2 * model.num_kv_heads) * model.head_dim + mlp)
    chunk = prefill_chunk * per_token + 4 * 2 * model.num_heads * prefill_chunk * prefill_chunk
    block = batch * block_size * (per_token + 4 * 2 * model.vocab_size)
    return max(chunk, block) + GiB // 2  # allocator slack, kernel workspaces, CUDA graphs' pools


def gpu_free_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return psutil.virtual_memory().available
    free, _ = torch.cuda.mem_get_info(device)
    # blocks torch's allocator holds but no tensor uses are free to this process (it hands them out
    # again, and releases them to retry an allocation that would fail)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def plan_memory(model: ModelConfig, mode: str, sparse: SparseConfig, batch: int, max_tokens: int,
                dtype: torch.dtype, device: torch.device, block_size: int, prefill_chunk: int,
                gpu_free: int | None = None, host_free: int | None = None, tensor_parallel: int = 1,
                kv_format: str = "model") -> MemoryPlan:
    """The footprint of `batch` sequences of up to `max_tokens` tokens in `mode`.

    kv_format (`EngineConfig.kv_format`): "fp8_e4m3" stores K/V as one byte per element (half of
    bf16) plus 8 bytes of scales per (layer, page, KV head), on the GPU for both modes that take it
    (dense's cache; herald's host store keeps its scales there, and each page slot has its own).

    tensor_parallel: the ranks the model is split over (runtime/parallel.py). Each rank holds its
    share of the heads and KV heads: the GPU side is one rank's; the host memory of the ranks of
    one host is one, so the host side counts all of them.
    """
    ranks, whole = tensor_parallel, model
    model = local_config(model, TensorParallel(0, ranks))
    p = sparse.page_size
    tokens = -(-max_tokens // p) * p
    kv_dtype = kv_storage_dtype(kv_format, dtype)
    per_token = kv_bytes_per_token(model, kv_dtype)
    # fp8 scales per KV head of every page of the batch (dense's cache, herald's store)
    scales = fp8_scale_bytes(model, batch * (tokens // p) * model.num_kv_heads) if is_fp8(kv_dtype) else 0
    host = 0
    if mode in ("dense", "mage", "quest"):
        gpu_kv = batch * tokens * per_token + scales
        if mode == "quest":
            gpu_kv += batch * (tokens // p) * 2 * model.num_layers * model.num_kv_heads * model.head_dim * 4
    elif mode == "herald":
        host = batch * tokens * per_token
        # the lookahead (or the forecast) fills a second set of page slots while the first is read
        sets = 2 if sparse.lookahead_resolved() or sparse.forecast != "off" else 1
        slots = batch * model.num_kv_heads * selected_pages_bound(sparse, max_tokens) * sets
        gpu_kv = slots * p * per_token // model.num_kv_heads + scales
        if scales:
            gpu_kv += fp8_scale_bytes(model, slots)
        gpu_kv += batch * tokens * per_token * sparse.dense_layers // model.num_layers  # exact layers stay on the GPU
        if sparse.source in ("gpu-compact", "split"):
            per_key = model.head_dim * sparse.compact_bits // 8 + 2 * model.head_dim // min(sparse.compact_group, model.head_dim)
            gpu_kv += batch * tokens * model.num_layers * model.num_kv_heads * per_key
    else:
        raise ValueError(f"mode {mode!r}; choose dense, mage, quest or herald")
    on_gpu = device.type == "cuda"
    host_avail = psutil.virtual_memory().available if host_free is None else host_free
    if gpu_free is None:
        gpu_free = gpu_free_bytes(device)
    # the allocator fragments a GPU filled with large caches: keep 1% of them free beyond the work estimate
    work = work_bytes(model, batch, block_size, prefill_chunk, dtype) + gpu_kv // 100
    if not on_gpu:  # one memory: the "GPU" side is host memory too
        host += gpu_kv
        gpu_free = host_avail
    weights = 0
    if ranks > 1:
        from runtime.model import weight_bytes  # runtime.model imports the modes, which import this module
        weights = weight_bytes(whole, dtype, ranks)[0]
    return MemoryPlan(mode, batch, max_tokens, gpu_kv, work, host * ranks, gpu_free, host_avail, ranks, weights)


def largest_batch(model: ModelConfig, mode: str, sparse: SparseConfig, max_tokens: int, dtype: torch.dtype,
                  device: torch.device, block_size: int, prefill_chunk: int, limit: int = 1024, **free) -> int:
    """The most sequences of `max_tokens` tokens that fit (0 if not even one). free: `plan_memory`'s
    keyword arguments (free memory overrides, tensor_parallel, kv_format)."""
    lo, hi = 0, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if plan_memory(model, mode, sparse, mid, max_tokens, dtype, device, block_size, prefill_chunk, **free).fits:
            lo = mid
        else:
            hi = mid - 1
    return lo


def check_fits(plan: MemoryPlan, largest: int) -> None:
    """Refuse a plan that does not fit, saying what would."""
    if plan.fits:
        return
    where = "GPU" if plan.gpu_bytes > plan.gpu_free_bytes else "host"
    hint = (f"at most {largest} such sequences fit" if largest else "not even one such sequence fits")
    raise MemoryError(f"{plan.describe()}: does not fit in {where} memory; {hint}. Lower max_batch_size or the "
                      "context, or use mode='herald' (KV in host memory) or a smaller budget")


def out_of_memory(err: BaseException, device: torch.device) -> str | None:
    """What ran out, if `err` is an allocation failure: a sentence with the memory free now, or None.

    Covers CUDA's OutOfMemoryError, Python's MemoryError and the RuntimeErrors torch raises for a
    failed host allocation (its CPU allocator) or a failed pinned one (a CUDA out-of-memory error)."""
    text = str(err)
    if isinstance(err, torch.OutOfMemoryError):
        what = "GPU memory"
    elif isinstance(err, MemoryError) or "DefaultCPUAllocator: can't allocate memory" in text:
        what = "host memory"
    elif isinstance(err, RuntimeError) and "CUDA error: out of memory" in text:
        what = "GPU or pinned host memory"
    else:
        return None
    if device.type == "cuda" and what != "host memory":
        free, total = torch.cuda.mem_get_info(device)
        return f"{what} ran out ({free / GiB:.2f} of {total / GiB:.2f} GiB of the GPU free now)"
    return f"{what} ran out ({psutil.virtual_memory().available / GiB:.2f} GiB of host memory available now)"
