"""Load and save Hugging Face-format checkpoints of the supported families from local directories.

Nothing here touches the network. Loading first reads only the safetensors headers, checks every
tensor's name and shape against what the config implies, and only then materialises the model,
tensor by tensor, straight into the target dtype and device (the model is built on the meta
device, so no second copy of the weights ever exists). runtime/checkpoint_layout.py says which
stored tensors make each of the forward's (LLaDA2.0's fused QKV, per-expert MoE weights).
"""
from __future__ import annotations

import contextlib
import json
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tokenizers
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from runtime.checkpoint_layout import Piece, assemble, disassemble, shard, stored_as, stored_shapes
from runtime.config import ModelConfig, read_json_file
from runtime.model import Transformer, expected_tensor_shapes
from runtime.parallel import TensorParallel, split_kind
from runtime.tokenizer import Tokenizer, hf_tokenizer_config

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Tensors some checkpoints carry that the forward recomputes: skipped without complaint.
HARMLESS_SUFFIXES = ("rotary_emb.inv_freq",)
FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
}
_MAX_LISTED = 40


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """torch dtype from a torch.dtype or a name such as "bfloat16" / "bf16" / "torch.float16"."""
    if isinstance(dtype, torch.dtype):
        if dtype not in FLOAT_DTYPES.values():
            raise ValueError(f"dtype {dtype} is not a supported floating dtype: {sorted(DTYPE_NAMES)}")
        return dtype
    name = str(dtype).removeprefix("torch.").lower()
    if name not in DTYPE_NAMES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPE_NAMES)}")
    return DTYPE_NAMES[name]


# Bytes per element of every dtype the safetensors format names (sub-byte formats are not loadable
# here, and a header naming a dtype outside this table was written by something else).
SAFETENSORS_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}
_REWRITE = "download or save the checkpoint again"


def _header_entry(file: Path, name: str, info: Any) -> tuple[str, tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of one header entry, each field checked (a corrupt header names it)."""
    if not isinstance(info, dict):
        raise ValueError(f"{file}: the header entry of tensor {name!r} is not an object: the header is corrupt; "
                         f"{_REWRITE}")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
            and isinstance(offsets, list) and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets) and 0 <= offsets[0] <= offsets[1]):
        raise ValueError(f"{file}: tensor {name!r} has a corrupt header entry {info!r} (expected dtype, shape "
                         f"[non-negative ints] and data_offsets [begin, end]); {_REWRITE}")
    if dtype not in SAFETENSORS_DTYPE_BYTES:
        raise ValueError(f"{file}: tensor {name!r} has dtype {dtype!r}, which is not a safetensors dtype this "
                         f"runtime reads ({sorted(SAFETENSORS_DTYPE_BYTES)}); export the checkpoint in "
                         f"{', '.join(sorted(FLOAT_DTYPES))}")
    begin, end = offsets
    want = SAFETENSORS_DTYPE_BYTES[dtype]
    for d in shape:
        want *= d
    if end - begin != want:
        raise ValueError(f"{file}: tensor {name!r} ({dtype}, shape {tuple(shape)}) needs {want} bytes but its "
                         f"data_offsets span {end - begin}: the header is corrupt; {_REWRITE}")
    return dtype, tuple(shape), begin, end


def read_safetensors_header(file: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor name: (safetensors dtype string, shape)} from a file's header, without reading data.

    Everything safetensors would refuse later, mid-load and naming no file (a truncated file, a
    corrupt or non-JSON header, unknown dtypes, data offsets that leave gaps, overlap or run past the
    end), is refused here with the file's path, before any memory is allocated for the weights.
    """
    file = Path(file)
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) != 8:
                raise ValueError(f"{file} is not a safetensors file ({size} bytes, shorter than its 8-byte header "
                                 f"length): it is truncated or empty; {_REWRITE}")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > size - 8:
                raise ValueError(f"{file} is truncated or not a safetensors file: its header claims {header_len} "
                                 f"bytes, the file holds {size - 8} after the length; {_REWRITE}")
            raw = f.read(header_len)
    except OSError as err:  # missing, a directory, unreadable: the OS's reason, with the path
        raise FileNotFoundError(f"cannot read {file}: {err.strerror or err}; check that the file exists and is "
                                "readable") from err
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{file} has a corrupt header (not UTF-8 JSON: {err}); the file is damaged or not a "
                         f"safetensors file; {_REWRITE}") from err
    if not isinstance(header, dict):
        raise ValueError(f"{file} has a corrupt header (a JSON {type(header).__name__}, not an object); {_REWRITE}")
    header.pop("__metadata__", None)
    entries = {name: _header_entry(file, name, info) for name, info in header.items()}
    # the tensors must tile the data section exactly, as safetensors checks when it opens the file
    data_len, covered = size - 8 - header_len, 0
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda item: item[1][2:]):
        if begin != covered:
            raise ValueError(f"{file}: tensor {name!r} starts at byte {begin} of the data, expected {covered} "
                             f"(a gap or an overlap): the header is corrupt; {_REWRITE}")
        covered = end
    if covered > data_len:
        raise ValueError(f"{file} is truncated: its header describes {covered} bytes of tensor data, the file holds "
                         f"{data_len} ({covered - data_len} missing); {_REWRITE}")
    if covered < data_len:
        raise ValueError(f"{file} has {data_len - covered} bytes after its last tensor (a damaged or "
                         f"concatenated file); {_REWRITE}")
    return {name: (dtype, shape) for name, (dtype, shape, _, _) in entries.items()}


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory: model.safetensors or the shards of its index."""
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = read_json_file(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no weight_map (tensor name -> shard file): replace the index with the "
                             "checkpoint's original")
        bad = [name for name, shard in weight_map.items() if not isinstance(shard, str) or not shard]
        if bad:
            raise ValueError(f"{index}: the weight_map entry of {bad[0]!r} is {weight_map[bad[0]]!r}, not a shard "
                             "file name; replace the index with the checkpoint's original")
        files = [path / name for name in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shard files that are not in {path}: {missing}; download the "
                                    "missing shards (or fix the index if they were renamed)")
        return files
    single = path / SINGLE_FILE
    if single.is_file():
        return [single]
    present = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    hint = ""
    if any(name.endswith((".bin", ".pt", ".pth")) for name in present):
        hint = " The directory holds PyTorch pickles: convert them to safetensors first."
    raise FileNotFoundError(f"{path} has neither {SINGLE_FILE} nor {INDEX_FILE} (found: {present}).{hint}")


def _listing(lines: list[str]) -> str:
    shown = lines[:_MAX_LISTED]
    more = f"\n    ... and {len(lines) - _MAX_LISTED} more" if len(lines) > _MAX_LISTED else ""
    return "".join(f"\n    {line}" for line in shown) + more


def check_tensors(found: Mapping[str, tuple[str, tuple[int, ...]]], config: ModelConfig,
                  where: str = "checkpoint") -> None:
    """Raise ValueError listing every missing, misshaped, non-float or unexpected tensor.

    found: {name: (safetensors dtype, shape)}. A tied checkpoint may still store lm_head.weight
    (the embedding is used, as transformers does); any other extra tensor is an error.
    """
    expected = stored_shapes(config, expected_tensor_shapes(config))
    missing = [f"{name} (expected shape {shape})" for name, shape in expected.items() if name not in found]
    misshaped = [f"{name}: shape {found[name][1]}, expected {shape}" for name, shape in expected.items()
                 if name in found and found[name][1] != shape]
    not_float = [f"{name}: dtype {found[name][0]}, expected one of {sorted(FLOAT_DTYPES)}" for name in expected
                 if name in found and found[name][0] not in FLOAT_DTYPES]
    tolerated = {"lm_head.weight"} if config.tie_word_embeddings else set()
    extra = [f"{name} {found[name][1]}" for name in found
             if name not in expected and name not in tolerated and not name.endswith(HARMLESS_SUFFIXES)]
    if config.tie_word_embeddings and "lm_head.weight" in found:
        shape, want = found["lm_head.weight"][1], (config.vocab_size, config.hidden_size)
        if shape != want:
            misshaped.append(f"lm_head.weight: shape {shape}, expected {want}")
    problems = []
    if missing:
        problems.append(f"missing tensors:{_listing(missing)}")
    if misshaped:
        problems.append(f"tensors with the wrong shape:{_listing(misshaped)}")
    if not_float:
        problems.append(f"tensors that are not floating point (quantised checkpoints are not supported):"
                        f"{_listing(not_float)}")
    if extra:
        problems.append(f"unexpected tensors (does config.json describe this checkpoint?):{_listing(extra)}")
    if config.moe is not None and any(".mlp." in line for line in missing + extra + misshaped):
        moe = config.moe
        problems.append(f"the MoE keys decide which expert tensors exist (num_experts={moe.num_experts}, "
                        f"moe_intermediate_size={moe.expert_intermediate_size}, MoE layers {list(moe.moe_layers)} "
                        "from decoder_sparse_step / mlp_only_layers or first_k_dense_replace, num_shared_experts="
                        f"{moe.num_shared_experts}): correct them to match the tensors")
    if problems:
        raise ValueError(f"{where} does not match its config.json "
                         f"({config.architecture}, {config.num_layers} layers, hidden {config.hidden_size}, "
                         f"{config.num_heads}/{config.num_kv_heads} heads of {config.head_dim}, "
                         f"vocab {config.vocab_size}): " + "; ".join(problems))


def _check_unsupported_features(raw: dict[str, Any], where: Path) -> None:
    if raw.get("use_sliding_window") and raw.get("sliding_window"):
        raise ValueError(f"{where}/config.json enables sliding-window attention (sliding_window="
                         f"{raw['sliding_window']}), which this runtime does not implement; set "
                         "use_sliding_window to false if the model was trained without it")


def load_model(path: str | Path, *, dtype: torch.dtype | str | None = None,
               device: str | torch.device = "cpu", tp: TensorParallel | None = None) -> tuple[Transformer, ModelConfig]:
    """Load a local Hugging Face directory of a supported family into a `Transformer` in eval mode.

    dtype None keeps the dtype the embedding is stored in. Parameters come back with
    requires_grad=False (an inference load); training calls `model.requires_grad_(True)`.
    With `tp`, the rank's shard (runtime/parallel.py): only its slices of the files are read.
    """
    path = Path(path)
    config = ModelConfig.from_dir(path)
    _check_unsupported_features(read_json_file(path / "config.json"), path)
    files = checkpoint_files(path)
    found: dict[str, tuple[str, tuple[int, ...]]] = {}
    file_of: dict[str, Path] = {}
    for file in files:
        for name, info in read_safetensors_header(file).items():
            if name in file_of:
                raise ValueError(f"tensor {name} is stored twice: in {file_of[name].name} and {file.name}")
            found[name], file_of[name] = info, file
    check_tensors(found, config, where=str(path))

    shapes = expected_tensor_shapes(config)
    recipes = stored_as(config, shapes)
    embedding = recipes["model.embed_tokens.weight"].pieces()[0].name
    tp = tp or TensorParallel()
    if tp.enabled:
        local = expected_tensor_shapes(config, tp)
        recipes = shard(recipes, shapes, {name: split_kind(name) for name in local}, tp.rank, tp.world_size)
    target = resolve_dtype(dtype) if dtype is not None else FLOAT_DTYPES[found[embedding][0]]
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    with torch.device("meta"):
        model = Transformer(config, tp)
    state: dict[str, torch.Tensor] = {}
    with contextlib.ExitStack() as stack:
        handles = {file: stack.enter_context(safe_open(file, framework="pt", device=str(device))) for file in files}

        def read(piece: Piece) -> torch.Tensor:
            stored = handles[file_of[piece.name]].get_slice(piece.name)
            rows = slice(*piece.rows) if piece.rows is not None else slice(None)
            cols = slice(*piece.cols) if piece.cols is not None else slice(None)
            return (stored[rows] if piece.cols is None else stored[rows, cols]).to(target)

        for name, recipe in recipes.items():
            state[name] = assemble(recipe, read)
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    model.requires_grad_(False)
    return model.eval(), config


FORECAST_FILE = "forecast.safetensors"  # optional: herald's learned forecast (training/forecast.py)


def load_forecast(path: str | Path, config: ModelConfig) -> torch.Tensor:
    """The learned forecast projections beside a checkpoint: [L, Hkv, D, D] fp32, entry l mapping
    layer l-1's selection queries (per KV head) to those that select layer l's pages
    (`SparseConfig.forecast="learned"`). Refuses a missing file or one for another geometry."""
    file = Path(path) / FORECAST_FILE
    if not file.is_file():
        raise FileNotFoundError(f"forecast='learned' needs {file}; fit one with `python -m training.forecast --model "
                                f"{path}`, or use forecast='next-layer' (training-free)")
    found = read_safetensors_header(file)
    expected = (config.num_layers, config.num_kv_heads, config.head_dim, config.head_dim)
    if set(found) != {"weight"} or found["weight"][1] != expected:
        raise ValueError(f"{file} holds {{{', '.join(f'{n}: {list(sh)}' for n, (_, sh) in found.items())}}}; this "
                         f"model's forecast is one tensor 'weight' of shape {list(expected)} (layers, KV heads, "
                         "head_dim, head_dim): fit it again for this checkpoint")
    with safe_open(file, framework="pt") as f:
        return f.get_tensor("weight").float()


def random_model(config: ModelConfig, *, dtype: torch.dtype | str = torch.float32,
                 device: str | torch.device = "cpu", seed: int = 0, std: float = 0.02,
                 tp: TensorParallel | None = None) -> Transformer:
    """A model with random weights allocated directly in `dtype` on `device` (speed runs at real geometry).

    With `tp`, one rank's shard. Every rank draws the same values for the same seed (its shards
    have the same shapes), so the replicated tensors (embedding, norms, router, head) agree: the
    ranks decode alike. The shards are not slices of the unsharded model of that seed."""
    target, device = resolve_dtype(dtype), torch.device(device)
    with torch.device("meta"):
        model = Transformer(config, tp)
    state = {name: torch.empty(t.shape, dtype=target, device=device) for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    model.init_weights(std, torch.Generator(device).manual_seed(seed))
    model.requires_grad_(False)
    return model.eval()


def save_checkpoint(model: Transformer, model_config_dict: Mapping[str, Any], path: str | Path,
                    tokenizer: Tokenizer | tokenizers.Tokenizer | None = None) -> None:
    """Write config.json + model.safetensors (+ tokenizer files) as a Hugging Face directory.

    model_config_dict: the config.json content (HF field names, e.g. model_type, hidden_size,
    mask_token_id, block_size); it must describe `model`, which is checked. A bare
    `tokenizers.Tokenizer` gets a tokenizer_config.json naming the eos/pad/mask tokens given by
    the config's eos_token_id / pad_token_id / mask_token_id.
    """
    if model.tp.enabled:
        raise ValueError("save_checkpoint takes a whole model, not one rank's tensor-parallel shard")
    path = Path(path)
    cfg = dict(model_config_dict)
    if "torch_dtype" not in cfg and "dtype" not in cfg:
        cfg["torch_dtype"] = str(model.dtype).removeprefix("torch.")
    described = ModelConfig.from_hf(cfg)
    have = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if described.tie_word_embeddings:
        have.pop("lm_head.weight", None)
    if expected_tensor_shapes(described) != have or described.tie_word_embeddings != model.config.tie_word_embeddings:
        raise ValueError("model_config_dict does not describe the model: it implies "
                         f"{ModelConfig.from_hf(cfg)}, the model was built from {model.config}")
    path.mkdir(parents=True, exist_ok=True)
    state = {name: t.detach().to("cpu") for name, t in model.state_dict().items() if name in have}
    stored = disassemble(stored_as(described, have), state)
    tensors = {name: t.contiguous() for name, t in stored.items()}
    save_file(tensors, str(path / SINGLE_FILE), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if tokenizer is None:
        return
    if isinstance(tokenizer, tokenizers.Tokenizer):
        def token(key: str) -> str | None:
            ids = cfg.get(key)
            first = ids[0] if isinstance(ids, list) and ids else ids
            return tokenizer.id_to_token(int(first)) if first is not None else None

        eos = token("eos_token_id")
        tokenizer = Tokenizer(tokenizer, hf_tokenizer_config(
            tokenizer, eos_token=eos, pad_token=token("pad_token_id") or eos, mask_token=token("mask_token_id")))
    tokenizer.save(path)
