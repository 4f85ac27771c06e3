"""The synthetic retrieval tasks: deterministic, exact lengths, and the answer is where the question points."""
import hashlib
import itertools
import re

import pytest

from runtime.tokenizer import DEFAULT_ALPHABET
from training.tasks import (ANSWER_ROOMS, MAX_VARTRACK_CHAIN, MIN_LENGTH, SPLITS, TASKS, TaskOptions, example_rng,
                            exact_match, filler, generate_examples, longest_vartrack_chain, make_example)

LENGTHS = (MIN_LENGTH, 256, 1000, 4096)


@pytest.mark.parametrize("task", TASKS)
def test_same_seed_same_examples_and_seeds_differ(task):
    a = generate_examples(task, 512, 5, seed=3, split="test")
    assert a == generate_examples(task, 512, 5, seed=3, split="test")
    # Example i does not depend on how many were asked for.
    assert generate_examples(task, 512, 2, seed=3, split="test", start=3) == a[3:5]
    other_seed = generate_examples(task, 512, 5, seed=4, split="test")
    assert all(x.prompt != y.prompt for x, y in zip(a, other_seed))


@pytest.mark.parametrize("task", TASKS)
def test_the_splits_give_disjoint_examples_for_the_same_seed_task_length_and_index(task):
    """train, validation and test (and demo) draw different examples at every (seed, task, length,
    index): the split leads the stream's key, so sharing every other field shares no stream."""
    for seed, length in ((0, MIN_LENGTH), (1234, 512)):
        by_split = {split: generate_examples(task, length, 100, seed, split=split) for split in SPLITS}
        for index in range(100):
            prompts = [by_split[split][index].prompt for split in SPLITS]
            assert len(set(prompts)) == len(SPLITS), (seed, length, index)
        sets = {split: {ex.prompt for ex in examples} for split, examples in by_split.items()}
        for one, other in itertools.combinations(SPLITS, 2):
            assert not sets[one] & sets[other], (seed, length, one, other)


def test_an_unknown_split_is_refused_naming_the_allowed_ones():
    assert SPLITS == ("train", "validation", "test", "demo")
    for name in ("eval", "Test", "", "test/0"):  # "eval": the former name of validation and test in one
        with pytest.raises(ValueError, match=re.escape(f"split {name!r} is unknown; choose from {SPLITS}")):
            generate_examples("passkey", 256, 1, seed=0, split=name)
        with pytest.raises(ValueError, match="unknown"):
            example_rng(name, 0, "passkey", 256, 0)
    with pytest.raises(TypeError, match="split"):  # no default stream: every caller names its own
        generate_examples("passkey", 256, 1, seed=0)


def test_the_train_stream_is_the_one_training_always_drew():
    """Pinned digest of train examples made before the validation/test split existed (commit
    f0c44fa): training batches, recipes and checkpoints do not move."""
    digest = hashlib.sha256()
    varied = TaskOptions(vartrack_chain=(1, 3), vartrack_any_query=0.5, kv_near_miss=0.5)
    for task in TASKS:
        for length in (128, 512):
            for options in (None, varied):
                for ex in generate_examples(task, length, 4, seed=0, split="train", options=options):
                    digest.update(f"{ex.prompt}\x00{ex.answer}\x00".encode())
    assert digest.hexdigest() == "7cfe41b2d11cffde0def7b39716cc7847c4f3fdbb1bd8b47994d8c6901e34fa7"


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("length", LENGTHS)
def test_lengths_and_alphabet(task, length):
    for ex in generate_examples(task, length, 8, seed=0, split="test"):
        assert length - ANSWER_ROOMS[task] - 7 <= len(ex.prompt) <= length - ANSWER_ROOMS[task]
        assert len(ex.prompt) + len(ex.answer) + 1 <= length
        assert set(ex.prompt) <= set(DEFAULT_ALPHABET)
        # vartrack's answer is worked: the names its chain passes through, then the number
        names = r"(?:[A-Z]{3} = ){0,%d}" % (MAX_VARTRACK_CHAIN - 1) if task == "vartrack" else ""
        assert re.fullmatch(names + r"[1-9]\d{4,5}", ex.answer)
        assert ex.task == task and ex.length == length
    # the prompt length varies modulo every block size up to 8 (the answer starts anywhere in a block)
    assert len({len(ex.prompt) % 8 for ex in generate_examples(task, length, 64, seed=0, split="test")}) >= 6


_QUESTION = r"\nWhich number does ([A-Z]{3}) hold\? \1 = $"


def _worked_answer(prompt: str, name: str) -> str:
    """What `name` is assigned, then what that is assigned, ... down to the number, joined by ' = '."""
    assignments = dict(re.findall(r" ([A-Z]{3}) = ([A-Z]{3}|\d+)\. ", prompt))
    steps = [assignments[name]]
    while not steps[-1].isdigit():
        steps.append(assignments[steps[-1]])
    return " = ".join(steps)


@pytest.mark.parametrize("length", LENGTHS)
def test_answer_is_where_the_question_points(length):
    for ex in generate_examples("passkey", length, 10, seed=1, split="test"):
        assert re.findall(r"The pass key is (\d+)\.", ex.prompt) == [ex.answer]
        assert ex.prompt.endswith("What is the pass key? The pass key is ")
    for ex in generate_examples("multikey", length, 10, seed=1, split="test"):
        label = re.search(r"\nThe pass key for (\w+) is $", ex.prompt).group(1)
        keys = dict(re.findall(r"The pass key for (\w+) is (\d+)\.", ex.prompt))
        assert len(keys) >= 2 and keys[label] == ex.answer
        assert len(re.findall(r"The pass key for (\w+) is \d+\.", ex.prompt)) == len(keys)  # labels unique
    for ex in generate_examples("kv", length, 10, seed=1, split="test"):
        key = re.search(r"What is the value of (\w{4})\? \1: $", ex.prompt).group(1)
        pairs = re.findall(r"\n(\w{4}): (\d+)\n", ex.prompt)
        assert len(pairs) >= 3 and len(dict(pairs)) == len(pairs)
        assert dict(pairs)[key] == ex.answer
    for ex in generate_examples("vartrack", length, 10, seed=1, split="test"):
        name = re.search(_QUESTION, ex.prompt).group(1)
        assert _worked_answer(ex.prompt, name) == ex.answer and " = " in ex.answer  # 1-2 indirections
        assert exact_match(f" {ex.answer}\n", ex.answer) and not exact_match(ex.answer.split(" = ")[-1], ex.answer)
        assert len(re.findall(r" [A-Z]{3} = \d+\. ", ex.prompt)) == 2  # the chain and its distractor
        hops = len(re.findall(r" [A-Z]{3} = [A-Z]{3}\. ", ex.prompt))  # indirections of both chains
        assert hops <= (2 if length < 256 else 4)


def test_facts_sit_at_varied_depths():
    examples = generate_examples("passkey", 2048, 40, 2, split="test")
    depths = [ex.prompt.index("The pass key is") / len(ex.prompt) for ex in examples]
    assert min(depths) < 0.2 and max(depths) > 0.8


def test_checker():
    ex = generate_examples("passkey", 256, 1, seed=0, split="test")[0]
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


# ----------------------------------------------------------------------------- training-time variations

def _chain_of(prompt: str, name: str) -> list[str]:
    """The names from `name` back to the one that holds a number (name first)."""
    assignments = dict(re.findall(r" ([A-Z]{3}) = ([A-Z]{3}|\d+)\. ", prompt))
    chain = [name]
    while not assignments[chain[-1]].isdigit():
        chain.append(assignments[chain[-1]])
    return chain


@pytest.mark.parametrize("task", TASKS)
def test_default_options_build_the_evaluated_tasks_exactly(task):
    for length in (MIN_LENGTH, 512):
        plain = generate_examples(task, length, 6, seed=2, split="test")
        assert generate_examples(task, length, 6, seed=2, split="test", options=TaskOptions()) == plain


@pytest.mark.parametrize("chain", [(1, 1), (1, 2), (2, 3), (3, 3), (1, MAX_VARTRACK_CHAIN)])
@pytest.mark.parametrize("length", LENGTHS)
def test_a_vartrack_chain_schedule_yields_valid_answerable_examples(chain, length):
    lo, hi = chain
    options = TaskOptions(vartrack_chain=chain)
    sizes = set()
    for ex in generate_examples("vartrack", length, 40, seed=3, split="train", options=options):
        assert len(ex.prompt) + len(ex.answer) + 1 <= length and set(ex.prompt) <= set(DEFAULT_ALPHABET)
        name = re.search(_QUESTION, ex.prompt).group(1)
        names = _chain_of(ex.prompt, name)
        assert " = ".join([*names[1:], dict(re.findall(r" ([A-Z]{3}) = (\d+)\. ", ex.prompt))[names[-1]]]) == ex.answer
        assert len(re.findall(r" [A-Z]{3} = \d+\. ", ex.prompt)) == 2  # the chain and its distractor, as evaluated
        longest = longest_vartrack_chain(len(ex.prompt))
        assert min(lo, longest) <= len(names) <= min(hi, longest)
        sizes.add(len(names))
    if length >= 1000:  # long prompts hold every chain asked for
        assert sizes == set(range(lo, hi + 1))
    if length == MIN_LENGTH:  # the shortest context holds 2 names at most (a distractor as long beside them)
        assert max(sizes) <= 2


def _asked(prompt: str) -> tuple[str, int, bool]:
    """(asked name, its indirections to the number, whether no statement refers to it: a chain's end)."""
    name = re.search(_QUESTION, prompt).group(1)
    referenced = set(re.findall(r" [A-Z]{3} = ([A-Z]{3})\. ", prompt))
    return name, len(_chain_of(prompt, name)) - 1, name not in referenced


def test_any_name_questions_ask_every_depth_of_both_chains():
    for probability, ends in ((0.0, (1.0, 1.0)), (0.5, (0.6, 0.9)), (1.0, (0.2, 0.6))):
        examples = generate_examples("vartrack", 1000, 200, seed=4, split="train",
                                     options=TaskOptions(vartrack_any_query=probability))
        depths, at_end = set(), 0
        for ex in examples:
            name, depth, is_end = _asked(ex.prompt)
            assert _worked_answer(ex.prompt, name) == ex.answer
            depths.add(depth)
            at_end += is_end
        # evaluated questions ask a chain's end, 1-2 indirections away; any-name ones any name, 0 too
        assert depths == ({1, 2} if probability == 0 else {0, 1, 2})
        assert ends[0] <= at_end / len(examples) <= ends[1], (probability, at_end)


@pytest.mark.parametrize("length", LENGTHS)
def test_kv_near_miss_keys_differ_in_one_character_and_the_answer_stays_unique(length):
    options = TaskOptions(kv_near_miss=1.0)
    for ex in generate_examples("kv", length, 20, seed=5, split="train", options=options):
        assert len(ex.prompt) + len(ex.answer) + 1 <= length
        key = re.search(r"What is the value of (\w{4})\? \1: $", ex.prompt).group(1)
        pairs = re.findall(r"\n(\w{4}): (\d+)\n", ex.prompt)
        assert len(dict(pairs)) == len(pairs) and dict(pairs)[key] == ex.answer
        assert len({v for _, v in pairs}) == len(pairs)  # values unique: the answer names one key
        near = [k for k, _ in pairs if sum(a != b for a, b in zip(k, key)) == 1]
        assert 1 <= len(near) <= 3 and all(k[0].isalpha() for k, _ in pairs)


def test_task_options_are_checked():
    with pytest.raises(ValueError, match="vartrack_chain"):
        TaskOptions(vartrack_chain=(0, 2))
    with pytest.raises(ValueError, match="vartrack_chain"):
        TaskOptions(vartrack_chain=(3, 2))
    with pytest.raises(ValueError, match="ANSWER_ROOMS"):  # its worked answer would not fit
        TaskOptions(vartrack_chain=(1, MAX_VARTRACK_CHAIN + 1))
    with pytest.raises(ValueError, match="probability"):
        TaskOptions(kv_near_miss=1.5)
    with pytest.raises(ValueError, match="probability"):
        TaskOptions(vartrack_any_query=-0.1)


def test_held_out_examples_never_come_from_a_training_stream():
    options = TaskOptions(vartrack_chain=(1, 3), vartrack_any_query=0.5, kv_near_miss=0.5)
    for task in TASKS:
        held_out = {ex.prompt for split in ("validation", "test")
                    for ex in generate_examples(task, 256, 200, seed=1234, split=split)}
        for seed in (0, 1234):  # a training seed equal to the evaluation seed still draws another stream
            for opts in (None, options):
                train = generate_examples(task, 256, 200, seed=seed, split="train", options=opts)
                assert not held_out & {ex.prompt for ex in train}
