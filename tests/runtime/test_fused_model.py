"""The fused layer path (`Transformer.set_fused(True)`) against the plain one, the reference.

Tiny random models with weights far from init (norms != 1, nonzero biases): a Qwen3 (q/k norm,
untied, GQA 2), a Qwen2 with q/k/v biases (tied, GQA 4, head_dim 12: a non-power-of-two half),
and a Qwen3 with attention_bias. On the CPU the kernels run in Triton's interpreter.
Tolerance: relative error ||fused - plain|| / ||plain|| of the logits < 1e-5 in fp32, 1e-12 in
fp64 (the kernels differ from torch only by rounding inside an operation). On a GPU, bf16:
fused within 5e-2 of plain and no further from the fp32 logits than 1.5x plain's distance + 1e-3.
"""
from __future__ import annotations

import copy

import pytest
import torch

from runtime import Engine, EngineConfig
from runtime.attention import MaskedAttention, block_diffusion_mask
from runtime.config import ModelConfig, RopeConfig
from runtime.model import Transformer, expected_tensor_shapes
from tests.runtime.weights import perturb

TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
VOCAB, MASK, EOS = 61, 60, 59

CASES = {
    "qwen3": ModelConfig(architecture="qwen3", vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=32, max_position_embeddings=512,
                         rope=RopeConfig(theta=1e6), qk_norm=True, mask_token_id=MASK, block_size=4,
                         eos_token_ids=(EOS,)),
    "qwen2_bias": ModelConfig(architecture="qwen2", vocab_size=VOCAB, hidden_size=48, intermediate_size=80,
                              num_layers=2, num_heads=4, num_kv_heads=1, head_dim=12, max_position_embeddings=512,
                              rope=RopeConfig(theta=1e4, rope_type="linear", factor=2.0), tie_word_embeddings=True,
                              attention_bias=True, mask_token_id=MASK, block_size=4, eos_token_ids=(EOS,)),
    "qwen3_bias": ModelConfig(architecture="qwen3", vocab_size=VOCAB, hidden_size=32, intermediate_size=40,
                              num_layers=1, num_heads=2, num_kv_heads=2, head_dim=16, max_position_embeddings=512,
                              qk_norm=True, attention_bias=True, mask_token_id=MASK, block_size=4),
}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def tiny_model(config: ModelConfig, dtype=torch.float32, device="cpu", seed=0) -> Transformer:
    model = Transformer(config).to(device=device, dtype=dtype).eval()
    perturb(model, seed)
    return model


def batch(seq_len=13, prefix=8, n=2, start=5, seed=3, device="cpu"):
    ids = torch.randint(0, VOCAB, (n, seq_len), generator=torch.Generator().manual_seed(seed)).to(device)
    positions = (start + torch.arange(seq_len, device=device))[None].expand(n, -1)
    return ids, positions, MaskedAttention(block_diffusion_mask(seq_len, prefix, 4, True).to(device))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", list(CASES))
def test_fused_logits_match_plain(case, dtype):
    model = tiny_model(CASES[case], dtype)
    ids, positions, attention = batch()
    with torch.no_grad():
        plain = model(ids, positions, attention)
        model.set_fused(True)
        fused = model(ids, positions, attention)
        assert model(ids, positions, attention, need_logits=False) is None
    assert fused.dtype == torch.float32 and fused.shape == plain.shape
    assert rel(fused, plain) < TOL[dtype], f"relative error {rel(fused, plain):.2e}"


@pytest.mark.parametrize("case", ["qwen3", "qwen2_bias"])
def test_switch_keeps_parameters_state_dict_and_ties(case):
    config = CASES[case]
    model = tiny_model(config)
    ids, positions, attention = batch()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    with torch.no_grad():
        before = model(ids, positions, attention)

    model.set_fused(True)
    assert model.fused
    after = model.state_dict()
    assert list(after) == list(state) and all(torch.equal(after[k], state[k]) for k in state)
    assert {k: tuple(v.shape) for k, v in after.items() if k in expected_tensor_shapes(config)} == \
        expected_tensor_shapes(config)
    assert all(p is params[k] for k, p in model.named_parameters())
    if config.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    hq, hkv, d = config.num_heads, config.num_kv_heads, config.head_dim
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        assert attn.fused_weight.shape == ((hq + 2 * hkv) * d, config.hidden_size)
        assert mlp.fused_weight.shape == (2 * config.intermediate_size, config.hidden_size)
        assert (attn.fused_bias is not None) == config.attention_bias and mlp.fused_bias is None
        # The parameters view the concatenations: no second copy of the weights.
        for linear, fused in ((attn.q_proj, attn.fused_weight), (attn.v_proj, attn.fused_weight),
                              (mlp.up_proj, mlp.fused_weight)):
            assert linear.weight.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()
        if config.attention_bias:
            assert attn.k_proj.bias.untyped_storage().data_ptr() == attn.fused_bias.untyped_storage().data_ptr()

    model.set_fused(False)
    assert not model.fused
    for layer in model.model.layers:
        attn = layer.self_attn
        assert attn.fused_weight is None and layer.mlp.fused_weight is None
        assert attn.q_proj.weight.untyped_storage().data_ptr() != attn.k_proj.weight.untyped_storage().data_ptr()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(ids, positions, attention), before)


def test_fused_survives_cast_and_state_dict_loads():
    config = CASES["qwen2_bias"]
    model = tiny_model(config)
    model.set_fused(True)
    ids, positions, attention = batch()

    model.to(torch.float64)  # _apply rebuilds the concatenations in the new dtype
    assert model.fused and model.model.layers[0].self_attn.fused_weight.dtype == torch.float64
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.untyped_storage().data_ptr() == attn.fused_weight.untyped_storage().data_ptr()
    reference = tiny_model(config).to(torch.float64)  # the same fp32-rounded weights, plain path
    with torch.no_grad():
        assert rel(model(ids, positions, attention), reference(ids, positions, attention)) < TOL[torch.float64]

    other = tiny_model(config, torch.float64, seed=7)
    for assign in (False, True):  # copied into the views / new tensors assigned, then concatenated again
        model.load_state_dict(copy.deepcopy(other.state_dict()), assign=assign)
        model.tie_weights()
        assert attn.q_proj.weight.untyped_storage().data_ptr() == attn.fused_weight.untyped_storage().data_ptr()
        with torch.no_grad():
            got, want = model(ids, positions, attention), other(ids, positions, attention)
        assert rel(got, want) < TOL[torch.float64], f"assign={assign}: {rel(got, want):.2e}"


def test_fused_path_refuses_autograd():
    model = tiny_model(CASES["qwen3_bias"]).requires_grad_(True)
    model.set_fused(True)
    ids, positions, attention = batch()
    with pytest.raises(RuntimeError, match="inference only"):
        model(ids, positions, attention)
    with torch.no_grad():
        model(ids, positions, attention)


def test_engine_generates_the_same_tokens_fused():
    """Prefill (need_logits=False: the last layer's MLP is skipped), denoising and commits through the
    engine's KV cache, fp64: the fused model gives the plain model's tokens."""
    model = tiny_model(CASES["qwen3"], torch.float64)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, VOCAB - 2, (n,), generator=gen).tolist() for n in (13, 6)]
    config = EngineConfig(model_path="unused", mode="dense", device="cpu", dtype="float64", progress=False,
                          unmasking="fixed", max_batch_size=2, prefill_chunk_size=8)

    def tokens():
        results = Engine(config, model=model).generate(prompts, max_new_tokens=4, stop_at_eos=False)
        return [r.tokens for r in results]

    plain = tokens()
    model.set_fused(True)
    assert tokens() == plain


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["qwen3", "qwen2_bias"])
def test_gpu_bf16_fused_tracks_plain_and_replays_from_a_graph(case):
    base = CASES[case]
    # Real head sizes, a few layers, hidden not a power of two for the Qwen2 case.
    config = ModelConfig(**{**base.__dict__, "hidden_size": 384, "intermediate_size": 1000, "num_layers": 3,
                            "num_heads": 6, "num_kv_heads": 2 if base.qk_norm else 1,
                            "head_dim": 128 if base.qk_norm else 64})
    ref_model = tiny_model(config, torch.float32, "cuda")
    with torch.no_grad():
        for name, p in ref_model.named_parameters():
            if not name.endswith("norm.weight"):
                p.mul_(0.15)  # near Qwen's init scale: bf16 logits ~1e-2 off fp32's
    model = copy.deepcopy(ref_model).to(torch.bfloat16)
    ids, positions, attention = batch(seq_len=40, prefix=8, n=3, device="cuda")
    with torch.no_grad():
        ref = ref_model(ids, positions, attention)
        plain = model(ids, positions, attention)
        model.set_fused(True)
        fused = model(ids, positions, attention)
    assert rel(fused, plain) < 5e-2, f"fused vs plain bf16: {rel(fused, plain):.2e}"
    assert rel(fused, ref) < 1.5 * rel(plain, ref) + 1e-3, (rel(fused, ref), rel(plain, ref))

    static_ids = ids.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad():
        model(static_ids, positions, attention)  # compiled and warm before capture
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            out = model(static_ids, positions, attention)
        static_ids.copy_(torch.randint(0, VOCAB, ids.shape, generator=torch.Generator().manual_seed(9)).cuda())
        graph.replay()
        torch.cuda.synchronize()
        eager = model(static_ids, positions, attention)
    assert rel(out, eager) < 1e-3 and rel(eager, fused) > 0.1  # the replay read the new ids
