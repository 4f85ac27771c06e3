"""Model families: recognised from their real config.json, decoding defaults where the hub files
are silent, the user's settings over both, stop tokens from every file that names one, and bad
configurations refused before a weight is read."""
from __future__ import annotations

import json

import pytest
import torch

from runtime import Engine, EngineConfig
from runtime.checkpoint import load_model, save_checkpoint
from runtime.config import ModelConfig
from runtime.engine import resolve_settings
from runtime.families import FAMILIES
from runtime.tokenizer import Tokenizer
from tests.runtime.real_family_code import chat_checkpoint, real_config, real_tokenizer, reference_file

IM_END, ENDOFTEXT = 151645, 151643


def hub_config(*parts: str) -> dict:
    return json.loads(reference_file(*parts).read_text())


def settings_of(tmp_path, folder: str, config_name: str, tokenizer: bool = True, **user):
    """Decoding settings the engine resolves for a family's real config.json, generation_config.json
    and tokenizer files (no weights are needed to decide them)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_bytes(reference_file(folder, config_name).read_bytes())
    (tmp_path / "generation_config.json").write_bytes(reference_file(folder, "generation_config.json").read_bytes())
    tok = None
    if tokenizer:
        real_tokenizer(folder, tmp_path)
        tok = Tokenizer.from_dir(tmp_path)
    return resolve_settings(EngineConfig(model_path=str(tmp_path), **user), ModelConfig.from_dir(tmp_path), tok)


@pytest.mark.parametrize("parts, family, architecture, block", [
    (("sdar", "config copy.json"), "sdar", "qwen3", None),  # the hub's file states no block size
    (("sdar", "config.json"), "sdar", "qwen3", 4),  # SDAR's training copy states it
    (("sdar", "sdar-4b-config.json"), "sdar", "qwen3", 4),  # TraDo's geometry
    (("fast-dllm-v2-7b", "config.json"), "fast_dllm_v2", "qwen2", 32),  # bd_size
])
def test_each_family_is_recognised_from_its_real_config(parts, family, architecture, block):
    config = ModelConfig.from_hf(hub_config(*parts))
    assert (config.family, config.architecture, config.block_size) == (family, architecture, block)
    assert config.family_defaults.name == family


def test_unknown_architecture_is_refused_naming_every_supported_family():
    cfg = dict(hub_config("sdar", "config copy.json"), model_type="llama", architectures=["LlamaForCausalLM"])
    with pytest.raises(ValueError, match="none of the supported families") as err:
        ModelConfig.from_hf(cfg)
    for family in FAMILIES:
        assert family.name in str(err.value)


def test_sdar_hub_config_decodes_with_the_family_defaults(tmp_path):
    s = settings_of(tmp_path, "sdar", "config copy.json")
    assert (s.block_size, s.steps, s.unmasking, s.threshold, s.rule, s.sub_block_size) == (4, 4, "threshold", 0.9,
                                                                                            "sdar", None)
    assert s.mask_token_id == 151669 and not s.prompt_causal
    # a chat model ends its turn with <|im_end|>, which only generation_config.json names
    assert set(s.eos_token_ids) == {ENDOFTEXT, IM_END}


def test_fast_dllm_v2_decodes_with_its_own_rule(tmp_path):
    s = settings_of(tmp_path, "fast-dllm-v2-7b", "config.json")
    assert (s.block_size, s.steps, s.threshold, s.rule, s.sub_block_size) == (32, 32, 0.9, "fast_dllm_v2", 8)
    assert s.token_shift and not s.prompt_causal  # its eval mask prefills the prompt block-causally
    assert s.mask_token_id == 151665 and set(s.eos_token_ids) == {IM_END, ENDOFTEXT}


def test_family_mask_and_block_fill_in_without_a_tokenizer(tmp_path):
    s = settings_of(tmp_path, "sdar", "config copy.json", tokenizer=False)
    assert (s.block_size, s.mask_token_id) == (4, 151669)


def test_the_users_settings_win(tmp_path):
    s = settings_of(tmp_path, "fast-dllm-v2-7b", "config.json", block_size=16, denoising_steps=5,
                    confidence_threshold=0.7, sub_block_size=4, mask_token_id=7, stop_token_ids=(9,),
                    prompt_attention="causal")
    assert (s.block_size, s.steps, s.threshold, s.sub_block_size, s.mask_token_id, s.eos_token_ids) == (
        16, 5, 0.7, 4, 7, (9,))
    assert s.prompt_causal and s.rule == "fast_dllm_v2"
    plain = settings_of(tmp_path / "b", "fast-dllm-v2-7b", "config.json", tokenizer=False, decoding="sdar",
                        unmasking="fixed")
    assert (plain.rule, plain.sub_block_size, plain.unmasking) == ("sdar", None, "fixed")
    with pytest.raises(ValueError, match="sub-blocks .* unmask by threshold"):
        settings_of(tmp_path / "c", "fast-dllm-v2-7b", "config.json", tokenizer=False, unmasking="fixed")
    with pytest.raises(ValueError, match="sub_block_size=5 must divide the block size 32"):
        settings_of(tmp_path / "d", "fast-dllm-v2-7b", "config.json", tokenizer=False, sub_block_size=5)


def test_a_block_size_nobody_states_is_asked_for():
    cfg = dict(hub_config("sdar", "config copy.json"), model_type="qwen3", architectures=["Qwen3ForCausalLM"])
    with pytest.raises(ValueError, match="neither the checkpoint .* nor the qwen3 family states a block size"):
        resolve_settings(EngineConfig(model_path="unused"), ModelConfig.from_hf(cfg), None)


def test_a_chat_model_stops_at_im_end_from_generation_config(tmp_path):
    """config.json names only <|endoftext|>; generation_config.json adds <|im_end|>, which the
    model here produces: the run stops there, and runs on without generation_config.json."""
    path, _ = chat_checkpoint("sdar", "config copy.json", tmp_path / "ck")
    prompt = "Tell me about block diffusion."
    free = Engine(EngineConfig(model_path=str(path), device="cpu", progress=False)).generate(
        [prompt], max_new_tokens=16, stop_at_eos=False)[0].tokens
    # make <|im_end|> the token the model writes where it wrote `first` (rows swapped in the
    # embedding and the output layer: the same model up to the names of two tokens)
    first = next(t for i, t in enumerate(free) if i >= 3 and t not in free[:i] and t not in (IM_END, ENDOFTEXT))
    model, _ = load_model(path)
    with torch.no_grad():
        for weight in (model.model.embed_tokens.weight, model.lm_head.weight):
            weight[[first, IM_END]] = weight[[IM_END, first]]
    save_checkpoint(model, json.loads((path / "config.json").read_text()), path)
    swapped = [IM_END if t == first else first if t == IM_END else t for t in free]
    result = Engine(EngineConfig(model_path=str(path), device="cpu", progress=False)).generate(
        [prompt], max_new_tokens=16)[0]
    assert result.finish_reason == "eos" and result.tokens == swapped[:swapped.index(IM_END)]
    (path / "generation_config.json").unlink()
    without = Engine(EngineConfig(model_path=str(path), device="cpu", progress=False)).generate(
        [prompt], max_new_tokens=16)[0]
    assert without.finish_reason == "length" and without.tokens == swapped


@pytest.mark.parametrize("change, message", [
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
     r"rope type 'dynamic' is not supported \(config.json rope_scaling\).*Set rope_scaling to one of them"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e6}},
     r"rope type 'longrope' is not supported \(config.json rope_parameters\)"),
    ({"partial_rotary_factor": 0.5},
     r"partial_rotary_factor=0.5, but the sdar family rotates the whole head dimension: remove the key"),
])
def test_bad_rope_settings_are_refused_before_weights_load(tmp_path, change, message):
    cfg = real_config("sdar", "config copy.json", **change)
    (tmp_path / "config.json").write_text(json.dumps(cfg))  # and no weights at all: the refusal comes first
    with pytest.raises(ValueError, match=message):
        Engine(EngineConfig(model_path=str(tmp_path), device="cpu", progress=False))
