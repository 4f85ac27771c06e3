"""Tokenizers: a thin wrapper over a model directory's tokenizer.json, and the project's own
character-level tokenizer for the checkpoints it trains.

Only the `tokenizers` library is needed at run time; the files written here are in Hugging Face's
format, so `transformers.AutoTokenizer` opens them as well.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, decoders, models

from runtime.config import read_json_file

# Mask tokens of the block-diffusion families (SDAR/TraDo, Fast-dLLM v2, LLaDA) and generic ones,
# tried in this order when tokenizer_config.json and config.json name none.
MASK_TOKEN_CANDIDATES = ("<|MASK|>", "<|mask|>", "|<MASK>|", "<|mdm_mask|>", "[MASK]", "<mask>")

EOS_TOKEN = "<|endoftext|>"
MASK_TOKEN = "<|MASK|>"
UNK_TOKEN = "<|unk|>"
DEFAULT_SPECIAL_TOKENS = (EOS_TOKEN, MASK_TOKEN, UNK_TOKEN, "<|im_start|>", "<|im_end|>")
# Printable ASCII (space to tilde) plus newline: what the project's synthetic tasks are written in.
DEFAULT_ALPHABET = "\n" + "".join(chr(c) for c in range(32, 127))


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, list) else [value])]


class Tokenizer:
    """Encode/decode plus the special ids the decoding loop needs.

    backend: the `tokenizers.Tokenizer`; config: tokenizer_config.json's content; model_config:
    config.json (+ generation_config.json) fields consulted for eos/mask ids (may be empty).
    """

    def __init__(self, backend: tokenizers.Tokenizer, config: dict[str, Any] | None = None,
                 model_config: dict[str, Any] | None = None):
        self.backend = backend
        self._literal: tokenizers.Tokenizer | None = None  # see _literal_backend
        self.config = dict(config or {})
        model_config = model_config or {}
        self.mask_token_id = self._find_mask_id(model_config)
        self.eos_token_ids = self._find_eos_ids(model_config)
        pad = self._id_of(_token_text(self.config.get("pad_token")))
        self.pad_token_id = pad if pad is not None else (self.eos_token_ids[0] if self.eos_token_ids else None)

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """Load tokenizer.json (+ tokenizer_config.json, config.json, generation_config.json) from a directory."""
        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            present = sorted(p.name for p in path.iterdir()) if path.is_dir() else "no such directory"
            raise FileNotFoundError(
                f"{path} has no tokenizer.json (found: {present}); only fast (tokenizers-library) "
                "tokenizers are supported: save one with transformers' tokenizer.save_pretrained(path)")
        model_config = read_json_file(path / "config.json", required=False)
        for key, value in read_json_file(path / "generation_config.json", required=False).items():
            model_config.setdefault(key, value)
        tokenizer_config = read_json_file(path / "tokenizer_config.json", required=False)
        try:
            backend = tokenizers.Tokenizer.from_file(str(tok_file))
        except Exception as err:  # the library's message names no file (e.g. "expected value at line 1 column 1")
            raise ValueError(f"{tok_file} cannot be read as a tokenizer ({err}); the file is damaged or not a "
                             "tokenizers-library file: replace it with the checkpoint's original") from err
        return cls(backend, tokenizer_config, model_config)

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def _find_mask_id(self, model_config: dict[str, Any]) -> int | None:
        named = self._id_of(_token_text(self.config.get("mask_token")))
        if named is not None:
            return named
        if model_config.get("mask_token_id") is not None:
            return int(model_config["mask_token_id"])
        for token in MASK_TOKEN_CANDIDATES:
            found = self._id_of(token)
            if found is not None:
                return found
        return None

    def _find_eos_ids(self, model_config: dict[str, Any]) -> tuple[int, ...]:
        """Every id that ends generation: the tokenizer's eos token and the model config's eos ids."""
        ids = [self._id_of(_token_text(self.config.get("eos_token")))]
        ids += _as_id_list(model_config.get("eos_token_id"))
        return tuple(dict.fromkeys(i for i in ids if i is not None))

    @property
    def vocab_size(self) -> int:
        """Tokens the tokenizer can emit, added tokens included (the model's vocab may be padded larger)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def special_tokens(self) -> dict[int, str]:
        """{id: text} of the special (control) tokens: eos, mask, chat turn markers, ..."""
        return {i: t.content for i, t in self.backend.get_added_tokens_decoder().items() if t.special}

    def special_tokens_in(self, text: str) -> list[str]:
        """The special tokens whose text occurs in `text`, in vocabulary order."""
        return [token for token in self.special_tokens.values() if token in text]

    def _literal_backend(self) -> tokenizers.Tokenizer:
        """A copy of the backend that reads special tokens' text as plain text (`encode_special_tokens`,
        transformers' split_special_tokens). A copy, not the flag set per call on the shared backend:
        engines share tokenizers, and a flag left set would change every other caller's encoding."""
        if self._literal is None:
            self._literal = tokenizers.Tokenizer.from_str(self.backend.to_str())
            self._literal.encode_special_tokens = True
        return self._literal

    def encode(self, text: str, add_special_tokens: bool = False, *, parse_special_tokens: bool = False,
               literal_spans: Sequence[tuple[int, int]] = ()) -> list[int]:
        """Token ids of `text`, without loss: text the tokenizer can only map to its unknown token
        (a character-level vocabulary without byte fallback) is refused, naming the characters.

        parse_special_tokens: False (the default) encodes special tokens' text (`<|endoftext|>`,
        `<|MASK|>`, ...) as the characters it is made of, so text from a user or a document can
        never inject a control token; True reads it as the tokens (a chat template's markers).
        literal_spans: [start, end) character ranges of `text` that stay plain text even when
        parsing, such as the messages inside a rendered chat template. Where no special token's text
        occurs inside them, the text is encoded whole (the ids transformers gives); otherwise it is
        encoded piece by piece, the spans holding special-token text as plain text.
        """
        if not text.isascii():
            try:  # the tokenizers library takes UTF-8 only; its own message ("must be str") names nothing
                text.encode("utf-8")
            except UnicodeEncodeError as err:
                raise ValueError(f"the text holds {text[err.start]!r} (U+{ord(text[err.start]):04X}) at character "
                                 f"{err.start}, a lone surrogate, which is not Unicode text: decode the source with "
                                 "errors='replace', or fix it where it was produced") from err
        if not parse_special_tokens:  # text without any special token's text reads the same either way
            pieces = [(self._literal_backend() if self.special_tokens_in(text) else self.backend, 0, len(text))]
        else:
            risky = sorted((a, b) for a, b in literal_spans if self.special_tokens_in(text[a:b]))
            pieces, at = [], 0
            for a, b in risky:
                if a < at:
                    raise ValueError(f"literal_spans overlap at character {a}")
                pieces += [(self.backend, at, a), (self._literal_backend(), a, b)]
                at = b
            pieces.append((self.backend, at, len(text)))
        encodings = [self._encode_checked(backend, text, a, b) for backend, a, b in pieces if b > a]
        if not encodings:
            encodings = [self.backend.encode("", add_special_tokens=False)]
        merged = encodings[0] if len(encodings) == 1 else tokenizers.Encoding.merge(encodings, growing_offsets=True)
        if add_special_tokens:  # the post-processor's bos/eos go around the whole text, not each piece
            merged = self.backend.post_process(merged, add_special_tokens=True)
        return merged.ids

    def _encode_checked(self, backend: tokenizers.Tokenizer, text: str, start: int, end: int) -> tokenizers.Encoding:
        """backend's encoding of text[start:end], refusing characters that could only become the
        unknown token (positions are characters of the whole `text`)."""
        piece = text[start:end]
        encoding = backend.encode(piece, add_special_tokens=False)
        unk = self._unk_id()
        if unk is not None and unk in encoding.ids:
            unk_text = self.backend.id_to_token(unk)
            lost = [(a, piece[a:b]) for tid, (a, b) in zip(encoding.ids, encoding.offsets)
                    if tid == unk and piece[a:b] != unk_text]
            if lost:
                shown = ", ".join(f"{chars!r} ({' '.join(f'U+{ord(c):04X}' for c in chars)}) at character "
                                  f"{start + a}" for a, chars in lost[:8])
                more = f" and {len(lost) - 8} more" if len(lost) > 8 else ""
                raise ValueError(
                    f"the text holds {len(lost)} character(s) this tokenizer cannot represent (it has no byte "
                    f"fallback: they would all become {unk_text}): {shown}{more}. Remove or replace them; a model "
                    "trained on this vocabulary has never seen them")
        return encoding

    def _unk_id(self) -> int | None:
        """The unknown token's id, where the vocabulary has one (byte-level BPE has none)."""
        name = getattr(self.backend.model, "unk_token", None) or _token_text(self.config.get("unk_token"))
        return None if name is None else self.backend.token_to_id(name)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def save(self, path: str | Path) -> None:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `path`."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(path / "tokenizer.json"))
        (path / "tokenizer_config.json").write_text(json.dumps(self.config, indent=2, ensure_ascii=False) + "\n")
        special = {k: self.config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token", "mask_token")
                   if self.config.get(k) is not None}
        (path / "special_tokens_map.json").write_text(json.dumps(special, indent=2, ensure_ascii=False) + "\n")


def hf_tokenizer_config(backend: tokenizers.Tokenizer, *, eos_token: str | None = None,
                        pad_token: str | None = None, mask_token: str | None = None,
                        unk_token: str | None = None, bos_token: str | None = None,
                        model_max_length: int = 1 << 20) -> dict[str, Any]:
    """A tokenizer_config.json for `backend` naming its special tokens (each must exist in it)."""
    named = {"bos_token": bos_token, "eos_token": eos_token, "unk_token": unk_token, "pad_token": pad_token,
             "mask_token": mask_token}
    for key, token in named.items():
        if token is not None and backend.token_to_id(token) is None:
            raise ValueError(f"{key}={token!r} is not in the tokenizer's vocabulary")
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
                              "clean_up_tokenization_spaces": False}
    config.update({k: v for k, v in named.items() if v is not None})
    return config


def build_char_tokenizer(alphabet: str | Iterable[str] = DEFAULT_ALPHABET,
                         special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
                         unk_token: str = UNK_TOKEN) -> tokenizers.Tokenizer:
    """A character-level tokenizer: ids 0.. are `special_tokens` in order, then one id per character.

    A BPE model with no merges splits text into single characters; characters outside the alphabet
    become `unk_token` (which must be one of `special_tokens`). Save it with
    `Tokenizer(tok, hf_tokenizer_config(tok, ...)).save(path)`.
    """
    chars = list(dict.fromkeys(alphabet))
    if any(len(c) != 1 for c in chars):
        raise ValueError("alphabet must consist of single characters")
    if unk_token not in special_tokens:
        raise ValueError(f"unk_token={unk_token!r} must be one of special_tokens={list(special_tokens)}")
    clash = [c for c in chars if c in special_tokens]
    if clash or len(set(special_tokens)) != len(special_tokens):
        raise ValueError(f"special tokens must be unique and not single alphabet characters: {clash}")
    vocab = {tok: i for i, tok in enumerate([*special_tokens, *chars])}
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=unk_token))
    backend.decoder = decoders.Fuse()  # characters concatenate back without separators
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
    return backend


__all__ = [
    "Tokenizer", "build_char_tokenizer", "hf_tokenizer_config", "DEFAULT_ALPHABET", "DEFAULT_SPECIAL_TOKENS",
    "EOS_TOKEN", "MASK_TOKEN", "UNK_TOKEN", "MASK_TOKEN_CANDIDATES",
]
