"""RULER's synthetic categories in training/tasks.py: every task at 4K tokens in the bundled
tokenizer's alphabet, its answer where the question points, exact lengths, determinism, disjoint
streams, and the grading of right and wrong answers."""
import itertools
import re
from collections import Counter
from pathlib import Path

import pytest

from runtime.tokenizer import DEFAULT_ALPHABET, UNK_TOKEN, Tokenizer
from training.tasks import (ALL_TASKS, ANSWER_ROOMS, ANSWER_RULES, CWE_COMMON, FWE_TOP, MIN_LENGTHS, NIAH_TASKS,
                            RULER_TASKS, SPLITS, TASKS, VT_HOPS, answer_items, check_answer, cwe_repeats, essay,
                            fwe_counts, generate_examples, make_example, noise, resolve_tasks)

BUNDLED = Path(__file__).resolve().parents[2] / "checkpoints" / "retrieval-6m"
NEEDLE = re.compile(r"One secret (number|uuid) of (\S+) is (\S+)\.")
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
VALUE = {"numbers": r"[1-9]\d{6}", "uuids": UUID}
KEY = {"words": r"[a-z]+-[a-z]+", "uuids": UUID}


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_dir(BUNDLED)


def test_the_task_names_are_rulers():
    assert RULER_TASKS == ("niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
                           "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe")
    assert ALL_TASKS == TASKS + RULER_TASKS and set(NIAH_TASKS) == {t for t in RULER_TASKS if t.startswith("niah")}
    assert set(ANSWER_ROOMS) == set(ANSWER_RULES) == set(MIN_LENGTHS) == set(ALL_TASKS)
    assert resolve_tasks(["ruler"]) == RULER_TASKS and resolve_tasks(["all"]) == ALL_TASKS
    assert resolve_tasks(["vt", "default", "kv", "vt"]) == ("vt", *TASKS)  # groups expanded, repeats dropped
    with pytest.raises(ValueError, match="unknown"):
        resolve_tasks(["niah_single_4"])


# ----------------------------------------------------------------------------- what each task asks

def _needles(prompt):
    """(key, value) of every whole needle, in order."""
    return [(key, value) for _, key, value in NEEDLE.findall(prompt)]


def check_niah(ex):
    spec = NIAH_TASKS[ex.task]
    noun = "number" if spec.value == "numbers" else "uuid"
    needles = _needles(ex.prompt)
    for key, value in needles:
        assert re.fullmatch(KEY[spec.key], key) and re.fullmatch(VALUE[spec.value], value), (key, value)
    keys = [k for k, _ in needles]
    if spec.haystack == "needles":  # the haystack is other keys' needles: every key once
        assert len(keys) == len(set(keys)) and len(needles) >= max(2, len(ex.prompt) // 200)
        first_line = ex.prompt.split("\n")[0]
        assert NEEDLE.fullmatch(first_line) or not NEEDLE.search(first_line)  # a line cut short holds no needle
    else:
        assert len(needles) == spec.keys * spec.values and len(set(keys)) == spec.keys
        lines = ex.prompt.split("\n")
        for key, value in needles:  # a needle is a line (noise) or a sentence (essay) of its own
            needle = f"One secret {noun} of {key} is {value}."
            if spec.haystack == "noise":
                assert needle in lines
            else:
                at = ex.prompt.index(needle)
                assert at == 0 or ex.prompt[at - 2:at] in (". ", ".\n"), ex.prompt[at - 40:at + 60]
    if spec.queries > 1:
        asked = re.search(rf"\nWhat are the secret {noun}s of (.+), (\S+), (\S+) and (\S+)\? In that order, they are $",
                          ex.prompt).groups()
        assert len(set(asked)) == spec.queries
        assert answer_items(ex.answer) == [dict(needles)[k] for k in asked]
    elif spec.values > 1:
        key = re.search(rf"\nWhat are all the secret {noun}s of (\S+)\? The secret {noun}s of \1 are $",
                        ex.prompt).group(1)
        assert answer_items(ex.answer) == [v for k, v in needles if k == key]  # in order of appearance
        assert len(answer_items(ex.answer)) == spec.values
    else:
        key = re.search(rf"\nWhat is the secret {noun} of (\S+)\? The secret {noun} of \1 is $", ex.prompt).group(1)
        assert [v for k, v in needles if k == key] == [ex.answer]
        assert ex.prompt.count(key) == 3  # its needle and the question's two mentions


def check_vt(ex):
    value = re.search(r"\nWhich variables hold the value (\d{5})\? They are: $", ex.prompt).group(1)
    lines = ex.prompt.split("\n")
    statements = [line for line in lines if line.startswith("VAR ")]
    assert len(statements) == 2 * (VT_HOPS + 1) == len(re.findall("VAR [A-Z]{5} = ", ex.prompt))  # each a line
    assigned = dict(re.fullmatch(r"VAR ([A-Z]{5}) = ([A-Z]{5}|\d{5})", s).groups() for s in statements)

    def resolve(name):
        while not assigned[name].isdigit():
            name = assigned[name]
        return assigned[name]
    holders = [name for name in assigned if resolve(name) == value]
    assert sorted(holders) == sorted(answer_items(ex.answer)) and len(holders) == VT_HOPS + 1
    assert len({resolve(name) for name in assigned}) == 2  # and a distractor chain of another number
    order = [re.search(r"VAR ([A-Z]{5}) = ", s).group(1) for s in statements]
    chain = answer_items(ex.answer)
    assert [n for n in order if n in chain] == chain  # statements read down the chain


def check_cwe(ex):
    words = re.search(r"\n(.*)\nWhich 10 words occur most often in the list above\? They are: $", ex.prompt).group(1)
    counts = Counter(words.split(", "))
    assert all(re.fullmatch(r"[a-z]{3,9}", w) for w in counts)
    top = [w for w, _ in counts.most_common(CWE_COMMON)]
    assert sorted(top) == sorted(answer_items(ex.answer))
    common = counts[top[0]]
    assert {counts[w] for w in top} == {common} and max(n for w, n in counts.items() if w not in top) < common
    if ex.length >= 4096:  # RULER's repeats: 30 for the common words, at most 3 for the others
        assert common == 30 and max(n for w, n in counts.items() if w not in top) <= 3
    assert answer_items(ex.answer) == sorted(top, key=words.split(", ").index)  # in order of first appearance


def check_fwe(ex):
    text = re.search(r"occurs\.\n(.*)\nIgnoring the dots, which 3 coded words occur most often above\? They are: $",
                     ex.prompt).group(1)
    counts = Counter(text.split(" "))
    assert counts.most_common(1)[0][0] == "..." and all(re.fullmatch(r"[a-z]{6}|\.\.\.", w) for w in counts)
    del counts["..."]
    ranked = counts.most_common()
    assert [w for w, _ in ranked[:FWE_TOP]] == answer_items(ex.answer)  # most frequent first
    tallies = [n for _, n in ranked]
    assert tallies[0] > tallies[1] > tallies[2] > tallies[3]  # a unique answer, in a unique order


CHECKS = {**dict.fromkeys(NIAH_TASKS, check_niah), "vt": check_vt, "cwe": check_cwe, "fwe": check_fwe}


@pytest.mark.parametrize("task", RULER_TASKS)
def test_every_task_at_4k_tokens_in_the_bundled_alphabet_with_its_answer_where_asked(task, tokenizer):
    unk = tokenizer.token_to_id(UNK_TOKEN)
    for ex in generate_examples(task, 4096, 4, seed=0, split="test"):
        assert 4096 - ANSWER_ROOMS[task] - 7 <= len(ex.prompt) <= 4096 - ANSWER_ROOMS[task]
        assert len(ex.answer) + 1 <= ANSWER_ROOMS[task]  # answer + EOS fit the room kept for them
        assert set(ex.prompt + ex.answer) <= set(DEFAULT_ALPHABET)
        ids = tokenizer.encode(ex.prompt)
        assert len(ids) == len(ex.prompt) and unk not in ids  # one token a character, never <|unk|>
        assert unk not in tokenizer.encode(ex.answer)
        CHECKS[task](ex)
        assert ex.check(ex.answer) and ex.task == task and ex.length == 4096


@pytest.mark.parametrize("task", RULER_TASKS)
def test_any_length_from_the_minimum_is_hit_exactly(task):
    """The prompt is length - room - r characters (r in 0..7) at every length, not only powers of two."""
    lengths = (MIN_LENGTHS[task], MIN_LENGTHS[task] + 333, 8192, 32768)
    for length in lengths:
        for ex in generate_examples(task, length, 2 if length < 8192 else 1, seed=5, split="validation"):
            assert length - ANSWER_ROOMS[task] - 7 <= len(ex.prompt) <= length - ANSWER_ROOMS[task]
            CHECKS[task](ex)
    offsets = {len(ex.prompt) % 8 for ex in generate_examples(task, 1000, 48, seed=0, split="test")}
    assert len(offsets) >= 6  # the answer starts at every offset inside a block
    with pytest.raises(ValueError, match=f"shortest supported context of {task}"):
        generate_examples(task, MIN_LENGTHS[task] - 1, 1, seed=0, split="test")


@pytest.mark.parametrize("task", RULER_TASKS)
def test_every_draw_fits_the_tasks_shortest_context(task):
    for ex in generate_examples(task, MIN_LENGTHS[task], 150, seed=7, split="train"):
        assert len(ex.prompt) + len(ex.answer) + 1 <= MIN_LENGTHS[task]


def test_needles_sit_at_varied_depths_of_their_haystack():
    for task in ("niah_single_1", "niah_single_2", "niah_multikey_2"):
        depths = []
        for ex in generate_examples(task, 2048, 40, seed=2, split="test"):
            key = re.search(r"What is the secret number of (\S+)\?", ex.prompt).group(1)
            depths.append(ex.prompt.index(f"of {key} is") / len(ex.prompt))
        assert min(depths) < 0.2 and max(depths) > 0.7, task


def test_the_haystacks_are_exact_and_hold_no_needle_text():
    import random
    for make in (noise, essay):
        for n in (0, 1, 99, 5000):
            text = make(random.Random(n), n)
            assert len(text) == n and not re.search(r"[0-9]|-|secret|number|uuid|VAR", text)
    assert essay(random.Random(1), 3000) != essay(random.Random(2), 3000)
    assert noise(random.Random(0), 500).endswith("\n")  # cut at the front: the question follows a whole line


def test_fwe_counts_keep_the_answer_strictly_ahead():
    for words in (40, 400, 4000):
        counts = fwe_counts(words, 40)
        assert counts[1] > counts[2] > counts[3] > max(counts[4:] + [1])
    assert cwe_repeats(1000) == (30, 3) and cwe_repeats(150) == (6, 1) and cwe_repeats(30) == (2, 1)


# ----------------------------------------------------------------------------- streams

@pytest.mark.parametrize("task", RULER_TASKS)
def test_same_seed_same_examples_and_the_streams_never_meet(task):
    length = MIN_LENGTHS[task]
    a = generate_examples(task, length, 4, seed=3, split="test")
    assert a == generate_examples(task, length, 4, seed=3, split="test")
    assert generate_examples(task, length, 2, seed=3, split="test", start=2) == a[2:]
    assert all(x.prompt != y.prompt for x, y in zip(a, generate_examples(task, length, 4, seed=4, split="test")))
    for seed in (0, 1234):  # a training seed equal to the held-out seed still draws another stream
        prompts = {split: {ex.prompt for ex in generate_examples(task, length, 30, seed, split=split)}
                   for split in SPLITS}
        assert all(len(p) == 30 for p in prompts.values())
        for one, other in itertools.combinations(SPLITS, 2):
            assert not prompts[one] & prompts[other], (seed, one, other)


def test_held_out_answers_are_not_training_answers():
    """Beyond distinct prompts: the held-out needles' keys and values come from other random draws."""
    train = {ex.answer for ex in generate_examples("niah_multikey_2", 512, 100, seed=1234, split="train")}
    test = {ex.answer for ex in generate_examples("niah_multikey_2", 512, 100, seed=1234, split="test")}
    assert len(train & test) <= 1


# ----------------------------------------------------------------------------- grading

def test_grading_single_answers_is_exact():
    for task in ("niah_single_1", "niah_single_3", "niah_multikey_1", "niah_multikey_3"):
        ex = generate_examples(task, 512, 1, seed=0, split="test")[0]
        assert ANSWER_RULES[task] == "exact"
        assert ex.check(ex.answer) and ex.check(f" {ex.answer}\n")
        assert not ex.check(ex.answer[:-1]) and not ex.check(ex.answer + "0") and not ex.check("")
        assert not ex.check(f"{ex.answer}, {ex.answer}")


@pytest.mark.parametrize("task", ["niah_multivalue", "vt", "cwe", "fwe"])
def test_grading_sets_any_order_none_missing_extra_or_repeated(task):
    ex = generate_examples(task, 1024, 1, seed=0, split="test")[0]
    items = answer_items(ex.answer)
    assert ANSWER_RULES[task] == "set" and len(items) > 1
    assert ex.check(ex.answer) and ex.check(", ".join(reversed(items))) and ex.check(" ".join(items) + "\n")
    assert not ex.check(", ".join(items[:-1]))  # one missing
    assert not ex.check(", ".join(items + ["extra"]))  # one extra
    assert not ex.check(", ".join(items + items[:1]))  # one twice
    assert not ex.check(", ".join(items[:-1] + [items[-1][:-1]]))  # one miscopied
    if any(c.isalpha() for c in ex.answer):  # names and words are copied in their case
        assert not ex.check(ex.answer.swapcase())


def test_grading_multiquery_is_in_the_order_asked():
    ex = generate_examples("niah_multiquery", 1024, 1, seed=0, split="test")[0]
    items = answer_items(ex.answer)
    assert ANSWER_RULES["niah_multiquery"] == "sequence" and len(items) == 4
    assert ex.check(ex.answer) and ex.check(" ".join(items)) and ex.check(",".join(items))
    assert not ex.check(", ".join(reversed(items)))  # every value, each given to the wrong key
    assert not ex.check(", ".join(items[:3]))
    assert check_answer("niah_multiquery", "1, 2", "1, 2") and not check_answer("niah_multiquery", "2, 1", "1, 2")


def test_the_original_tasks_are_graded_as_before():
    for task in TASKS:
        ex = generate_examples(task, 256, 1, seed=0, split="test")[0]
        assert ANSWER_RULES[task] == "exact" and ex.check(ex.answer) and not ex.check(ex.answer + " 1")
    with pytest.raises(ValueError, match="unknown"):
        import random
        make_example("ruler", 4096, random.Random(0))
