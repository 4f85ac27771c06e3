"""rms_norm / qk_norm_rope / silu_mul vs their plain-torch references.

Error: ||kernel - reference|| / ||reference|| over fresh random inputs (the same inputs to both).
Tolerances: fp32 1e-5 and fp64 1e-12 (the kernels differ from torch only by fp32 rounding inside
an operation: fused multiply-adds, reduction order, exp / rsqrt), fp16 2e-3, bf16 8e-3 (those
differences occasionally move a result across a rounding boundary: one unit in the last place
of an element, 1e-3 / 8e-3 relative). On the CPU the kernels run in Triton's interpreter
(fp32, fp16, fp64: its fp32 -> bf16 conversion truncates, so bf16 runs on the GPU only); on a
GPU machine the same tests run on the GPU, and the `gpu` ones add bf16 / fp16 at the real
Qwen3-8B geometry. Output buffers are filled with NaN first: an element the kernel fails to
write stays NaN and fails the comparison.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from gpu_kernels.fused_layer import (  # noqa: E402
    qk_norm_rope, qk_norm_rope_reference, rms_norm, rms_norm_reference, silu_mul, silu_mul_reference)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 8e-3}
CPU_DTYPES = [torch.float32, torch.float16, torch.float64]


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-30))


def _poisoned(shape, dtype) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=DEV)


def _check(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert got.shape == ref.shape and got.dtype == ref.dtype == dtype and got.is_contiguous(), what
    assert not got.isnan().any(), f"{what}: NaN left in the output (an element was not written)"
    err = rel_err(got, ref)
    assert err < TOL[dtype], f"{what}: relative error {err:.2e} >= {TOL[dtype]:.0e}"


def _rope_tables(gen, n, t, d, dtype, factor=1.0):
    """cos, sin [N, 1, T, D] as runtime/model.py's Rotary builds them, at large random positions."""
    rope_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    positions = torch.randint(0, 131072, (n, t), generator=gen)
    inv_freq = 1.0 / 1e6 ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = positions.double()[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)[:, None]
    return ((angles.cos() * factor).to(rope_dtype).to(DEV), (angles.sin() * factor).to(rope_dtype).to(DEV))


# ---------------------------------------------------------------------------------------------
# rms_norm

def _check_rms_norm(lead, hidden, dtype, residual, seed, strided=False, in_place=False):
    gen = torch.Generator().manual_seed(seed)
    width = hidden + 24 if strided else hidden
    x = (3 * torch.randn(*lead, width, generator=gen)).to(dtype).to(DEV)[..., :hidden]
    w = (1 + 0.3 * torch.randn(hidden, generator=gen)).to(dtype).to(DEV)
    res = torch.randn(*lead, hidden, generator=gen).to(dtype).to(DEV) if residual else None
    eps = 1e-6
    ref = rms_norm_reference(x, w, eps, res)
    out = _poisoned((*lead, hidden), dtype)
    if residual:
        res_out = res if in_place else _poisoned((*lead, hidden), dtype)
        got, got_res = rms_norm(x, w, eps, res, out=out, residual_out=res_out)
        assert got is out and got_res is res_out
        _check(got, ref[0], dtype, "rms_norm out")
        _check(got_res, ref[1], dtype, "rms_norm residual")
        assert torch.equal(got_res, ref[1]), "the residual add is one rounding in both: bitwise equal"
    else:
        got = rms_norm(x, w, eps, out=out)
        assert got is out
        _check(got, ref, dtype, "rms_norm")
        _check(rms_norm(x, w, eps), ref, dtype, "rms_norm (allocated out)")


# (leading dims, hidden): one row, rows not a multiple of anything, non-power-of-two hidden
RMS_SHAPES = [((1,), 64), ((2, 3), 48), ((5, 7), 96), ((3, 1), 200), ((1, 32), 128)]


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("lead,hidden", RMS_SHAPES)
@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm_matches_reference(lead, hidden, dtype, residual):
    _check_rms_norm(lead, hidden, dtype, residual, seed=hidden + len(lead))


def test_rms_norm_strided_input_and_in_place_residual():
    _check_rms_norm((3, 5), 80, torch.float32, residual=True, seed=1, strided=True, in_place=True)
    _check_rms_norm((4,), 64, torch.float32, residual=False, seed=2, strided=True)


def test_rms_norm_rejects_mismatched_weight():
    x = torch.randn(2, 8, device=DEV)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.ones(8, dtype=torch.float16, device=DEV), 1e-6)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.ones(4, device=DEV), 1e-6)
    with pytest.raises(ValueError, match="residual"):
        rms_norm(x, torch.ones(8, device=DEV), 1e-6, torch.randn(3, 8, device=DEV))


# ---------------------------------------------------------------------------------------------
# qk_norm_rope

def _check_qk_norm_rope(n, t, hq, hkv, d, norm, dtype, seed, block_t=None, strided=False, factor=1.0):
    gen = torch.Generator().manual_seed(seed)
    width = (hq + 2 * hkv) * d
    qkv = (2 * torch.randn(n, t, width + (8 if strided else 0), generator=gen)).to(dtype).to(DEV)[..., :width]
    qw = (1 + 0.3 * torch.randn(d, generator=gen)).to(dtype).to(DEV) if norm else None
    kw = (1 + 0.3 * torch.randn(d, generator=gen)).to(dtype).to(DEV) if norm else None
    cos, sin = _rope_tables(gen, n, t, d, dtype, factor)
    kwargs = dict(num_heads=hq, num_kv_heads=hkv, eps=1e-6)
    ref = qk_norm_rope_reference(qkv, qw, kw, cos, sin, **kwargs)
    out = (_poisoned((n, hq, t, d), dtype), _poisoned((n, hkv, t, d), dtype), _poisoned((n, hkv, t, d), dtype))
    got = qk_norm_rope(qkv, qw, kw, cos, sin, out=out, block_t=block_t, **kwargs)
    assert all(g is o for g, o in zip(got, out))
    for name, g, r in zip("qkv", got, ref):
        _check(g, r, dtype, f"{name} (N={n} T={t} Hq={hq} Hkv={hkv} D={d} norm={norm})")
    assert torch.equal(got[2], ref[2]), "v is a copy"


# (N, T, Hq, Hkv, D, q/k norm, block_t): T in 1, 3, 32, 33; D 32/48/64/128; N*T never a multiple
# of the token block (7, 15, 96 with block 64, 66), GQA groups 1, 2, 4
QKR_SHAPES = [
    (7, 1, 2, 1, 32, True, None),
    (5, 3, 4, 2, 64, True, None),
    (1, 3, 2, 2, 48, False, None),
    (3, 32, 4, 1, 128, True, 64),
    (2, 33, 2, 1, 128, False, None),
    (1, 32, 4, 2, 64, True, 8),
]


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("shape", QKR_SHAPES)
def test_qk_norm_rope_matches_reference(shape, dtype):
    n, t, hq, hkv, d, norm, block_t = shape
    _check_qk_norm_rope(n, t, hq, hkv, d, norm, dtype, seed=n * 100 + t * 10 + d, block_t=block_t)


def test_qk_norm_rope_strided_qkv_and_scaled_tables():
    """qkv a column slice of a wider tensor (row stride > width); cos/sin carrying an attention
    factor as YaRN's do."""
    _check_qk_norm_rope(3, 5, 4, 2, 32, True, torch.float32, seed=3, strided=True, factor=1.2)


def test_qk_norm_rope_rejects_bad_shapes():
    qkv = torch.randn(2, 3, 4 * 16, device=DEV)
    cos = sin = torch.randn(2, 1, 3, 16, device=DEV)
    with pytest.raises(ValueError, match="heads"):
        qk_norm_rope(qkv, None, None, cos, sin, num_heads=3, num_kv_heads=1)
    with pytest.raises(ValueError, match="both"):
        qk_norm_rope(qkv, torch.ones(16, device=DEV), None, cos, sin, num_heads=2, num_kv_heads=1)
    with pytest.raises(ValueError, match="cos"):
        qk_norm_rope(qkv, None, None, cos[:, :, :2], sin, num_heads=2, num_kv_heads=1)


# ---------------------------------------------------------------------------------------------
# silu_mul

def _check_silu_mul(lead, inter, dtype, seed, block=None, strided=False):
    gen = torch.Generator().manual_seed(seed)
    width = 2 * inter + (16 if strided else 0)
    gate_up = 4 * torch.randn(*lead, width, generator=gen)
    gate_up.view(-1, width)[0, :3] = torch.tensor([-100.0, 100.0, 0.0])  # exp overflow, saturation, zero
    gate_up = gate_up.to(dtype).to(DEV)[..., :2 * inter]
    ref = silu_mul_reference(gate_up)
    out = _poisoned((*lead, inter), dtype)
    got = silu_mul(gate_up, out=out, block=block)
    assert got is out
    _check(got, ref, dtype, f"silu_mul {lead} I={inter}")


# (leading dims, I, block): one row, I not a multiple of the block, block < I
SILU_SHAPES = [((1,), 40, None), ((2, 3), 96, None), ((7,), 40, 16), ((3, 5), 1000, 256), ((1, 32), 64, None)]


# gate = -100: exp(100) overflows to inf in fp32 (silu -> -0, as torch), which numpy reports
@pytest.mark.filterwarnings("ignore:overflow encountered in exp")
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("lead,inter,block", SILU_SHAPES)
def test_silu_mul_matches_reference(lead, inter, block, dtype):
    _check_silu_mul(lead, inter, dtype, seed=inter + len(lead), block=block)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")
def test_silu_mul_strided_input_and_bad_width():
    _check_silu_mul((4, 3), 24, torch.float32, seed=5, strided=True)
    with pytest.raises(ValueError, match="even"):
        silu_mul(torch.randn(3, 7, device=DEV))


# ---------------------------------------------------------------------------------------------
# GPU: low precision at the real geometry (Qwen3-8B: hidden 4096, 32/8 heads of 128, I = 12288)

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 37, 128, 256])
def test_gpu_low_precision_real_geometry(dtype, rows):
    _check_rms_norm((rows,), 4096, dtype, residual=True, seed=rows)
    _check_rms_norm((rows,), 4096, dtype, residual=False, seed=rows + 1)
    n, t = (rows, 1) if rows < 32 else (rows // 32, 32)
    _check_qk_norm_rope(n, t, 32, 8, 128, True, dtype, seed=rows)
    _check_qk_norm_rope(n, t, 28, 4, 128, False, dtype, seed=rows + 2)  # Qwen2-7B heads, no q/k norm
    _check_silu_mul((rows,), 12288, dtype, seed=rows)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_low_precision_ragged_shapes(dtype):
    for lead, hidden in RMS_SHAPES:
        _check_rms_norm(lead, hidden, dtype, residual=True, seed=hidden)
    for n, t, hq, hkv, d, norm, block_t in QKR_SHAPES:
        _check_qk_norm_rope(n, t, hq, hkv, d, norm, dtype, seed=n + t + d, block_t=block_t)
    for lead, inter, block in SILU_SHAPES:
        _check_silu_mul(lead, inter, dtype, seed=inter, block=block)


@pytest.mark.gpu
def test_gpu_kernels_capture_in_a_cuda_graph():
    """With out buffers given, the three calls allocate nothing and replay from a graph."""
    gen = torch.Generator().manual_seed(0)
    dtype, n, t = torch.bfloat16, 4, 32
    x = torch.randn(n, t, 4096, generator=gen).to(dtype).cuda()
    res = torch.randn(n, t, 4096, generator=gen).to(dtype).cuda()
    w = torch.ones(4096, dtype=dtype, device="cuda")
    qkv = torch.randn(n, t, 48 * 128, generator=gen).to(dtype).cuda()
    qw = kw = torch.ones(128, dtype=dtype, device="cuda")
    cos, sin = _rope_tables(gen, n, t, 128, dtype)
    gu = torch.randn(n, t, 2 * 12288, generator=gen).to(dtype).cuda()
    out, res_out = torch.empty_like(x), torch.empty_like(x)
    qkv_out = tuple(torch.empty(n, h, t, 128, dtype=dtype, device="cuda") for h in (32, 8, 8))
    act = torch.empty(n, t, 12288, dtype=dtype, device="cuda")

    def step():
        rms_norm(x, w, 1e-6, res, out=out, residual_out=res_out)
        qk_norm_rope(qkv, qw, kw, cos, sin, num_heads=32, num_kv_heads=8, out=qkv_out)
        silu_mul(gu, out=act)

    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for buf in (out, res_out, act, *qkv_out):
        buf.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    ref_out, ref_res = rms_norm_reference(x, w, 1e-6, res)
    _check(out, ref_out, dtype, "graph rms_norm")
    _check(res_out, ref_res, dtype, "graph residual")
    for g, r in zip(qkv_out, qk_norm_rope_reference(qkv, qw, kw, cos, sin, num_heads=32, num_kv_heads=8)):
        _check(g, r, dtype, "graph qk_norm_rope")
    _check(act, silu_mul_reference(gu), dtype, "graph silu_mul")
