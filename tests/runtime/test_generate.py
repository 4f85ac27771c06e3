"""The cached, batched loop against the recompute-everything reference decoder."""
import pytest
import torch

from runtime.attention import DenseAttention
from runtime.config import ModelConfig, RopeConfig
from runtime.decoding import DecodeSettings, GenerationRequest, SequenceState
from runtime.generate import BlockDiffusionLoop
from runtime.model import Transformer
from runtime.reference import reference_decode

VOCAB, MASK, EOS = 48, 47, 46


def tiny_model(arch: str, seed: int = 0, head_dim: int = 8, dtype: torch.dtype = torch.float64) -> Transformer:
    config = ModelConfig(architecture=arch, vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=head_dim, max_position_embeddings=512,
                         rope=RopeConfig(theta=10000.0), attention_bias=arch == "qwen2", qk_norm=arch == "qwen3",
                         tie_word_embeddings=arch == "qwen2")
    torch.manual_seed(seed)
    model = Transformer(config).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():  # sharper distributions than the default init, so unmasking order matters
            p.normal_(0.0, 0.3)
    return model


def settings(block=4, steps=4, unmasking="fixed", threshold=0.9, prompt_causal=False, eos=()):
    return DecodeSettings(block_size=block, steps=steps, unmasking=unmasking, threshold=threshold,
                          mask_token_id=MASK, eos_token_ids=eos, prompt_causal=prompt_causal)


def make_seq(seq_id, prompt, block, max_new=10, **request):
    g = torch.Generator().manual_seed(request.pop("seed", 0))
    req = GenerationRequest(prompt=prompt, max_new_tokens=max_new, **request)
    return SequenceState(seq_id, req, list(prompt), block, g)


def run_loop(model, prompts, s, max_batch=8, chunk=8, max_new=10, backend="torch", **request):
    seqs = [make_seq(i, p, s.block_size, max_new, **request) for i, p in enumerate(prompts)]
    device = next(model.parameters()).device
    mode = DenseAttention(model.config, min(max_batch, len(seqs)), max(q.max_tokens for q in seqs), page_size=4,
                          dtype=model.dtype, device=device, backend=backend)
    loop = BlockDiffusionLoop(model, mode, s, max_batch, chunk, device)
    with torch.no_grad():
        loop.run(seqs)
    assert not mode.slot_of, "every sequence must give its KV slot back"
    return seqs


def reference(model, prompt, s, max_new=10, **request):
    return reference_decode(model, make_seq(0, prompt, s.block_size, max_new, **request), s)


def prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB - 2, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
@pytest.mark.parametrize("prompt_causal", [False, True])
@pytest.mark.parametrize("unmasking,threshold", [("fixed", 0.9), ("threshold", 0.3)])
def test_cached_loop_matches_reference_decoder(arch, prompt_causal, unmasking, threshold):
    model = tiny_model(arch)
    s = settings(block=4, steps=3, unmasking=unmasking, threshold=threshold, prompt_causal=prompt_causal)
    # prompt lengths that are not multiples of the block; 17 spans three prefill chunks of 8
    for prompt in prompts([3, 9, 17]):
        expected = reference(model, prompt, s)
        got = run_loop(model, [prompt], s)[0]
        assert got.generated == expected.generated
        assert len(got.generated) == 10 and got.finish_reason == "length"


def test_batch_equals_each_sequence_alone():
    model = tiny_model("qwen3")
    s = settings(block=4, steps=4, unmasking="threshold", threshold=0.3)
    ps = prompts([5, 12, 1, 20, 7])
    batched = run_loop(model, ps, s, max_batch=3, max_new=9)  # 5 requests through 3 slots: continuous batching
    for prompt, seq in zip(ps, batched):
        alone = run_loop(model, [prompt], s, max_new=9)[0]
        assert seq.generated == alone.generated


def test_sampling_with_seed_matches_reference():
    model = tiny_model("qwen3")
    s = settings(block=4, steps=2)
    prompt = prompts([6])[0]
    expected = reference(model, prompt, s, temperature=0.8, top_p=0.9, seed=5)
    got = run_loop(model, [prompt], s, temperature=0.8, top_p=0.9, seed=5)[0]
    assert got.generated == expected.generated


def test_stops_at_eos():
    model = tiny_model("qwen3")
    prompt = prompts([5])[0]
    free = reference(model, prompt, settings(block=4, steps=4), max_new=12)
    eos = free.generated[5]  # pretend the sixth generated token is the end of sequence
    s = settings(block=4, steps=4, eos=(eos,))
    got = run_loop(model, [prompt], s, max_new=12)[0]
    first = free.generated.index(eos)
    assert got.finish_reason == "eos" and got.generated == free.generated[:first]
    assert got.blocks_done == (len(prompt) + first) // 4 - len(prompt) // 4 + 1


def test_triton_backend_matches_torch_backend():
    """The dense mode's split-KV kernel path gives the torch path's tokens (interpreter on CPU, fp32)."""
    model = tiny_model("qwen3", head_dim=16, dtype=torch.float32)
    if torch.cuda.is_available():
        model = model.cuda()
    s = settings(block=4, steps=2, unmasking="fixed")
    ps = prompts([6, 11])
    torch_path = run_loop(model, ps, s, max_new=8)
    kernel_path = run_loop(model, ps, s, max_new=8, backend="triton")
    assert [q.generated for q in kernel_path] == [q.generated for q in torch_path]
