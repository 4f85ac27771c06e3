"""The project's Qwen2/Qwen3 forward against transformers' on tiny random checkpoints.

Both sides see the same whole sequence under the block-diffusion mask: ours through
MaskedAttention, transformers' as a 4D additive float mask (transformers 5.x passes a 4D
attention_mask through its mask builder unchanged and the eager kernel adds it to the scores).
Tolerance: relative error ||ours - ref|| / ||ref|| of the logits < 1e-4 in fp32.
"""
from __future__ import annotations

import copy

import pytest
import torch

from runtime.attention import (DenseAttention, ForwardBatch, MaskedAttention, Phase, block_diffusion_mask)
from runtime.checkpoint import load_model
from runtime.config import ModelConfig, RopeConfig
from runtime.model import Transformer, rope_frequencies
from tests.runtime.weights import perturb

transformers = pytest.importorskip("transformers")
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM  # noqa: E402

TOL = 1e-4
BLOCK = 4
BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=256, rms_norm_eps=1e-6, attn_implementation="eager")

# name: (config class, model class, config overrides, first position, save shard size)
CASES = {
    "qwen2_bias_tied_gqa2": (Qwen2Config, Qwen2ForCausalLM,
                             dict(num_key_value_heads=2, tie_word_embeddings=True,
                                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0}), 0, None),
    "qwen3_qknorm_untied_gqa1": (Qwen3Config, Qwen3ForCausalLM,
                                 dict(num_key_value_heads=4, head_dim=16, tie_word_embeddings=False,
                                      rope_parameters={"rope_type": "default", "rope_theta": 1e6}), 0, None),
    "qwen3_yarn_sharded": (Qwen3Config, Qwen3ForCausalLM,
                           dict(num_key_value_heads=2, head_dim=16, tie_word_embeddings=False,
                                rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                                 "original_max_position_embeddings": 64}), 60, "60KB"),
    "qwen2_linear_gqa4": (Qwen2Config, Qwen2ForCausalLM,
                          dict(num_key_value_heads=1, tie_word_embeddings=False,
                               rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}), 20, None),
    "qwen3_llama3_bias": (Qwen3Config, Qwen3ForCausalLM,
                          dict(num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, attention_bias=True,
                               rope_parameters={"rope_type": "llama3", "factor": 4.0, "rope_theta": 10000.0,
                                                "original_max_position_embeddings": 64, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0}), 40, None),
}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    """(transformers model, our model, first position) for one case, loaded from a saved directory."""
    config_cls, model_cls, overrides, start, shard = CASES[request.param]
    torch.manual_seed(0)
    hf = model_cls(config_cls(**BASE, **overrides)).eval()
    perturb(hf, seed=1)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    if shard:
        assert (path / "model.safetensors.index.json").is_file() and len(list(path.glob("*.safetensors"))) > 1
    ours, config = load_model(path)
    assert config.tie_word_embeddings == overrides["tie_word_embeddings"]
    assert config.rope.rope_type == overrides["rope_parameters"]["rope_type"]
    return hf, ours, start


def _hf_logits(hf, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    additive = None
    if mask is not None:
        additive = torch.zeros(mask.shape, dtype=torch.float32).masked_fill(~mask, float("-inf"))
        additive = additive[None, None].expand(ids.shape[0], 1, -1, -1)
    with torch.no_grad():
        return hf(input_ids=ids, position_ids=positions, attention_mask=additive).logits.float()


@pytest.mark.parametrize("prompt_causal", [True, False])
@pytest.mark.parametrize("seq_len,prefix_len", [(7, 4), (13, 8), (30, 12)])
def test_matches_transformers_under_block_diffusion_mask(pair, seq_len, prefix_len, prompt_causal):
    hf, ours, start = pair
    gen = torch.Generator().manual_seed(seq_len)
    ids = torch.randint(0, hf.config.vocab_size, (2, seq_len), generator=gen)
    positions = (start + torch.arange(seq_len))[None].expand(2, -1)
    mask = block_diffusion_mask(seq_len, prefix_len, BLOCK, prompt_causal)

    with torch.no_grad():
        got = ours(ids, positions, MaskedAttention(mask))
    ref = _hf_logits(hf, ids, positions, mask)
    assert got.dtype == torch.float32 and got.shape == (2, seq_len, hf.config.vocab_size)
    assert rel(got, ref) < TOL, f"relative error {rel(got, ref):.2e}"
    # The custom mask really reached transformers' attention: plain causal gives other logits.
    assert rel(_hf_logits(hf, ids, positions, None), ref) > 1e-3


def test_low_precision_dtypes_track_fp32(pair, tmp_path):
    hf, ours, start = pair
    ids = torch.randint(0, hf.config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(3))
    positions = (start + torch.arange(13))[None].expand(2, -1)
    attention = MaskedAttention(block_diffusion_mask(13, 8, BLOCK, True))
    with torch.no_grad():
        ref = ours(ids, positions, attention)
        for dtype, tol in [(torch.float64, 1e-5), (torch.bfloat16, 5e-2), (torch.float16, 1e-2)]:
            low = copy.deepcopy(ours).to(dtype)
            assert low.dtype == dtype
            got = low(ids, positions, attention)
            assert got.dtype == torch.float32
            assert rel(got, ref) < tol, f"{dtype}: relative error {rel(got, ref):.2e}"
        assert ours(ids, positions, attention, need_logits=False) is None


def test_dense_cache_passes_match_whole_sequence_forward(pair):
    """Prefill, denoise, commit, denoise through DenseAttention = one masked forward of the sequence."""
    hf, ours, _ = pair
    prefix, n = 8, 2
    ids = torch.randint(0, hf.config.vocab_size, (n, prefix + 2 * BLOCK), generator=torch.Generator().manual_seed(5))
    for prompt_causal in (True, False):
        whole_mask = block_diffusion_mask(prefix + 2 * BLOCK, prefix, BLOCK, prompt_causal)
        with torch.no_grad():
            whole = ours(ids, torch.arange(ids.shape[1])[None].expand(n, -1), MaskedAttention(whole_mask))
        dense = DenseAttention(ours.config, max_sequences=n, max_tokens=64, page_size=4, dtype=torch.float32,
                               device=torch.device("cpu"))
        for s in range(n):
            dense.add_sequence(s, 64)

        def run(phase: Phase, begin: int, length: int, visibility: int) -> torch.Tensor | None:
            batch = ForwardBatch(phase, tuple(range(n)), torch.full((n,), begin, dtype=torch.int64), length, visibility)
            dense.plan(batch)
            with torch.no_grad():
                return ours(ids[:, begin:begin + length], batch.positions("cpu"), dense,
                            need_logits=phase is Phase.DENOISE)

        assert run(Phase.PREFILL, 0, prefix, 1 if prompt_causal else BLOCK) is None
        for b in range(2):
            begin = prefix + b * BLOCK
            got = run(Phase.DENOISE, begin, BLOCK, BLOCK)
            assert rel(got, whole[:, begin:begin + BLOCK]) < TOL
            run(Phase.COMMIT, begin, BLOCK, BLOCK)
        dense.close()


@pytest.mark.parametrize("rope_parameters", [
    {"rope_type": "default", "rope_theta": 1e6},
    {"rope_type": "linear", "factor": 8.0, "rope_theta": 5e5},
    {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6, "original_max_position_embeddings": 32768},
    {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4, "original_max_position_embeddings": 2048,
     "beta_fast": 16, "beta_slow": 2, "mscale": 1.0, "mscale_all_dim": 0.5, "truncate": False},
    {"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5, "original_max_position_embeddings": 8192,
     "low_freq_factor": 1.0, "high_freq_factor": 4.0},
])
def test_rope_frequencies_match_transformers(rope_parameters):
    """inv_freq and the cos/sin factor at real geometry (head_dim 128), against transformers' own init."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    hf_cfg = Qwen3Config(head_dim=128, hidden_size=1024, num_attention_heads=8, num_key_value_heads=8,
                         max_position_embeddings=131072,
                         rope_parameters=dict(rope_parameters))
    kind = rope_parameters["rope_type"]
    init = Qwen3RotaryEmbedding.compute_default_rope_parameters if kind == "default" else ROPE_INIT_FUNCTIONS[kind]
    ref_inv, ref_factor = init(hf_cfg)
    config = ModelConfig.from_hf(hf_cfg.to_dict())
    inv, factor = rope_frequencies(config.head_dim, config.rope, config.max_position_embeddings)
    assert config.rope == RopeConfig.from_hf(hf_cfg.to_dict())
    assert torch.allclose(inv.float(), ref_inv.float(), rtol=1e-6, atol=0)
    assert factor == pytest.approx(ref_factor, rel=1e-12)


def test_parameter_names_match_transformers():
    for config_cls, model_cls, overrides, _, _ in CASES.values():
        hf = model_cls(config_cls(**BASE, **overrides))
        ours = Transformer(ModelConfig.from_hf(hf.config.to_dict()))
        assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in hf.state_dict().items()}
