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


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


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
        model_config = _read_json(path / "config.json")
        for key, value in _read_json(path / "generation_config.json").items():
            model_config.setdefault(key, value)
        return cls(tokenizers.Tokenizer.from_file(str(tok_file)), _read_json(path / "tokenizer_config.json"),
                   model_config)

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

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

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
