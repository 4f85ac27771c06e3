"""The memory planner: each mode's footprint from the geometry, the largest batch, and refusals that
say what would fit, before anything is allocated."""
import pytest
import torch

from runtime import Engine, EngineConfig
from runtime.config import ModelConfig, RopeConfig, SparseConfig
from runtime.engine import CHECKPOINTS
from runtime.memory import (GiB, check_fits, check_weights_fit, gpu_free_bytes, kv_bytes_per_token, largest_batch, plan_memory,
                            selected_pages_bound)
from runtime.model import weight_bytes
from tests.runtime.real_family_code import LLADA2_MINI

# Qwen3-8B as SDAR-8B uses it: 144 KiB of K and V per token in bf16
QWEN3_8B = ModelConfig(architecture="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                       num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128, max_position_embeddings=262144,
                       rope=RopeConfig(theta=1e6), qk_norm=True, mask_token_id=151669, block_size=32)
CUDA = torch.device("cuda")  # planning only reads the device type when free memory is given
CONTEXT = 131072


def plan(mode, batch, sparse=None, **free):
    free.setdefault("gpu_free", 200 * GiB)
    free.setdefault("host_free", 200 * GiB)
    sparse = (sparse or SparseConfig()).for_device(CUDA)
    return plan_memory(QWEN3_8B, mode, sparse, batch, CONTEXT, torch.bfloat16, CUDA, 32, 2048, **free)


def test_footprints_follow_the_geometry():
    per_token = kv_bytes_per_token(QWEN3_8B, torch.bfloat16)
    assert per_token == 144 * 1024
    dense = plan("dense", 3)
    assert dense.gpu_kv_bytes == 3 * CONTEXT * per_token and dense.host_bytes == 0
    quest = plan("quest", 3)
    summaries = 3 * (CONTEXT // 16) * 2 * 36 * 8 * 128 * 4  # fp32 min and max per page and channel
    assert quest.gpu_kv_bytes == dense.gpu_kv_bytes + summaries
    herald = plan("herald", 3, SparseConfig(lookahead=False))
    assert herald.host_bytes == 3 * CONTEXT * per_token  # the whole KV lives in pinned host memory
    # on the GPU: the two exact layers' KV, the page cache of the budget, the int4 keys with scales
    exact_layers = 3 * CONTEXT * per_token * 2 // 36
    cache = 3 * 8 * selected_pages_bound(SparseConfig(), CONTEXT) * 16 * per_token // 8
    compact = 3 * CONTEXT * 36 * 8 * (128 // 2 + 2 * 128 // 32)
    assert herald.gpu_kv_bytes == exact_layers + cache + compact
    assert herald.gpu_kv_bytes < dense.gpu_kv_bytes / 4
    # the lookahead holds the next block's pages beside the current ones: twice the cache
    ahead = plan("herald", 3, SparseConfig(lookahead=True))
    assert ahead.gpu_kv_bytes == herald.gpu_kv_bytes + cache
    # by default the lookahead is on where a side stream can hide it: with CUDA, not on the CPU
    assert plan("herald", 3).gpu_kv_bytes == ahead.gpu_kv_bytes
    cpu = torch.device("cpu")
    on_cpu = plan_memory(QWEN3_8B, "herald", SparseConfig().for_device(cpu), 3, CONTEXT, torch.bfloat16, cpu, 32,
                         2048, gpu_free=200 * GiB, host_free=200 * GiB)
    assert on_cpu.gpu_kv_bytes == herald.gpu_kv_bytes
    with pytest.raises(ValueError, match=r"lookahead=None means 'by device': resolve it with for_device"):
        plan_memory(QWEN3_8B, "herald", SparseConfig(), 3, CONTEXT, torch.bfloat16, CUDA, 32, 2048,
                    gpu_free=200 * GiB, host_free=200 * GiB)


@pytest.mark.parametrize("mode", ["dense", "mage", "quest", "herald"])
def test_largest_batch_is_the_fit_boundary(mode):
    free = dict(gpu_free=63 * GiB, host_free=100 * GiB)  # an 80 GB card after the weights; 100 GiB of host RAM
    n = largest_batch(QWEN3_8B, mode, SparseConfig().for_device(CUDA), CONTEXT, torch.bfloat16, CUDA, 32, 2048,
                      **free)
    assert n >= 1
    assert plan(mode, n, **free).fits and not plan(mode, n + 1, **free).fits
    if mode == "herald":
        assert n == 5  # host bound: 18 GiB pinned per 128K sequence
    if mode == "dense":
        assert n == 3  # GPU bound: 18 GiB of KV per 128K sequence


def test_a_batch_that_does_not_fit_is_refused_with_what_would():
    too_many = plan("dense", 8, gpu_free=63 * GiB)
    assert not too_many.fits
    with pytest.raises(MemoryError, match=r"does not fit in GPU memory; at most 3 such sequences fit"):
        check_fits(too_many, 3)
    host_bound = plan("herald", 8, host_free=100 * GiB)
    with pytest.raises(MemoryError, match=r"does not fit in host memory; at most 5 such sequences fit"):
        check_fits(host_bound, 5)
    with pytest.raises(MemoryError, match="not even one such sequence fits"):
        check_fits(plan("dense", 1, gpu_free=GiB), 0)


def test_engine_refuses_before_allocating():
    engine = Engine(EngineConfig(model_path=str(CHECKPOINTS / "tiny-random"), device="cpu", progress=False,
                                 mode="herald"))
    assert engine.largest_batch(4096, gpu_free=0, host_free=0) == 0
    tight = engine.memory_plan(4, 4096, gpu_free=1 << 20, host_free=1 << 20)
    assert not tight.fits and "herald: 4 x 4096 tokens needs" in tight.describe()
    with pytest.raises(ValueError, match="gpu_memory_gib=0 must be > 0"):
        EngineConfig(model_path="x", gpu_memory_gib=0)
    with pytest.raises(ValueError, match="prefill_chunk_size=2 is smaller than the block size"):
        Engine(EngineConfig(model_path=str(CHECKPOINTS / "tiny-random"), device="cpu", progress=False,
                            prefill_chunk_size=2)).generate(["a prompt"], max_new_tokens=4)


@pytest.mark.gpu
def test_gpu_free_bytes_counts_the_allocators_cached_blocks():
    """A failed run leaves its memory in torch's cache (cudaMemGetInfo calls it used): the planner
    must count it free, or every configuration after an out-of-memory is refused."""
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    del x
    driver_free, _ = torch.cuda.mem_get_info()
    assert gpu_free_bytes(torch.device("cuda")) - driver_free >= 2**30
    torch.cuda.empty_cache()


def test_weights_count_every_expert():
    """LLaDA2.0-mini: 16.3B parameters, 256 routed experts in 19 of its 20 layers."""
    config = ModelConfig.from_hf(LLADA2_MINI)
    total, experts = weight_bytes(config, torch.bfloat16)
    assert 16.0e9 < total / 2 < 16.6e9  # the published 16B
    assert experts == 2 * 19 * 256 * 3 * 2048 * 512
    with pytest.raises(MemoryError, match=r"take 30\.\d GiB at bfloat16, 28\.5 GiB of them routed experts, more than "
                                          r"the 24\.0 GiB .* raise gpu_memory_gib"):
        check_weights_fit((total, experts), torch.bfloat16, 24 * 2**30, "llada2-mini")
    check_weights_fit((total, experts), torch.bfloat16, 40 * 2**30, "llada2-mini")


@pytest.mark.parametrize("mode", ["dense", "herald"])
def test_tensor_parallel_plans_one_ranks_gpu_and_every_ranks_host_memory(mode):
    sparse = SparseConfig().for_device(CUDA)
    one = plan_memory(QWEN3_8B, mode, sparse, 6, CONTEXT, torch.bfloat16, CUDA, 32, 2048,
                      gpu_free=200 * GiB, host_free=200 * GiB)
    four = plan_memory(QWEN3_8B, mode, sparse, 6, CONTEXT, torch.bfloat16, CUDA, 32, 2048,
                       gpu_free=200 * GiB, host_free=200 * GiB, tensor_parallel=4)
    # each rank holds 2 of the 8 KV heads: a quarter of every KV byte on its GPU ...
    assert four.gpu_kv_bytes == one.gpu_kv_bytes // 4
    # ... and of the host store, which the four ranks of the host hold together: the whole of it
    assert four.host_bytes == one.host_bytes and (mode == "dense") == (four.host_bytes == 0)
    assert four.ranks == 4 and one.ranks == 1
    # the rank's weights: a quarter of the attention and MLP, the embedding and head whole
    whole = weight_bytes(QWEN3_8B, torch.bfloat16)[0]
    embed_head = 2 * QWEN3_8B.vocab_size * QWEN3_8B.hidden_size * 2
    assert four.weight_bytes == weight_bytes(QWEN3_8B, torch.bfloat16, 4)[0]
    assert four.weight_bytes == pytest.approx(embed_head + (whole - embed_head) / 4, rel=1e-3)
    assert "each of 4 GPUs" in four.describe() and "all 4 ranks" in four.describe()


def test_tensor_parallel_host_memory_is_shared_by_the_ranks():
    sparse = SparseConfig().for_device(CUDA)
    per_rank = plan_memory(QWEN3_8B, "herald", sparse, 1, CONTEXT, torch.bfloat16, CUDA, 32, 2048,
                           gpu_free=80 * GiB, host_free=1000 * GiB, tensor_parallel=2)
    whole = per_rank.host_bytes  # both ranks' halves of one sequence's KV
    assert whole == kv_bytes_per_token(QWEN3_8B, torch.bfloat16) * CONTEXT
    # host memory for 5 sequences of both ranks: 5, whatever the GPUs would take
    free = dict(gpu_free=80 * GiB, host_free=5 * whole + whole // 2)
    assert largest_batch(QWEN3_8B, "herald", sparse, CONTEXT, torch.bfloat16, CUDA, 32, 2048,
                         tensor_parallel=2, **free) == 5
    # on the CPU the "GPU" side is host memory too: the ranks' KV counts there as well
    cpu = plan_memory(QWEN3_8B, "dense", sparse, 1, CONTEXT, torch.float32, torch.device("cpu"), 32, 2048,
                      host_free=1000 * GiB, tensor_parallel=2)
    assert cpu.host_bytes == 2 * cpu.gpu_kv_bytes == kv_bytes_per_token(QWEN3_8B, torch.float32) * CONTEXT
