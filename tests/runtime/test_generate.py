"""The cached, batched loop against the recompute-everything reference decoder."""
import pytest
import torch

from runtime.attention import DenseAttention
from runtime.config import ModelConfig, RopeConfig
from runtime.decoding import DecodeSettings, GenerationRequest, SequenceState, start_block, unmask_step
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


def settings(block=4, steps=4, unmasking="fixed", threshold=0.9, prompt_causal=False, eos=(), **rule):
    return DecodeSettings(block_size=block, steps=steps, unmasking=unmasking, threshold=threshold,
                          mask_token_id=MASK, eos_token_ids=eos, prompt_causal=prompt_causal, **rule)


def fast_dllm_settings(**changes):
    """Fast-dLLM v2's rule at a small scale: blocks of 8 in sub-blocks of 4."""
    return settings(**{"block": 8, "steps": 8, "unmasking": "threshold", "threshold": 0.3, "rule": "fast_dllm_v2",
                       "sub_block_size": 4, **changes})


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


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_fast_dllm_rule_cached_loop_matches_reference_decoder(arch):
    """Token shift, each block's first token from the last logits before it (the prompt's too,
    when it ends on a block boundary: 8 and 16, the latter over two prefill chunks), sub-blocks
    left to right: the batched cached loop gives the recomputing reference decoder's tokens."""
    model = tiny_model(arch)
    s = fast_dllm_settings()
    ps = prompts([3, 8, 16, 13])
    batched = run_loop(model, ps, s, max_batch=3, max_new=13)
    for prompt, got in zip(ps, batched):
        expected = reference(model, prompt, s, max_new=13)
        assert got.generated == expected.generated and len(got.generated) == 13
        assert got.passes < got.blocks_done * 8, "some pass unmasked several tokens"


def test_fast_dllm_rule_rows_leaving_mid_block_keep_the_others_exact():
    """A row cancelled mid-block leaves its block; the next-block tokens of the rows that stay
    still reach their own rows."""
    model = tiny_model("qwen3")
    s = fast_dllm_settings()
    ps = prompts([8, 5, 11])
    seqs = [make_seq(i, p, s.block_size, 14) for i, p in enumerate(ps)]
    mode = DenseAttention(model.config, 3, max(q.max_tokens for q in seqs), page_size=4, dtype=model.dtype,
                          device=torch.device("cpu"))
    loop = BlockDiffusionLoop(model, mode, s, 3, 8, torch.device("cpu"))
    with torch.no_grad():
        loop.run(seqs, should_cancel=lambda seq: seq.seq_id == 0 and seq.passes >= 2)
    assert seqs[0].finish_reason == "cancelled"
    for prompt, seq in zip(ps[1:], seqs[1:]):
        assert seq.generated == reference(model, prompt, s, max_new=14).generated


def test_fast_dllm_rule_unmasks_sub_blocks_left_to_right():
    model = tiny_model("qwen3")
    s = fast_dllm_settings(threshold=1.0)  # one token per pass: the order is visible
    seq = make_seq(0, prompts([8])[0], s.block_size, 8)
    seq.tokens = list(seq.prompt_ids) + [5]  # the block's first token, decoded before it opened
    start_block(seq, s)
    order = []
    for step in range(7):
        before = seq.masked.clone()
        logits = torch.randn(8, VOCAB, generator=torch.Generator().manual_seed(step))
        unmask_step(seq, logits, step, s)
        order.append(int((before & ~seq.masked).nonzero()))
    assert sorted(order[:3]) == [1, 2, 3] and sorted(order[3:]) == [4, 5, 6, 7]


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
