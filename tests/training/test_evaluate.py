"""The accuracy harness: table layout, a deadline that skips (and lists) what does not fit, and the
command's default split (test)."""
import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from runtime import Engine, EngineConfig
from training.evaluate import accuracy_table, build_parser, evaluate, main
from training.tasks import ALL_TASKS, ANSWER_ROOMS, RULER_TASKS, TASKS, generate_examples

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


class ScriptedEngine:
    """An engine stand-in that answers each prompt with `reply(example)` and keeps the requests."""

    def __init__(self, examples, reply):
        self.by_prompt = {ex.prompt: ex for ex in examples}
        self.reply, self.requests = reply, []
        self.model_config = SimpleNamespace(max_position_embeddings=4096)
        self.config = SimpleNamespace(mode="dense")

    def generate(self, requests):
        self.requests += requests
        return [SimpleNamespace(text=self.reply(self.by_prompt[r.prompt]), tokens=[0]) for r in requests]


def test_ruler_tasks_are_graded_by_their_rules_within_each_examples_room():
    tasks, contexts = ("niah_single_3", "niah_multivalue", "niah_multiquery", "vt", "cwe"), (512, 1000)
    examples = [ex for c in contexts for t in tasks for ex in generate_examples(t, c, 2, 7, split="test")]
    right = ScriptedEngine(examples, lambda ex: f" {ex.answer}\n")
    res = evaluate(right, tasks, contexts, per_task=2, seed=7, split="test")
    assert all(v == 1.0 for cells in res["accuracy"].values() for v in cells.values())
    # the generation limit is each example's room: prompt + answer never pass its context
    assert sorted(r.max_new_tokens for r in right.requests) == sorted(ex.length - len(ex.prompt) for ex in examples)
    assert all(len(r.prompt) + r.max_new_tokens <= 1000 for r in right.requests)
    assert {r.max_new_tokens >= ANSWER_ROOMS[right.by_prompt[r.prompt].task] for r in right.requests} == {True}
    # the items reversed: right for the sets, wrong for multiquery (each value given to another key) and uuids
    reversed_items = ScriptedEngine(examples, lambda ex: ", ".join(reversed(ex.answer.split(", "))))
    res = evaluate(reversed_items, tasks, contexts, per_task=2, seed=7, split="test")
    assert {t: set(res["accuracy"][t].values()) for t in tasks} == {
        "niah_single_3": {1.0}, "niah_multivalue": {1.0}, "niah_multiquery": {0.0}, "vt": {1.0}, "cwe": {1.0}}
    one_short = ScriptedEngine(examples, lambda ex: ex.answer.rsplit(", ", 1)[0] if ", " in ex.answer
                               else ex.answer[:-1])
    res = evaluate(one_short, tasks, contexts, per_task=2, seed=7, split="test")
    assert set(res["mean"].values()) == {0.0}
    with pytest.raises(ValueError, match="cwe from 512"):
        evaluate(right, ["passkey", "cwe"], [256, 512], per_task=1, seed=0, split="test")
    fixed = ScriptedEngine(generate_examples("passkey", 256, 1, 0, split="test"), lambda ex: ex.answer)
    evaluate(fixed, ["passkey"], [256], per_task=1, seed=0, max_new_tokens=5, split="test")
    assert [r.max_new_tokens for r in fixed.requests] == [5]  # a limit given applies to every request


def test_the_task_option_takes_names_and_groups():
    assert build_parser().parse_args(["--model", TINY]).tasks == list(TASKS)
    parsed = build_parser().parse_args(["--model", TINY, "--tasks", "ruler", "passkey", "vt"]).tasks
    assert parsed == [*RULER_TASKS, "passkey"]
    assert build_parser().parse_args(["--model", TINY, "--tasks", "all"]).tasks == list(ALL_TASKS)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--model", TINY, "--tasks", "niah_single_4"])
