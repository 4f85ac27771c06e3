"""The elementwise work of a decoder layer as fused Triton kernels, with plain-torch references.

A layer of the model in plain torch runs some 65 small kernels (RMSNorm alone is ~7, RoPE with
its chunk / neg / cat another handful, transposes, SiLU * mul, residual adds); each costs a few
microseconds even inside a CUDA graph, several times the weights' read time at small batches.
Three kernels replace them:

- `rms_norm`: optional residual add + RMSNorm of each row, one kernel (returns the new residual).
- `qk_norm_rope`: the fused QKV projection output -> per-head q/k RMSNorm (optional), RoPE, and
  the [N, H, T, D] layouts attention takes, q, k and v in one kernel.
- `silu_mul`: silu(gate) * up from the fused gate/up projection output.

Numerics follow runtime/model.py operation by operation (math in fp32, or fp64 for fp64 inputs;
results rounded to the activation dtype where the torch code rounds), so the fused path differs
from it only by fp32 rounding inside an operation (fused multiply-adds, reduction order) and by
occasional last-bit differences of exp / rsqrt. Each `*_reference` below is that torch code.

Host work per call: shape checks and one launch, no device sync; with `out` buffers given a call
allocates nothing (CUDA-graph capturable). Under TRITON_INTERPRET=1 on the CPU the kernels run as
written (all math is already fp32 or fp64), but the interpreter rounds fp32 -> bf16 by truncation,
so bf16 results there can be a unit in the last place off torch's (test bf16 on a GPU).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_TILE = 2048  # elements a program of rms_norm / silu_mul handles at least, when rows are short


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------

# Row and token counts vary with every batch shape: specialising on them would compile a new
# variant (and load it, which synchronises the device) in the middle of decoding.
@triton.jit(do_not_specialize=["num_rows"])
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    num_rows, stride_x, stride_res, stride_out, stride_res_out, eps,
    HIDDEN: tl.constexpr, BLOCK: tl.constexpr, BLOCK_R: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, F64: tl.constexpr,
):
    """Grid (cdiv(rows, BLOCK_R),), BLOCK_R rows per program. h = x + residual (rounded to x's
    dtype, stored to res_out), then out = weight * round(h * rsqrt(mean(h^2) + eps)) with the
    norm in fp32 (fp64 for fp64)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK)
    col_ok = cols < HIDDEN
    mask = (rows < num_rows)[:, None] & col_ok[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        res = tl.load(res_ptr + rows[:, None] * stride_res + cols[None, :], mask=mask, other=0.0)
        if F64:
            x = (x.to(tl.float64) + res.to(tl.float64)).to(x.dtype)
        else:
            x = (x.to(tl.float32) + res.to(tl.float32)).to(x.dtype)
        tl.store(res_out_ptr + rows[:, None] * stride_res_out + cols[None, :], x, mask=mask)
    if F64:
        xf = x.to(tl.float64)
    else:
        xf = x.to(tl.float32)
    inv_rms = tl.math.rsqrt(tl.sum(xf * xf, axis=1) / HIDDEN + eps)
    normed = (xf * inv_rms[:, None]).to(x.dtype).to(xf.dtype)
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(xf.dtype)
    tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :],
             (normed * w[None, :]).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _head_norm(lo, hi, w_ptr, offs, ok, eps, HEAD_DIM: tl.constexpr, ACT: tl.constexpr):
    """Per-row RMSNorm of rows split into halves lo, hi [BLOCK_T, BLOCK_HALF] (math dtype), with
    runtime/model.py's roundings: normalise, round to ACT, times the weight, round to ACT."""
    inv_rms = tl.math.rsqrt((tl.sum(lo * lo, axis=1) + tl.sum(hi * hi, axis=1)) / HEAD_DIM + eps)
    w_lo = tl.load(w_ptr + offs, mask=ok, other=0.0).to(lo.dtype)
    w_hi = tl.load(w_ptr + HEAD_DIM // 2 + offs, mask=ok, other=0.0).to(lo.dtype)
    lo = ((lo * inv_rms[:, None]).to(ACT).to(lo.dtype) * w_lo[None, :]).to(ACT).to(lo.dtype)
    hi = ((hi * inv_rms[:, None]).to(ACT).to(hi.dtype) * w_hi[None, :]).to(ACT).to(hi.dtype)
    return lo, hi


@triton.jit(do_not_specialize=["num_tokens", "seq_len"])
def _qk_norm_rope_kernel(
    qkv_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr,
    num_tokens, seq_len, stride_qkv, stride_cos, stride_sin, eps,
    HQ: tl.constexpr, HKV: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BLOCK_T: tl.constexpr, HAS_NORM: tl.constexpr, F64: tl.constexpr,
):
    """Grid (cdiv(num_tokens, BLOCK_T), HQ + 2 * HKV): BLOCK_T tokens of one head.

    Token m (flat over [N, T]) is row m of qkv [N*T, (HQ + 2*HKV) * D]; head h < HQ is a query head,
    then HKV key heads, then HKV value heads. q/k: per-head RMSNorm (HAS_NORM), then the half-split
    rotation x * cos + cat(-x2, x1) * sin in cos's dtype; v: copied. Outputs [N, H, T, D] contiguous.
    """
    HALF: tl.constexpr = HEAD_DIM // 2
    h = tl.program_id(1)
    m = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_ok = m < num_tokens
    n = m // seq_len
    t = m % seq_len
    offs = tl.arange(0, BLOCK_HALF)
    ok = offs < HALF
    mask = tok_ok[:, None] & ok[None, :]
    src = qkv_ptr + m[:, None] * stride_qkv + h * HEAD_DIM + offs[None, :]
    lo = tl.load(src, mask=mask, other=0.0)
    hi = tl.load(src + HALF, mask=mask, other=0.0)
    if h < HQ + HKV:
        if h < HQ:
            dst = q_ptr + ((n * HQ + h) * seq_len + t) * HEAD_DIM
            w_ptr = qw_ptr
        else:
            dst = k_ptr + ((n * HKV + (h - HQ)) * seq_len + t) * HEAD_DIM
            w_ptr = kw_ptr
        if F64:
            lo_f = lo.to(tl.float64)
            hi_f = hi.to(tl.float64)
        else:
            lo_f = lo.to(tl.float32)
            hi_f = hi.to(tl.float32)
        if HAS_NORM:
            lo_f, hi_f = _head_norm(lo_f, hi_f, w_ptr, offs, ok, eps, HEAD_DIM, lo.dtype)
        rope_dtype = cos_ptr.dtype.element_ty
        lo_f = lo_f.to(rope_dtype)
        hi_f = hi_f.to(rope_dtype)
        cs = cos_ptr + m[:, None] * stride_cos + offs[None, :]
        sn = sin_ptr + m[:, None] * stride_sin + offs[None, :]
        cos_lo = tl.load(cs, mask=mask, other=0.0)
        cos_hi = tl.load(cs + HALF, mask=mask, other=0.0)
        sin_lo = tl.load(sn, mask=mask, other=0.0)
        sin_hi = tl.load(sn + HALF, mask=mask, other=0.0)
        out_lo = lo_f * cos_lo + (-hi_f) * sin_lo
        out_hi = hi_f * cos_hi + lo_f * sin_hi
        tl.store(dst[:, None] + offs[None, :], out_lo.to(lo.dtype), mask=mask)
        tl.store(dst[:, None] + HALF + offs[None, :], out_hi.to(lo.dtype), mask=mask)
    else:
        dst = v_ptr + ((n * HKV + (h - HQ - HKV)) * seq_len + t) * HEAD_DIM
        tl.store(dst[:, None] + offs[None, :], lo, mask=mask)
        tl.store(dst[:, None] + HALF + offs[None, :], hi, mask=mask)


@triton.jit(do_not_specialize=["num_rows"])
def _silu_mul_kernel(
    gu_ptr, out_ptr, num_rows, stride_gu, stride_out,
    INTER: tl.constexpr, BLOCK: tl.constexpr, BLOCK_R: tl.constexpr, F64: tl.constexpr,
):
    """Grid (cdiv(rows, BLOCK_R), cdiv(INTER, BLOCK)): out = round(silu(gate)) * up, rounded;
    gate = gu[:, :INTER], up = gu[:, INTER:] (torch rounds silu's result before the multiply,
    so the kernel does too)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = (rows < num_rows)[:, None] & (cols < INTER)[None, :]
    src = gu_ptr + rows[:, None] * stride_gu + cols[None, :]
    gate = tl.load(src, mask=mask, other=0.0)
    up = tl.load(src + INTER, mask=mask, other=0.0)
    if F64:
        g = gate.to(tl.float64)
        u = up.to(tl.float64)
    else:
        g = gate.to(tl.float32)
        u = up.to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(gate.dtype).to(g.dtype)
    tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], (silu * u).to(out_ptr.dtype.element_ty),
             mask=mask)


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------

def _check_float(x: torch.Tensor, name: str) -> None:
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be one of {_FLOAT_DTYPES}, got {x.dtype}")


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., C] as a 2-D [rows, C] view with a contiguous last dim (copied only if it must be)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    try:
        return x.view(-1, x.shape[-1])
    except RuntimeError:
        return x.reshape(-1, x.shape[-1])


def _buffer(buf: torch.Tensor | None, shape: tuple[int, ...], like: torch.Tensor, name: str) -> torch.Tensor:
    """buf checked to be contiguous with this shape and like's dtype/device, or a new empty tensor."""
    if buf is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    if tuple(buf.shape) != tuple(shape) or buf.dtype != like.dtype or buf.device != like.device \
            or not buf.is_contiguous():
        raise ValueError(f"{name} buffer must be contiguous {tuple(shape)} {like.dtype} on {like.device}; got "
                         f"{tuple(buf.shape)} {buf.dtype} on {buf.device} (contiguous={buf.is_contiguous()})")
    return buf


def _warps(tile: int) -> int:
    """Warps for a tile of `tile` elements: about 16 elements per thread, 1 to 16 warps."""
    return max(1, min(16, tile // 512))


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of x [..., H] by weight [H], after adding `residual` [..., H] when given.

    h = residual + x (rounded to x's dtype), out = weight * round(h * rsqrt(mean(h^2) + eps)),
    normalised in fp32 (fp64 for fp64). x, weight and residual share one dtype and device.
    Returns out [..., H]; with `residual`, (out, h) where h is the new residual stream [..., H]
    (`residual_out` may be `residual` itself: each element is read before it is written).
    out / residual_out: optional contiguous buffers.
    """
    _check_float(x, "x")
    hidden = x.shape[-1]
    if weight.shape != (hidden,):
        raise ValueError(f"weight {tuple(weight.shape)} must be [{hidden}] (x's last dim)")
    if weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(f"weight ({weight.dtype} on {weight.device}) must match x ({x.dtype} on {x.device})")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype
                                 or residual.device != x.device):
        raise ValueError(f"residual {tuple(residual.shape)} {residual.dtype} on {residual.device} must match "
                         f"x {tuple(x.shape)} {x.dtype} on {x.device}")
    shape = tuple(x.shape)
    out = _buffer(out, shape, x, "out")
    res_out = _buffer(residual_out, shape, x, "residual_out") if residual is not None else None
    if x.numel() == 0:
        return out if residual is None else (out, res_out)
    x2, out2 = _rows(x), out.view(-1, hidden)
    res2 = _rows(residual) if residual is not None else x2
    res_out2 = res_out.view(-1, hidden) if res_out is not None else out2
    block = triton.next_power_of_2(hidden)
    block_r = max(1, _TILE // block)  # several rows per program only when rows are short
    rows = x2.shape[0]
    _rms_norm_kernel[(triton.cdiv(rows, block_r),)](
        x2, res2, weight.contiguous(), out2, res_out2,
        rows, x2.stride(0), res2.stride(0), out2.stride(0), res_out2.stride(0), float(eps),
        HIDDEN=hidden, BLOCK=block, BLOCK_R=block_r, HAS_RESIDUAL=residual is not None,
        F64=x.dtype == torch.float64, num_warps=_warps(block * block_r),
    )
    return out if residual is None else (out, res_out)


def rms_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Plain torch `rms_norm` (runtime/model.py's RMSNorm after the layer's residual add)."""
    if residual is not None:
        x = residual + x
    xf = x if x.dtype == torch.float64 else x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * xf.to(x.dtype)
    return out if residual is None else (out, x)


def _rope_table(table: torch.Tensor, name: str, n: int, t: int, d: int) -> torch.Tensor:
    """cos or sin [N, 1, T, D] or [N, T, D] as a [N*T, D] view with a contiguous last dim."""
    if tuple(table.shape) not in ((n, 1, t, d), (n, t, d)):
        raise ValueError(f"{name} {tuple(table.shape)} must be [N={n}, 1, T={t}, D={d}] or [N, T, D]")
    if table.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{name} must be fp32 or fp64 (RoPE math runs in its dtype), got {table.dtype}")
    return _rows(table.reshape(n, t, d))


def qk_norm_rope(
    qkv: torch.Tensor,
    q_norm_weight: torch.Tensor | None,
    k_norm_weight: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    num_heads: int,
    num_kv_heads: int,
    eps: float = 1e-6,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    block_t: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split a fused QKV projection into attention's layouts, normalising and rotating q and k.

    qkv [N, T, (Hq + 2 * Hkv) * D] (q heads, then k heads, then v heads, as the concatenated
    q/k/v projection gives them); q_norm_weight, k_norm_weight [D] in qkv's dtype (both None:
    no q/k norm, as in Qwen2); cos, sin [N, 1, T, D] or [N, T, D] fp32 (fp64 for fp64 qkv), the
    half-split tables of runtime/model.py's Rotary. eps: the q/k norm's epsilon.
    Returns q [N, Hq, T, D], k [N, Hkv, T, D] (RMSNorm per head in fp32, rounded as the model
    rounds, then RoPE in cos's dtype) and v [N, Hkv, T, D], contiguous, in qkv's dtype.
    out: optional (q, k, v) contiguous buffers. block_t: tokens per program (tuning override).
    """
    _check_float(qkv, "qkv")
    if qkv.dim() != 3:
        raise ValueError(f"qkv must be [N, T, (Hq + 2*Hkv) * D], got shape {tuple(qkv.shape)}")
    if num_heads <= 0 or num_kv_heads <= 0:
        raise ValueError(f"num_heads={num_heads} and num_kv_heads={num_kv_heads} must be positive")
    n, t, width = qkv.shape
    heads = num_heads + 2 * num_kv_heads
    if width % heads:
        raise ValueError(f"qkv width {width} is not (num_heads + 2 * num_kv_heads) = {heads} heads of one size")
    d = width // heads
    if d % 2:
        raise ValueError(f"head_dim={d} must be even for the half-split rotation")
    if (q_norm_weight is None) != (k_norm_weight is None):
        raise ValueError("pass both q_norm_weight and k_norm_weight (q/k norm) or neither")
    for name, w in (("q_norm_weight", q_norm_weight), ("k_norm_weight", k_norm_weight)):
        if w is not None and (w.shape != (d,) or w.dtype != qkv.dtype or w.device != qkv.device):
            raise ValueError(f"{name} must be [{d}] {qkv.dtype} on {qkv.device}; got {tuple(w.shape)} "
                             f"{w.dtype} on {w.device}")
    cos2 = _rope_table(cos, "cos", n, t, d)
    sin2 = _rope_table(sin, "sin", n, t, d)
    if cos2.dtype != sin2.dtype or cos2.device != qkv.device or sin2.device != qkv.device:
        raise ValueError(f"cos ({cos.dtype} on {cos.device}) and sin ({sin.dtype} on {sin.device}) must share "
                         f"a dtype and be on qkv's device {qkv.device}")
    shapes = ((n, num_heads, t, d), (n, num_kv_heads, t, d), (n, num_kv_heads, t, d))
    bufs = out if out is not None else (None, None, None)
    if len(bufs) != 3:
        raise ValueError("out must be a (q, k, v) tuple of buffers")
    q, k, v = (_buffer(b, s, qkv, name) for b, s, name in zip(bufs, shapes, ("out q", "out k", "out v")))
    if n * t == 0:
        return q, k, v
    qkv2 = _rows(qkv)
    block_half = max(2, triton.next_power_of_2(d // 2))
    if block_t is None:
        block_t = max(2, min(32, triton.next_power_of_2(2048 // (2 * block_half)), triton.next_power_of_2(n * t)))
    has_norm = q_norm_weight is not None
    _qk_norm_rope_kernel[(triton.cdiv(n * t, block_t), heads)](
        qkv2, q_norm_weight.contiguous() if has_norm else qkv2, k_norm_weight.contiguous() if has_norm else qkv2,
        cos2, sin2, q, k, v,
        n * t, t, qkv2.stride(0), cos2.stride(0), sin2.stride(0), float(eps),
        HQ=num_heads, HKV=num_kv_heads, HEAD_DIM=d, BLOCK_HALF=block_half, BLOCK_T=block_t,
        HAS_NORM=has_norm, F64=qkv.dtype == torch.float64,
        num_warps=4 if block_t * block_half >= 1024 else 2,
    )
    return q, k, v


def qk_norm_rope_reference(
    qkv: torch.Tensor,
    q_norm_weight: torch.Tensor | None,
    k_norm_weight: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    num_heads: int,
    num_kv_heads: int,
    eps: float = 1e-6,
    **_ignored,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain torch `qk_norm_rope`: runtime/model.py's split, q/k RMSNorm, apply_rope and transposes."""
    n, t, width = qkv.shape
    d = width // (num_heads + 2 * num_kv_heads)
    q_dim, kv_dim = num_heads * d, num_kv_heads * d
    q = qkv[..., :q_dim].reshape(n, t, num_heads, d)
    k = qkv[..., q_dim:q_dim + kv_dim].reshape(n, t, num_kv_heads, d)
    v = qkv[..., q_dim + kv_dim:].reshape(n, t, num_kv_heads, d)
    if q_norm_weight is not None:
        q, k = rms_norm_reference(q, q_norm_weight, eps), rms_norm_reference(k, k_norm_weight, eps)
    cos, sin = cos.reshape(n, 1, t, d), sin.reshape(n, 1, t, d)

    def rope(x: torch.Tensor) -> torch.Tensor:
        xf = x.to(cos.dtype)
        x1, x2 = xf.chunk(2, dim=-1)
        return (xf * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)

    return (rope(q.transpose(1, 2)).contiguous(), rope(k.transpose(1, 2)).contiguous(),
            v.transpose(1, 2).contiguous())


def silu_mul(gate_up: torch.Tensor, *, out: torch.Tensor | None = None, block: int | None = None) -> torch.Tensor:
    """gate_up [..., 2 * I] (gate, then up, as the concatenated gate/up projection gives them)
    -> silu(gate) * up [..., I] in gate_up's dtype (silu in fp32, rounded, then the product, rounded:
    torch's order). out: optional contiguous buffer. block: columns per program (tuning override)."""
    _check_float(gate_up, "gate_up")
    width = gate_up.shape[-1]
    if width % 2:
        raise ValueError(f"gate_up's last dim {width} must be even (gate and up halves)")
    inter = width // 2
    out = _buffer(out, (*gate_up.shape[:-1], inter), gate_up, "out")
    if out.numel() == 0:
        return out
    gu2, out2 = _rows(gate_up), out.view(-1, inter)
    if block is None:
        block = min(1024, triton.next_power_of_2(inter))
    block_r = max(1, _TILE // 2 // block)
    rows = gu2.shape[0]
    _silu_mul_kernel[(triton.cdiv(rows, block_r), triton.cdiv(inter, block))](
        gu2, out2, rows, gu2.stride(0), out2.stride(0),
        INTER=inter, BLOCK=block, BLOCK_R=block_r, F64=gate_up.dtype == torch.float64,
        num_warps=max(1, min(8, block * block_r // 256)),
    )
    return out


def silu_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """Plain torch `silu_mul` (runtime/model.py's MLP between its projections)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


__all__ = ["rms_norm", "rms_norm_reference", "qk_norm_rope", "qk_norm_rope_reference", "silu_mul",
           "silu_mul_reference"]
