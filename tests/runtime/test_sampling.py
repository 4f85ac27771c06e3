"""SamplingParams: validation, stop strings across block boundaries, stop token ids, min new
tokens, min-p, n with derived seeds, logprobs; on the tiny random checkpoint (block size 4)."""
import math

import pytest

from runtime import Engine, EngineConfig, GenerationRequest
from runtime.engine import CHECKPOINTS
from runtime.sampling import SamplingParams, derived_seed, match_stop

TINY = CHECKPOINTS / "tiny-random"
PROMPT = "abcdef"  # 6 tokens: the first generated block holds 2 new tokens, the next ones 4


@pytest.fixture(scope="module")
def engine():
    return Engine(EngineConfig(model_path=str(TINY), device="cpu", dtype="float64", progress=False,
                               max_batch_size=3))


def greedy(engine, **options):
    [result] = engine.generate([PROMPT], sampling_params=SamplingParams(max_new_tokens=16, ignore_eos=True, **options))
    return result


@pytest.mark.parametrize("field, value, message", [
    ("temperature", float("nan"), "temperature=nan: must be a finite number"),
    ("temperature", -1.0, "temperature=-1.0"),
    ("min_p", 1.5, "min_p=1.5: must be a number in"),
    ("n", 0, "n=0: must be an integer >= 1"),
    ("stop", ["ok", ""], "stop=.*non-empty strings"),
    ("stop_token_ids", [-1], "stop_token_ids="),
    ("min_new_tokens", 200, r"min_new_tokens=200: must be an integer in \[0, max_new_tokens=128\]"),
    ("seed", 2**64, "seed="),
    ("logprobs", 1, "logprobs=1: must be True or False"),
])
def test_bad_values_are_refused_naming_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**{field: value})


def test_from_dict_refuses_unknown_names():
    assert SamplingParams.from_dict({"temperature": 0.5, "stop": "x"}).stop == ("x",)
    with pytest.raises(ValueError, match="no field 'max_tokens'"):
        SamplingParams.from_dict({"max_tokens": 3})


def test_stop_string_across_a_block_boundary_cuts_the_text(engine):
    full = greedy(engine)
    assert len(full.tokens) == 16 and full.finish_reason == "length"
    # generated characters 1..3 straddle the boundary between the first block (2 new) and the second
    stop = full.text[1:4]
    start = full.text.find(stop)
    cut = greedy(engine, stop=[stop])
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == full.text[:start]
    assert cut.tokens == full.tokens[:len(engine.tokenizer.encode(full.text[:start + len(stop)]))]
    kept = greedy(engine, stop=[stop], include_stop_str_in_output=True)
    assert kept.text == full.text[:start + len(stop)]
    assert match_stop("xxabyy", ["ab", "x"], start=3) == (2, "ab")


def test_stop_token_ids_and_min_new_tokens(engine):
    full = greedy(engine)
    token = full.tokens[5]
    first = full.tokens.index(token)
    stopped = greedy(engine, stop_token_ids=[token])
    assert stopped.finish_reason == "stop" and stopped.stop_reason == token
    assert stopped.tokens == full.tokens[:first]
    assert greedy(engine, stop_token_ids=[token], include_stop_str_in_output=True).tokens == full.tokens[:first + 1]
    late = greedy(engine, stop_token_ids=[token], min_new_tokens=first + 3)
    assert token not in late.tokens[:first + 3]
    assert len(late.tokens) >= first + 3


def test_min_p_keeps_the_top_tokens_and_logprobs_come_per_token(engine):
    plain = greedy(engine, logprobs=True)
    assert plain.tokens == greedy(engine).tokens  # asking for logprobs changes no token
    assert len(plain.logprobs) == len(plain.tokens)
    assert all(lp is not None and lp <= 0.0 and math.isfinite(lp) for lp in plain.logprobs)
    # min_p=1 keeps only each position's top token, as top_k=1 does (confidences 1: a sampling row's)
    top_only = greedy(engine, temperature=1.0, min_p=1.0, seed=3, logprobs=True)
    assert top_only.tokens == greedy(engine, temperature=1.0, top_k=1, seed=5).tokens
    assert top_only.tokens != greedy(engine, temperature=1.0, seed=3).tokens


def test_n_expands_with_derived_seeds_and_batch_does_not_change_tokens(engine):
    params = SamplingParams(temperature=1.0, seed=11, n=3, max_new_tokens=12, ignore_eos=True)
    results = engine.generate([PROMPT, "zz"], sampling_params=params)
    assert [r.request_id for r in results] == ["0.0", "0.1", "0.2", "1.0", "1.1", "1.2"]
    assert derived_seed(11, 0) == 11 and len({derived_seed(11, k) for k in range(3)}) == 3
    assert len({tuple(r.tokens) for r in results[:3]}) > 1  # different streams
    one = engine.generate([PROMPT], sampling_params=SamplingParams(temperature=1.0, seed=11, max_new_tokens=12,
                                                                   ignore_eos=True))
    assert one[0].tokens == results[0].tokens  # the first continuation keeps the seed
    alone = engine.generate([GenerationRequest(prompt=PROMPT, max_new_tokens=12, temperature=1.0,
                                               seed=derived_seed(11, 2), stop_at_eos=False)])
    assert alone[0].tokens == results[2].tokens  # the same tokens alone as in a batch of six


def test_one_sampling_params_per_prompt_must_match_the_prompts(engine):
    with pytest.raises(ValueError, match="one per prompt: got 1 for 2 prompts"):
        engine.generate(["a", "b"], sampling_params=[SamplingParams()])


def test_a_refused_prompt_with_sampling_params_ends_alone(engine):
    """An empty prompt (or token ids that are not integers) given with SamplingParams fails alone,
    under the ids its requests would have had; the other prompts run as they would without it."""
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    alone = engine.generate([PROMPT], sampling_params=params)
    results = engine.generate([PROMPT, "", [1.5, 2.0]], sampling_params=params)
    assert [r.request_id for r in results] == ["0", "1", "2"]
    assert results[0].tokens == alone[0].tokens and results[0].finish_reason == "length"
    assert [r.finish_reason for r in results[1:]] == ["error", "error"]
    assert "empty" in results[1].error and "prompt" in results[2].error
    paired = engine.generate(["", PROMPT], sampling_params=SamplingParams(max_new_tokens=8, n=2, ignore_eos=True))
    assert [(r.request_id, r.finish_reason) for r in paired] == [("0.0", "error"), ("0.1", "error"),
                                                                  ("1.0", "length"), ("1.1", "length")]
