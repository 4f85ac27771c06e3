"""The model forward: a Qwen2 / Qwen3 / Qwen3-MoE / LLaDA2.0 decoder in plain PyTorch.

Parameter names follow Hugging Face's Qwen names (`model.layers.{i}.self_attn.q_proj.weight`, ...);
runtime/checkpoint_layout.py maps each family's stored names (LLaDA2.0's fused query_key_value,
per-expert MoE tensors) onto them. A MoE layer's MLP is runtime/moe.py's. Attention itself is not here: every layer hands its
RoPE'd q/k/v to an `AttentionMode` (runtime/attention.py), which owns the KV cache and decides
what each query sees. The model therefore knows nothing of caches, masks or phases.

`Transformer.set_fused(True)` switches inference to a fused path (gpu_kernels/fused_layer.py):
one QKV and one gate/up GEMM per layer, one kernel for q/k norm + RoPE + layouts, one for
SiLU * mul, and RMSNorms that take the residual add with them. The plain path stays the reference.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gpu_kernels.fused_layer import qk_norm_rope, rms_norm, silu_mul
from runtime.attention import AttentionMode
from runtime.config import ModelConfig, RopeConfig
from runtime.moe import MoeMLP
from runtime.parallel import TensorParallel, local_config

SUPPORTED_ROPE_TYPES = ("default", "linear", "yarn", "llama3")


def rope_frequencies(head_dim: int, rope: RopeConfig, max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim // 2] (fp64, CPU) and the factor cos/sin are multiplied by.

    Follows the rope types of Hugging Face's modeling_rope_utils; computed in fp64 so that the
    cast to the forward's RoPE dtype is the only rounding. Always on the CPU (explicitly, so that
    building the model under `torch.device("meta")` keeps real values).
    """
    if head_dim % 2:
        raise ValueError(f"head_dim={head_dim} must be even for rotary embeddings")
    base = 1.0 / rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device="cpu") / head_dim)
    kind = rope.rope_type
    original = rope.original_max_position_embeddings or max_position_embeddings
    if kind == "default":
        return base, 1.0
    if kind == "linear":
        return base / rope.factor, 1.0
    if kind == "llama3":
        # Long wavelengths (beyond the pretraining context) are slowed by `factor`, short ones kept,
        # the band between them blended linearly in context-length / wavelength.
        wavelen = 2 * math.pi / base
        long_wavelen = original / rope.low_freq_factor
        short_wavelen = original / rope.high_freq_factor
        blend = (original / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        blended = (1 - blend) * base / rope.factor + blend * base
        out = torch.where(wavelen > long_wavelen, base / rope.factor, base)
        middle = (wavelen >= short_wavelen) & (wavelen <= long_wavelen)
        return torch.where(middle, blended, out), 1.0
    if kind == "yarn":
        return _yarn_frequencies(base, head_dim, rope, original)
    raise ValueError(f"rope type {kind!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}")


def _yarn_frequencies(base: torch.Tensor, head_dim: int, rope: RopeConfig, original: int) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate low-frequency dims by `factor`, keep high-frequency ones, ramp between."""
    factor = rope.factor

    def magnitude(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    if rope.attention_factor is not None:
        attention_factor = float(rope.attention_factor)
    elif rope.mscale and rope.mscale_all_dim:
        attention_factor = magnitude(factor, rope.mscale) / magnitude(factor, rope.mscale_all_dim)
    else:
        attention_factor = magnitude(factor)

    def dim_for_rotations(rotations: float) -> float:
        # The rotary dim index whose wavelength fits `rotations` times into the original context.
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = dim_for_rotations(rope.beta_fast), dim_for_rotations(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float64, device="cpu") - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # weight of the unscaled (extrapolated) frequency
    return base / factor * (1 - keep) + base * keep, attention_factor


class Rotary:
    """cos/sin tables for arbitrary absolute positions (no cache of positions: 128K-ready)."""

    def __init__(self, config: ModelConfig):
        self.inv_freq, self.attention_factor = rope_frequencies(
            config.rope_dim, config.rope, config.max_position_embeddings)
        self._inv_freq_on: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [N, T] -> cos, sin [N, 1, T, R] in fp32 (fp64 for fp64 models); R the rotated dims."""
        rope_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        key = (positions.device, rope_dtype)
        inv_freq = self._inv_freq_on.get(key)
        if inv_freq is None:
            inv_freq = self._inv_freq_on[key] = self.inv_freq.to(device=positions.device, dtype=rope_dtype)
        angles = positions.to(rope_dtype)[..., None] * inv_freq  # [N, T, D/2]
        angles = torch.cat([angles, angles], dim=-1)[:, None]
        return angles.cos() * self.attention_factor, angles.sin() * self.attention_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [N, H, T, D] by cos/sin [N, 1, T, R] (half-split pairs, as Qwen does); math in cos.dtype.

    R < D (partial rotary, LLaDA2.0): the first R dims rotate, the rest pass through unchanged."""
    rot = cos.shape[-1]
    xf = x[..., :rot].to(cos.dtype)
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = (xf * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)
    return rotated if rot == x.shape[-1] else torch.cat([rotated, x[..., rot:]], dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (fp64 stays fp64), round back, then scale: the order Qwen's reference uses.
        xf = x if x.dtype == torch.float64 else x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def _share_rows(linears: list[nn.Linear], attr: str) -> torch.Tensor | None:
    """Concatenate the linears' `attr` tensors along dim 0 into one new tensor and make each
    parameter a view of its rows (same Parameter objects, so state_dict, optimisers and checkpoint
    loading still see them), so the fused GEMM costs no second copy of the weights.
    Returns the concatenation, or None when the linears have no `attr` (no bias)."""
    params = [getattr(linear, attr) for linear in linears]
    if params[0] is None:
        return None
    fused = torch.cat([p.detach() for p in params])
    offset = 0
    for p in params:
        p.data = fused[offset:offset + p.shape[0]]
        offset += p.shape[0]
    return fused


def _own_rows(linears: list[nn.Linear], fused: torch.Tensor | None, attr: str) -> None:
    """Undo `_share_rows`: each parameter that is still a view of `fused` gets its own storage."""
    if fused is None:
        return
    for linear in linears:
        p = getattr(linear, attr)
        if p.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr():
            p.data = p.detach().clone()


def _refuse_after_load(module: "_FusedProjections", _incompatible_keys) -> None:
    # load_state_dict(assign=True) gives the parameters new storage: concatenate them again.
    module.set_fused(module.fused)


class _FusedProjections(nn.Module):
    """A module whose fused path runs some of its nn.Linear children as one GEMM.

    The concatenated weight (and bias) are non-persistent buffers (absent from state_dict) whose
    storage the children's parameters view. Like nn.RNN's flattened weights, they are rebuilt
    when the module is moved or cast (`_apply`) and after `load_state_dict`, which both give the
    parameters new storage.
    """

    fused: bool

    def _fused_linears(self) -> list[nn.Linear]:
        raise NotImplementedError

    def _init_fused(self) -> None:
        self.fused = False
        self.register_buffer("fused_weight", None, persistent=False)
        self.register_buffer("fused_bias", None, persistent=False)
        self.register_load_state_dict_post_hook(_refuse_after_load)

    def set_fused(self, enabled: bool) -> None:
        """Concatenate the weights (again: from the parameters as they are now) or drop the concatenation."""
        linears = self._fused_linears()
        _own_rows(linears, self.fused_weight, "weight")
        _own_rows(linears, self.fused_bias, "bias")
        self.fused_weight = self.fused_bias = None
        if enabled:
            self.fused_weight = _share_rows(linears, "weight")
            self.fused_bias = _share_rows(linears, "bias")
        self.fused = enabled

    def _apply(self, fn, recurse=True):
        fused = self.fused
        if fused:
            self.set_fused(False)
        super()._apply(fn, recurse)
        if fused:
            self.set_fused(True)
        return self


class Attention(_FusedProjections):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        q_dim, kv_dim = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, q_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_dim, bias=bias)
        self.o_proj = nn.Linear(q_dim, config.hidden_size, bias=config.has_output_bias)
        self.qk_norm = config.qk_norm
        self.partial_rotary = config.rope_dim < config.head_dim  # the fused kernel rotates whole heads
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
        self._init_fused()

    def _fused_linears(self) -> list[nn.Linear]:
        return [self.q_proj, self.k_proj, self.v_proj]

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attention: AttentionMode,
                layer: int) -> torch.Tensor:
        return self._attend(self.q_proj(x), self.k_proj(x), self.v_proj(x), cos, sin, attention, layer)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attention: AttentionMode, layer: int) -> torch.Tensor:
        """q [N, T, Hq*D], k/v [N, T, Hkv*D] projections -> the attention's output projection [N, T, H]."""
        n, t, _ = q.shape
        q = q.view(n, t, self.num_heads, self.head_dim)
        k = k.view(n, t, self.num_kv_heads, self.head_dim)
        v = v.view(n, t, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(1, 2), cos, sin).contiguous()
        k = apply_rope(k.transpose(1, 2), cos, sin).contiguous()
        v = v.transpose(1, 2).contiguous()
        out = attention.run(layer, q, k, v)  # [N, Hq, T, D]
        return self.o_proj(out.transpose(1, 2).reshape(n, t, self.num_heads * self.head_dim))

    def forward_fused(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attention: AttentionMode,
                      layer: int) -> torch.Tensor:
        """`forward` with one QKV GEMM and one kernel for q/k norm, RoPE and the head layouts."""
        n, t, _ = x.shape
        qkv = F.linear(x, self.fused_weight, self.fused_bias)  # [N, T, (Hq + 2 Hkv) * D]
        if self.partial_rotary:
            q_dim, kv_dim = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
            return self._attend(*qkv.split([q_dim, kv_dim, kv_dim], dim=-1), cos, sin, attention, layer)
        q, k, v = qk_norm_rope(qkv, self.q_norm.weight if self.qk_norm else None,
                               self.k_norm.weight if self.qk_norm else None, cos, sin,
                               num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                               eps=self.q_norm.eps if self.qk_norm else 0.0)
        out = attention.run(layer, q, k, v)  # [N, Hq, T, D]
        return self.o_proj(out.transpose(1, 2).reshape(n, t, self.num_heads * self.head_dim))


class MLP(_FusedProjections):
    def __init__(self, config: ModelConfig, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)
        self._init_fused()

    def _fused_linears(self) -> list[nn.Linear]:
        return [self.gate_proj, self.up_proj]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        """`forward` with one gate/up GEMM and one SiLU * mul kernel."""
        return self.down_proj(silu_mul(F.linear(x, self.fused_weight)))


def layer_mlp(config: ModelConfig, layer: int) -> nn.Module:
    """Layer `layer`'s MLP: dense, or the mixture of experts (with its shared experts, if any)."""
    if not config.is_moe_layer(layer):
        return MLP(config, config.intermediate_size)
    shared = config.moe.shared_intermediate_size
    return MoeMLP(config, MLP(config, shared) if shared else None)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, tp: TensorParallel | None = None):
        super().__init__()
        self.tp = tp or TensorParallel()  # a shard: its attention and MLP outputs are summed over the ranks
        self.self_attn = Attention(config)
        self.mlp = layer_mlp(config, layer)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attention: AttentionMode,
                layer: int) -> torch.Tensor:
        x = x + self.tp.all_reduce(self.self_attn(self.input_layernorm(x), cos, sin, attention, layer))
        return x + self.tp.all_reduce(self.mlp(self.post_attention_layernorm(x)))

    def set_fused(self, enabled: bool) -> None:
        self.self_attn.set_fused(enabled)
        self.mlp.set_fused(enabled)

    def forward_fused(self, normed: torch.Tensor, residual: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      attention: AttentionMode, layer: int, next_norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """The fused path of `forward`, with the residual stream carried beside its normalised form.

        normed = input_layernorm(residual), residual: [N, T, H]. Returns (next_norm(h), h) for the
        layer's output h, so each residual add runs inside the RMSNorm that follows it (the next
        layer's input_layernorm, or the final norm).
        """
        attn = self.tp.all_reduce(self.self_attn.forward_fused(normed, cos, sin, attention, layer))
        normed, residual = rms_norm(attn, self.post_attention_layernorm.weight,
                                    self.post_attention_layernorm.eps, residual)
        return rms_norm(self.tp.all_reduce(self.mlp.forward_fused(normed)), next_norm.weight, next_norm.eps, residual)


class Backbone(nn.Module):
    """The `model.` prefix of Hugging Face's parameter names."""

    def __init__(self, config: ModelConfig, tp: TensorParallel | None = None):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i, tp) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Transformer(nn.Module):
    """The causal-LM weights of every supported family; the attention pattern comes from the
    AttentionMode passed in.

    With `tp` (runtime/parallel.py) it is one rank's shard: `config` stays the whole model's,
    `local_config` the shard's geometry (its heads and KV heads: what its attention mode holds)."""

    def __init__(self, config: ModelConfig, tp: TensorParallel | None = None):
        super().__init__()
        if config.rope.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"rope type {config.rope.rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}")
        self.config = config
        self.tp = tp or TensorParallel()
        self.local_config = local_config(config, self.tp)
        self.model = Backbone(self.local_config, self.tp)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = Rotary(config)
        self._fused = False
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share lm_head with the embedding when the checkpoint ties them (call again after re-assigning)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def set_fused(self, enabled: bool) -> None:
        """Run inference on the fused path (True) or the plain torch one (False, the default).

        Fused, each layer runs one QKV GEMM (Qwen2's q/k/v biases included) and one gate/up GEMM
        over weights concatenated here, q/k norm + RoPE + the [N, H, T, D] layouts in one kernel,
        SiLU * mul in one, and every residual add inside the RMSNorm that follows it (Triton
        kernels: CUDA, or the CPU under TRITON_INTERPRET=1). The q/k/v and gate/up parameters
        become views of the concatenations (no second copy of the weights); state_dict, parameter
        names and checkpoint loading are unchanged. Moving or casting the model and load_state_dict
        rebuild the concatenations; call again after assigning parameters any other way. The fused
        path is inference only (no autograd): forward refuses it while parameters need gradients.
        """
        for layer in self.model.layers:
            layer.set_fused(enabled)
        self._fused = bool(enabled)

    @property
    def fused(self) -> bool:
        return self._fused

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attention: AttentionMode,
                need_logits: bool = True) -> torch.Tensor | None:
        """input_ids, positions: [N, T] int64 (absolute positions) -> fp32 logits [N, T, V].

        `attention` must have been planned for this pass. need_logits=False (KV-only passes such
        as prefill) skips the final norm and lm_head and returns None.
        """
        if input_ids.shape != positions.shape or input_ids.dim() != 2:
            raise ValueError(f"input_ids {tuple(input_ids.shape)} and positions {tuple(positions.shape)} "
                             "must both be [N, T]")
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rotary.cos_sin(positions, x.dtype)
        if self._fused:
            return self._forward_fused(x, cos, sin, attention, need_logits)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, attention, i)
        if not need_logits:
            return None
        return self.lm_head(self.model.norm(x)).float()

    def _forward_fused(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attention: AttentionMode,
                       need_logits: bool) -> torch.Tensor | None:
        """`forward` after the embedding, on the fused path (see `set_fused`)."""
        if torch.is_grad_enabled() and self.model.norm.weight.requires_grad:
            raise RuntimeError("the fused path is inference only (its kernels have no backward): run under "
                               "torch.no_grad(), or call set_fused(False) to train")
        layers = self.model.layers
        norms = [layer.input_layernorm for layer in layers] + [self.model.norm]
        residual, normed = x, rms_norm(x, norms[0].weight, norms[0].eps)
        for i, layer in enumerate(layers):
            if i == len(layers) - 1 and not need_logits:
                # Only the last layer's K/V are still needed: its MLP would feed nothing.
                layer.self_attn.forward_fused(normed, cos, sin, attention, i)
                return None
            normed, residual = layer.forward_fused(normed, residual, cos, sin, attention, i, norms[i + 1])
        if not need_logits:
            return None
        return self.lm_head(normed).float()

    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Random weights as Qwen initialises them: N(0, std) matrices, zero biases, unit norms."""
        init_qwen_weights(self, std, generator)


@torch.no_grad()
def init_qwen_weights(module: nn.Module, std: float = 0.02, generator: torch.Generator | None = None) -> None:
    """Qwen's initialisation of any part of the model: N(0, std) matrices, zero biases and expert
    biases, unit norms."""
    for name, b in module.named_buffers():
        if name.endswith("expert_bias"):
            b.zero_()
    for name, p in module.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        elif name.endswith(".bias"):
            p.zero_()
        else:
            p.normal_(0.0, std, generator=generator)


def expected_tensor_shapes(config: ModelConfig, tp: TensorParallel | None = None) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of this config must hold, with its shape (lm_head absent when tied);
    with `tp`, the shapes of that rank's shard."""
    with torch.device("meta"):
        model = Transformer(config, tp)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight")
    return shapes


def weight_bytes(config: ModelConfig, dtype: torch.dtype, tensor_parallel: int = 1) -> tuple[int, int]:
    """(all weights, the routed experts' share of them) in bytes at `dtype`: what loading puts on the
    GPU (on each GPU of `tensor_parallel`: rank 0's shard, the largest)."""
    elem = torch.empty((), dtype=dtype).element_size()
    total = experts = 0
    for name, shape in expected_tensor_shapes(config, TensorParallel(0, tensor_parallel)).items():
        size = elem * math.prod(shape)
        total += size
        experts += size if ".mlp.experts." in name else 0
    return total, experts
