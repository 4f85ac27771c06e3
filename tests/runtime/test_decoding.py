"""The unmasking rule and per-sequence bookkeeping, without a model."""
import pytest
import torch

from runtime.decoding import (DecodeSettings, GenerationRequest, SequenceState, _filter_logits, finish_block,
                              fixed_schedule, propose, start_block, unmask_step)

MASK, EOS, VOCAB = 9, 8, 10


def settings(unmasking="fixed", steps=4, block=4, threshold=0.9):
    return DecodeSettings(block_size=block, steps=steps, unmasking=unmasking, threshold=threshold,
                          mask_token_id=MASK, eos_token_ids=(EOS,), prompt_causal=False)


def sequence(prompt, max_new=8, block=4, **request):
    g = torch.Generator().manual_seed(0)
    seq = SequenceState(0, GenerationRequest(prompt=prompt, max_new_tokens=max_new, **request), list(prompt), block, g)
    seq.tokens = list(prompt)
    return seq


def logits_favouring(tokens, confidence):
    """[B, V] logits whose softmax puts about `confidence[i]` on tokens[i]."""
    out = torch.zeros(len(tokens), VOCAB)
    for i, (t, c) in enumerate(zip(tokens, confidence)):
        out[i, t] = torch.log(torch.tensor(c * (VOCAB - 2) / (1 - c)))  # VOCAB-1 others at logit 0, MASK excluded
    return out


@pytest.mark.parametrize("masked,steps,expected", [(4, 4, [1, 1, 1, 1]), (7, 3, [3, 2, 2]), (2, 4, [1, 1, 0, 0])])
def test_fixed_schedule_splits_evenly(masked, steps, expected):
    assert fixed_schedule(masked, steps) == expected
    assert sum(fixed_schedule(masked, steps)) == masked


def test_block_keeps_prompt_tail_fixed():
    seq = sequence([1, 2, 3, 4, 5, 6])  # block 4: prefix 4, tail [5, 6] shares the first block
    assert seq.prefix_len == 4 and seq.max_tokens == 16
    start_block(seq, settings())
    assert seq.tokens == [1, 2, 3, 4] and seq.context_len == 4
    assert seq.block.tolist() == [5, 6, MASK, MASK]
    assert seq.masked.tolist() == [False, False, True, True]
    assert seq.step_quota == [1, 1, 0, 0]


def test_fixed_unmasks_most_confident_first():
    seq = sequence([1, 2, 3, 4])
    s = settings("fixed", steps=2)
    start_block(seq, s)
    logits = logits_favouring([0, 1, 2, 3], [0.3, 0.8, 0.5, 0.6])
    unmask_step(seq, logits, 0, s)
    assert seq.block.tolist() == [MASK, 1, MASK, 3]
    unmask_step(seq, logits, 1, s)  # last step: everything left
    assert seq.block.tolist() == [0, 1, 2, 3] and not seq.masked.any()


def test_threshold_unmasks_all_confident_and_at_least_one():
    seq = sequence([1, 2, 3, 4])
    s = settings("threshold", steps=4, threshold=0.7)
    start_block(seq, s)
    unmask_step(seq, logits_favouring([0, 1, 2, 3], [0.95, 0.2, 0.75, 0.3]), 0, s)
    assert seq.masked.tolist() == [False, True, False, True]
    unmask_step(seq, logits_favouring([0, 5, 2, 6], [0.95, 0.2, 0.75, 0.3]), 1, s)
    assert seq.masked.tolist() == [False, True, False, False]  # none confident: the top one only
    assert seq.block.tolist() == [0, MASK, 2, 6]


def test_never_proposes_mask_token():
    logits = torch.zeros(3, VOCAB)
    logits[:, MASK] = 100.0
    tokens, conf = propose(logits, GenerationRequest(prompt=[1]), torch.Generator(), MASK)
    assert (tokens != MASK).all() and (conf > 0).all()


def test_sampling_is_seeded_and_respects_top_k():
    logits = torch.randn(16, VOCAB)
    req = GenerationRequest(prompt=[1], temperature=1.0, top_k=2)
    a, _ = propose(logits, req, torch.Generator().manual_seed(3), MASK)
    b, _ = propose(logits, req, torch.Generator().manual_seed(3), MASK)
    assert torch.equal(a, b)
    masked_logits = logits.clone()
    masked_logits[:, MASK] = float("-inf")
    top2 = masked_logits.topk(2, -1).indices
    assert ((a[:, None] == top2).any(-1)).all()


def test_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = _filter_logits(logits, None, 0.7).isfinite()
    assert kept.tolist() == [[True, True, False, False]]
    assert _filter_logits(logits, None, 0.1).isfinite().sum() == 1


def test_finish_stops_at_eos_and_truncates():
    seq = sequence([1, 2, 3, 4], max_new=8)
    s = settings()
    start_block(seq, s)
    seq.block = torch.tensor([5, EOS, 6, 7])
    seq.masked[:] = False
    finish_block(seq, s)
    assert seq.finish_reason == "eos" and seq.generated == [5]


def test_finish_stops_at_length_and_truncates():
    seq = sequence([1, 2, 3, 4, 5], max_new=2)
    s = settings()
    start_block(seq, s)
    seq.block = torch.tensor([5, 1, 2, 3])
    seq.masked[:] = False
    finish_block(seq, s)
    assert seq.finish_reason == "length" and seq.generated == [1, 2]


def test_request_validation():
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerationRequest(prompt=[1], max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        GenerationRequest(prompt=[1], top_p=0.0)
