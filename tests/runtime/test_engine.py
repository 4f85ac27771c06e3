"""The public API and the command line, on the bundled checkpoints."""
import json
import re

import pytest
import torch

from runtime import Engine, EngineConfig, GenerationRequest
from runtime.cli import _config, build_parser, main
from runtime.engine import CHECKPOINTS, DEFAULT_MODEL

TINY = CHECKPOINTS / "tiny-random"


@pytest.fixture(scope="module")
def engine():
    # float64: the random default model's predictions are near-ties, and only exact arithmetic
    # makes token equality across batch compositions a statement about the code, not rounding.
    return Engine(EngineConfig(model_path=str(TINY), device="cpu", dtype="float64", progress=False,
                               max_batch_size=2))


def test_generate_returns_results_in_order(engine):
    prompts = ["The key is", "abc", GenerationRequest(prompt="Hello there, friend", max_new_tokens=5, request_id="x")]
    results = engine.generate(prompts, max_new_tokens=7)
    assert [r.request_id for r in results][2] == "x"
    assert [len(r.tokens) for r in results] == [7, 7, 5] or any(r.finish_reason == "eos" for r in results)
    for r in results:
        assert r.finish_reason in ("eos", "length")
        assert r.text == engine.tokenizer.decode(r.tokens, skip_special_tokens=True)
        assert r.blocks >= 1 and r.denoising_passes >= r.blocks
    assert engine.last_stats.generated_tokens == sum(len(r.tokens) for r in results)


def test_batch_composition_does_not_change_tokens(engine):
    prompts = ["one", "a longer prompt than the block", "x" * 13]
    batched = engine.generate(prompts, max_new_tokens=9)
    for prompt, result in zip(prompts, batched):
        assert engine.generate([prompt], max_new_tokens=9)[0].tokens == result.tokens


def test_seeded_sampling_is_reproducible(engine):
    req = GenerationRequest(prompt="same seed", max_new_tokens=8, temperature=1.0, seed=7)
    assert engine.generate([req])[0].tokens == engine.generate([req])[0].tokens


def test_token_id_prompts(engine):
    ids = engine.tokenizer.encode("token ids")
    assert engine.generate([ids], max_new_tokens=4)[0].tokens == engine.generate(["token ids"], max_new_tokens=4)[0].tokens


def test_bad_input_is_refused_with_a_reason(engine):
    """A bad prompt ends alone with its reason; the others of the call are served as without it."""
    limit = engine.model_config.max_position_embeddings
    bad = {"too-long": ([3] * limit, "beyond the model's"), "empty": ([], "prompt=\\[\\] \\(list\\): is empty"),
           "vocab": ([engine.model_config.vocab_size + 3], "outside the vocabulary of 101"),
           "floats": ([5.0, 7.5], r"token id 5.0 at position 0 is not an integer"),
           "bytes": (b"hello", r"bytes are neither text nor token ids: decode them"),
           "text": ("tab\there", r"'\\t' \(U\+0009\) at character 3")}
    alone = engine.generate(["fine prompt"], max_new_tokens=8)[0]
    results = engine.generate([prompt for prompt, _ in bad.values()][:3] + ["fine prompt"]
                              + [prompt for prompt, _ in bad.values()][3:], max_new_tokens=8)
    assert [r.request_id for r in results] == [str(i) for i in range(len(bad) + 1)]
    fine = results.pop(3)
    assert fine.finish_reason == alone.finish_reason and fine.tokens == alone.tokens and fine.error is None
    for result, (name, (_, message)) in zip(results, bad.items()):
        assert result.finish_reason == "error" and result.tokens == [] and result.blocks == 0, name
        assert re.search(message, result.error), (name, result.error)
    assert engine.last_stats.requests == len(bad) + 1 and engine.last_stats.errors == len(bad)
    [only] = engine.generate([[]])  # nothing to run: no mode is built
    assert only.finish_reason == "error" and engine.last_stats.errors == 1
    with pytest.raises(ValueError, match="mode"):
        EngineConfig(model_path=str(DEFAULT_MODEL), mode="nonsense")


def test_call_level_mistakes_refuse_the_call(engine):
    with pytest.raises(ValueError, match=r"request_id 'a' is given to prompts 0 and 2 of this generate call"):
        engine.generate([GenerationRequest("x", request_id="a"), "y", GenerationRequest("z", request_id="a")])
    # an explicit id equal to another prompt's index
    with pytest.raises(ValueError, match=r"request_id '0' is given to prompts 0 and 1"):
        engine.generate(["x", GenerationRequest("y", request_id="0")])
    with pytest.raises(ValueError, match=r"max_new_tokens=1.5: must be an integer >= 1"):
        engine.generate(["x"], max_new_tokens=1.5)
    with pytest.raises(ValueError, match=r"seed=18446744073709551616: must be an integer in \[0, 2\*\*64 - 1"):
        engine.generate(["x"], seed=2**64)


def test_the_largest_seed_runs(engine):
    [result] = engine.generate([GenerationRequest("seed", max_new_tokens=4, temperature=1.0, seed=2**64 - 1)])
    assert result.finish_reason in ("length", "eos") and result.error is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_cuda_requested_without_cuda():
    with pytest.raises(RuntimeError, match="needs CUDA"):
        Engine(EngineConfig(model_path=str(DEFAULT_MODEL), device="cuda"))


def test_missing_model_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        Engine(EngineConfig(model_path=str(tmp_path)))


def test_cli_demo_and_generate(capsys):
    assert main(["demo", "--model", str(TINY), "--no-progress", "--max-new-tokens", "6", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "demo wall time" in out and "tokens/s" in out
    assert main(["generate", "--model", str(TINY), "--no-progress", "--prompt", "hi", "--prompt", "there", "--json",
                 "--max-new-tokens", "5", "--device", "cpu"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [line["prompt"] for line in lines] == ["hi", "there"]
    assert all(len(line["tokens"]) <= 5 for line in lines)
    herald = ["generate", "--model", str(TINY), "--no-progress", "--prompt", "hi", "--json", "--mode", "herald",
              "--lookahead", "--budget", "0.5", "--max-new-tokens", "5", "--device", "cpu"]
    assert _config(build_parser().parse_args(herald)).sparse.lookahead
    assert main(herald) == 0
    assert "mode herald" in capsys.readouterr().err


def test_cli_reports_errors_without_traceback(capsys, tmp_path):
    assert main(["generate", "--model", str(tmp_path), "--prompt", "x", "--no-progress"]) == 2
    assert "config.json" in capsys.readouterr().err


def test_default_model_answers_a_retrieval_prompt_with_herald_and_dense(capsys):
    """The README's main command: the trained default model, herald at 5% and dense, side by side."""
    examples = json.loads((DEFAULT_MODEL / "demo_prompts.json").read_text())
    assert main(["demo", "--no-progress", "--max-new-tokens", "8", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "herald:" in out and "dense:" in out and out.count("expected:") == len(examples)
    passkey = next(e for e in examples if e["task"] == "passkey")
    engine = Engine(EngineConfig(model_path=str(DEFAULT_MODEL), device="cpu", progress=False))
    [result] = engine.generate([passkey["prompt"]], max_new_tokens=8)
    assert result.text.strip() == passkey["answer"]  # dense answers the held-out pass key


def test_prompts_may_come_from_an_iterator(engine):
    results = engine.generate((p for p in ["one", "two"]), max_new_tokens=4)
    assert [r.request_id for r in results] == ["0", "1"] and all(r.error is None for r in results)
