"""Broken checkpoint files are refused before any weight is allocated, naming the file and what to do.

Each case damages a copy of the bundled tiny-random checkpoint one way. A stand-in for safetensors'
reader fails the test if a weight is read before the refusal.
"""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

import runtime.checkpoint
from runtime import Engine, EngineConfig
from runtime.checkpoint import load_model
from runtime.engine import CHECKPOINTS

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


@pytest.fixture
def ckpt(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "ckpt"
    shutil.copytree(CHECKPOINTS / "tiny-random", path)

    def no_weight_read(*args, **kwargs):
        raise AssertionError("a weight was read before the checkpoint was refused")

    monkeypatch.setattr(runtime.checkpoint, "safe_open", no_weight_read)
    return path


def header(path: Path) -> tuple[dict, bytes]:
    """(header dict, tensor data) of a safetensors file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write(path: Path, head: dict | bytes, data: bytes) -> None:
    blob = head if isinstance(head, bytes) else json.dumps(head).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def refused(path: Path, error: type[Exception], pattern: str) -> str:
    """load_model and Engine both refuse `path` with `error` matching `pattern`; returns the message."""
    with pytest.raises(error, match=pattern) as err:
        load_model(path)
    with pytest.raises(error, match=pattern):
        Engine(EngineConfig(model_path=str(path), device="cpu", progress=False))
    return str(err.value)


def test_missing_weights_file(ckpt):
    (ckpt / WEIGHTS).unlink()
    refused(ckpt, FileNotFoundError, rf"{ckpt} has neither model.safetensors nor {INDEX}")


def test_truncated_weights_file(ckpt):
    file = ckpt / WEIGHTS
    data = file.read_bytes()
    file.write_bytes(data[:-1000])
    refused(ckpt, ValueError, rf"{file} is truncated: its header describes \d+ bytes of tensor data, the file holds "
                              r"\d+ \(1000 missing\); download or save the checkpoint again")
    file.write_bytes(data[:200])  # cut inside the header
    refused(ckpt, ValueError, rf"{file} is truncated or not a safetensors file: its header claims \d+ bytes, the "
                              "file holds 192")
    file.write_bytes(b"")
    refused(ckpt, ValueError, rf"{file} is not a safetensors file \(0 bytes, shorter than its 8-byte header length\)")


def test_bytes_after_the_last_tensor(ckpt):
    file = ckpt / WEIGHTS
    file.write_bytes(file.read_bytes() + b"\0" * 24)
    refused(ckpt, ValueError, rf"{file} has 24 bytes after its last tensor")


@pytest.mark.parametrize("damage, pattern", [
    (lambda head: b"{not json" + b" " * 10, r"has a corrupt header \(not UTF-8 JSON"),
    (lambda head: b"\xff\xfe" * 8, r"has a corrupt header \(not UTF-8 JSON"),
    (lambda head: b"[1, 2, 3]", r"has a corrupt header \(a JSON list, not an object\)"),
    (lambda head: {**head, "model.norm.weight": {"dtype": "F32", "shape": [64]}},
     r"tensor 'model.norm.weight' has a corrupt header entry .* \(expected dtype, shape \[non-negative ints\] and "
     r"data_offsets \[begin, end\]\)"),
    (lambda head: {**head, "model.norm.weight": {**head["model.norm.weight"], "shape": [32]}},
     r"tensor 'model.norm.weight' \(F32, shape \(32,\)\) needs 128 bytes but its data_offsets span 256: the header is "
     "corrupt"),
    (lambda head: {**head, "model.norm.weight": {**head["model.norm.weight"],
                                                 "data_offsets": [o + 4 for o in head["model.norm.weight"]["data_offsets"]]}},
     r"starts at byte \d+ of the data, expected \d+ \(a gap or an overlap\)"),
], ids=["not-json", "not-utf8", "not-an-object", "entry-without-offsets", "offsets-disagree-with-shape", "overlap"])
def test_corrupt_header(ckpt, damage, pattern):
    file = ckpt / WEIGHTS
    head, data = header(file)
    assert head["model.norm.weight"]["dtype"] == "F32"
    write(file, damage(head), data)
    message = refused(ckpt, ValueError, pattern)
    assert str(file) in message and "download or save the checkpoint again" in message


def test_wrong_dtype(ckpt):
    file = ckpt / WEIGHTS
    head, data = header(file)
    write(file, {**head, "model.norm.weight": {**head["model.norm.weight"], "dtype": "Q4_K"}}, data)
    refused(ckpt, ValueError, rf"{file}: tensor 'model.norm.weight' has dtype 'Q4_K', which is not a safetensors dtype "
                              r"this runtime reads .*; export the checkpoint in BF16, F16, F32, F64")
    entry = head["model.norm.weight"]  # 64 floats -> 128 int16: the bytes agree, the dtype is not a float
    write(file, {**head, "model.norm.weight": {**entry, "dtype": "I16", "shape": [128]}}, data)
    refused(ckpt, ValueError, rf"(?s){ckpt} does not match .* not floating point \(quantised checkpoints are not "
                              r"supported\):\s+model.norm.weight: dtype I16")


def test_config_json_syntax_error(ckpt):
    file = ckpt / "config.json"
    file.write_text(file.read_text().replace('"hidden_size": 64,', '"hidden_size": 64'))
    refused(ckpt, ValueError, rf"{file} is not valid JSON: Expecting ',' delimiter at line \d+ column \d+; fix the "
                              "file or replace it with the checkpoint's original")
    file.write_text("[]")
    refused(ckpt, ValueError, rf"{file} holds a JSON list, not an object")


@pytest.mark.parametrize("field, value, pattern", [
    ("hidden_size", "64", r"hidden_size='64' must be an integer >= 1"),
    ("num_hidden_layers", 2.5, r"num_hidden_layers=2.5 must be an integer >= 1"),
    ("vocab_size", 0, r"vocab_size=0 must be an integer >= 1"),
    ("mask_token_id", -1, r"mask_token_id=-1 must be an integer >= 0"),
    ("eos_token_id", [0, "x"], r"eos_token_id=\[0, 'x'\] must be a token id"),
])
def test_config_json_field_of_the_wrong_type(ckpt, field, value, pattern):
    file = ckpt / "config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), field: value}))
    refused(ckpt, ValueError, rf"{file}: {pattern}")


def test_a_parse_error_names_the_config_file(ckpt):
    file = ckpt / "config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), "rope_scaling": {"rope_type": "dynamic"}}))
    refused(ckpt, ValueError, rf"{file}: rope type 'dynamic' is not supported")


def test_generation_config_syntax_error(ckpt):
    file = ckpt / "generation_config.json"
    file.write_text('{"eos_token_id": [0,}')
    refused(ckpt, ValueError, rf"{file} is not valid JSON")


def sharded(ckpt: Path) -> dict[str, str]:
    """Split the checkpoint's one file into two shards and an index; returns its weight_map."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(ckpt / WEIGHTS)
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in shards.items():
        save_file({n: tensors[n] for n in part}, ckpt / file)
    (ckpt / WEIGHTS).unlink()
    weight_map = {n: file for file, part in shards.items() for n in part}
    (ckpt / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return weight_map


def test_shard_listed_in_the_index_but_absent(ckpt):
    sharded(ckpt)
    (ckpt / "model-00002-of-00002.safetensors").unlink()
    refused(ckpt, FileNotFoundError, rf"{ckpt / INDEX} names shard files that are not in {ckpt}: "
                                     r"\['model-00002-of-00002.safetensors'\]; download the missing shards")


def test_index_syntax_error_and_bad_weight_map(ckpt):
    weight_map = sharded(ckpt)
    index = ckpt / INDEX
    index.write_text('{"weight_map": {')
    refused(ckpt, ValueError, rf"{index} is not valid JSON")
    index.write_text(json.dumps({"weight_map": {**weight_map, "model.norm.weight": None}}))
    refused(ckpt, ValueError, rf"{index}: the weight_map entry of 'model.norm.weight' is None, not a shard file name")
    index.write_text(json.dumps({"metadata": {}}))
    refused(ckpt, ValueError, rf"{index} has no weight_map")


def test_a_truncated_shard_is_named(ckpt):
    sharded(ckpt)
    shard = ckpt / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    refused(ckpt, ValueError, rf"{shard} is truncated")


def test_damaged_tokenizer_files(ckpt):
    tok = ckpt / "tokenizer.json"
    tok.write_text(tok.read_text()[:500])
    with pytest.raises(ValueError, match=rf"{tok} cannot be read as a tokenizer .*replace it with the checkpoint's "
                                         "original"):
        Engine(EngineConfig(model_path=str(ckpt), device="cpu", progress=False))
    shutil.copy(CHECKPOINTS / "tiny-random" / "tokenizer.json", tok)
    config = ckpt / "tokenizer_config.json"
    config.write_text(config.read_text()[:-3])
    with pytest.raises(ValueError, match=rf"{config} is not valid JSON"):
        Engine(EngineConfig(model_path=str(ckpt), device="cpu", progress=False))
