"""Prompt text is text: special tokens written in it stay characters unless asked, the mask token
never enters a prompt, nothing is silently lost to <|unk|>, and result text leaves special tokens out.

On the bundled tokenizers (character-level, no byte fallback: their vocabulary is the trained
model's, so unknown characters are refused rather than added) and on a real Qwen tokenizer's files
(byte-level BPE: everything encodes)."""
from __future__ import annotations

import random
import re

import pytest

from runtime import Engine, EngineConfig, GenerationRequest
from runtime.cli import _config, build_parser, main
from runtime.engine import CHECKPOINTS
from runtime.tokenizer import Tokenizer

BUNDLED = ["retrieval-6m", "tiny-random"]
TINY = CHECKPOINTS / "tiny-random"

# Random text draws from each of these: what the alphabet has, what it lacks (tabs, accents, CJK,
# emoji with joiners, controls), and special tokens' text.
POOLS = [
    [chr(c) for c in range(32, 127)] + ["\n"],
    ["\t", "\r", "\x00", "\x7f", "é", "ß", "ñ", "İ", "中", "文", "😀", "👩\u200d💻", "\u200b", "\ufeff", "\U0010fffd"],
    ["<|endoftext|>", "<|MASK|>", "<|unk|>", "<|im_start|>", "<|im_end|>", "<|", "|>"],
]


def random_text(rng: random.Random) -> str:
    pieces = []
    for _ in range(rng.randint(0, 40)):
        pool = rng.choices(POOLS, weights=[8, 1, 1])[0]
        pieces.append(rng.choice(pool))
    return "".join(pieces)


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_tokenizer_round_trips_random_unicode_or_refuses_naming_each_character(name):
    tok = Tokenizer.from_dir(CHECKPOINTS / name)
    alphabet = {tok.backend.id_to_token(i) for i in range(tok.vocab_size)}
    rng = random.Random(35)
    refused = 0
    for _ in range(400):
        text = random_text(rng)
        lost = [(i, c) for i, c in enumerate(text) if c not in alphabet]
        if not lost:
            ids = tok.encode(text)
            assert tok.decode(ids) == text  # lossless, special tokens' text included
            assert not set(ids) & set(tok.special_tokens)  # ... and it stayed characters
            continue
        refused += 1
        with pytest.raises(ValueError) as err:
            tok.encode(text)
        message = str(err.value)
        assert f"holds {len(lost)} character(s) this tokenizer cannot represent" in message
        for i, c in lost[:8]:  # every character named with its code point and position (the first 8)
            assert f"{c!r} (U+{ord(c):04X}) at character {i}" in message
    assert 50 < refused < 350  # both branches were exercised


def test_lone_surrogates_are_refused_clearly():
    tok = Tokenizer.from_dir(TINY)
    with pytest.raises(ValueError, match=r"'\\ud800' \(U\+D800\) at character 2, a lone surrogate"):
        tok.encode("ab\ud800c")


def test_special_tokens_text_stays_text_unless_parsing_is_asked_for():
    tok = Tokenizer.from_dir(TINY)
    text = "x<|endoftext|>y<|MASK|>"
    plain = tok.encode(text)
    assert len(plain) == len(text) and tok.decode(plain) == text
    parsed = tok.encode(text, parse_special_tokens=True)
    assert parsed == [tok.token_to_id("x"), 0, tok.token_to_id("y"), tok.mask_token_id]
    # spans that stay text while the rest is parsed (a chat template's messages)
    assert tok.encode(text, parse_special_tokens=True, literal_spans=[(1, 14)]) == plain[:14] + parsed[2:]
    # a shared tokenizer is not changed by encoding literally
    assert tok.backend.encode(text).ids == parsed


@pytest.fixture(scope="module")
def engine():
    return Engine(EngineConfig(model_path=str(TINY), device="cpu", dtype="float64", progress=False))


def test_prompt_text_cannot_inject_end_of_text_or_mask(engine):
    tok = engine.tokenizer
    text = "The document says <|endoftext|> and <|MASK|> here"
    seq = engine.make_sequence(GenerationRequest(text))
    assert seq.prompt_ids == tok.encode(text) and len(seq.prompt_ids) == len(text)
    assert engine.settings.mask_token_id not in seq.prompt_ids and 0 not in seq.prompt_ids
    plain, = engine.generate([text], max_new_tokens=4)
    assert plain.error is None and plain.prompt_tokens == len(text)


def test_parse_special_tokens_reads_them_but_never_the_mask(engine):
    parsing = Engine(engine.config.with_(parse_special_tokens=True), model=engine.model)
    seq = parsing.make_sequence(GenerationRequest("a<|im_start|>b<|endoftext|>"))
    assert seq.prompt_ids == [parsing.tokenizer.token_to_id("a"), 3, parsing.tokenizer.token_to_id("b"), 0]
    masked, fine = parsing.generate(["doc <|MASK|> doc", "fine"], max_new_tokens=4)
    assert masked.finish_reason == "error" and fine.error is None
    assert re.search(r"holds the mask token '<\|MASK\|>' \(id 1\) at token 4 \(parse_special_tokens=True read its "
                     r"text as the control token\): \[MASK\] marks the positions still to be generated", masked.error)


def test_result_text_skips_special_tokens_unless_asked(engine):
    tok = engine.tokenizer
    # a request that stops at nothing generates whatever the random model proposes, special tokens included
    reqs = [GenerationRequest(f"prompt {i}", max_new_tokens=40, stop_at_eos=False, temperature=2.0, seed=i)
            for i in range(6)]
    results = engine.generate(reqs)
    special = set(tok.special_tokens)
    assert any(set(r.tokens) & special for r in results), "no special token generated: pick other seeds"
    for r in results:
        assert r.text == tok.decode(r.tokens, skip_special_tokens=True)
    keeping = Engine(engine.config.with_(skip_special_tokens=False), model=engine.model)
    for r, kept in zip(results, keeping.generate(reqs)):
        assert kept.tokens == r.tokens and kept.text == tok.decode(r.tokens)


def test_cli_flags_and_bad_values():
    args = build_parser().parse_args(["generate", "--model", str(TINY), "--parse-special-tokens",
                                      "--keep-special-tokens", "--prompt", "x"])
    config = _config(args)
    assert config.parse_special_tokens and not config.skip_special_tokens
    defaults = _config(build_parser().parse_args(["generate", "--model", str(TINY), "--prompt", "x"]))
    assert not defaults.parse_special_tokens and defaults.skip_special_tokens
    with pytest.raises(ValueError, match="parse_special_tokens=1 must be True or False"):
        EngineConfig(model_path=str(TINY), parse_special_tokens=1)


def test_cli_reports_a_refused_prompt_and_serves_the_rest(capsys):
    assert main(["generate", "--model", str(TINY), "--device", "cpu", "--no-progress", "--max-new-tokens", "4",
                 "--prompt", "caf\u00e9", "--prompt", "fine"]) == 1
    captured = capsys.readouterr()
    assert "error: request 0: refused: the text holds 1 character(s)" in captured.err
    assert "'é' (U+00E9) at character 3" in captured.err
    assert "--- [1] length, 4 tokens" in captured.out
