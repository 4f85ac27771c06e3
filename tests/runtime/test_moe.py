"""The mixture-of-experts MLP: routing as Qwen3-MoE and LLaDA2.0 define it, the grouped-GEMM experts
against the every-expert reference, the stored layout of expert and fused-QKV tensors, and MoE
configurations that disagree with themselves or with their tensors refused before weights load."""
from __future__ import annotations

import json

import pytest
import torch

from runtime import Engine, EngineConfig
from runtime.checkpoint import load_model, random_model, save_checkpoint
from runtime.config import ModelConfig, MoeConfig, SparseConfig
from runtime.engine import resolve_settings
from runtime.moe import experts_reference, grouped_experts, route
from tests.runtime.real_family_code import LLADA2_MINI, SDAR_MOE_KEYS, SMALL_MOE, reference_file, small_config
from tests.runtime.weights import perturb

# fp32 on the CPU: the grouped GEMM and the reference differ only in summation order
TOL = 1e-5


def qwen3_moe_config(**changes) -> dict:
    return small_config({**SDAR_MOE_KEYS, "model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"]},
                        **{**SMALL_MOE, "mask_token_id": 250, "block_size": 4, **changes})


def llada2_config(**changes) -> dict:
    return small_config(LLADA2_MINI, **{**SMALL_MOE, "n_group": 4, "topk_group": 2, "mask_token_id": 250, **changes})


def routing_by_hand(logits: torch.Tensor, moe: MoeConfig, bias: torch.Tensor | None) -> tuple[list, list]:
    """Route one token at a time from the definitions (Qwen3-MoE's softmax top-k; LLaDA2.0's
    choice on score + bias within the groups whose two best experts sum highest, weights from the
    unbiased scores)."""
    experts, weights = [], []
    per_group = moe.num_experts // moe.num_groups
    for row in logits:
        scores = row.softmax(-1) if moe.score == "softmax" else row.sigmoid()
        rank = (scores + (bias if bias is not None else 0)).tolist()

        def group_score(g: int) -> float:
            return sum(sorted(rank[g * per_group:(g + 1) * per_group], reverse=True)[:2])

        groups = sorted(range(moe.num_groups), key=group_score, reverse=True)[:moe.groups_per_token]
        allowed = [e for g in groups for e in range(g * per_group, (g + 1) * per_group)]
        chosen = sorted(allowed, key=lambda e: -rank[e])[:moe.experts_per_token]
        w = torch.stack([scores[e] for e in chosen])
        if moe.normalize_weights:
            w = w / w.sum()
        experts.append(sorted(chosen))
        weights.append({e: float(x) * moe.routed_scaling for e, x in zip(chosen, w)})
    return experts, weights


@pytest.mark.parametrize("moe", [
    MoeConfig(8, 2, 16, (0,), normalize_weights=True),  # Qwen3-MoE, norm_topk_prob
    MoeConfig(8, 3, 16, (0,)),  # Qwen3-MoE without renormalising
    MoeConfig(16, 4, 16, (0,), score="sigmoid", normalize_weights=True, num_groups=4, groups_per_token=2,
              routed_scaling=2.5, expert_bias=True),  # LLaDA2.0
], ids=["softmax-normalised", "softmax", "sigmoid-grouped"])
def test_routing_follows_the_definition(moe):
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(11, 24, generator=gen), torch.randn(moe.num_experts, 24, generator=gen)
    bias = 0.3 * torch.randn(moe.num_experts, generator=gen) if moe.expert_bias else None
    experts, weights = route(x, w, moe, bias)
    want_experts, want_weights = routing_by_hand(x @ w.T, moe, bias)
    assert experts.shape == weights.shape == (11, moe.experts_per_token)
    for row in range(11):
        assert sorted(experts[row].tolist()) == want_experts[row]
        for e, weight in zip(experts[row].tolist(), weights[row].tolist()):
            assert weight == pytest.approx(want_weights[row][e], rel=1e-5)


def test_grouped_choice_keeps_to_the_best_groups():
    moe = MoeConfig(8, 2, 16, (0,), score="sigmoid", num_groups=4, groups_per_token=1)
    logits = torch.full((8,), -5.0)
    logits[[0, 6]] = 5.0  # the two best experts lie in different groups ...
    logits[7] = 4.0  # ... and group 3 (experts 6, 7) has the best pair
    router = torch.zeros(8, 4)
    router[:, 0] = logits  # the token [1, 0, 0, 0] scores exactly `logits`
    experts, _ = route(torch.tensor([[1.0, 0.0, 0.0, 0.0]]), router, moe)
    assert sorted(experts[0].tolist()) == [6, 7]


@pytest.mark.parametrize("tokens,experts,k", [(1, 4, 1), (7, 8, 2), (33, 16, 4), (64, 8, 8)])
def test_grouped_experts_match_the_reference(tokens, experts, k):
    """Ragged groups included: few tokens over many experts leave most experts with none."""
    gen = torch.Generator().manual_seed(tokens)
    hidden, inter = 24, 20
    x = torch.randn(tokens, hidden, generator=gen)
    gate_up = torch.randn(experts, 2 * inter, hidden, generator=gen) / hidden ** 0.5
    down = torch.randn(experts, hidden, inter, generator=gen) / inter ** 0.5
    chosen = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k, generator=gen)
    ours = grouped_experts(x, chosen, weights, gate_up, down)
    want = experts_reference(x, chosen, weights, gate_up, down)
    err = ((ours - want).norm() / want.norm()).item()
    assert err < TOL, f"grouped experts differ from the reference by {err:.2e}"
    # and a token's result does not depend on the other tokens in the batch
    alone = grouped_experts(x[-1:], chosen[-1:], weights[-1:], gate_up, down)
    torch.testing.assert_close(alone, ours[-1:], rtol=TOL, atol=TOL)


@pytest.mark.parametrize("make", [qwen3_moe_config, llada2_config], ids=["qwen3_moe", "llada2"])
def test_checkpoint_round_trip_in_the_family_layout(make, tmp_path):
    cfg = make()
    model = random_model(ModelConfig.from_hf(cfg), seed=1)
    perturb(model, seed=2)
    save_checkpoint(model, cfg, tmp_path)
    loaded, config = load_model(tmp_path)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    stored = set(json.loads((tmp_path / "model.safetensors").read_bytes()[8:8 + int.from_bytes(
        (tmp_path / "model.safetensors").read_bytes()[:8], "little")]))
    assert "model.layers.1.mlp.experts.7.up_proj.weight" in stored and "model.layers.1.mlp.gate.weight" in stored
    assert not any(".experts.gate_up_proj" in name or ".router." in name for name in stored)
    if config.architecture == "llada2_moe":
        assert {"model.word_embeddings.weight", "model.layers.0.attention.query_key_value.weight",
                "model.layers.1.mlp.gate.expert_bias", "model.layers.1.mlp.shared_experts.up_proj.weight"} <= stored
        assert "model.layers.0.mlp.gate_proj.weight" in stored  # first_k_dense_replace: a dense first layer
        assert config.rope_dim == config.head_dim // 2


@pytest.mark.parametrize("make", [qwen3_moe_config, llada2_config], ids=["qwen3_moe", "llada2"])
@pytest.mark.parametrize("mode", ["dense", "mage", "quest", "herald"])
def test_moe_models_decode_in_every_mode(make, mode, tmp_path):
    cfg = make()
    model = random_model(ModelConfig.from_hf(cfg), seed=3)
    perturb(model, seed=4)
    save_checkpoint(model, cfg, tmp_path)
    sparse = SparseConfig(page_size=4, sink_tokens=4, local_window=8, compact_group=16, budget_fraction=0.5)
    engine = Engine(EngineConfig(model_path=str(tmp_path), mode=mode, device="cpu", dtype="float32", progress=False,
                                 block_size=4, denoising_steps=4, max_batch_size=2, sparse=sparse))
    results = engine.generate([list(range(3, 40)), list(range(50, 61))], max_new_tokens=8, stop_at_eos=False)
    assert [len(r.tokens) for r in results] == [8, 8]
    assert all(0 <= t < cfg["vocab_size"] for r in results for t in r.tokens)


@pytest.mark.parametrize("changes,match", [
    ({"num_experts_per_tok": 9}, r"num_experts_per_tok=9 must be in \[1, num_experts=8\]"),
    ({"moe_intermediate_size": None}, r"lacks \['moe_intermediate_size'\]"),
    ({"mlp_only_layers": [5]}, r"mlp_only_layers names layers \[5\] outside the model's 2"),
    ({"decoder_sparse_step": 0}, r"decoder_sparse_step=0 must be >= 1"),
])
def test_inconsistent_qwen3_moe_keys_are_refused(changes, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf(qwen3_moe_config(**changes))


@pytest.mark.parametrize("changes,match", [
    ({"n_group": 3}, r"n_group=3 must divide num_experts=8"),
    ({"topk_group": 5}, r"topk_group=5 must be in \[1, n_group=4\]"),
    ({"topk_group": 1, "num_experts_per_tok": 3}, r"num_experts_per_tok=3 exceeds the 2 experts of topk_group=1"),
    ({"score_function": "relu"}, r"score_function='relu'; supported"),
])
def test_inconsistent_llada2_keys_are_refused(changes, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf(llada2_config(**changes))


def test_moe_keys_on_a_dense_family_are_refused():
    cfg = small_config({**SDAR_MOE_KEYS, "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]})
    with pytest.raises(ValueError, match="num_experts=128, but model_type='qwen3' .* is a dense model"):
        ModelConfig.from_hf(cfg)


@pytest.mark.parametrize("changes", [{"num_experts": 6}, {"moe_intermediate_size": 24}, {"mlp_only_layers": []}],
                         ids=["fewer-experts", "expert-width", "sparse-layers"])
def test_moe_keys_that_disagree_with_the_tensors_are_refused_before_loading(changes, tmp_path):
    cfg = qwen3_moe_config(mlp_only_layers=[0])
    save_checkpoint(random_model(ModelConfig.from_hf(cfg)), cfg, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, **changes}))
    with pytest.raises(ValueError, match="the MoE keys decide which expert tensors exist .* correct them"):
        load_model(tmp_path)


@pytest.mark.parametrize("cfg,family,settings", [
    # SDAR's hub config.json with Qwen3-30B-A3B's MoE keys: SDAR's numbers
    (lambda: {**json.loads(reference_file("sdar", "config copy.json").read_text()), **SDAR_MOE_KEYS}, "sdar_moe",
     (4, 4, 0.9, 151669)),
    (lambda: LLADA2_MINI, "llada2_moe", (32, 32, 0.95, 156895)),  # LLaDA2.0's generate() defaults
], ids=["sdar_moe", "llada2"])
def test_moe_families_are_recognised_with_their_decoding_defaults(cfg, family, settings):
    config = ModelConfig.from_hf(cfg())  # the real geometry: no weights are needed to decide
    assert config.family == family and config.moe is not None
    s = resolve_settings(EngineConfig(model_path="<test>"), config, None)
    assert (s.block_size, s.steps, s.threshold, s.mask_token_id) == settings
    assert s.rule == "sdar" and not s.prompt_causal


@pytest.mark.gpu
@pytest.mark.parametrize("tokens,experts,k", [(1, 8, 2), (96, 128, 8), (257, 256, 8)])
def test_grouped_experts_in_bf16_on_the_gpu(tokens, experts, k):
    """torch's grouped GEMM (bf16, CUDA) against the fp32 reference, per token: bf16 rounding of the
    inputs and the intermediate activations, 2e-2 relative (a dropped expert is off by ~1/k)."""
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    hidden, inter = 256, 128
    x = torch.randn(tokens, hidden, device="cuda", generator=gen).bfloat16()
    gate_up = (torch.randn(experts, 2 * inter, hidden, device="cuda", generator=gen) / hidden ** 0.5).bfloat16()
    down = (torch.randn(experts, hidden, inter, device="cuda", generator=gen) / inter ** 0.5).bfloat16()
    chosen = torch.rand(tokens, experts, device="cuda", generator=gen).topk(k, dim=-1).indices
    weights = torch.rand(tokens, k, device="cuda", generator=gen)
    ours = grouped_experts(x, chosen, weights, gate_up, down).float()
    want = experts_reference(x.float(), chosen, weights, gate_up.float(), down.float())
    err = (ours - want).norm(dim=-1) / want.norm(dim=-1)
    assert err.max().item() < 2e-2, f"worst token {err.argmax().item()}: {err.max().item():.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("make", [qwen3_moe_config, llada2_config], ids=["qwen3_moe", "llada2"])
@pytest.mark.parametrize("mode", ["dense", "herald"])
def test_moe_decode_replays_from_cuda_graphs_as_it_runs_eagerly(make, mode, tmp_path):
    """The routing and grouped GEMMs never sync with the host: a pass captured in a CUDA graph
    gives the tokens of the eager pass (bf16, the fused layers)."""
    cfg = make()
    model = random_model(ModelConfig.from_hf(cfg), seed=5)
    perturb(model, seed=6)
    save_checkpoint(model, cfg, tmp_path)
    sparse = SparseConfig(page_size=16, sink_tokens=16, local_window=32, budget_fraction=0.5)
    prompts = [list(range(3, 200)), list(range(20, 90))]
    runs = []
    for graphs in (False, True):
        engine = Engine(EngineConfig(model_path=str(tmp_path), mode=mode, device="cuda", dtype="bfloat16",
                                     progress=False, block_size=4, denoising_steps=4, max_batch_size=2,
                                     cuda_graphs=graphs, sparse=sparse))
        runs.append([r.tokens for r in engine.generate(prompts, max_new_tokens=16, stop_at_eos=False)])
    assert runs[0] == runs[1]
    assert all(len(tokens) == 16 for tokens in runs[0])
