"""Training data: deterministic batches from worker processes, and the curriculum's moves."""
import dataclasses
import itertools
import re

import numpy as np
import pytest

from training.data import (NOISY, BatchRequest, BatchSource, CharEncoder, Curriculum, LayoutSettings, Level,
                           make_batch_arrays, make_levels, stage_at_shares)
from training.tasks import DEFAULT_OPTIONS, MIN_LENGTHS, RULER_TASKS, TASKS, TaskOptions, generate_examples
from training.train import make_tokenizer

TOKENIZER = make_tokenizer()


def settings(seed=0):
    return LayoutSettings(seed=seed, block_size=4, mask_token_id=TOKENIZER.mask_token_id,
                          eos_token_id=TOKENIZER.eos_token_ids[0], noisy_copies=2, eps=1e-3, loss_weighting="none",
                          pad_multiple=8, max_rows=16, encoder=CharEncoder(TOKENIZER))


def request(index, context=128, rows=3, tasks=TASKS, weights=(1.0, 1.0, 1.0, 1.0)):
    return BatchRequest(index=index, context=context, rows=rows, tasks=tuple(tasks), weights=tuple(weights))


def same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_batch_arrays_depend_only_on_seed_and_request():
    s = settings()
    a = make_batch_arrays(s, request(5))
    assert same(a, make_batch_arrays(s, request(5)))
    assert not same(a, make_batch_arrays(s, request(6)))
    assert not same(a, make_batch_arrays(settings(seed=1), request(5)))
    assert a["input_ids"].shape[0] == 3 and a["input_ids"].shape[1] % 8 == 0
    assert (a["kind"] == NOISY).any() and (a["targets"] != -100).any()
    # a task of weight zero is never drawn: only the pass-key prompt ends this way
    only_pk = make_batch_arrays(s, request(7, rows=8, weights=(1.0, 0.0, 0.0, 0.0)))
    question = CharEncoder(TOKENIZER)("\nWhat is the pass key? The pass key is ")
    for row in range(8):
        clean = only_pk["input_ids"][row][only_pk["kind"][row] == 0].tolist()
        assert any(clean[i:i + len(question)] == question for i in range(len(clean) - len(question) + 1)), row


def test_worker_batches_equal_inline_batches_in_request_order():
    def requests():  # endless: the pool asks `lookahead` requests ahead
        i = 0
        while True:
            yield request(i, context=128 if i % 2 else 192, rows=2 + i % 3)
            i += 1

    inline = BatchSource(settings(), workers=0)
    pooled = BatchSource(settings(), workers=1, lookahead=3)
    try:
        it_a, it_b = requests(), requests()
        for _ in range(6):
            ra, a = inline.next(lambda: next(it_a))
            rb, b = pooled.next(lambda: next(it_b))
            assert ra == rb and same(a, b)
        assert pooled.pool is not None  # the pool really ran
    finally:
        pooled.close()


def test_a_dead_pool_falls_back_to_inline_batches(capsys):
    source = BatchSource(settings(), workers=1, lookahead=2)
    source.pool.shutdown(wait=True)
    reqs = iter([request(i) for i in range(4)])
    req, arrays = source.next(lambda: next(reqs))
    assert req.index == 0 and same(arrays, make_batch_arrays(settings(), req))
    assert source.pool is None and "inline" in capsys.readouterr().err
    req, _ = source.next(lambda: next(reqs))
    assert req.index == 1  # the queued request is still served, in order


def test_levels():
    levels = make_levels(128, 1024, TASKS, warmup_tasks=["passkey"])
    assert levels[0] == Level(128, ("passkey",))
    assert [lv.context for lv in levels] == [128, 128, 256, 512, 1024]
    assert all(lv.tasks == tuple(TASKS) for lv in levels[1:])
    assert make_levels(128, 256, TASKS, warmup_tasks=TASKS) == [Level(128, tuple(TASKS)), Level(256, tuple(TASKS))]
    assert len(make_levels(128, 256, TASKS)) == 2
    with pytest.raises(ValueError, match="warm-up"):
        make_levels(128, 256, ["kv"], warmup_tasks=["passkey"])
    with pytest.raises(ValueError, match="min_context"):
        make_levels(64, 256, TASKS)


def test_curriculum_advances_on_evaluation_and_by_the_time_floor():
    cur = Curriculum(make_levels(128, 512, TASKS, ["passkey"]), advance_at=0.9, ramp_end=0.8, replay=0.0)
    assert cur.level_at(0.0) == 0 and cur.level_at(0.79) == 2 and cur.level_at(0.8) == 3  # floor, 4 levels
    assert not cur.record(0, {"passkey": 0.85}, step=10, elapsed=1.0)
    assert cur.record(0, {"passkey": 0.95}, step=20, elapsed=2.0) and cur.level_at(0.0) == 1
    assert not cur.record(1, {"passkey": 1.0, "multikey": 0.95, "kv": 0.5, "vartrack": 1.0}, step=30, elapsed=3.0)
    assert cur.record(1, dict.fromkeys(TASKS, 0.92), step=40, elapsed=4.0) and cur.level_at(0.0) == 2
    assert [h["earned_level"] for h in cur.history] == [1, 2]
    assert not cur.record(0, {"passkey": 1.0}, step=50, elapsed=5.0)  # an old level never moves it back or on
    assert cur.earned == 2
    never = Curriculum(make_levels(128, 256, TASKS), advance_at=None, ramp_end=0.5)
    assert not never.record(0, dict.fromkeys(TASKS, 1.0), step=1, elapsed=0.0) and never.level_at(0.49) == 0


def test_task_weights_follow_accuracy_and_requests_fit_the_batch():
    cur = Curriculum(make_levels(128, 512, TASKS), advance_at=0.9, replay=0.0, min_task_weight=0.15)
    assert cur.weights(TASKS) == (1.0, 1.0, 1.0, 1.0)
    cur.record(0, {"passkey": 1.0, "multikey": 0.6, "kv": 0.0, "vartrack": 0.9}, step=1, elapsed=0.0)
    assert cur.weights(TASKS) == pytest.approx((0.15, 0.4, 1.0, 0.15))
    req = cur.request(3, 0.0, tokens_per_batch=1000, max_rows=5)
    assert req.index == 3 and req.context == 128 and req.rows == 5 and req.weights == cur.weights(TASKS)
    assert cur.request(4, 0.99, tokens_per_batch=1000, max_rows=64).rows == 1000 // 512


def test_replay_draws_only_shorter_contexts():
    cur = Curriculum(make_levels(128, 1024, TASKS, ["passkey"]), advance_at=None, ramp_end=0.5, replay=0.5, seed=3)
    contexts = [cur.request(i, 0.99, tokens_per_batch=4096, max_rows=64).context for i in range(400)]
    assert set(contexts) == {128, 256, 512, 1024}
    assert 0.35 < contexts.count(1024) / len(contexts) < 0.65
    first = [cur.request(i, 0.0, tokens_per_batch=4096, max_rows=64) for i in range(50)]
    assert {r.context for r in first} == {128} and {r.tasks for r in first} == {("passkey",)}


def test_levels_carry_task_options_into_the_batches():
    options = TaskOptions(vartrack_any_query=1.0)
    warm = TaskOptions(vartrack_chain=(1, 1), vartrack_any_query=1.0)
    levels = make_levels(128, 256, TASKS, warmup_tasks=["passkey"], options=options, warmup_options=warm)
    assert [(lv.context, lv.tasks, lv.options) for lv in levels] == [
        (128, ("passkey",), options), (128, tuple(TASKS), warm), (128, tuple(TASKS), options),
        (256, tuple(TASKS), options)]
    cur = Curriculum(levels, advance_at=None, ramp_end=0.8, replay=0.0)
    req = cur.request(0, 0.3, tokens_per_batch=128 * 6, max_rows=6)
    assert cur.level_at(0.3) == 1 and req.options == warm
    # Every vartrack row of the warm-up level asks for a name that holds its number directly.
    vartrack_only = BatchRequest(index=1, context=128, rows=6, tasks=("vartrack",), weights=(1.0,), options=warm)
    arrays = make_batch_arrays(settings(), vartrack_only)
    chars = {i: c for c in map(chr, range(128)) if (i := TOKENIZER.token_to_id(c)) is not None}
    for row in range(6):
        text = "".join(chars.get(int(t), "") for t in arrays["input_ids"][row][arrays["kind"][row] == 0])
        name = re.search(r"Which number does ([A-Z]{3}) hold", text).group(1)
        assert re.search(rf" {name} = \d+\. ", text)
    plain = dataclasses.replace(vartrack_only, options=DEFAULT_OPTIONS)
    assert plain.options == TaskOptions() and not same(arrays, make_batch_arrays(settings(), plain))


def test_training_batches_never_hold_held_out_examples():
    held_out = {ex.prompt for task in TASKS for split in ("validation", "test")
                for ex in generate_examples(task, 128, 100, seed=0, split=split)}
    encode = CharEncoder(TOKENIZER)
    s = settings(seed=0)  # the training seed equal to the evaluation seed: the split still separates them
    for index in range(4):
        arrays = make_batch_arrays(s, request(index, rows=8))
        for row in range(8):
            clean = arrays["input_ids"][row][arrays["kind"][row] == 0].tolist()
            assert not any(clean[:len(p)] == encode(p) for p in held_out)


def test_advancing_on_the_mean_lets_one_slow_task_wait():
    levels = make_levels(128, 512, TASKS)
    every = Curriculum(levels, advance_at=0.85, replay=0.0)
    mean = Curriculum(levels, advance_at=0.85, replay=0.0, advance_on="mean")
    scores = {"passkey": 1.0, "multikey": 1.0, "kv": 0.95, "vartrack": 0.5}  # mean 0.8625
    assert not every.record(0, scores, step=1, elapsed=1.0)
    assert mean.record(0, scores, step=1, elapsed=1.0) and mean.level_at(0.0) == 1
    assert not mean.record(1, {**scores, "kv": 0.8}, step=2, elapsed=2.0)  # mean 0.825
    with pytest.raises(ValueError, match="advance_on"):
        Curriculum(levels, advance_on="median")


def test_level_time_shares_shape_the_time_floor():
    assert [stage_at_shares(p, (1, 2, 1)) for p in (0.0, 0.24, 0.25, 0.74, 0.75, 1.0)] == [0, 0, 1, 1, 2, 2]
    levels = make_levels(128, 1024, TASKS, ["passkey"])  # 5 levels
    cur = Curriculum(levels, advance_at=0.9, replay=0.0, shares=(1, 1, 1, 1, 6))
    assert [cur.level_at(p) for p in (0.05, 0.15, 0.25, 0.35, 0.45, 0.99)] == [0, 1, 2, 3, 4, 4]
    cur.record(0, {"passkey": 1.0}, step=1, elapsed=1.0)
    assert cur.level_at(0.05) == 1  # evaluations still move it ahead of the floor
    with pytest.raises(ValueError, match="one per level"):
        Curriculum(levels, shares=(1, 1, 1))
    with pytest.raises(ValueError, match="one per level"):
        Curriculum(levels, shares=(1, 1, 0, 1, 1))


def test_task_options_travel_to_worker_processes():
    options = TaskOptions(vartrack_chain=(1, 2), vartrack_any_query=1.0, kv_near_miss=1.0)
    reqs = (BatchRequest(index=i, context=128, rows=4, tasks=TASKS, weights=(1.0,) * 4, options=options)
            for i in itertools.count())  # endless: the pool asks `lookahead` requests ahead
    pooled = BatchSource(settings(), workers=1, lookahead=2)
    try:
        for i in range(3):
            got, arrays = pooled.next(lambda: next(reqs))
            assert got.index == i and got.options == options and same(arrays, make_batch_arrays(settings(), got))
        assert pooled.pool is not None
    finally:
        pooled.close()


def test_a_mixed_run_takes_each_task_from_the_context_it_fits():
    """RULER-style tasks join the curriculum at their MIN_LENGTHS context; replayed shorter contexts keep
    only the tasks that fit them."""
    tasks = ("passkey", "niah_single_1", "cwe")
    levels = make_levels(128, 1024, tasks, warmup_tasks=["passkey"])
    assert [(lv.context, lv.tasks) for lv in levels] == [(128, ("passkey",)), (256, ("passkey", "niah_single_1")),
                                                          (512, tasks), (1024, tasks)]
    assert make_levels(512, 1024, RULER_TASKS)[0] == Level(512, RULER_TASKS)
    with pytest.raises(ValueError, match=r"\['cwe'\] need contexts of at least \[512\]"):
        make_levels(128, 256, ["passkey", "cwe"])
    with pytest.raises(ValueError, match="shortest context 128 holds the tasks \\[\\] only"):
        make_levels(128, 1024, ["cwe", "niah_single_1"])
    with pytest.raises(ValueError, match="warm-up"):  # a warm-up task must fit the first level
        make_levels(256, 1024, ["niah_single_1", "cwe"], warmup_tasks=["cwe"])
    cur = Curriculum(levels, advance_at=None, ramp_end=0.5, replay=0.7, seed=1)
    requests = [cur.request(i, 0.99, tokens_per_batch=2048, max_rows=8) for i in range(60)]
    assert {r.context for r in requests} == {128, 256, 512, 1024}
    for r in requests:
        assert r.tasks == tuple(t for t in tasks if MIN_LENGTHS[t] <= r.context) and len(r.weights) == len(r.tasks)
    # a batch of every RULER task encodes in the char alphabet and lays out
    arrays = make_batch_arrays(settings(), BatchRequest(index=0, context=512, rows=len(RULER_TASKS),
                                                        tasks=RULER_TASKS, weights=(1.0,) * len(RULER_TASKS)))
    assert arrays["input_ids"].shape[0] == len(RULER_TASKS) and (arrays["targets"] != -100).any()
