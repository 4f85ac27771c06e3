"""The fp8 KV format: K and V pages as float8 e4m3 with one fp32 scale per (page, KV head), K and V
scaled apart. Its quantizer and dequantizer live here, once in torch and once as Triton helpers that
the page-write and attention kernels call.

A page unit (one KV head's P x D keys or values) holds e4m3 codes x_q with

    x = x_q * scale,    scale = amax(|x| over the unit's written tokens) / 448

(448: e4m3fn's largest finite value; an all-zero unit gets scale 1). Rounding is to nearest, ties
to even, as torch's float32 -> float8_e4m3fn cast rounds. Per-page scales cost 4 bytes per unit
(0.2% of a 16 x 128 unit), and let one outlier token widen only its own page's step.

Scales sit in their own fp32 tensors, laid out as the pages without (P, D): store [num_pages, Hkv]
(per layer), pool [num_slots]. A unit written a few tokens at a time (a block of 4 into 16-token
pages) is rewritten whole: the write reads the unit's earlier tokens back, takes the amax over old
and new, and requantizes all of them (`gpu_kernels.page_copy.write_tokens`), so a later token
larger than the earlier ones only coarsens its page's step, it never clips.

Triton's CPU interpreter rounds some float32 -> fp8 casts wrongly (126.26 -> 64: the mantissa carry
is lost); `fp8_round` rounds onto the e4m3 grid in fp32 arithmetic first, so the cast that follows
is exact on the interpreter and on the GPU alike.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # e4m3fn's largest finite value


def is_fp8(dtype: torch.dtype) -> bool:
    """Whether K/V of this dtype are fp8 codes that need scales."""
    return dtype == FP8_DTYPE


def unit_scale(amax: torch.Tensor) -> torch.Tensor:
    """fp32 scales for units whose largest magnitude is amax (fp32): amax / 448, 1 for an all-zero unit."""
    return torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))


def quantize_units(x: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize units of K or V: x [..., P, D] (any float dtype) -> (codes [..., P, D] float8_e4m3fn,
    scale [...] fp32), the scale over each unit's last two dims. valid [..., P] bool: the tokens that
    count toward the scale; the others are stored as 0 (unwritten positions of a partial page)."""
    x = x.float()
    if valid is not None:
        x = torch.where(valid[..., None], x, torch.zeros((), dtype=x.dtype, device=x.device))
    scale = unit_scale(x.abs().amax(dim=(-2, -1)))
    codes = (x / scale[..., None, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return codes, scale


def dequantize_units(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp32 values of codes [..., P, D] float8_e4m3fn under scale [...] fp32 (one per unit)."""
    return codes.float() * scale.to(codes.device)[..., None, None]


def check_scales(pages: torch.Tensor, scales: torch.Tensor | None, name: str) -> None:
    """Refuse fp8 pages without scales (or scales beside non-fp8 pages), and scales whose shape is
    not the pages' without (P, D) (store [num_pages, Hkv] or pool [num_slots], with a leading layer
    dim where the pages have one)."""
    if not is_fp8(pages.dtype):
        if scales is not None:
            raise ValueError(f"{name} scales were given for {pages.dtype} pages; only float8_e4m3fn pages take scales")
        return
    if scales is None:
        raise ValueError(f"{name} pages are float8_e4m3fn: pass their per-(page, head) scales "
                         f"({tuple(pages.shape[:-2])} fp32)")
    if scales.dtype != torch.float32 or tuple(scales.shape) != tuple(pages.shape[:-2]):
        raise ValueError(f"{name} scales must be fp32 {tuple(pages.shape[:-2])} (the pages' shape without P, D); "
                         f"got {scales.dtype} {tuple(scales.shape)}")


# ------------------------------------------------------------------------------ Triton helpers


@triton.jit
def fp8_round(x):
    """x (fp32) saturated to +-448 and rounded to the nearest e4m3 value (ties to even), still fp32:
    its cast to tl.float8e4nv is then exact. The step of x's binade is 2^(e - 3) (3 mantissa bits),
    2^-9 below the smallest normal 2^-6; adding and taking away 1.5 * 2^23 rounds x / step to an
    integer (|x / step| < 16), ties to even."""
    x = tl.minimum(tl.maximum(x, -448.0), 448.0)
    exponent = ((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    step = ((tl.maximum(exponent, -6) - 3 + 127) << 23).to(tl.float32, bitcast=True)
    return ((x / step + 12582912.0) - 12582912.0) * step


@triton.jit
def fp8_unit_scale(amax):
    """Triton twin of `unit_scale`: amax / 448, 1 where amax is 0."""
    return tl.where(amax > 0, amax / 448.0, 1.0)


@triton.jit
def fp8_dequantize(codes, scale, OUT_DTYPE: tl.constexpr):
    """A tile of e4m3 codes [rows, D] times its rows' scales [rows] (fp32 math), as OUT_DTYPE."""
    return (codes.to(tl.float32) * scale[:, None]).to(OUT_DTYPE)
