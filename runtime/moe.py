"""The mixture-of-experts MLP of Qwen3-MoE (SDAR-30B-A3B) and LLaDA2.0.

A token's router picks `experts_per_token` experts (`route`); their SwiGLU MLPs run as grouped
GEMMs over the tokens sorted by expert, one launch for every expert's gate/up projection and one
for every down projection (`grouped_experts`), never a Python loop over experts: the expert
weights are stacked [E, ...] tensors, the tokens of expert e the rows offs[e-1]:offs[e]. Nothing
syncs with the host, so the MLP replays from a CUDA graph. `experts_reference` is the per-expert
loop the grouped path is tested against.

The checkpoint stores each expert's gate_proj / up_proj / down_proj separately;
runtime/checkpoint_layout.py stacks them into this module's tensors.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from runtime.config import ModelConfig, MoeConfig

# public as F.grouped_mm from torch 2.10; the same operator before that
_grouped_mm = getattr(F, "grouped_mm", None) or torch._grouped_mm


def route(x: torch.Tensor, router_weight: torch.Tensor, moe: MoeConfig,
          expert_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's experts and their weights.

    x: [T, H]; router_weight: [E, H]; expert_bias: [E] (added to the scores only to choose).
    Returns (experts [T, k] int64, weights [T, k] fp32). The router runs in fp32, as LLaDA2.0's
    does (Qwen3-MoE's runs in the model dtype: the same in fp32, closer to fp32 in bf16).
    """
    logits = F.linear(x.float(), router_weight.float())  # [T, E]
    k = moe.experts_per_token
    if moe.score == "softmax":
        scores = logits.softmax(-1)
    else:
        scores = logits.sigmoid()
    ranking = scores if expert_bias is None else scores + expert_bias.float()
    if moe.num_groups > 1:
        # group-limited choice: a group ranks by the sum of its two best experts; only the
        # `groups_per_token` best groups' experts can be picked
        t = ranking.shape[0]
        grouped = ranking.view(t, moe.num_groups, -1)
        group_rank = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)  # [T, G]
        keep = torch.zeros_like(group_rank, dtype=torch.bool)
        keep.scatter_(1, group_rank.topk(moe.groups_per_token, dim=-1).indices, True)
        ranking = ranking.masked_fill(~keep.repeat_interleave(grouped.shape[-1], dim=1), float("-inf"))
    experts = ranking.topk(k, dim=-1).indices
    weights = scores.gather(1, experts)
    if moe.normalize_weights:
        weights = weights / (weights.sum(-1, keepdim=True) + (1e-20 if moe.score == "sigmoid" else 0.0))
    return experts, weights * moe.routed_scaling


def grouped_mm_supported(x: torch.Tensor) -> bool:
    """Whether torch's grouped GEMM takes x's device and dtype (CUDA: bf16 only; the CPU: not fp64)."""
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16
    return x.dtype != torch.float64


def grouped_experts(x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
                    down: torch.Tensor) -> torch.Tensor:
    """The weighted sum of each token's experts' SwiGLU MLPs, as two grouped GEMMs.

    x: [T, H]; experts, weights: [T, k] (`route`); gate_up: [E, 2I, H] (gate rows, then up rows);
    down: [E, H, I]. Returns [T, H] in x's dtype. The tokens are sorted by expert (stably, so the
    result does not depend on the batch's order), each expert's rows multiplied by its weights in
    one grouped GEMM, and the k results of a token summed in a fixed order (no atomics).
    """
    t, k = experts.shape
    flat = experts.reshape(-1)
    order = flat.argsort(stable=True)  # rows grouped by expert
    counts = torch.zeros(gate_up.shape[0], dtype=torch.int32, device=x.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    offsets = counts.cumsum(0, dtype=torch.int32)  # end of each expert's rows
    rows = x[order // k]  # [T*k, H]
    hidden = _grouped_mm(rows, gate_up.transpose(1, 2), offs=offsets)  # [T*k, 2I]
    inter = hidden.shape[-1] // 2
    hidden = F.silu(hidden[:, :inter]) * hidden[:, inter:]
    out_sorted = _grouped_mm(hidden, down.transpose(1, 2), offs=offsets)  # [T*k, H]
    out = torch.empty_like(out_sorted)
    out[order] = out_sorted
    return (out.view(t, k, -1).float() * weights[..., None]).sum(1).to(x.dtype)


def experts_reference(x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
                      down: torch.Tensor) -> torch.Tensor:
    """`grouped_experts` in plain torch: every expert on every token, weighted by the routing (zero
    for the experts a token did not pick). The reference of the tests, and the path where the
    grouped GEMM does not take the dtype (CUDA fp32/fp16): E/k times the work, no host sync."""
    dense_weights = torch.zeros(x.shape[0], gate_up.shape[0], dtype=torch.float32, device=x.device)
    dense_weights.scatter_(1, experts, weights.float())  # [T, E]
    inter = gate_up.shape[1] // 2
    hidden = torch.einsum("th,eih->eti", x, gate_up)  # [E, T, 2I]
    hidden = F.silu(hidden[..., :inter]) * hidden[..., inter:]
    out = torch.einsum("eti,ehi->eth", hidden, down)  # [E, T, H]
    return torch.einsum("eth,te->th", out.float(), dense_weights).to(x.dtype)


class Router(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        moe = config.moe
        self.weight = nn.Parameter(torch.empty(moe.num_experts, config.hidden_size))
        if moe.expert_bias:
            self.register_buffer("expert_bias", torch.zeros(moe.num_experts))
        else:
            self.expert_bias = None


class Experts(nn.Module):
    """Every routed expert's weights, stacked: gate_up_proj [E, 2I, H], down_proj [E, H, I]."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        moe = config.moe
        inter, hidden = moe.expert_intermediate_size, config.hidden_size
        self.gate_up_proj = nn.Parameter(torch.empty(moe.num_experts, 2 * inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(moe.num_experts, hidden, inter))


class MoeMLP(nn.Module):
    """Routed experts (+ shared experts): the MLP of a MoE layer. x: [N, T, H] -> [N, T, H]."""

    def __init__(self, config: ModelConfig, shared: nn.Module | None):
        super().__init__()
        self.moe = config.moe
        self.router = Router(config)
        self.experts = Experts(config)
        self.shared_experts = shared

    def routed(self, x: torch.Tensor) -> torch.Tensor:
        """The routed experts' share of the output (no shared experts). x: [N, T, H]."""
        flat = x.reshape(-1, x.shape[-1])
        experts, weights = route(flat, self.router.weight, self.moe, self.router.expert_bias)
        run = grouped_experts if grouped_mm_supported(flat) else experts_reference
        return run(flat, experts, weights, self.experts.gate_up_proj, self.experts.down_proj).view_as(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.routed(x)
        return out if self.shared_experts is None else out + self.shared_experts(x)

    def set_fused(self, enabled: bool) -> None:
        if self.shared_experts is not None:
            self.shared_experts.set_fused(enabled)

    def forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        # the routed experts are two grouped GEMMs already; only the shared MLP has a fused path
        out = self.routed(x)
        return out if self.shared_experts is None else out + self.shared_experts.forward_fused(x)
