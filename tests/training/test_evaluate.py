"""The accuracy harness: table layout, a deadline that skips (and lists) what does not fit, and the
command's default split (test)."""
import json
import time
from pathlib import Path

import pytest

from runtime import Engine, EngineConfig
from training.evaluate import accuracy_table, build_parser, evaluate, main
from training.tasks import generate_examples

TINY = str(Path(__file__).resolve().parents[2] / "checkpoints" / "tiny-random")


@pytest.fixture(scope="module")
def engine():
    return Engine(EngineConfig(model_path=TINY, device="cpu", progress=False, max_batch_size=8))


def test_every_context_without_a_deadline(engine):
    res = evaluate(engine, ["passkey", "kv"], [256, 128], per_task=2, seed=0, split="test")
    assert res["contexts"] == [128, 256] and res["skipped_contexts"] == []
    assert set(res["accuracy"]) == {"passkey", "kv"} and set(res["accuracy"]["kv"]) == {"128", "256"}
    assert all(res["accuracy"][t][c] == res["correct"][t][c] / 2 for t in res["correct"] for c in res["correct"][t])
    assert res["mean"]["128"] == pytest.approx((res["accuracy"]["passkey"]["128"] + res["accuracy"]["kv"]["128"]) / 2)
    table = accuracy_table(res)
    assert table.splitlines()[0].split()[-2:] == ["128", "256"] and "not evaluated" not in table


def test_a_passed_deadline_runs_the_first_context_only_and_lists_the_rest(engine):
    res = evaluate(engine, ["passkey"], [192, 128, 256], per_task=1, seed=0, split="test",
                   deadline=time.perf_counter())
    assert res["contexts"] == [192] and res["skipped_contexts"] == [128, 256]
    assert list(res["accuracy"]["passkey"]) == ["192"]
    assert "not evaluated, out of time: contexts [128, 256]" in accuracy_table(res)
    assert "| 192 |" in accuracy_table(res, markdown=True)


def test_the_command_reports_the_test_split_by_default_and_says_so(tmp_path, capsys):
    """training.evaluate is a reported number: by default it draws the test split, example by example
    (never validation, the stream training's decisions used), and its JSON and header name it."""
    assert build_parser().parse_args(["--model", TINY]).split == "test"
    for stream in ("train", "demo", "eval"):  # a reported number never comes from a stream it may not name
        with pytest.raises(SystemExit):
            build_parser().parse_args(["--model", TINY, "--split", stream])
    out = tmp_path / "eval.json"
    assert main(["--model", TINY, "--contexts", "128", "--per-task", "2", "--tasks", "passkey", "--device", "cpu",
                 "--json-out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert (data["split"], data["seed"]) == ("test", 1234)
    test, validation = (generate_examples("passkey", 128, 1, 1234, split=split)[0] for split in ("test", "validation"))
    sample = data["samples"][0]
    assert (sample["prompt_tail"], sample["answer"]) == (test.prompt[-80:], test.answer)
    assert sample["prompt_tail"] != validation.prompt[-80:]
    assert "test split, seed 1234" in capsys.readouterr().out.splitlines()[0]
