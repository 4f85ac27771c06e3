"""The unmasking rule and per-sequence bookkeeping, without a model."""
import pytest
import torch

from runtime.decoding import (DecodeSettings, GenerationRequest, SequenceState, _filter_logits, finish_block,
                              fixed_schedule, propose, propose_greedy, start_block, unmask_rows,
                              unmask_step)

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


def _rows_at_random_states(n: int, block: int, s: DecodeSettings, gen: torch.Generator) -> list[SequenceState]:
    """n open blocks with a random prompt tail fixed and random earlier steps already applied, so
    the rows have different remaining counts (some none)."""
    rows = []
    for i in range(n):
        tail = int(torch.randint(0, block, (1,), generator=gen))
        seq = sequence(list(range(block)) + list(range(tail)), max_new=4 * block, block=block)
        seq.seq_id = i
        start_block(seq, s)
        done = torch.rand(block, generator=gen) < 0.4  # positions an earlier step unmasked
        seq.block = torch.where(done & seq.masked, torch.randint(0, MASK, (block,), generator=gen), seq.block)
        seq.masked &= ~done
        rows.append(seq)
    return rows


@pytest.mark.parametrize("unmasking,threshold", [("fixed", 0.9), ("threshold", 0.3), ("threshold", 0.97)])
@pytest.mark.parametrize("step", [0, 1, 3])  # 3: the last step unmasks whatever remains
def test_unmask_rows_equals_unmask_step_row_by_row(unmasking, threshold, step):
    block, steps = 16, 4
    s = settings(unmasking, steps=steps, block=block, threshold=threshold)
    gen = torch.Generator().manual_seed(100 * step + int(threshold * 100))
    for trial in range(5):
        rows = _rows_at_random_states(6, block, s, gen)
        tokens = torch.randint(0, MASK, (len(rows), block), generator=gen)
        conf = torch.rand(len(rows), block, generator=gen)
        block_t = torch.stack([r.block for r in rows])
        masked_t = torch.stack([r.masked for r in rows])
        quota = torch.tensor([r.step_quota[step] for r in rows])
        left = unmask_rows(block_t, masked_t, tokens, conf, step, s, quota if unmasking == "fixed" else None)
        for i, seq in enumerate(rows):
            unmask_step(seq, None, step, s, (tokens[i], conf[i]))
            assert torch.equal(block_t[i], seq.block) and torch.equal(masked_t[i], seq.masked), (trial, i)
            assert int(left[i]) == int(seq.masked.sum())
        assert len({int(r.masked.sum()) for r in rows}) > 1 or step == steps - 1, "rows should differ in what is left"


def test_unmask_rows_with_nothing_left_changes_nothing():
    s = settings("threshold", steps=4, block=4, threshold=0.5)
    block = torch.tensor([[1, 2, 3, 4]])
    masked = torch.zeros(1, 4, dtype=torch.bool)
    left = unmask_rows(block, masked, torch.tensor([[5, 5, 5, 5]]), torch.ones(1, 4), 0, s, None)
    assert block.tolist() == [[1, 2, 3, 4]] and int(left[0]) == 0


def test_propose_greedy_equals_propose_row_by_row():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 4, VOCAB, generator=gen)
    logits[1, :, MASK] = 50.0  # [MASK] would win: it is never proposed
    before = logits.clone()
    tokens, conf = propose_greedy(logits, MASK)
    for i in range(3):
        seq = sequence([1, 2, 3, 4])
        t, c = propose(logits[i], seq.request, seq.generator, MASK)
        assert torch.equal(tokens[i], t) and torch.equal(conf[i], c)
    assert torch.equal(logits, before), "the caller's logits stay as they were"



# Every field of a request is checked where it is written: (field, bad value, what the message says).
BAD_REQUESTS = [
    ("max_new_tokens", 1.5, "max_new_tokens=1.5: must be an integer >= 1"),
    ("max_new_tokens", 0, "max_new_tokens=0: must be an integer >= 1"),
    ("max_new_tokens", True, "max_new_tokens=True: must be an integer >= 1"),
    ("max_new_tokens", "8", "max_new_tokens='8': must be an integer >= 1"),
    ("temperature", float("nan"), "temperature=nan: must be a finite number >= 0"),
    ("temperature", float("inf"), "temperature=inf: must be a finite number >= 0"),
    ("temperature", -0.1, "temperature=-0.1: must be a finite number >= 0"),
    ("temperature", True, "temperature=True: must be a finite number >= 0"),
    ("top_k", 2.0, "top_k=2.0: must be an integer >= 1, or None"),
    ("top_k", 0, "top_k=0: must be an integer >= 1, or None"),
    ("top_p", float("nan"), r"top_p=nan: must be a number in \(0, 1\], or None"),
    ("top_p", 0.0, r"top_p=0.0: must be a number in \(0, 1\]"),
    ("top_p", 1.5, r"top_p=1.5: must be a number in \(0, 1\]"),
    ("seed", 2**64, r"seed=18446744073709551616: must be an integer in \[0, 2\*\*64 - 1 = 18446744073709551615\]"),
    ("seed", -1, r"seed=-1: must be an integer in \[0, 2\*\*64 - 1"),
    ("seed", 1.0, r"seed=1.0: must be an integer in \[0, 2\*\*64 - 1"),
    ("seed", False, r"seed=False: must be an integer"),
    ("stop_at_eos", 1, "stop_at_eos=1: must be True or False"),
    ("stop_at_eos", "no", "stop_at_eos='no': must be True or False"),
    ("request_id", 3, r"request_id=3: must be a str or None \(e.g. str\(3\)\)"),
    ("prompt", "", "prompt='': is empty"),
    ("prompt", [], r"prompt=\[\] \(list\): is empty"),
    ("prompt", b"text", r"prompt=b'text' \(bytes\): bytes are neither text nor token ids: decode them to str first"),
    ("prompt", bytearray(b"\x01\x02"), r"prompt=bytearray\(b'\\x01\\x02'\) \(bytearray\): bytes are neither text nor token ids"),
    ("prompt", [1, 2.0, 3], r"prompt: token id 2.0 at position 1 is not an integer >= 0 \(1 such of 3\)"),
    ("prompt", [1, True], r"prompt: token id True at position 1 is not an integer >= 0"),
    ("prompt", [1, -4], r"prompt: token id -4 at position 1 is not an integer >= 0"),
    ("prompt", [1, "2"], r"prompt: token id '2' at position 1 is not an integer >= 0"),
    ("prompt", [1, float("nan")], r"prompt: token id nan at position 1 is not an integer >= 0"),
    ("prompt", [1, {"role": "user"}], r"prompt: token id \{'role': 'user'\} \(dict\) at position 1"),
    ("prompt", 42, r"prompt=42: must be a str, a list of int token ids or a list of chat messages"),
    ("prompt", torch.tensor([1, 2]), r"prompt=tensor\(\[1, 2\]\) \(Tensor\): must be a str, .* \(an array or tensor of ids: pass ids.tolist\(\)\)"),
]


@pytest.mark.parametrize("field,value,message", BAD_REQUESTS,
                         ids=[f"{f}={v!r}"[:40] for f, v, _ in BAD_REQUESTS])
def test_every_request_field_is_checked_naming_field_value_and_range(field, value, message):
    fields = {"prompt": [1, 2, 3], field: value}
    with pytest.raises(ValueError, match=rf"^GenerationRequest {message}"):
        GenerationRequest(**fields)


def test_good_requests_pass_and_numpy_integers_count_as_integers():
    np = pytest.importorskip("numpy")
    GenerationRequest(prompt=(1, np.int64(2), np.uint8(3)), max_new_tokens=np.int32(4), seed=2**64 - 1, top_k=5,
                      top_p=np.float32(0.5), temperature=np.float64(0.7), stop_at_eos=np.bool_(False),
                      request_id="r")
    GenerationRequest(prompt="text", seed=0, temperature=0)
    GenerationRequest(prompt=[{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match=r"token id np.float64\(2.0\) \(float64\) at position 0"):
        GenerationRequest(prompt=[np.float64(2.0)])


def test_a_long_prompt_is_quoted_short():
    with pytest.raises(ValueError) as err:
        GenerationRequest(prompt=[0.5] * 100_000)
    assert len(str(err.value)) < 400 and "(100000 such of 100000)" in str(err.value)
