"""Tensor parallelism (runtime/parallel.py): the shard geometry and its errors, each rank loading
only its slices, and TP=2 decoding the tokens of TP=1 (greedy and seeded, dense and herald, a dense
Qwen3 and a MoE checkpoint) in two processes over gloo on the CPU, over NCCL on two GPUs, and
through `torchrun -m runtime generate`."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from runtime import Engine, EngineConfig
from runtime.checkpoint import load_model
from runtime.config import ModelConfig, SparseConfig
from runtime.parallel import TensorParallel, allowed_sizes, check_divisible, local_config
from tests.runtime.real_family_code import LLADA2_MINI, MASK, SMALL_MOE, make_checkpoint, small_config

REPO = Path(__file__).resolve().parents[2]
QWEN3 = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
         "tie_word_embeddings": False, "eos_token_id": 251, "mask_token_id": MASK, "block_size": 4}
PROMPTS = [list(range(3, 43)), list(range(60, 73))]
SPARSE = SparseConfig(page_size=4, sink_tokens=4, local_window=8, compact_group=16, budget_fraction=0.3)


def qwen3_config() -> dict:
    return small_config(QWEN3, attention_bias=True)  # Qwen3's attention_bias: o_proj's bias too


def llada2_config() -> dict:
    # o_proj's bias on (use_bias), fused QKV, a shared expert, expert bias, a dense first layer
    return small_config(LLADA2_MINI, **{**SMALL_MOE, "n_group": 4, "topk_group": 2, "mask_token_id": MASK,
                                        "use_bias": True, "num_shared_experts": 1})


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tp")
    return {name: str(make_checkpoint(cfg, root / name, seed=7)) for name, cfg in
            (("qwen3", qwen3_config()), ("llada2_moe", llada2_config()))}


def decode(path: str, mode: str, device: str, dtype: str) -> dict[str, list[list[int]]]:
    """Greedy and seeded tokens of PROMPTS (the engine takes its tensor-parallel group from torch.distributed)."""
    engine = Engine(EngineConfig(model_path=path, mode=mode, device=device, dtype=dtype, progress=False, block_size=4,
                                 denoising_steps=4, max_batch_size=2, sparse=SPARSE))
    out = {}
    for name, sampling in (("greedy", {}), ("seeded", {"temperature": 1.0, "top_k": 20, "seed": 3})):
        results = engine.generate(PROMPTS, max_new_tokens=8, stop_at_eos=False, **sampling)
        assert all(r.finish_reason == "length" for r in results), [r.error for r in results]
        out[name] = [r.tokens for r in results]
    out["local_kv_heads"] = engine.model.local_config.num_kv_heads  # what the mode held: the rank's KV heads
    return out


def decode_all(checkpoints: dict[str, str], device: str, dtype: str) -> dict:
    return {f"{name}/{mode}": decode(path, mode, device, dtype) for name, path in checkpoints.items()
            for mode in ("dense", "herald")}


def _worker(rank: int, world: int, port: int, backend: str, checkpoints: dict, dtype: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    device = "cpu"
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device = "cuda"
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        tokens = decode_all(checkpoints, device, dtype)
        Path(out, f"rank{rank}.json").write_text(json.dumps(tokens))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(world: int, backend: str, checkpoints: dict, dtype: str, out: Path) -> list[dict]:
    mp.spawn(_worker, args=(world, free_port(), backend, checkpoints, dtype, str(out)), nprocs=world)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def test_tp2_decodes_the_tokens_of_tp1_over_gloo(checkpoints, tmp_path):
    # fp64: splitting a GEMM's sum over two ranks changes rounding only in the last bits, so the
    # tokens are TP=1's unless two predictions tie to 1e-15
    reference = decode_all(checkpoints, "cpu", "float64")
    ranks = run_ranks(2, "gloo", checkpoints, "float64", tmp_path)
    for case in reference:  # each rank held one of the two KV heads
        assert (reference[case].pop("local_kv_heads"), ranks[0][case].pop("local_kv_heads"),
                ranks[1][case].pop("local_kv_heads")) == (2, 1, 1)
    assert ranks[0] == ranks[1]  # every rank commits the same tokens (replicated head, same seeds)
    assert ranks[0] == reference
    assert reference["qwen3/dense"]["greedy"] != reference["qwen3/dense"]["seeded"]  # sampling was exercised


@pytest.mark.gpu
def test_tp2_decodes_the_tokens_of_tp1_over_nccl(checkpoints, tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA GPUs")
    reference = decode_all(checkpoints, "cuda", "float32")
    ranks = run_ranks(2, "nccl", checkpoints, "float32", tmp_path)
    for case in reference:
        assert (reference[case].pop("local_kv_heads"), ranks[0][case].pop("local_kv_heads"),
                ranks[1][case].pop("local_kv_heads")) == (2, 1, 1)
    assert ranks[0] == ranks[1]
    assert ranks[0] == reference


def test_torchrun_generate_matches_one_process():
    """`torchrun --nproc-per-node 2 -m runtime generate` on the CPU (gloo): rank 0 prints TP=1's results."""
    args = ["generate", "--model", str(REPO / "checkpoints" / "tiny-random"), "--device", "cpu", "--dtype", "float64",
            "--mode", "herald", "--budget", "0.3", "--page-size", "4", "--max-new-tokens", "8", "--no-progress",
            "--json", "--temperature", "0.8", "--prompt", "The key to the vault is", "--prompt", "Once upon a time"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

    def run(*launch: str) -> list[dict]:
        done = subprocess.run([sys.executable, *launch, "-m", "runtime", *args], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
        return [{k: r[k] for k in ("prompt", "tokens", "finish_reason")}
                for r in map(json.loads, done.stdout.splitlines())]

    one = run()
    two = run("-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()))
    assert len(one) == 2 and two == one  # rank 0 alone prints, the tokens of one process


def test_shard_geometry_and_the_sizes_a_model_splits_into():
    config = ModelConfig.from_hf(llada2_config())  # 4 heads, 2 KV heads, intermediate 128, experts 32
    assert allowed_sizes(config) == [1, 2]
    rank1 = local_config(config, TensorParallel(1, 2))
    assert (rank1.num_heads, rank1.num_kv_heads, rank1.intermediate_size) == (2, 1, 64)
    assert rank1.moe.expert_intermediate_size == 16 and rank1.moe.shared_intermediate_size == 16
    assert local_config(config, TensorParallel(0, 2)).has_output_bias and not rank1.has_output_bias
    assert rank1.group_size == config.group_size and rank1.head_dim == config.head_dim
    with pytest.raises(ValueError, match=r"tensor_parallel_size=4 does not divide config.json "
                                         r"num_key_value_heads=2: this model splits over \[1, 2\] ranks"):
        check_divisible(config, 4)
    with pytest.raises(ValueError, match=r"num_attention_heads=4"):
        check_divisible(config, 3)


def test_an_engine_needs_a_launch_of_as_many_processes(checkpoints):
    with pytest.raises(ValueError, match="tensor_parallel_size=2 needs as many processes.*torchrun --nproc-per-node"):
        Engine(EngineConfig(model_path=checkpoints["qwen3"], device="cpu", tensor_parallel_size=2))
    with pytest.raises(ValueError, match="tensor_parallel_size=0 must be >= 1"):
        EngineConfig(model_path=checkpoints["qwen3"], tensor_parallel_size=0)


@pytest.mark.parametrize("name", ["qwen3", "llada2_moe"])
def test_each_rank_loads_its_slices(checkpoints, name):
    whole, _ = load_model(checkpoints[name])
    shards = [load_model(checkpoints[name], tp=TensorParallel(r, 2))[0] for r in range(2)]
    full = whole.state_dict()
    for key, tensor in full.items():
        parts = [s.state_dict().get(key) for s in shards]
        if key.endswith("o_proj.bias"):  # added once: rank 0 holds it
            assert parts[1] is None
            torch.testing.assert_close(parts[0], tensor, rtol=0, atol=0)
        elif key.endswith(("o_proj.weight", "down_proj.weight")):
            torch.testing.assert_close(torch.cat(parts, dim=1), tensor, rtol=0, atol=0, msg=key)
        elif key.endswith("experts.down_proj"):
            torch.testing.assert_close(torch.cat(parts, dim=2), tensor, rtol=0, atol=0, msg=key)
        elif key.endswith("experts.gate_up_proj"):  # each rank: its gate rows, then its up rows
            inter = tensor.shape[1] // 2
            gate = torch.cat([p[:, :inter // 2] for p in parts], dim=1)
            up = torch.cat([p[:, inter // 2:] for p in parts], dim=1)
            torch.testing.assert_close(torch.cat([gate, up], dim=1), tensor, rtol=0, atol=0, msg=key)
        elif key.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "q_proj.bias", "k_proj.bias",
                           "v_proj.bias", "gate_proj.weight", "up_proj.weight")):
            torch.testing.assert_close(torch.cat(parts), tensor, rtol=0, atol=0, msg=key)
        else:
            for part in parts:
                torch.testing.assert_close(part, tensor, rtol=0, atol=0, msg=key)
