"""Seeded synthetic long-context tasks in plain text (printable ASCII + newline).

Every example is a prompt of haystack text with facts hidden at random depths (or, for cwe and
fwe, a list to count), ending in a question that the answer completes. With the project's
character tokenizer one character is one token, so lengths here are token counts; every task is
written in that tokenizer's alphabet (no <|unk|>).

The original tasks (`TASKS`, the bundled 6.3M model's; answers are 5-6 digit numbers, vartrack's
the chain of names leading to one; random-word filler):
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

RULER's synthetic categories (`RULER_TASKS`, named as RULER names them; written for this
tokenizer, not RULER's text). Needles read `One secret number of amber-lantern is 4821307.`
(keys: adjective-noun pairs or uuids; values: 7-digit numbers or uuids, 32 hex digits grouped
8-4-4-4-12), each a line of its own in a line haystack, a sentence of its own in the essay. The
haystacks: `noise`, one passage repeated line after line; `essay`, essay-like sentences from a
small grammar; needles, other keys' needles only.
- `niah_single_1` / `_2` / `_3`: one needle, a number in noise / a number in the essay / a uuid in
  the essay. Asked `What is the secret number of K? The secret number of K is `.
- `niah_multikey_1`: 4 keys' needles in the essay, one asked; `niah_multikey_2`: one needle among
  other keys' needles (the whole haystack); `niah_multikey_3`: the same with uuid keys and values.
- `niah_multivalue`: 4 needles of one key in the essay; the answer is all 4 values
  (`4821307, 1190342, 5528107, 3310986`, in the order they appear), graded as a set.
- `niah_multiquery`: 4 keys' needles in the essay, all 4 asked by name; the answer is their values
  in the order asked, graded as a sequence.
- `vt`: variable tracking: lines `VAR QXJPL = 48213`, `VAR MPLRT = QXJPL`, ... (a chain of
  VT_HOPS + 1 = 5 variables) in noise, interleaved with a distractor chain holding another number
  (RULER's default has one chain; with one, listing every VAR line would answer it). Asked
  `Which variables hold the value 48213? They are: `; the answer is the chain's 5 names (in chain
  order), graded as a set.
- `cwe`: common words extraction: a comma-separated list of made-up words in which 10 occur
  most often (`cwe_repeats`: RULER's 30 times against 3 from about 4K tokens, 6 against 1
  below, fewer where the list is short); the answer is those 10 (in order of first appearance),
  graded as a set.
- `fwe`: frequent words extraction: coded words (6 random letters) drawn from a Zipf law of
  exponent 2 with the most frequent rank shown as dots `...`; the answer is the 3 most frequent
  coded words (most frequent first, strictly more frequent than the rest), graded as a set.
Grading (`ANSWER_RULES`, `check_answer`): exact match after stripping whitespace, except the list
answers, read as items split at commas and whitespace: the same items in the same order
(`sequence`) or in any order with none missing, extra or repeated (`set`). RULER grades the lists by
the share of items found (partial credit); here an example is right or wrong.

Lengths: an example built for `length` (any length from MIN_LENGTHS[task]; 128 for the original
tasks, 256 or 512 for RULER's) has a prompt of exactly `length - ANSWER_ROOMS[task] - r`
characters (r uniform in 0..7, so the answer starts at every offset inside a block), which leaves
room for the answer and its end-of-sequence token: prompt + answer + EOS always fits in `length`,
and prompt + ANSWER_ROOMS[task] + r is `length` exactly. The haystack (filler, noise, essay,
needles) is cut to the characters left; cwe and fwe end their lists with words chosen to fit.

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

import math
import random
import re
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterable

TASKS = ("passkey", "multikey", "kv", "vartrack")  # the bundled model's tasks: every command's default
RULER_TASKS = ("niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
               "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe")  # RULER's names
ALL_TASKS = TASKS + RULER_TASKS
TASK_GROUPS = {"default": TASKS, "ruler": RULER_TASKS, "all": ALL_TASKS}  # names a task list may use for several
SPLITS = ("train", "validation", "test", "demo")  # the example streams (module docstring: who draws which)
MAX_VARTRACK_CHAIN = 3  # names in an asked chain: its worked answer (2 names + 6 digits = 18) must fit its room
# Characters kept free after each task's prompt: its longest answer + EOS, rounded up to blocks of 8 (a number:
# 6 + 1; vartrack's worked answer: 18 + 1; a 7-digit number: 7 + 1; a uuid: 36 + 1; 4 numbers or 5 variables,
# comma-separated: 34 + 1 or 33 + 1; cwe's 10 words of 4-7 letters: 88 + 1; fwe's 3 coded words: 22 + 1).
ANSWER_ROOMS = {"passkey": 16, "multikey": 16, "kv": 16, "vartrack": 24,
                "niah_single_1": 16, "niah_single_2": 16, "niah_single_3": 40, "niah_multikey_1": 16,
                "niah_multikey_2": 16, "niah_multikey_3": 40, "niah_multivalue": 40, "niah_multiquery": 40,
                "vt": 40, "cwe": 96, "fwe": 24}
ANSWER_ROOM = max(ANSWER_ROOMS.values())  # the longest answer room of any task
MIN_LENGTH = 128  # the original tasks fit with little filler: curricula start here, where retrieval is learnt fastest
# The shortest context of each task (the RULER-style ones hold several needles, chains or lists).
MIN_LENGTHS = (dict.fromkeys(TASKS, MIN_LENGTH) | dict.fromkeys(RULER_TASKS, 512)
               | dict.fromkeys(("niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_2"), 256))

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


# How each task's answer is graded. exact: the whole text (exact_match). Lists (comma-separated items: numbers,
# uuids, names, words) are read as items split at commas and whitespace; sequence: the same items in the same
# order (niah_multiquery's answers each belong to the key asked at that place); set: the same items in any
# order, none missing, none extra, none twice (RULER scores these by recall of the items, with partial credit).
ANSWER_RULES = dict.fromkeys(ALL_TASKS, "exact") | {"niah_multiquery": "sequence"} | dict.fromkeys(
    ("niah_multivalue", "vt", "cwe", "fwe"), "set")


def answer_items(text: str) -> list[str]:
    """The items of a list answer: `text` split at commas and whitespace."""
    return [item for item in re.split(r"[,\s]+", text) if item]


def check_answer(task: str, prediction: str, answer: str) -> bool:
    """Whether `prediction` answers an example of `task` whose answer is `answer` (ANSWER_RULES)."""
    rule = ANSWER_RULES[task]
    if rule == "exact":
        return exact_match(prediction, answer)
    got, want = answer_items(prediction), answer_items(answer)
    return got == want if rule == "sequence" else sorted(got) == sorted(want)


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str
    task: str
    length: int  # the context length it was built for: len(prompt) + len(answer) + 1 <= length

    def check(self, prediction: str) -> bool:
        return check_answer(self.task, prediction, self.answer)


def _number(rng: random.Random, used: set[str], digits: int | None = None) -> str:
    """A fresh number (no leading zero) not in `used`: `digits` long, or 5 or 6 digits at random."""
    while True:
        size = digits or rng.choice((5, 6))
        value = str(rng.randrange(10 ** (size - 1), 10 ** size))
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


@dataclass(frozen=True)
class Haystack:
    """Where facts hide: `make(rng, n)` is exactly n characters of it; a fact is inserted only right
    after one of `seps` (or at either end), with `fact_end` appended."""

    make: Callable[[random.Random, int], str]
    seps: tuple[str, ...] = (" ",)
    fact_end: str = ""


FILLER = Haystack(filler)  # random words; facts between words (the original tasks)


def _snap(body: str, cut: int, seps: tuple[str, ...]) -> int:
    """The last insertion point at or before `cut`: just after a separator, or 0."""
    found = [body.rfind(sep, 0, cut) for sep in seps]
    return max([at + len(sep) for at, sep in zip(found, seps) if at >= 0], default=0)


def _weave(rng: random.Random, num_chars: int, facts: list[str], ordered: bool = False,
           haystack: Haystack = FILLER) -> str:
    """`num_chars` characters of `haystack` with `facts` inserted at random depths (at its separators).

    ordered=True keeps the facts in the given order (chains read top to bottom).
    """
    body = haystack.make(rng, num_chars)
    cuts = sorted(rng.randrange(num_chars + 1) for _ in facts)
    # Move every cut back to a separator so no filler word (sentence, line) is split by a fact.
    cuts = [c if c in (0, num_chars) else _snap(body, c, haystack.seps) for c in cuts]
    order = list(facts) if ordered else rng.sample(facts, len(facts))
    out, prev = [], 0
    for cut, fact in zip(cuts, order):
        out.append(body[prev:cut])
        out.append(fact + haystack.fact_end)
        prev = cut
    out.append(body[prev:])
    return "".join(out)


def _assemble(rng: random.Random, prompt_len: int, facts: list[str], question: str, ordered: bool = False,
              haystack: Haystack = FILLER) -> str:
    """A prompt of exactly `prompt_len` characters: the facts woven into the haystack, then the question."""
    used = len(question) + sum(len(f) + len(haystack.fact_end) for f in facts)
    room = prompt_len - used
    if room < 0:
        raise ValueError(f"prompt of {prompt_len} characters cannot hold facts and a question of {used}; "
                         "use a longer length")
    return _weave(rng, room, facts, ordered, haystack) + question


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


def _names(rng: random.Random, count: int, size: int = 3) -> list[str]:
    """`count` distinct names of `size` capital letters."""
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choices(_UPPER, k=size))
        if name not in names:
            names.append(name)
    return names


_QUESTION_CHARS = len("\nWhich number does XXX hold? XXX = ")
_VALUE_STATEMENT, _NAME_STATEMENT = len(" XXX = 123456. "), len(" XXX = YYY. ")


def longest_vartrack_chain(prompt_len: int) -> int:
    """The longest asked chain whose worst case (a distractor as long, 6-digit numbers) fits the prompt."""
    per_chain = (prompt_len - _QUESTION_CHARS) // 2
    return max(1, 1 + (per_chain - _VALUE_STATEMENT) // _NAME_STATEMENT)


def _interleave(rng: random.Random, ours: list[str], theirs: list[str]) -> list[str]:
    """The two lists merged at random, each kept in order (two assignment chains read top to bottom)."""
    ours, theirs, merged = list(ours), list(theirs), []
    while ours or theirs:
        pick = ours if (ours and (not theirs or rng.random() < 0.5)) else theirs
        merged.append(pick.pop(0))
    return merged


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

    facts = _interleave(rng, statements(chain, answer), statements(decoy, decoy_value))
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


# ----------------------------------------------------------------------------- RULER's synthetic tasks

# Haystacks of the RULER-style tasks. Each is cut at its front (its first line or sentence may be a
# fragment), so the text before the question ends whole and facts sit between lines or sentences.
_NOISE_LINE = "A gray cat naps by the stove. Rain taps on the window. The kettle hums. Nothing changes today.\n"
# Essay-like prose from a small grammar (RULER's essays are Paul Graham's; no text ships here). No
# digits, hyphens or needle words ("secret", "number", "uuid", "VAR"), so no sentence reads as a fact.
_ESSAY_OPENERS = ("", "", "", "In practice, ", "Over time, ", "Oddly enough, ", "For most people, ", "In the end, ",
                  "At first, ", "Looking back, ", "As a rule, ", "Even so, ", "Sooner or later, ")
_ESSAY_SUBJECTS = ("a good teacher", "most young founders", "the best writers", "a careful reader",
                   "people who build things", "a small team", "every new student", "the curious engineer",
                   "an honest critic", "most readers", "the old town council", "a patient gardener",
                   "anyone who cooks", "the quiet neighbor", "a busy painter")
_ESSAY_VERBS = ("learned", "noticed", "found", "decided", "argued", "suspected", "realized", "admitted",
                "explained", "believed", "discovered", "forgot")
_ESSAY_CLAUSES = ("that the hard part is rarely the first step", "how much time a simple task can take",
                  "that good ideas often look wrong at first", "why old habits are so hard to change",
                  "that a clear plan beats a clever one", "how little the early choices mattered",
                  "that most problems look smaller up close", "why the quiet work matters most",
                  "that writing things down clears the mind", "how often a detour becomes the main road",
                  "that patience pays more than talent", "why a short walk can settle a long argument",
                  "that the obvious answer is sometimes right", "how hard it is to explain something simple",
                  "that nobody reads the manual until it is too late")
_ESSAY_TAILS = ("", "", " after a few hard years", " without much help", " in a crowded room",
                " long before anyone else", " while fixing something else", " on a slow afternoon",
                " by asking simple questions", " the hard way")
# Needle keys: adjective-noun pairs (RULER draws its own word pairs). The hyphen never occurs in a haystack,
# and no adjective ends another, so no cut line of a needles haystack ends in another key's needle.
_KEY_ADJECTIVES = """amber ancient bitter bold brave brisk calm clever crimson crisp curly damp dusty eager early
faint fancy fierce fluffy frozen gentle giant glossy grand hollow humble jolly keen lively lofty lucky mellow
misty modest narrow noble odd pale plain polite proud quick rapid rare rough rusty shiny silent sleepy slim smooth
solid spicy steady sturdy sunny swift tame tidy tiny vast vivid wild windy wise witty""".split()
_KEY_NOUNS = """anchor apple arrow badge barrel basket beacon bell blanket bottle bucket button cabin camera candle
canyon carpet castle cellar chair chimney clock comet compass cottage crystal curtain desert diamond dolphin drum
eagle engine falcon feather fence fiddle forest fountain garden glacier guitar hammer harbor helmet hill jacket
jungle kettle ladder lantern lemon lizard magnet marble meadow mirror mitten orchard otter owl paddle palace parrot
pebble pencil pepper piano pillow planet pocket puzzle rabbit ribbon river rocket saddle sandal shovel spoon
squirrel statue teapot thimble tiger tower trumpet tunnel umbrella valley violin wagon walnut whistle window wizard
zebra""".split()
_CONSONANTS, _VOWELS = "bcdfghjklmnprstvwz", "aeiou"


def _front_cut(num_chars: int, unit: Callable[[], str]) -> str:
    """The last `num_chars` characters of units drawn until they are that long."""
    parts, size = [], 0
    while size < num_chars:
        parts.append(unit())
        size += len(parts[-1])
    return "".join(parts)[size - num_chars:]


def noise(rng: random.Random, num_chars: int) -> str:
    """Exactly `num_chars` characters of one short passage repeated line after line (RULER's noise haystack)."""
    return _front_cut(num_chars, lambda: _NOISE_LINE)


def essay(rng: random.Random, num_chars: int) -> str:
    """Exactly `num_chars` characters of essay-like sentences from a small grammar."""
    def sentence() -> str:
        text = (f"{rng.choice(_ESSAY_OPENERS)}{rng.choice(_ESSAY_SUBJECTS)} {rng.choice(_ESSAY_VERBS)} "
                f"{rng.choice(_ESSAY_CLAUSES)}{rng.choice(_ESSAY_TAILS)}.")
        return text[0].upper() + text[1:] + rng.choice("     \n")  # a paragraph every sixth sentence or so
    return _front_cut(num_chars, sentence)


NOISE = Haystack(noise, ("\n",), "\n")  # facts are lines of their own
ESSAY = Haystack(essay, (". ", ".\n"), " ")  # facts are sentences of their own


def _uuid(rng: random.Random) -> str:
    """A uuid-like value: 32 random hex digits grouped 8-4-4-4-12."""
    h = f"{rng.getrandbits(128):032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


_DRAWS: dict[str, Callable[[random.Random], str]] = {
    "words": lambda rng: f"{rng.choice(_KEY_ADJECTIVES)}-{rng.choice(_KEY_NOUNS)}",
    "numbers": lambda rng: str(rng.randrange(10 ** 6, 10 ** 7)),  # 7 digits, as RULER's
    "uuids": _uuid,
    "coded": lambda rng: "".join(rng.choices(_KEY_CHARS[:26], k=FWE_WORD)),  # fwe's coded words
}


def _fresh(rng: random.Random, kind: str, used: set[str]) -> str:
    """A key or value of `kind` (words, numbers, uuids) not in `used` (then added to it)."""
    for _ in range(1000):
        value = _DRAWS[kind](rng)
        if value not in used:
            used.add(value)
            return value
    raise ValueError(f"no fresh {kind} left after {len(used)}: the context is too long for this task's keys")


@dataclass(frozen=True)
class NiahSpec:
    """A needle-in-a-haystack task in RULER's terms: its haystack (noise, essay, or needles: other
    keys' needles), the kinds of keys and values, keys with needles, needles (values) per key, and
    keys asked."""

    haystack: str
    key: str = "words"
    value: str = "numbers"
    keys: int = 1
    values: int = 1
    queries: int = 1


NIAH_TASKS = {
    "niah_single_1": NiahSpec("noise"),
    "niah_single_2": NiahSpec("essay"),
    "niah_single_3": NiahSpec("essay", value="uuids"),
    "niah_multikey_1": NiahSpec("essay", keys=4),
    "niah_multikey_2": NiahSpec("needles"),
    "niah_multikey_3": NiahSpec("needles", key="uuids", value="uuids"),
    "niah_multivalue": NiahSpec("essay", values=4),
    "niah_multiquery": NiahSpec("essay", keys=4, queries=4),
}


def _needle(noun: str, key: str, value: str) -> str:
    return f"One secret {noun} of {key} is {value}."


def _niah(spec: NiahSpec, rng: random.Random, prompt_len: int,
          options: TaskOptions = DEFAULT_OPTIONS) -> tuple[str, str]:
    noun = "number" if spec.value == "numbers" else "uuid"
    used_keys: set[str] = set()
    used_values: set[str] = set()
    keys = [_fresh(rng, spec.key, used_keys) for _ in range(spec.keys)]
    needles = [(key, _fresh(rng, spec.value, used_values)) for key in keys for _ in range(spec.values)]
    rng.shuffle(needles)  # the order they appear in
    asked = rng.sample(keys, spec.queries)
    values = [value for key in asked for k, value in needles if k == key]  # per asked key, in order of appearance
    if spec.queries > 1:
        question = (f"\nWhat are the secret {noun}s of {', '.join(asked[:-1])} and {asked[-1]}? "
                    "In that order, they are ")
    elif spec.values > 1:
        question = f"\nWhat are all the secret {noun}s of {asked[0]}? The secret {noun}s of {asked[0]} are "
    else:
        question = f"\nWhat is the secret {noun} of {asked[0]}? The secret {noun} of {asked[0]} is "
    if spec.haystack == "needles":  # other keys' needles, each key and value unused so far
        def lines(rng_: random.Random, num_chars: int) -> str:
            return _front_cut(num_chars, lambda: _needle(noun, _fresh(rng_, spec.key, used_keys),
                                                         _fresh(rng_, spec.value, used_values)) + "\n")
        haystack = Haystack(lines, ("\n",), "\n")
    else:
        haystack = {"noise": NOISE, "essay": ESSAY}[spec.haystack]
    facts = [_needle(noun, key, value) for key, value in needles]
    return _assemble(rng, prompt_len, facts, question, ordered=True, haystack=haystack), ", ".join(values)


VT_HOPS = 4  # RULER's: a chain of 5 variables


def _vt(rng: random.Random, prompt_len: int, options: TaskOptions = DEFAULT_OPTIONS) -> tuple[str, str]:
    names = _names(rng, 2 * (VT_HOPS + 1), size=5)
    chain, decoy = names[:VT_HOPS + 1], names[VT_HOPS + 1:]
    used: set[str] = set()
    value, decoy_value = _number(rng, used, 5), _number(rng, used, 5)

    def statements(chain_names: list[str], number: str) -> list[str]:
        return [f"VAR {chain_names[0]} = {number}"] + [f"VAR {b} = {a}" for a, b in zip(chain_names, chain_names[1:])]

    facts = _interleave(rng, statements(chain, value), statements(decoy, decoy_value))
    question = f"\nWhich variables hold the value {value}? They are: "
    return _assemble(rng, prompt_len, facts, question, ordered=True, haystack=NOISE), ", ".join(chain)


def _coined(rng: random.Random, size: int, used: set[str]) -> str:
    """A fresh pronounceable made-up word of `size` letters (consonants and vowels alternate)."""
    while True:
        start = rng.randrange(2)
        word = "".join(rng.choice(_VOWELS if (i + start) % 2 else _CONSONANTS) for i in range(size))
        if word not in used:
            used.add(word)
            return word


def _spread(total: int, lo: int, hi: int) -> list[int]:
    """Sizes in [lo, hi] adding up to `total` (>= lo), as few and as even as can be."""
    count = -(-total // hi)
    base, extra = divmod(total, count)
    assert base >= lo, (total, lo, hi)
    return [base + 1] * extra + [base] * (count - extra)


CWE_COMMON = 10  # RULER's: the 10 most common words are asked
_CWE_INTRO = "Below is a list of words. Some of them appear more often than the rest.\n"
_CWE_QUESTION = f"\nWhich {CWE_COMMON} words occur most often in the list above? They are: "


def cwe_repeats(capacity: int) -> tuple[int, int]:
    """(times each common word occurs, times each other word occurs) in a list of about `capacity` words:
    RULER's 30 and 3 from 400 words (about a 4K context), its short-context 6 and 1 below, and fewer
    common repeats (down to 2) where 60 would crowd the list."""
    if capacity >= 400:
        return 30, 3
    return max(2, min(6, capacity // 20)), 1


def _cwe(rng: random.Random, prompt_len: int, options: TaskOptions = DEFAULT_OPTIONS) -> tuple[str, str]:
    room = prompt_len - len(_CWE_INTRO) - len(_CWE_QUESTION)
    left = room + 2  # a word costs its length + 2 (", "), the first one 2 less
    common_times, other_times = cwe_repeats(left // 8)
    used: set[str] = set()
    common = [_coined(rng, rng.randint(4, 7), used) for _ in range(CWE_COMMON)]
    words = common * common_times
    left -= common_times * sum(len(w) + 2 for w in common)
    if left < 5:
        raise ValueError(f"prompt of {prompt_len} characters cannot hold cwe's list; use a longer length")
    while True:  # the other words, each `other_times` times, while at least 5 characters stay free
        word = _coined(rng, rng.randint(4, 7), used)
        if left - other_times * (len(word) + 2) < 5:
            break
        words += [word] * other_times
        left -= other_times * (len(word) + 2)
    words += [_coined(rng, cost - 2, used) for cost in _spread(left, 5, 11)]  # once each, to the exact length
    rng.shuffle(words)
    answer = ", ".join(sorted(common, key=words.index))  # in order of first appearance
    return _CWE_INTRO + ", ".join(words) + _CWE_QUESTION, answer


FWE_ALPHA, FWE_TOP, FWE_WORD = 2.0, 3, 6  # RULER's Zipf exponent, words asked, coded word length
_FWE_ZETA = math.pi ** 2 / 6  # zeta(FWE_ALPHA): the Zipf normaliser
_FWE_INTRO = "Read the coded text below and keep count of how often each coded word occurs.\n"
_FWE_QUESTION = f"\nIgnoring the dots, which {FWE_TOP} coded words occur most often above? They are: "


def fwe_counts(words: int, vocab: int) -> list[int]:
    """Occurrences of the words of ranks 1..vocab in a text of about `words` words, Zipf-distributed
    (rank 1 is the dots). Ranks 2..FWE_TOP+1, the answer, are made strictly more frequent than the next
    and than any word used once."""
    counts = [int(words * k ** -FWE_ALPHA / _FWE_ZETA) for k in range(1, vocab + 1)]
    floor = max(counts[FWE_TOP + 1:] + [1])
    for rank in range(FWE_TOP, 0, -1):  # indices FWE_TOP .. 1, least frequent answer first
        counts[rank] = max(counts[rank], floor + 1)
        floor = counts[rank]
    return counts


def _fwe(rng: random.Random, prompt_len: int, options: TaskOptions = DEFAULT_OPTIONS) -> tuple[str, str]:
    room = prompt_len - len(_FWE_INTRO) - len(_FWE_QUESTION)
    budget = room + 1  # a word costs its length + 1 (" "), the first one 1 less; the dots "..." cost 4
    used: set[str] = set()
    vocab = [_fresh(rng, "coded", used) for _ in range(max(16, room // 50))]  # RULER: one word per 50 tokens

    def cost(counts: list[int]) -> int:
        return 4 * counts[0] + (FWE_WORD + 1) * sum(counts[1:])

    words = budget // 5
    while words > 0 and cost(fwe_counts(words, len(vocab))) > budget - 24:
        words -= 1 + words // 64
    counts = fwe_counts(words, len(vocab))
    left = budget - cost(counts)
    if left < 24:
        raise ValueError(f"prompt of {prompt_len} characters cannot hold fwe's text; use a longer length")
    # Fill the rest exactly: 0-3 more words used once (7 characters each) and the dots (4 each).
    once = (3 * left) % 4
    counts[0] += (left - (FWE_WORD + 1) * once) // 4
    items = ["..."] * counts[0] + [w for w, n in zip(vocab[1:], counts[1:]) for _ in range(n)]
    items += [_fresh(rng, "coded", used) for _ in range(once)]
    rng.shuffle(items)
    return _FWE_INTRO + " ".join(items) + _FWE_QUESTION, ", ".join(vocab[1:FWE_TOP + 1])


_BUILDERS: dict[str, Callable[[random.Random, int, TaskOptions], tuple[str, str]]] = {
    "passkey": _passkey, "multikey": _multikey, "kv": _kv, "vartrack": _vartrack,
    **{name: partial(_niah, spec) for name, spec in NIAH_TASKS.items()}, "vt": _vt, "cwe": _cwe, "fwe": _fwe,
}


def make_example(task: str, length: int, rng: random.Random, options: TaskOptions | None = None) -> Example:
    """One example of `task` for a context of `length` tokens, drawn from `rng`.

    options: training-time variations (None or the defaults: the evaluated task)."""
    if task not in _BUILDERS:
        raise ValueError(f"task {task!r} is unknown; choose from {ALL_TASKS}")
    if length < MIN_LENGTHS[task]:
        raise ValueError(f"length={length} is below the shortest supported context of {task}, {MIN_LENGTHS[task]}")
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


def resolve_tasks(names: Iterable[str]) -> tuple[str, ...]:
    """Task names, each TASK_GROUPS name replaced by its tasks, repeats dropped (first place kept)."""
    out: list[str] = []
    for name in names:
        if name not in TASK_GROUPS and name not in _BUILDERS:
            raise ValueError(f"task {name!r} is unknown; choose from {ALL_TASKS} or a group {tuple(TASK_GROUPS)}")
        out += [task for task in TASK_GROUPS.get(name, (name,)) if task not in out]
    return tuple(out)


__all__ = ["TASKS", "RULER_TASKS", "ALL_TASKS", "TASK_GROUPS", "SPLITS", "ANSWER_ROOM", "ANSWER_ROOMS",
           "ANSWER_RULES", "MAX_VARTRACK_CHAIN", "MIN_LENGTH", "MIN_LENGTHS", "NIAH_TASKS", "NiahSpec", "VT_HOPS",
           "CWE_COMMON", "FWE_TOP", "TaskOptions", "DEFAULT_OPTIONS", "Example", "Haystack", "exact_match",
           "answer_items", "check_answer", "filler", "noise", "essay", "cwe_repeats", "fwe_counts",
           "longest_vartrack_chain", "make_example", "example_rng", "generate_examples", "resolve_tasks"]
