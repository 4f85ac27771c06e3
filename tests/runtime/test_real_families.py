"""The project's forward and cached decoding against the real code of SDAR, TraDo, Fast-dLLM v2,
SDAR-MoE (transformers' Qwen3MoeForCausalLM) and LLaDA2.0.

Each family gets a small random checkpoint written with its real config.json's keys (the hub's
SDAR file states no block size and no mask: the family's defaults fill in) and the tensor names
its modeling code loads strictly. On the CPU in fp32:
- logits: the project's model under the block-diffusion mask against the family's modeling code
  under its own mask, relative error < 1e-4;
- greedy tokens: the engine's cached loop, in every attention mode (the sparse ones at a 100%
  budget), against the family's own decoding rule run on its own model and KV cache
  (real_family_runner.py says which code that is), on prompts shorter than a block, ending on a
  block boundary, and whose tail shares a block with the first generated tokens;
- a stop token: both stop at it with the same tokens before it.
Fast-dLLM v2's generate() prefills only prompts longer than a block: a prompt of exactly one
block never reaches its cache (the runtime prefills it), so no prompt here has that length.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import pytest
import torch

from runtime import Engine, EngineConfig
from runtime.attention import MaskedAttention, block_diffusion_mask
from runtime.checkpoint import load_model
from runtime.config import SparseConfig
from tests.runtime.real_family_code import (LLADA2_MINI, MASK, SDAR_MOE_KEYS, SMALL_MOE, VOCAB, make_checkpoint,
                                            real_config, reference_file, run_real_code, small_config)


class Case(NamedTuple):
    config: Callable[[], dict]  # the family's config.json at the small geometry
    modeling: tuple[str, ...] | None  # its modeling folder among the reference files (None: transformers')
    package: str  # what the runner calls it
    block: int
    threshold: float
    lengths: list[int]  # prompt lengths
    new: int  # tokens generated


FAMILIES = {
    # the hub's config.json: no block size, no mask id (the family's defaults: block 4, mask by EngineConfig)
    "sdar": Case(lambda: real_config("sdar", "config copy.json"), ("sdar",), "sdar", 4, 0.9, [3, 8, 13, 22], 24),
    # TraDo ships SDAR's code; SDAR-4B's geometry keys (head_dim independent of hidden / heads)
    "trado": Case(lambda: real_config("sdar", "sdar-4b-config.json", mask_token_id=MASK), ("trado-sdar-modeling",),
                  "trado", 4, 0.9, [5, 12, 17], 20),
    "fast_dllm_v2": Case(lambda: real_config("fast-dllm-v2-7b", "config.json"), ("fast-dllm-v2-7b",), "fast_dllm_v2",
                         32, 0.9, [5, 40, 64, 71], 70),
    # SDAR-30B-A3B: Qwen3-MoE keys and tensors, its first layer dense (mlp_only_layers)
    "sdar_moe": Case(lambda: real_config("sdar", "config copy.json",
                                                **{**SDAR_MOE_KEYS, **SMALL_MOE, "mlp_only_layers": [0]}),
                     None, "qwen3_moe", 4, 0.9, [3, 8, 13, 22], 24),
    # LLaDA2.0-mini's keys: 4 expert groups (2 a token), a shared expert, half the head dims rotated
    "llada2": Case(lambda: small_config(LLADA2_MINI, **{**SMALL_MOE, "n_group": 4, "topk_group": 2}),
                   ("llada2-moe",), "llada2", 32, 0.95, [5, 40, 64, 71], 70),
}
MODES = {
    "dense": {},
    "mage": {"budget_fraction": 1.0, "dense_layers": 0},
    "quest": {"budget_fraction": 1.0, "dense_layers": 0},
    "herald": {"budget_fraction": 1.0, "dense_layers": 0, "source": "gpu-compact"},
}

def prompts(lengths: list[int], seed: int = 3) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, MASK - 10, (n,), generator=g).tolist() for n in lengths]


def engine(path, mode: str = "dense", **changes) -> Engine:
    sparse = SparseConfig(page_size=4, sink_tokens=4, local_window=8, compact_group=16, check_residency=True,
                          **MODES[mode])
    return Engine(EngineConfig(model_path=str(path), mode=mode, device="cpu", dtype="float32", progress=False,
                               mask_token_id=MASK, max_batch_size=2, prefill_chunk_size=64, sparse=sparse, **changes))


def first_repeat_free_stop(tokens: list[int]) -> tuple[int, int]:
    """A token of a run to stop at, and where it first appears: the first whose first appearance
    lies past a quarter of the run."""
    for i, tok in enumerate(tokens):
        if i >= len(tokens) // 4 and tok not in tokens[:i]:
            return tok, i
    raise AssertionError(f"no stop token to pick in {tokens}")


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(name, checkpoint folder, prompts, tokens to generate, the stop job, the real code's results)."""
    name = request.param
    case = FAMILIES[name]
    block, new, package = case.block, case.new, case.package
    path = make_checkpoint(case.config(), tmp_path_factory.mktemp(name))
    batch = prompts(case.lengths)
    # a stop token picked from the engine's own free run: the real code must stop at it too
    free = engine(path).generate([batch[-1]], max_new_tokens=new, stop_at_eos=False)[0].tokens
    stop, _ = first_repeat_free_stop(free)
    fast = package == "fast_dllm_v2"
    # generate() decodes whole blocks: ask for a block more than the engine generates
    gen_length = new + 2 * block if fast else new
    task = {
        "package": package, "modeling_dir": str(reference_file(*case.modeling)) if case.modeling else None,
        "model_dir": str(path), "block_size": block, "mask_id": MASK, "threshold": case.threshold, "steps": block,
        "sub_block_size": 8,
        "logits": [prompts([45 if fast else 18], seed=9)[0]],
        "decode": [{"prompt": p, "gen_length": gen_length} for p in batch]
                  + [{"prompt": batch[-1], "gen_length": gen_length, "stop": stop}],
    }
    real = run_real_code(task, tmp_path_factory.mktemp(f"{name}-run"))
    return name, path, batch, new, stop, real


def test_logits_match_the_real_modeling_code(family):
    name, path, _, _, _, real = family
    model, config = load_model(path, dtype=torch.float32)
    block = FAMILIES[name].block
    for ids, expected in zip(prompts([45 if name == "fast_dllm_v2" else 18], seed=9), real["logits"]):
        mask = block_diffusion_mask(len(ids), 0, block, prompt_causal=False)
        with torch.no_grad():
            ours = model(torch.tensor([ids]), torch.arange(len(ids))[None], MaskedAttention(mask))[0]
        assert ours.shape == expected.shape == (len(ids), VOCAB)
        err = ((ours.double() - expected.double()).norm() / expected.double().norm()).item()
        assert err < 1e-4, f"{name}: logits differ from the real code's by {err:.2e}"


@pytest.mark.parametrize("mode", list(MODES))
def test_cached_greedy_tokens_match_the_real_decoding_rule(family, mode):
    name, path, batch, new, _, real = family
    eng = engine(path, mode)
    assert (eng.settings.block_size, eng.settings.threshold) == (FAMILIES[name].block, FAMILIES[name].threshold)
    results = eng.generate(batch, max_new_tokens=new, stop_at_eos=False)
    for prompt, result, expected in zip(batch, results, real["decoded"]):
        assert len(result.tokens) == new
        assert result.tokens == expected[:new], f"{name} ({mode}), prompt of {len(prompt)} tokens"
    # not vacuous: some passes unmasked several tokens at once (threshold), and the rule differs by family
    assert sum(r.denoising_passes for r in results) < sum(len(r.tokens) for r in results)


def test_stop_token_ends_both_at_the_same_place(family):
    name, path, batch, new, stop, real = family
    expected = real["decoded"][-1]
    assert stop in expected, f"{name}: the real code never produced the stop token {stop}"
    result = engine(path, stop_token_ids=(stop,)).generate([batch[-1]], max_new_tokens=new)[0]
    assert result.finish_reason == "eos"
    assert result.tokens == expected[:expected.index(stop)]
