"""fp8 KV (`EngineConfig.kv_format="fp8_e4m3"`) at the engine level, on the CPU with the bundled
trained model (checkpoints/retrieval-6m, 8 layers, 4 KV heads of 32 dims): dense keeps e4m3 pages
with per-(page, head) scales resident, herald keeps them in its host store; both read them through
the same dequantizing paths (torch on the CPU, the Triton kernels on CUDA).

Tolerances: e4m3 rounds each K/V element to 3 mantissa bits (relative error <= 1/16 of the page's
largest value in its binade), and one scale per (page, head) covers every channel, so small key
channels beside large ones round coarsely. Measured on this model (CPU, fp32 compute, random-token
prompts of 160-400 tokens, 9 cases): the next block's logits move by 4.5-18% normwise against the
unquantized cache (bf16 K/V: 0.5-1.3%), the argmax of 50-100% of the positions stays. The bounds
below are 25% and half the positions: fp8's cost, not a fine check; the task-level cost is
`benchmarks.accuracy --kv-format`'s to measure. With the whole context selected (budget 1) herald
attends to exactly dense's fp8 context, so its logits equal dense-fp8's to fp32 rounding.
"""
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from runtime import Engine, EngineConfig  # noqa: E402
from runtime.attention import DenseAttention, ForwardBatch, Phase  # noqa: E402
from runtime.checkpoint import load_model  # noqa: E402
from runtime.config import SparseConfig  # noqa: E402
from runtime.herald import HeraldAttention  # noqa: E402
from runtime.memory import plan_memory  # noqa: E402

MODEL = Path(__file__).resolve().parents[2] / "checkpoints" / "retrieval-6m"
CPU = torch.device("cpu")
FULL = SparseConfig(budget_fraction=1.0, page_size=16, lookahead=False)


@pytest.fixture(scope="module")
def model():
    model, _ = load_model(MODEL, dtype=torch.float32)
    return model


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).norm() / ref.norm())


def block_logits(model, mode, ids: torch.Tensor, prefix: int, block: int) -> torch.Tensor:
    """Prefill ids[:, :prefix] into `mode`, then one denoising step of the next block: its logits
    [N, block, vocab], then the mode is closed."""
    n = ids.shape[0]
    for s in range(n):
        mode.add_sequence(s, prefix + block)

    def run(phase: Phase, begin: int, length: int) -> torch.Tensor | None:
        batch = ForwardBatch(phase, tuple(range(n)), torch.full((n,), begin, dtype=torch.int64), length, block)
        mode.plan(batch)
        with torch.no_grad():
            return model(ids[:, begin:begin + length], batch.positions("cpu"), mode, need_logits=phase is Phase.DENOISE)

    for begin in range(0, prefix, 64):  # chunks: later ones read the context the earlier wrote
        run(Phase.PREFILL, begin, min(64, prefix - begin))
    logits = run(Phase.DENOISE, prefix, block)
    mode.close()
    return logits


@pytest.mark.parametrize("prefix", [160, 203])  # whole pages, and a last page half written
def test_fp8_logits_are_close_to_the_model_dtype_and_herald_matches_dense(model, prefix):
    cfg = model.config
    ids = torch.randint(2, cfg.vocab_size, (2, prefix + 4), generator=torch.Generator().manual_seed(prefix))
    tokens = prefix + 4

    def dense(kv_dtype):
        return DenseAttention(cfg, 2, tokens, 16, torch.float32, CPU, kv_dtype=kv_dtype)

    exact = block_logits(model, dense(None), ids, prefix, 4)
    fp8 = block_logits(model, dense(torch.float8_e4m3fn), ids, prefix, 4)
    herald_fp8 = block_logits(model, HeraldAttention(cfg, 2, tokens, torch.float32, CPU, "torch", FULL,
                                                     kv_dtype=torch.float8_e4m3fn), ids, prefix, 4)
    assert 0 < rel(fp8, exact) < 0.25
    assert (fp8.argmax(-1) == exact.argmax(-1)).float().mean() >= 0.5
    assert rel(herald_fp8, fp8) < 1e-5


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_fp8_generation_runs_in_dense_and_herald(device):
    """Generation end to end with fp8 K/V in both modes that take it (on CUDA: bf16, the Triton
    kernels, CUDA graphs, herald's lookahead): every request finishes and every slot and page is
    given back; on the CPU (fp32, one summation order) herald over its whole context gives
    dense-fp8's tokens."""
    prompts = ["The key to the vault is 4821. The key to the vault is", "Once upon a time"]
    texts = {}
    sparse = FULL if device == "cpu" else SparseConfig(budget_fraction=1.0, page_size=16)
    for mode in ("dense", "herald"):
        engine = Engine(EngineConfig(model_path=str(MODEL), mode=mode, kv_format="fp8_e4m3", max_batch_size=2,
                                     progress=False, device=device, sparse=sparse))
        results = engine.generate(prompts, max_new_tokens=12)
        assert all(r.finish_reason in ("eos", "length") for r in results), [r.error for r in results]
        texts[mode] = [r.text for r in results]
        assert all(v == 0 for v in engine.last_occupancy.values()), engine.last_occupancy
    if device == "cpu":
        assert texts["herald"] == texts["dense"]


def test_kv_format_is_checked_naming_the_field():
    with pytest.raises(ValueError, match="kv_format='fp9'; choose one of"):
        EngineConfig(model_path="m", kv_format="fp9")
    with pytest.raises(ValueError, match="kv_format='fp8_e4m3' is not available in mode='mage'"):
        EngineConfig(model_path="m", mode="mage", kv_format="fp8_e4m3")
    with pytest.raises(ValueError, match="needs SparseConfig\\(source='gpu-compact'\\)"):
        EngineConfig(model_path="m", mode="herald", kv_format="fp8_e4m3", sparse=SparseConfig(source="cpu"))


def test_the_planner_halves_kv_bytes_with_fp8(model):
    """Host bytes per token halve for herald (the scales sit on the GPU), dense's GPU cache nearly
    halves (plus 8 bytes of scales per page and KV head of every layer)."""
    cfg, sparse = model.config, SparseConfig(lookahead=False)
    plans = {(mode, fmt): plan_memory(cfg, mode, sparse, 4, 8192, torch.bfloat16, CPU, 4, 512,
                                      gpu_free=2**40, host_free=2**40, kv_format=fmt)
             for mode in ("dense", "herald") for fmt in ("model", "fp8_e4m3")}
    store = 4 * 8192 * 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2  # bf16 bytes of the batch's KV
    scales = 4 * (8192 // 16) * cfg.num_kv_heads * cfg.num_layers * 8
    # on the CPU the planner puts the "GPU" side in host memory too: compare the KV terms
    assert plans["herald", "model"].host_bytes - plans["herald", "model"].gpu_kv_bytes == store
    assert plans["herald", "fp8_e4m3"].host_bytes - plans["herald", "fp8_e4m3"].gpu_kv_bytes == store // 2
    assert plans["dense", "model"].gpu_kv_bytes == store
    assert plans["dense", "fp8_e4m3"].gpu_kv_bytes == store // 2 + scales
