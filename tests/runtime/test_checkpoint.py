"""Checkpoint loading/saving, the tokenizer, and the bundled tiny-random checkpoint."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from runtime.attention import MaskedAttention, block_diffusion_mask
from runtime.checkpoint import load_model, random_model, read_safetensors_header, save_checkpoint
from runtime.config import ModelConfig
from runtime.model import Transformer
from runtime.tokenizer import MASK_TOKEN, Tokenizer, build_char_tokenizer, hf_tokenizer_config

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "checkpoints" / "tiny-random"

CONFIG = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 50, "hidden_size": 32,
    "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 8, "max_position_embeddings": 128, "rope_theta": 10000.0, "tie_word_embeddings": False,
}
Q_PROJ = "model.layers.1.self_attn.q_proj.weight"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _logits(model: Transformer, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(0, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids, torch.arange(10)[None].expand(2, -1), MaskedAttention(block_diffusion_mask(10, 4, 4, True)))


@pytest.fixture
def saved(tmp_path) -> tuple[Path, Transformer]:
    model = Transformer(ModelConfig.from_hf(CONFIG))
    model.init_weights(0.2, torch.Generator().manual_seed(0))
    save_checkpoint(model, CONFIG, tmp_path / "ckpt")
    return tmp_path / "ckpt", model


def _rewrite(path: Path, edit) -> None:
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors")


def test_round_trip_gives_identical_logits(saved):
    path, model = saved
    loaded, config = load_model(path)
    assert config == dataclasses.replace(model.config, torch_dtype="float32")
    assert torch.equal(_logits(loaded), _logits(model))
    assert not any(p.requires_grad for p in loaded.parameters())


def test_missing_tensor_is_named(saved):
    path, _ = saved
    _rewrite(path, lambda t: t.pop(Q_PROJ))
    with pytest.raises(ValueError, match=r"missing tensors:\s+model\.layers\.1\.self_attn\.q_proj\.weight "
                                         r"\(expected shape \(32, 32\)\)"):
        load_model(path)


def test_wrong_shape_names_tensor_and_both_shapes(saved):
    path, _ = saved
    _rewrite(path, lambda t: t.update({Q_PROJ: torch.zeros(16, 32)}))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.q_proj\.weight: shape \(16, 32\), "
                                         r"expected \(32, 32\)"):
        load_model(path)


def test_extra_tensors_are_listed_but_rotary_buffers_tolerated(saved):
    path, model = saved
    _rewrite(path, lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)}))
    load_model(path)  # harmless
    _rewrite(path, lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.ones(3), "score.weight": torch.ones(2)}))
    with pytest.raises(ValueError, match=r"(?s)unexpected tensors.*model\.layers\.0\.mlp\.extra\.weight \(3,\)"
                                         r".*score\.weight \(2,\)"):
        load_model(path)


def test_integer_tensors_are_rejected(saved):
    path, _ = saved
    _rewrite(path, lambda t: t.update({Q_PROJ: torch.zeros(32, 32, dtype=torch.int8)}))
    with pytest.raises(ValueError, match=r"(?s)not floating point.*q_proj\.weight: dtype I8"):
        load_model(path)


def test_missing_files_give_clear_errors(saved, tmp_path):
    path, _ = saved
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match=r"neither model\.safetensors nor model\.safetensors\.index\.json"
                                                r".*convert them to safetensors"):
        load_model(path)
    (path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_model(path)
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_model(tmp_path / "does-not-exist")


def test_sharded_loading(saved):
    path, model = saved
    tensors = load_file(path / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in shards.items():
        save_file({n: tensors[n] for n in part}, path / file)
    (path / "model.safetensors").unlink()
    weight_map = {n: file for file, part in shards.items() for n in part}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    loaded, _ = load_model(path)
    assert torch.equal(_logits(loaded), _logits(model))

    (path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        load_model(path)


def test_tied_checkpoints(tmp_path):
    cfg = dict(CONFIG, tie_word_embeddings=True, model_type="qwen2", architectures=["Qwen2ForCausalLM"])
    model = random_model(ModelConfig.from_hf(cfg), seed=3, std=0.2)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    save_checkpoint(model, cfg, tmp_path)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    loaded, config = load_model(tmp_path, dtype="float64")
    assert config.attention_bias and loaded.dtype == torch.float64
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert rel(_logits(loaded), _logits(model)) < 1e-5
    # A tied checkpoint that stores lm_head anyway still loads (the embedding is used).
    _rewrite(tmp_path, lambda t: t.update({"lm_head.weight": torch.zeros(50, 32)}))
    again, _ = load_model(tmp_path)
    assert torch.equal(_logits(again), _logits(model))


def test_dtype_choice(saved):
    path, _ = saved
    model, _ = load_model(path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert _logits(model).dtype == torch.float32
    with pytest.raises(ValueError, match="dtype 'int8' is not one of"):
        load_model(path, dtype="int8")


@pytest.mark.parametrize("change,message", [
    ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, "none of the supported families: sdar"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope type 'dynamic' is not supported"),
    ({"rope_scaling": {"type": "longrope", "factor": 2.0}}, "rope type 'longrope' is not supported"),
    ({"use_sliding_window": True, "sliding_window": 64}, "sliding-window attention"),
    ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads=3"),
])
def test_unsupported_configs_are_refused(saved, change, message):
    path, _ = saved
    (path / "config.json").write_text(json.dumps(dict(CONFIG, **change)))
    with pytest.raises(ValueError, match=message):
        load_model(path)


def test_config_that_does_not_fit_the_model_is_refused(tmp_path):
    model = Transformer(ModelConfig.from_hf(CONFIG))
    with pytest.raises(ValueError, match="does not describe the model"):
        save_checkpoint(model, dict(CONFIG, intermediate_size=64), tmp_path)
    cfg = dict(CONFIG, vocab_size=60)  # checkpoint and config.json disagree
    save_checkpoint(Transformer(ModelConfig.from_hf(cfg)), cfg, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    with pytest.raises(ValueError, match=r"model\.embed_tokens\.weight: shape \(60, 32\), expected \(50, 32\)"):
        load_model(tmp_path)


def test_char_tokenizer_round_trip_and_hf_compatibility(tmp_path):
    backend = build_char_tokenizer("abc \n", ["<|endoftext|>", "<|MASK|>", "<|unk|>"])
    tok = Tokenizer(backend, hf_tokenizer_config(backend, eos_token="<|endoftext|>", mask_token="<|MASK|>",
                                                 unk_token="<|unk|>"))
    assert (tok.vocab_size, tok.mask_token_id, tok.eos_token_ids, tok.pad_token_id) == (8, 1, (0,), 0)
    text = "ab c\ncab<|MASK|>a<|endoftext|>"
    ids = tok.encode(text, parse_special_tokens=True)
    assert ids == [3, 4, 6, 5, 7, 5, 3, 4, 1, 3, 0]
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == "ab c\ncaba"
    with pytest.raises(ValueError, match=r"1 character\(s\) this tokenizer cannot represent .*'z' \(U\+007A\) at "
                                         r"character 2"):
        tok.encode("abz")  # would be "ab<|unk|>": refused, not lost
    with pytest.raises(ValueError, match="must be one of special_tokens"):
        build_char_tokenizer("ab", ["<|endoftext|>"])

    tok.save(tmp_path)
    again = Tokenizer.from_dir(tmp_path)
    assert again.encode(text, parse_special_tokens=True) == ids and again.mask_token_id == 1
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf(text, add_special_tokens=False).input_ids == ids
    assert (hf.mask_token_id, hf.eos_token_id, len(hf)) == (1, 0, 8)


def test_tokenizer_lookups(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    backend = build_char_tokenizer("xy", ["<|endoftext|>", "<|im_end|>", "|<MASK>|", "<|unk|>"])
    # No mask_token in tokenizer_config: found by its name; eos ids merge tokenizer and model config.
    Tokenizer(backend, {"eos_token": "<|im_end|>"}).save(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": [0, 1]}))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.mask_token_id == 2 and tok.eos_token_ids == (1, 0) and tok.pad_token_id == 1
    (tmp_path / "config.json").write_text(json.dumps({"mask_token_id": 4}))
    assert Tokenizer.from_dir(tmp_path).mask_token_id == 4
    plain = build_char_tokenizer("xy", ["<|endoftext|>", "<|unk|>"])
    assert Tokenizer(plain).mask_token_id is None and Tokenizer(plain).eos_token_ids == ()


def test_tiny_checkpoint_loads_tokenizes_and_runs():
    model, config = load_model(TINY)
    tok = Tokenizer.from_dir(TINY)
    assert config.architecture == "qwen3" and config.qk_norm and config.block_size == 4
    assert (config.hidden_size, config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim,
            config.intermediate_size, config.max_position_embeddings) == (64, 2, 4, 2, 16, 128, 4096)
    assert config.vocab_size == tok.vocab_size
    assert config.mask_token_id == tok.mask_token_id == tok.token_to_id(MASK_TOKEN)
    assert config.eos_token_ids == tok.eos_token_ids == (tok.token_to_id("<|endoftext|>"),)
    text = "The key is 7241.\nWhat is the key? ~{}|"
    assert tok.decode(tok.encode(text)) == text
    assert sum(f.stat().st_size for f in TINY.iterdir()) < 1 << 20
    assert "trained model replaces it" in (TINY / "README.md").read_text()

    ids = torch.tensor([tok.encode(text)[:12] + [config.mask_token_id] * 4])
    with torch.no_grad():
        logits = model(ids, torch.arange(16)[None], MaskedAttention(block_diffusion_mask(16, 12, 4, True)))
    assert logits.shape == (1, 16, config.vocab_size) and torch.isfinite(logits).all()
    assert logits.std() > 0


def test_tiny_checkpoint_is_what_the_script_writes(tmp_path):
    spec = importlib.util.spec_from_file_location("make_tiny_checkpoint", REPO / "scripts" / "make_tiny_checkpoint.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = script.make(tmp_path / "tiny", seed=0)
    for file in sorted(TINY.iterdir()):
        if file.name == "model.safetensors":
            # Names, shapes and dtypes only: the random draws may differ across torch versions.
            assert read_safetensors_header(out / file.name) == read_safetensors_header(file)
        else:
            assert (out / file.name).read_bytes() == file.read_bytes(), f"{file.name} differs: rerun the script"
    assert sorted(f.name for f in out.iterdir()) == sorted(f.name for f in TINY.iterdir())


def test_save_with_bare_tokenizer(tmp_path):
    backend = build_char_tokenizer("ab", ["<|endoftext|>", "<|MASK|>", "<|unk|>"])
    cfg = dict(CONFIG, vocab_size=5, eos_token_id=0, mask_token_id=1)
    save_checkpoint(Transformer(ModelConfig.from_hf(cfg)), cfg, tmp_path, backend)
    tok = Tokenizer.from_dir(tmp_path)
    assert (tok.mask_token_id, tok.eos_token_ids, tok.pad_token_id) == (1, (0,), 0)
    shutil.rmtree(tmp_path)
