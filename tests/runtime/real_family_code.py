"""What the tests against the real model families share: the reference files, small checkpoints
with the families' real config keys and tensor names, and a process running the real code.

The reference files (real config.json, tokenizer files, chat templates, modeling code of SDAR,
TraDo and Fast-dLLM v2) sit at `<repo root>/../shared/reference-models` (the checkout beside
shared/); tests that need them skip with the reason where that folder is missing. The real
modeling code needs the transformers it was written for (4.53) and einops: they are installed
once, without their dependencies that the project's environment already has, into
`<repo root>/.cache/real-family-code/` from PyPI; the tests that run the real code skip, saying
so, where that install cannot be made.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runtime.checkpoint import random_model, save_checkpoint
from runtime.config import ModelConfig
from tests.runtime.weights import perturb

REPO = Path(__file__).resolve().parents[2]
REFERENCE_MODELS = REPO.parent / "shared" / "reference-models"
RUNNER = Path(__file__).with_name("real_family_runner.py")
DEPS = REPO / ".cache" / "real-family-code"
# the versions the real files were written with (their config.json's transformers_version: 4.52-4.53)
# and what that transformers needs beyond the project's environment
PINNED = ("transformers==4.53.3", "huggingface-hub==0.36.2", "tokenizers==0.21.4", "einops==0.8.2",
          "requests>=2.32,<3", "urllib3>=2,<3", "idna>=3,<4", "certifi", "charset-normalizer>=3,<4")

# small geometry for the families' real configs: every other key stays as the hub file has it
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, vocab_size=256, max_position_embeddings=512)
VOCAB = SMALL["vocab_size"]
# the MoE families at the small geometry: 8 experts, 2 a token; the first layer dense
SMALL_MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32)
# SDAR-30B-A3B: SDAR's config.json with Qwen3-30B-A3B's MoE keys (its own hub file is not among the
# reference files; transformers' Qwen3MoeForCausalLM is its reference code)
SDAR_MOE_KEYS = dict(model_type="sdar_moe", architectures=["SDARMoeForCausalLM"], num_experts=128,
                     num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True, decoder_sparse_step=1,
                     mlp_only_layers=[])
# LLaDA2.0-mini's config.json as published (inclusionAI/LLaDA2.0-mini; no copy among the reference files)
LLADA2_MINI = {
    "architectures": ["LLaDA2MoeModelLM"], "model_type": "llada2_moe", "vocab_size": 157184, "hidden_size": 2048,
    "intermediate_size": 5120, "num_hidden_layers": 20, "num_attention_heads": 16, "num_key_value_heads": 4,
    "head_dim": 128, "max_position_embeddings": 32768, "rope_theta": 600000, "partial_rotary_factor": 0.5,
    "rms_norm_eps": 1e-6, "use_qk_norm": True, "use_qkv_bias": False, "use_bias": False, "norm_head": False,
    "num_experts": 256, "num_experts_per_tok": 8, "num_shared_experts": 1, "n_group": 8, "topk_group": 4,
    "moe_intermediate_size": 512, "first_k_dense_replace": 1, "routed_scaling_factor": 2.5,
    "score_function": "sigmoid", "norm_topk_prob": True, "moe_router_enable_expert_bias": True,
    "tie_word_embeddings": False, "pad_token_id": 156892, "eos_token_id": 156892, "hidden_act": "silu",
}
MASK = 250  # in the small vocabulary, where the real ids (151669, 151665) do not fit
STOP = 251


def reference_file(*parts: str) -> Path:
    path = REFERENCE_MODELS.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is missing: the reference files of the real model families are expected in "
                    f"shared/reference-models beside the checkout")
    return path


def real_config(*parts: str, **changes) -> dict:
    """A real config.json with the small geometry (and `changes`) in place of the real one."""
    return small_config(json.loads(reference_file(*parts).read_text()), **changes)


def small_config(cfg: dict, **changes) -> dict:
    """A family's config.json (dict) at the small geometry, its special tokens at STOP, with `changes`."""
    cfg = dict(cfg)
    cfg.update(SMALL)
    if "layer_types" in cfg:
        cfg["layer_types"] = cfg["layer_types"][:SMALL["num_hidden_layers"]]
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if key in cfg:
            cfg[key] = STOP
    cfg.update(changes)
    return cfg


@torch.no_grad()
def make_checkpoint(cfg: dict, path: Path, seed: int = 0, logit_scale: float = 6.0) -> Path:
    """A random checkpoint of `cfg` saved as the family stores it (config.json, model.safetensors).

    Weights far from the init (every part of a layer matters), the output layer sharpened so that
    predictions cross the unmasking threshold often, and the [MASK] row of the output layer zero:
    as in a trained model, [MASK] is never the prediction (the runtime never proposes it; the
    families' own code would, and it would never finish a block that did)."""
    model = random_model(ModelConfig.from_hf(cfg), seed=seed)
    perturb(model, seed=seed + 1)
    model.lm_head.weight.mul_(logit_scale)
    model.lm_head.weight[MASK] = 0.0
    save_checkpoint(model, cfg, path)
    return path


def deps_path() -> Path:
    """The folder holding the transformers the real code needs, installed on first use."""
    done = DEPS / ".complete"
    if done.is_file() and done.read_text() == "\n".join(PINNED):
        return DEPS
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--upgrade", "--target", str(DEPS), *PINNED]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as err:
        pytest.skip(f"cannot install the transformers the real modeling code needs ({' '.join(PINNED)}): {err}")
    if result.returncode != 0:
        pytest.skip(f"cannot install the transformers the real modeling code needs ({' '.join(PINNED)}) "
                    f"into {DEPS}: {result.stderr.strip()[-500:]}")
    done.write_text("\n".join(PINNED))
    return DEPS


def run_real_code(task: dict, work: Path) -> dict:
    """Run `task` (see real_family_runner.py) in a process with the old transformers; its results."""
    deps = deps_path()
    task_file, out_file = work / "task.json", work / "out.pt"
    task_file.write_text(json.dumps(task))
    env = dict(os.environ, PYTHONPATH=str(deps), TRANSFORMERS_VERBOSITY="error")
    result = subprocess.run([sys.executable, str(RUNNER), str(task_file), str(out_file)], capture_output=True,
                            text=True, timeout=900, env=env)
    assert result.returncode == 0, f"the real modeling code failed:\n{result.stderr[-4000:]}"
    return torch.load(out_file)


TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja")


def real_tokenizer(folder: str, path: Path):
    """The family's real tokenizer files in `path`, plus the tokenizer.json the runtime reads
    (transformers converts vocab.json and merges.txt); returns transformers' tokenizer of them."""
    transformers = pytest.importorskip("transformers")
    source = path / "hf-tokenizer"
    source.mkdir(parents=True)
    for name in TOKENIZER_FILES:
        if (file := reference_file(folder) / name).is_file():
            (source / name).write_bytes(file.read_bytes())
            (path / name).write_bytes(file.read_bytes())
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(source))
    tokenizer.backend_tokenizer.save(str(path / "tokenizer.json"))
    return tokenizer


def chat_checkpoint(folder: str, config_name: str, path: Path, generation_config: bool = True, seed: int = 0):
    """A small random checkpoint with the family's real vocabulary, tokenizer files, chat template
    and (optionally) generation_config.json; returns (path, transformers' tokenizer)."""
    cfg = json.loads(reference_file(folder, config_name).read_text())
    cfg.update({k: v for k, v in SMALL.items() if k not in ("vocab_size", "max_position_embeddings")},
               hidden_size=32, intermediate_size=64, head_dim=8)
    if "layer_types" in cfg:
        cfg["layer_types"] = cfg["layer_types"][:SMALL["num_hidden_layers"]]
    model = random_model(ModelConfig.from_hf(cfg), seed=seed)
    perturb(model, seed=seed + 1)
    save_checkpoint(model, cfg, path)
    if generation_config:
        (path / "generation_config.json").write_bytes(reference_file(folder, "generation_config.json").read_bytes())
    return path, real_tokenizer(folder, path)
