"""Training matches inference: the block-diffusion training forward sees what the decoder sees."""
import random

import pytest
import torch

from runtime.attention import MaskedAttention, block_diffusion_mask
from runtime.checkpoint import load_model
from runtime.config import EngineConfig, ModelConfig
from runtime.engine import Engine
from runtime.model import Transformer
from training.tasks import TASKS, generate_examples, make_example
from training.train import NOISY, build_batch, main, make_tokenizer, model_config_dict

BLOCK = 4


@pytest.mark.parametrize("task", TASKS)
def test_tasks_are_seeded_and_answerable(task):
    a = generate_examples(task, 300, 3, seed=1)
    assert a == generate_examples(task, 300, 3, seed=1)
    assert a != generate_examples(task, 300, 3, seed=2)
    assert generate_examples(task, 300, 3, seed=1, split="train") != a  # held-out stream differs
    for ex in a:
        assert len(ex.prompt) + len(ex.answer) + 1 <= ex.length
        assert ex.check(f" {ex.answer} ") and not ex.check(ex.answer + "0")
    with pytest.raises(ValueError, match="unknown"):
        make_example("nonsense", 300, random.Random(0))


def tiny_model(tokenizer) -> Transformer:
    cfg = ModelConfig.from_hf(model_config_dict(tokenizer, hidden=32, layers=2, heads=4, kv_heads=2, head_dim=8,
                                                intermediate=64, block_size=BLOCK, rope_theta=10000.0,
                                                max_context=256))
    torch.manual_seed(0)
    model = Transformer(cfg).to(torch.float64).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


def test_training_forward_equals_the_decoders_view_of_each_noisy_block():
    tokenizer = make_tokenizer()
    model = tiny_model(tokenizer)
    ex = make_example("passkey", 300, random.Random(3))
    prompt, answer = tokenizer.encode(ex.prompt), tokenizer.encode(ex.answer)
    batch = build_batch([(prompt, answer)], block_size=BLOCK, mask_token_id=tokenizer.mask_token_id,
                        eos_token_id=tokenizer.eos_token_ids[0], noisy_copies=2,
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(batch.input_ids, batch.positions, MaskedAttention(batch.mask))[0]
    clean = batch.input_ids[0][batch.kind[0] != NOISY]
    noisy = (batch.kind[0] == NOISY).nonzero().flatten()
    assert len(noisy) >= 2 * BLOCK
    checked = 0
    for start in range(0, len(noisy), BLOCK):
        idx = noisy[start:start + BLOCK]
        pos = batch.positions[0, idx]
        block_start = int(pos[0])
        assert block_start % BLOCK == 0 and torch.equal(pos, torch.arange(block_start, block_start + BLOCK))
        # the decoder: committed tokens before the block, then the partially masked block itself
        ids = torch.cat([clean[:block_start], batch.input_ids[0, idx]])[None]
        mask = block_diffusion_mask(ids.shape[1], 0, BLOCK, prompt_causal=False)
        with torch.no_grad():
            ref = model(ids, torch.arange(ids.shape[1])[None], MaskedAttention(mask))[0, -BLOCK:]
        err = (logits[idx] - ref).norm() / ref.norm()
        assert err < 1e-10, (start, float(err))
        checked += 1
    assert checked >= 2


def test_a_short_training_run_writes_a_checkpoint_the_engine_runs(tmp_path):
    out = tmp_path / "model"
    main(["--steps", "3", "--max-context", "256", "--device", "cpu", "--out", str(out), "--hidden", "32",
          "--layers", "2", "--heads", "4", "--kv-heads", "2", "--head-dim", "8", "--intermediate", "64",
          "--tokens-per-batch", "1024", "--noisy-copies", "1", "--eval-every", "0", "--final-contexts", "256",
          "--final-per-task", "1"])
    model, config = load_model(out)
    assert config.block_size == BLOCK and config.mask_token_id is not None
    engine = Engine(EngineConfig(model_path=str(out), device="cpu", progress=False))
    result = engine.generate(["What is the pass key? The pass key is "], max_new_tokens=6)[0]
    assert result.finish_reason in ("eos", "length") and len(result.tokens) <= 6
