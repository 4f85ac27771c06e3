"""The synthetic retrieval tasks: deterministic, exact lengths, and the answer is where the question points."""
import re

import pytest

from runtime.tokenizer import DEFAULT_ALPHABET
from training.tasks import ANSWER_ROOM, MIN_LENGTH, TASKS, exact_match, filler, generate_examples, make_example

LENGTHS = (MIN_LENGTH, 256, 1000, 4096)


@pytest.mark.parametrize("task", TASKS)
def test_same_seed_same_examples_and_splits_differ(task):
    a = generate_examples(task, 512, 5, seed=3)
    assert a == generate_examples(task, 512, 5, seed=3)
    # Example i does not depend on how many were asked for.
    assert generate_examples(task, 512, 2, seed=3, start=3) == a[3:5]
    other_seed = generate_examples(task, 512, 5, seed=4)
    train = generate_examples(task, 512, 5, seed=3, split="train")
    assert all(x.prompt != y.prompt for x, y in zip(a, other_seed))
    assert not {x.prompt for x in a} & {y.prompt for y in train}


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("length", LENGTHS)
def test_lengths_and_alphabet(task, length):
    for ex in generate_examples(task, length, 8, seed=0):
        assert length - ANSWER_ROOM - 7 <= len(ex.prompt) <= length - ANSWER_ROOM
        assert len(ex.prompt) + len(ex.answer) + 1 <= length
        assert set(ex.prompt) <= set(DEFAULT_ALPHABET)
        assert re.fullmatch(r"[1-9]\d{4,5}", ex.answer)
        assert ex.task == task and ex.length == length
    # the prompt length varies modulo every block size up to 8 (the answer starts anywhere in a block)
    assert len({len(ex.prompt) % 8 for ex in generate_examples(task, length, 64, seed=0)}) >= 6


def _resolve_chain(prompt: str, name: str) -> str:
    assignments = dict(re.findall(r" ([A-Z]{3}) = ([A-Z]{3}|\d+)\. ", prompt))
    value, hops = assignments[name], 0
    while not value.isdigit():
        value, hops = assignments[value], hops + 1
    assert hops >= 1
    return value


@pytest.mark.parametrize("length", LENGTHS)
def test_answer_is_where_the_question_points(length):
    for ex in generate_examples("passkey", length, 10, seed=1):
        assert re.findall(r"The pass key is (\d+)\.", ex.prompt) == [ex.answer]
        assert ex.prompt.endswith("What is the pass key? The pass key is ")
    for ex in generate_examples("multikey", length, 10, seed=1):
        label = re.search(r"\nThe pass key for (\w+) is $", ex.prompt).group(1)
        keys = dict(re.findall(r"The pass key for (\w+) is (\d+)\.", ex.prompt))
        assert len(keys) >= 2 and keys[label] == ex.answer
        assert len(re.findall(r"The pass key for (\w+) is \d+\.", ex.prompt)) == len(keys)  # labels unique
    for ex in generate_examples("kv", length, 10, seed=1):
        key = re.search(r"What is the value of (\w{4})\? \1: $", ex.prompt).group(1)
        pairs = re.findall(r"\n(\w{4}): (\d+)\n", ex.prompt)
        assert len(pairs) >= 3 and len(dict(pairs)) == len(pairs)
        assert dict(pairs)[key] == ex.answer
    for ex in generate_examples("vartrack", length, 10, seed=1):
        name = re.search(r"which number does ([A-Z]{3}) hold\?\nAnswer: $", ex.prompt).group(1)
        assert _resolve_chain(ex.prompt, name) == ex.answer
        assert len(re.findall(r" [A-Z]{3} = \d+\. ", ex.prompt)) == 2  # the chain and its distractor
        hops = len(re.findall(r" [A-Z]{3} = [A-Z]{3}\. ", ex.prompt))  # indirections of both chains
        assert hops <= (2 if length < 256 else 4)


def test_facts_sit_at_varied_depths():
    depths = [ex.prompt.index("The pass key is") / len(ex.prompt) for ex in generate_examples("passkey", 2048, 40, 2)]
    assert min(depths) < 0.2 and max(depths) > 0.8


def test_checker():
    ex = generate_examples("passkey", 256, 1, seed=0)[0]
    assert ex.check(ex.answer) and ex.check(f" {ex.answer}\n")
    assert not ex.check(ex.answer + "0") and not ex.check(ex.answer[:-1]) and not ex.check("")
    assert exact_match("123456", "123456") and not exact_match("123 456", "123456")


def test_filler_is_exact_and_digit_free():
    import random
    rng = random.Random(0)
    for n in (0, 1, 7, 100, 3001):
        text = filler(rng, n)
        assert len(text) == n and not any(c.isdigit() for c in text)
    assert filler(random.Random(5), 500) != filler(random.Random(6), 500)


def test_bad_arguments():
    import random
    with pytest.raises(ValueError, match="unknown"):
        make_example("nope", 512, random.Random(0))
    with pytest.raises(ValueError, match="shortest"):
        make_example("passkey", MIN_LENGTH - 1, random.Random(0))


@pytest.mark.parametrize("task", TASKS)
def test_every_task_fits_the_shortest_context(task):
    # The curriculum starts at MIN_LENGTH: every random draw (labels, chain lengths, offsets) must fit.
    for ex in generate_examples(task, MIN_LENGTH, 300, seed=7, split="train"):
        assert len(ex.prompt) + len(ex.answer) + 1 <= MIN_LENGTH
