"""Shared by the model tests: weights far from Qwen's init, so that every part of a layer matters."""
import torch


@torch.no_grad()
def perturb(model: torch.nn.Module, seed: int) -> None:
    """Norms != 1, nonzero biases and expert biases, larger matrices; the same values for the same
    seed and shapes."""
    gen = torch.Generator().manual_seed(seed)
    for name, b in model.named_buffers():
        if name.endswith("expert_bias"):  # MoE routers (LLaDA2.0): shifts which experts are chosen
            b.copy_(0.1 * torch.randn(b.shape, generator=gen))
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if name.endswith("norm.weight"):
            p.copy_(1.0 + 0.2 * noise)
        elif name.endswith(".bias"):
            p.copy_(0.3 * noise)
        else:
            p.copy_(0.15 * noise)
