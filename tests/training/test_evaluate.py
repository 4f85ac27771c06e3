"""The accuracy harness: table layout, and a deadline that skips (and lists) what does not fit."""
import time
from pathlib import Path

import pytest

from runtime import Engine, EngineConfig
from training.evaluate import accuracy_table, evaluate

TINY = str(Path(__file__).resolve().parents[2] / "checkpoints" / "tiny-random")


@pytest.fixture(scope="module")
def engine():
    return Engine(EngineConfig(model_path=TINY, device="cpu", progress=False, max_batch_size=8))


def test_every_context_without_a_deadline(engine):
    res = evaluate(engine, ["passkey", "kv"], [256, 128], per_task=2, seed=0)
    assert res["contexts"] == [128, 256] and res["skipped_contexts"] == []
    assert set(res["accuracy"]) == {"passkey", "kv"} and set(res["accuracy"]["kv"]) == {"128", "256"}
    assert all(0 <= res["correct"][t][c] <= 2 for t in res["correct"] for c in res["correct"][t])
    assert res["mean"]["128"] == pytest.approx((res["accuracy"]["passkey"]["128"] + res["accuracy"]["kv"]["128"]) / 2)
    table = accuracy_table(res)
    assert table.splitlines()[0].split()[-2:] == ["128", "256"] and "not evaluated" not in table


def test_a_passed_deadline_runs_the_first_context_only_and_lists_the_rest(engine):
    res = evaluate(engine, ["passkey"], [192, 128, 256], per_task=1, seed=0, deadline=time.perf_counter())
    assert res["contexts"] == [192] and res["skipped_contexts"] == [128, 256]
    assert list(res["accuracy"]["passkey"]) == ["192"]
    assert "not evaluated, out of time: contexts [128, 256]" in accuracy_table(res)
    assert "| 192 |" in accuracy_table(res, markdown=True)
