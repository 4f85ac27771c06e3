"""Seeded synthetic long-context retrieval tasks in plain text (printable ASCII + newline).

Every example is a prompt of filler text with a few facts hidden at random depths, ending in a
question whose answer is a 5-6 digit number (vartrack's: the chain of names leading to one). With
the project's character tokenizer one character is one token, so lengths here are token counts.

Tasks:
- `passkey`: one pass key hidden in the filler ("The pass key is 48213.").
- `multikey`: several labelled pass keys ("The pass key for delta is 48213."), asked for one.
- `kv`: many `k3f9: 51207` lines among the filler, asked for one key's value.
- `vartrack`: an assignment chain (`QXJ = 48213.` ... `MPL = QXJ.` ... `RTE = MPL.`) plus a
  distractor chain, asked which number the chain's last name holds. The answer is worked: the
  question ends in `Which number does RTE hold? RTE = ` and the answer is `MPL = QXJ = 48213`,
  every name the chain passes through, then the number (graded whole). Each step is then the
  cloze lookup the other tasks ask (copy what follows `MPL = ` in the prompt). A bare number
  would need 1-2 lookups composed in one pass with no intermediate result to attend to: models
  trained on that format picked the distractor chain's number about half the time.

Lengths: an example built for `length` has a prompt of `length - ANSWER_ROOMS[task] - r` characters
(r uniform in 0..7, so the answer starts at every offset inside a block), which leaves room for
the answer and its end-of-sequence token: prompt + answer + EOS always fits in `length`.

Determinism: example i of (split, seed, task, length) comes from its own `random.Random` seeded
with that tuple as a string (hashed with SHA-512 by the standard library, so stable across runs
and machines). The split is the key's first field and one of `SPLITS` (any other name is
refused), so two splits never share a stream, whatever the seeds:
- `train`: training batches (training/data.py);
- `validation`: every decision taken while training: the periodic evaluations that move the
  curriculum and weight the tasks, the final evaluation in a checkpoint's train_summary /
  README, and training/variants.py's choice of the best recipe;
- `test`: reported numbers (training.evaluate, benchmarks.accuracy, benchmarks.recall's task
  prompts), never seen by a training-time decision;
- `demo`: the display prompts shipped with a checkpoint (demo_prompts.json), never scored.

`TaskOptions` varies the tasks for training only (shorter or longer vartrack chains, questions
about any variable, kv keys that differ from the asked one in a single character); its defaults
build exactly the evaluated tasks, drawing the same random numbers as before it existed.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

TASKS = ("passkey", "multikey", "kv", "vartrack")
SPLITS = ("train", "validation", "test", "demo")  # the example streams (module docstring: who draws which)
MAX_VARTRACK_CHAIN = 3  # names in an asked chain: its worked answer (2 names + 6 digits = 18) must fit its room
# Characters kept free after each task's prompt: its longest answer + EOS, rounded up to blocks (a number: 6 + 1;
# vartrack's worked answer: 18 + 1). ANSWER_ROOM, the largest, is the generation limit an evaluation needs.
ANSWER_ROOMS = {"passkey": 16, "multikey": 16, "kv": 16, "vartrack": 24}
ANSWER_ROOM = max(ANSWER_ROOMS.values())
MIN_LENGTH = 128  # every task fits with little filler: the curriculum starts here, where retrieval is learnt fastest

# Filler vocabulary: lowercase words with no digits and none of the words the facts use
# ("pass", "key", "value", the multikey labels), so a fact is never confused with filler.
_FILLER_WORDS = """
the a an of to in on at by for with from about over under after before during between into
through across around near far above below behind beside again still never always often
sometimes soon later early quickly slowly quietly loudly softly gently warmly brightly very
river mountain forest garden window table kitchen village harbor market bridge island meadow
cloud storm rain snow wind sun moon star morning evening night winter summer autumn spring
house road field stone tree leaf flower bird horse dog cat fish boat ship train wagon letter
book story song voice friend teacher farmer baker sailor painter doctor child family neighbor
walks runs sings reads writes paints builds carries finds keeps brings opens closes watches
hears remembers forgets follows leads waits climbs crosses gathers plants cooks mends sells
old young small large quiet busy bright dark warm cold green yellow brown silver golden gray
happy tired careful curious patient gentle clever honest simple strange distant ancient fresh
and but or so because while when where although then there here this that these those some
many few every each another other people water bread paper light music wood iron glass salt
""".split()
_LABELS = """alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november
oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu""".split()
_KEY_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789"
_UPPER = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
assert not set(_LABELS) & set(_FILLER_WORDS)


@dataclass(frozen=True)
class TaskOptions:
    """Training-time variations of the tasks. The defaults are the evaluated tasks, bit for bit.

    vartrack_chain: (min, max) names in the asked chain (1: the asked name holds the number
    itself; 2: one indirection), max at most MAX_VARTRACK_CHAIN. None: 2 for prompts under 256
    characters, else 2-3. A prompt too short for the longest chain asked gets the longest that
    always fits.
    vartrack_any_query: probability that the question asks a random name of either chain (the
    distractor's too, at any depth) instead of the asked chain's last name: lookups of 0, 1, 2
    indirections from the same prompts, so the single lookup is learnt and then composed.
    kv_near_miss: probability that an example's distractor keys include up to 3 that differ from
    the asked key in one character, so the whole key must be matched, not a prefix.
    """

    vartrack_chain: tuple[int, int] | None = None
    vartrack_any_query: float = 0.0
    kv_near_miss: float = 0.0

    def __post_init__(self) -> None:
        if self.vartrack_chain is not None:
            lo, hi = self.vartrack_chain
            if not 1 <= lo <= hi <= MAX_VARTRACK_CHAIN:
                raise ValueError(f"vartrack_chain={self.vartrack_chain} must be (min, max) with 1 <= min <= max <= "
                                 f"{MAX_VARTRACK_CHAIN} (a longer chain's worked answer would not fit ANSWER_ROOMS['vartrack'])")
        for name in ("vartrack_any_query", "kv_near_miss"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)} must be a probability in [0, 1]")


DEFAULT_OPTIONS = TaskOptions()


def exact_match(prediction: str, answer: str) -> bool:
    """The checker: the generated text, stripped of surrounding whitespace, equals the answer."""
    return prediction.strip() == answer


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str
    task: str
    length: int  # the context length it was built for: len(prompt) + len(answer) + 1 <= length

    def check(self, prediction: str) -> bool:
        return exact_match(prediction, self.answer)


def _number(rng: random.Random, used: set[str]) -> str:
    """A fresh 5- or 6-digit number (no leading zero) not in `used`."""
    while True:
        digits = rng.choice((5, 6))
        value = str(rng.randrange(10 ** (digits - 1), 10 ** digits))
        if value not in used:
            used.add(value)
            return value


def filler(rng: random.Random, num_chars: int) -> str:
    """Exactly `num_chars` characters of random sentences from the built-in vocabulary."""
    if num_chars <= 0:
        return ""
    words = rng.choices(_FILLER_WORDS, k=num_chars // 5 + 8)
    ends = rng.choices((". ", ". ", ".\n", ", ", " "), weights=(1, 1, 1, 1, 14), k=len(words))
    parts, capital, size = [], True, 0
    for word, end in zip(words, ends):
        if capital:
            word = word.capitalize()
        parts.append(word)
        parts.append(end)
        size += len(word) + len(end)
        capital = end[0] == "."
        if size >= num_chars:
            break
    text = "".join(parts)
    while len(text) < num_chars:  # only for very long words lists cut short; keeps the length exact
        text += " " + filler(rng, num_chars - len(text) - 1)
    return text[:num_chars]


def _weave(rng: random.Random, num_chars: int, facts: list[str], ordered: bool = False) -> str:
    """Filler of `num_chars` characters with `facts` inserted at random depths (between words).

    ordered=True keeps the facts in the given order (chains read top to bottom).
    """
    body = filler(rng, num_chars)
    cuts = sorted(rng.randrange(num_chars + 1) for _ in facts)
    # Move every cut back to a word boundary so no filler word is split by a fact.
    cuts = [c if c in (0, num_chars) else max(body.rfind(" ", 0, c) + 1, 0) for c in cuts]
    order = list(facts) if ordered else rng.sample(facts, len(facts))
    out, prev = [], 0
    for cut, fact in zip(cuts, order):
        out.append(body[prev:cut])
        out.append(fact)
        prev = cut
    out.append(body[prev:])
    return "".join(out)


def _assemble(rng: random.Random, prompt_len: int, facts: list[str], question: str, ordered: bool = False) -> str:
    room = prompt_len - len(question) - sum(len(f) for f in facts)
    if room < 0:
        raise ValueError(f"prompt of {prompt_len} characters cannot hold facts of "
                         f"{sum(len(f) for f in facts)} and a question of {len(question)}; use a longer length")
    return _weave(rng, room, facts, ordered) + question


def _passkey(rng: random.Random, prompt_len: int, options: TaskOptions = DEFAULT_OPTIONS) -> tuple[str, str]:
    answer = _number(rng, set())
    fact = f" The pass key is {answer}. Remember it. "
    return _assemble(rng, prompt_len, [fact], "\nWhat is the pass key? The pass key is "), answer


def _multikey(rng: random.Random, prompt_len: int, options: TaskOptions = DEFAULT_OPTIONS) -> tuple[str, str]:
    count = min(len(_LABELS), max(2, min(8, prompt_len // 128)))
    labels = rng.sample(_LABELS, rng.randint(2, count))
    used: set[str] = set()
    values = [_number(rng, used) for _ in labels]
    facts = [f" The pass key for {lab} is {val}. " for lab, val in zip(labels, values)]
    i = rng.randrange(len(labels))
    # A cloze question (the fact's own wording): short enough for two facts at MIN_LENGTH.
    question = f"\nThe pass key for {labels[i]} is "
    return _assemble(rng, prompt_len, facts, question), values[i]


def _near_misses(rng: random.Random, key: str, count: int, taken: list[str]) -> list[str]:
    """Up to `count` keys not in `taken` that differ from `key` in exactly one character."""
    out: list[str] = []
    for _ in range(8 * count):
        if len(out) == count:
            break
        at = rng.randrange(len(key))
        alphabet = _KEY_CHARS[:26] if at == 0 else _KEY_CHARS  # keys start with a letter
        other = key[:at] + rng.choice(alphabet.replace(key[at], "")) + key[at + 1:]
        if other not in taken and other not in out:
            out.append(other)
    return out


def _kv(rng: random.Random, prompt_len: int, options: TaskOptions = DEFAULT_OPTIONS) -> tuple[str, str]:
    # About a third of the prompt is key-value lines, the rest filler.
    count = max(3, prompt_len // 40)
    keys: list[str] = []
    while len(keys) < count:
        key = rng.choice(_KEY_CHARS[:26]) + "".join(rng.choices(_KEY_CHARS, k=3))
        if key not in keys:
            keys.append(key)
    i = rng.randrange(count) if options.kv_near_miss > 0 else None
    if i is not None and rng.random() < options.kv_near_miss:
        # Replace some distractors (never the asked key) by one-character variants of the asked key.
        others = [j for j in range(count) if j != i]
        misses = _near_misses(rng, keys[i], min(3, len(others)), keys)
        for j, miss in zip(rng.sample(others, len(misses)), misses):
            keys[j] = miss
    used: set[str] = set()
    values = [_number(rng, used) for _ in keys]
    facts = [f"\n{k}: {v}\n" for k, v in zip(keys, values)]
    if i is None:
        i = rng.randrange(count)
    question = f"\nWhat is the value of {keys[i]}? {keys[i]}: "
    return _assemble(rng, prompt_len, facts, question), values[i]


def _names(rng: random.Random, count: int) -> list[str]:
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choices(_UPPER, k=3))
        if name not in names:
            names.append(name)
    return names


_QUESTION_CHARS = len("\nWhich number does XXX hold? XXX = ")
_VALUE_STATEMENT, _NAME_STATEMENT = len(" XXX = 123456. "), len(" XXX = YYY. ")


def longest_vartrack_chain(prompt_len: int) -> int:
    """The longest asked chain whose worst case (a distractor as long, 6-digit numbers) fits the prompt."""
    per_chain = (prompt_len - _QUESTION_CHARS) // 2
    return max(1, 1 + (per_chain - _VALUE_STATEMENT) // _NAME_STATEMENT)


def _vartrack(rng: random.Random, prompt_len: int, options: TaskOptions = DEFAULT_OPTIONS) -> tuple[str, str]:
    if options.vartrack_chain is None:
        # Chain length 2 (one indirection) where the prompt is short, up to 3 otherwise.
        hops = rng.randint(2, 2 if prompt_len < 256 else 3)
    else:
        longest = longest_vartrack_chain(prompt_len)
        lo, hi = options.vartrack_chain
        hops = rng.randint(min(lo, longest), min(hi, longest))
    decoy_hops = rng.randint(1, hops)
    names = _names(rng, hops + decoy_hops)
    chain, decoy = names[:hops], names[hops:]
    used: set[str] = set()
    answer, decoy_value = _number(rng, used), _number(rng, used)

    def statements(chain_names: list[str], value: str) -> list[str]:
        return [f" {chain_names[0]} = {value}. "] + [f" {b} = {a}. " for a, b in zip(chain_names, chain_names[1:])]

    ours, theirs = statements(chain, answer), statements(decoy, decoy_value)
    # Interleave the two chains at random while keeping each in order.
    facts: list[str] = []
    while ours or theirs:
        pick = ours if (ours and (not theirs or rng.random() < 0.5)) else theirs
        facts.append(pick.pop(0))
    asked_chain, value = chain, answer
    asked = chain[-1]
    if options.vartrack_any_query > 0 and rng.random() < options.vartrack_any_query:
        asked = rng.choice(names)
        if asked in decoy:
            asked_chain, value = decoy, decoy_value
    # The worked answer: the names from the asked one back to the chain's start, then its number.
    depth = asked_chain.index(asked)
    worked = " = ".join([*asked_chain[depth - 1::-1], value] if depth else [value])
    question = f"\nWhich number does {asked} hold? {asked} = "
    return _assemble(rng, prompt_len, facts, question, ordered=True), worked


_BUILDERS: dict[str, Callable[[random.Random, int, TaskOptions], tuple[str, str]]] = {
    "passkey": _passkey, "multikey": _multikey, "kv": _kv, "vartrack": _vartrack,
}


def make_example(task: str, length: int, rng: random.Random, options: TaskOptions | None = None) -> Example:
    """One example of `task` for a context of `length` tokens, drawn from `rng`.

    options: training-time variations (None or the defaults: the evaluated task)."""
    if task not in _BUILDERS:
        raise ValueError(f"task {task!r} is unknown; choose from {TASKS}")
    if length < MIN_LENGTH:
        raise ValueError(f"length={length} is below the shortest supported context {MIN_LENGTH}")
    prompt_len = length - ANSWER_ROOMS[task] - rng.randrange(8)
    prompt, answer = _BUILDERS[task](rng, prompt_len, options or DEFAULT_OPTIONS)
    assert len(prompt) == prompt_len, (task, len(prompt), prompt_len)
    return Example(prompt=prompt, answer=answer, task=task, length=length)


def example_rng(split: str, seed: int, task: str, length: int, index: int) -> random.Random:
    """The random stream of one example. The key starts with `split`, one of SPLITS, none of which
    holds a "/": the key's text before its first "/" is the split, so keys (and streams) of
    different splits differ whatever the other fields. The train key is the one training has
    always used: its examples are unchanged."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is unknown; choose from {SPLITS}")
    return random.Random(f"{split}/{seed}/{task}/{length}/{index}")


def generate_examples(task: str, length: int, count: int, seed: int, *, split: str,
                      start: int = 0, options: TaskOptions | None = None) -> list[Example]:
    """Examples start .. start+count-1 of the (split, seed, task, length) stream.

    split has no default: every caller names the stream it draws (SPLITS)."""
    return [make_example(task, length, example_rng(split, seed, task, length, i), options)
            for i in range(start, start + count)]


__all__ = ["TASKS", "SPLITS", "ANSWER_ROOM", "ANSWER_ROOMS", "MAX_VARTRACK_CHAIN", "MIN_LENGTH", "TaskOptions", "DEFAULT_OPTIONS", "Example", "exact_match", "filler",
           "longest_vartrack_chain", "make_example", "example_rng", "generate_examples"]
