"""Tensor parallelism over the GPUs of one host, on torch.distributed (NCCL on GPUs, gloo on the CPU).

Launch with torchrun (`torchrun --nproc-per-node 2 -m runtime generate ...`); every rank runs the
same engine on the same requests. The sharding (Megatron's):
- attention: rank r holds heads [r*H/W, (r+1)*H/W) and their KV heads (q/k/v projections split by
  rows, o_proj by columns). The attention mode is built from the rank's `local_config` (its heads
  and KV heads), so it keeps, offloads, selects and fetches only its own KV heads: herald's pinned
  host store, compact keys and page pools are per rank. Selection is per KV head: no collective.
- MLP: gate/up split by rows, down by columns. MoE: every rank holds every expert, a 1/W slice of
  each one's intermediate dim (and of the shared experts'): the router is replicated, every rank
  routes the same tokens to the same experts and runs the same grouped GEMMs over thinner weights.
  No all-to-all and no load imbalance between ranks (whole experts per rank would make a rank's
  work the number of tokens routed to its experts, and need the tokens dispatched to them).
- one all-reduce after attention's output projection and one after the MLP (routed + shared
  experts summed first). o_proj's bias (LLaDA2.0 use_bias, Qwen3 attention_bias) lives on rank 0
  only, so that the sum adds it once.
- embedding, norms, router and LM head replicated: every rank computes the same full logits from
  the same all-reduced hidden states, and samples with the same per-request seeds, so every rank
  commits the same tokens by construction (no broadcast; tests/runtime/test_parallel.py checks
  that the ranks agree). Vocab-splitting the head would save (W-1)/W of its bytes per rank
  (0.6 GiB of Qwen3-8B's 16 GiB at bf16) for a gather per pass.

Loading reads only the rank's slices of the safetensors files (`safe_open(...).get_slice`).
The ranks of one host share its memory: the planner counts all of them against it.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist

from runtime.config import ModelConfig


@dataclass(frozen=True)
class TensorParallel:
    """This process's place in the tensor-parallel group (world_size 1: no parallelism)."""

    rank: int = 0
    world_size: int = 1
    group: Any = None  # the process group of the collectives (None: the default group)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over the ranks of their partial x (x itself without parallelism)."""
        if self.world_size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def agree(self, value: int, op: str = "min") -> int:
        """The min (or max) of an integer over the ranks: decisions every rank must take alike."""
        if self.world_size == 1:
            return value
        backend = dist.get_backend(self.group)
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        t = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN if op == "min" else dist.ReduceOp.MAX, group=self.group)
        return int(t.item())


def divisible_fields(config: ModelConfig) -> list[tuple[str, int]]:
    """The config.json fields a tensor-parallel size must divide, with their values."""
    fields = [("num_attention_heads", config.num_heads), ("num_key_value_heads", config.num_kv_heads)]
    if any(not config.is_moe_layer(layer) for layer in range(config.num_layers)):
        fields.append(("intermediate_size", config.intermediate_size))
    if config.moe is not None:
        fields.append(("moe_intermediate_size", config.moe.expert_intermediate_size))
    return fields


def allowed_sizes(config: ModelConfig) -> list[int]:
    """Every tensor-parallel size the model splits into."""
    common = math.gcd(*(value for _, value in divisible_fields(config)))
    return [n for n in range(1, common + 1) if common % n == 0]


def check_divisible(config: ModelConfig, world_size: int) -> None:
    """Refuse a tensor-parallel size that does not divide the heads, KV heads or MLP widths."""
    if world_size < 1:
        raise ValueError(f"tensor_parallel_size={world_size} must be >= 1")
    for field, value in divisible_fields(config):
        if value % world_size:
            raise ValueError(f"tensor_parallel_size={world_size} does not divide config.json {field}={value}: "
                             f"this model splits over {allowed_sizes(config)} ranks")


def local_config(config: ModelConfig, tp: TensorParallel) -> ModelConfig:
    """The geometry of one rank's shard: its heads, KV heads and MLP widths (o_proj's bias on rank 0)."""
    if not tp.enabled:
        return config
    check_divisible(config, tp.world_size)
    w = tp.world_size
    moe = config.moe
    if moe is not None:
        moe = replace(moe, expert_intermediate_size=moe.expert_intermediate_size // w)
    return replace(config, num_heads=config.num_heads // w, num_kv_heads=config.num_kv_heads // w,
                   intermediate_size=config.intermediate_size // w, moe=moe,
                   output_bias=config.has_output_bias and tp.rank == 0)


# the forward's tensors split by output rows (column-parallel) and by input columns (row-parallel)
_COLUMN = re.compile(r"\.(q_proj|k_proj|v_proj|gate_proj|up_proj)\.(weight|bias)$|\.experts\.gate_up_proj$")
_ROW = re.compile(r"\.(o_proj|down_proj)\.weight$|\.experts\.down_proj$")


def split_kind(name: str) -> str:
    """How tensor `name` of the forward is sharded: "rows", "cols" or "replicated"."""
    if _COLUMN.search(name):
        return "rows"
    if _ROW.search(name):
        return "cols"
    return "replicated"


def process_group_from_env(device_type: str) -> None:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, MASTER_ADDR/PORT in the
    environment): NCCL for CUDA, gloo for the CPU. Nothing when it is joined or not launched so."""
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")


def setup(requested: int | None, device_type: str) -> TensorParallel:
    """The tensor-parallel group an engine runs in.

    requested None: every process torchrun started (the world), 1 when not launched by it;
    1: none, even under torchrun (data parallel: one engine per process); N: the world, which
    must have N processes.
    """
    if requested == 1:
        return TensorParallel()
    process_group_from_env(device_type)
    world = dist.get_world_size() if dist.is_initialized() else 1
    if requested is None:
        requested = world
    if requested != world:
        how = (f"the {world} processes of this launch" if dist.is_initialized()
               else "one process: launch it with `torchrun --nproc-per-node N -m runtime ...`")
        raise ValueError(f"tensor_parallel_size={requested} needs as many processes, and there are {how}; "
                         "tensor parallelism spans every process of the launch (or set 1 for one engine each)")
    if world == 1:
        return TensorParallel()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if local != world:
        raise ValueError(f"tensor parallelism spans the GPUs of one host: this launch has {world} processes, "
                         f"{local} on this host (run one torchrun per host with --nproc-per-node = its GPUs)")
    return TensorParallel(rank=dist.get_rank(), world_size=world)


def shutdown() -> None:
    """Leave the process group (torchrun's processes exit cleanly)."""
    if dist.is_initialized():
        dist.destroy_process_group()
