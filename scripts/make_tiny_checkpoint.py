"""Write checkpoints/tiny-random/: a tiny Qwen3-architecture block-diffusion checkpoint, random weights.

It is the bundled default model (tests, smoke runs, the CLI without --model) until a trained
model replaces it. Deterministic: the same seed writes the same bytes.

    python scripts/make_tiny_checkpoint.py [--out checkpoints/tiny-random] [--seed 0]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from runtime.checkpoint import save_checkpoint
from runtime.config import ModelConfig
from runtime.model import Transformer
from runtime.tokenizer import (EOS_TOKEN, MASK_TOKEN, UNK_TOKEN, Tokenizer, build_char_tokenizer,
                               hf_tokenizer_config)

REPO = Path(__file__).resolve().parent.parent
BLOCK_SIZE = 4

README = """# tiny-random

A tiny Qwen3-architecture block-diffusion checkpoint with **random weights** (seed {seed}), written by
`scripts/make_tiny_checkpoint.py`. It exists so that tests, smoke runs and the command line have a
model to load without any download. Its outputs are meaningless; it is only the bundled default
until a trained model replaces it.

- architecture: Qwen3 (q/k RMSNorm, no attention bias), tied embeddings, fp32 weights
- hidden {hidden}, {layers} layers, {heads} query heads / {kv_heads} KV heads of dim {head_dim},
  MLP {intermediate}, vocab {vocab}, max_position_embeddings {max_pos}
- block-diffusion fields in config.json: `mask_token_id` {mask} (`{mask_token}`), `block_size` {block},
  `eos_token_id` {eos} (`{eos_token}`)
- tokenizer: character level (printable ASCII + newline, unknown characters become `{unk_token}`),
  Hugging Face format (tokenizer.json + tokenizer_config.json + special_tokens_map.json)

Regenerate: `python scripts/make_tiny_checkpoint.py --seed {seed}`
"""


def tiny_config_dict(vocab_size: int, mask_id: int, eos_id: int) -> dict:
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "tie_word_embeddings": True,
        "initializer_range": 0.02,
        "bos_token_id": None,
        "eos_token_id": eos_id,
        "pad_token_id": eos_id,
        "mask_token_id": mask_id,
        "block_size": BLOCK_SIZE,
        "torch_dtype": "float32",
    }


def make(out: Path, seed: int) -> Path:
    backend = build_char_tokenizer()
    tokenizer = Tokenizer(backend, hf_tokenizer_config(backend, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN,
                                                       mask_token=MASK_TOKEN, unk_token=UNK_TOKEN))
    cfg = tiny_config_dict(tokenizer.vocab_size, tokenizer.token_to_id(MASK_TOKEN), tokenizer.token_to_id(EOS_TOKEN))
    model = Transformer(ModelConfig.from_hf(cfg))
    model.init_weights(std=cfg["initializer_range"], generator=torch.Generator().manual_seed(seed))
    save_checkpoint(model, cfg, out, tokenizer)
    (out / "README.md").write_text(README.format(
        seed=seed, hidden=cfg["hidden_size"], layers=cfg["num_hidden_layers"], heads=cfg["num_attention_heads"],
        kv_heads=cfg["num_key_value_heads"], head_dim=cfg["head_dim"], intermediate=cfg["intermediate_size"],
        vocab=cfg["vocab_size"], max_pos=cfg["max_position_embeddings"], mask=cfg["mask_token_id"],
        mask_token=MASK_TOKEN, block=BLOCK_SIZE, eos=cfg["eos_token_id"], eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "checkpoints" / "tiny-random")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = make(args.out, args.seed)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {out} ({size / 1024:.0f} KiB): {sorted(f.name for f in out.iterdir())}")


if __name__ == "__main__":
    main()
