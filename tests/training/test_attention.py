"""training/attention.py: flex attention over training rows equals the dense-mask reference."""
import numpy as np
import pytest
import torch

from runtime.attention import MaskedAttention
from training.attention import FlexTrainingAttention, attention_for
from training.data import build_batch

MASK, EOS = 1, 0


def random_pairs(prompt_lens, answer_lens, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.integers(3, 90, p).tolist(), rng.integers(3, 90, a).tolist()) for p, a in zip(prompt_lens, answer_lens)]


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("block_size,prompt_lens,answer_lens,pad", [
    (4, [21, 24, 30, 33], [5, 6, 11, 2], 16),   # ragged rows, padding
    (8, [130, 61], [17, 3], 128),               # rows spanning several 128-token tiles
    (4, [250], [9], 1),                         # one row, no padding
])
def test_flex_training_attention_equals_dense_mask(block_size, prompt_lens, answer_lens, pad):
    """Eager flex attention (the CPU path of FlexTrainingAttention) against SDPA with the dense
    training mask, fp64 on fresh random q/k/v with GQA; tolerance 1e-10 (both exact softmax)."""
    batch = build_batch(random_pairs(prompt_lens, answer_lens, seed=block_size), block_size=block_size,
                        mask_token_id=MASK, eos_token_id=EOS, noisy_copies=3,
                        generator=np.random.default_rng(block_size), pad_multiple=pad)
    n, length = batch.input_ids.shape
    gen = torch.Generator().manual_seed(length)
    q = torch.randn(n, 4, length, 16, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(n, 2, length, 16, generator=gen, dtype=torch.float64) for _ in range(2))
    expected = MaskedAttention(batch.mask).run(0, q, k, v)
    got = FlexTrainingAttention(batch, compiled=False).run(0, q, k, v)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < 1e-10


def test_attention_choice():
    batch = build_batch(random_pairs([20], [5]), block_size=4, mask_token_id=MASK, eos_token_id=EOS,
                        noisy_copies=1, generator=np.random.default_rng(0))
    assert isinstance(attention_for(batch, "auto"), MaskedAttention)  # the CPU: the dense mask
    assert isinstance(attention_for(batch, "flex"), FlexTrainingAttention)
    with pytest.raises(ValueError, match="training attention 'fast'"):
        attention_for(batch, "fast")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_flex_matches_dense_mask_on_gpu_with_gradients():
    """Compiled flex (what training runs on CUDA) against SDPA with the dense mask, bf16 inputs:
    outputs and q/k/v gradients within 2e-2 relative to their scale (bf16 rounding)."""
    batch = build_batch(random_pairs([700, 333, 1000], [9, 40, 3]), block_size=4, mask_token_id=MASK,
                        eos_token_id=EOS, noisy_copies=4, generator=np.random.default_rng(3), pad_multiple=128,
                        device="cuda")
    n, length = batch.input_ids.shape
    gen = torch.Generator(device="cuda").manual_seed(0)
    leaves = [torch.randn(n, h, length, 64, generator=gen, device="cuda", dtype=torch.bfloat16).requires_grad_()
              for h in (8, 4, 4)]
    outs, grads = [], []
    for mode in (MaskedAttention(batch.mask), attention_for(batch, "auto")):
        out = mode.run(0, *leaves)
        out.float().square().sum().backward()
        outs.append(out.float())
        grads.append([x.grad.float().clone() for x in leaves])
        for x in leaves:
            x.grad = None
    assert isinstance(mode, FlexTrainingAttention)
    assert (outs[0] - outs[1]).abs().max() <= 2e-2 * outs[0].abs().max()
    for ref, got in zip(*grads):
        assert (ref - got).abs().max() <= 2e-2 * ref.abs().max()
