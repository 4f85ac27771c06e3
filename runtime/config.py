"""Configuration: what the checkpoint says (ModelConfig) and what the user asks for (EngineConfig).

Both are frozen dataclasses, built once and passed down; nothing below `runtime/` reads them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from runtime.families import DECODING_RULES, Family, detect_family, family_by_name

if TYPE_CHECKING:
    import torch

ATTENTION_MODES = ("dense", "mage", "quest", "herald")
SELECTION_SOURCES = ("gpu-exact", "cpu", "gpu-compact", "split")
# herald's step-0 forecast of the next layer's pages (SparDA's): off | next-layer (training-free) |
# learned (the queries first mapped by the projections of the checkpoint's forecast.safetensors)
FORECASTS = ("off", "next-layer", "learned")
SELECTION_QUERIES = ("mean", "center", "positions")
GRANULARITIES = ("page", "token")
ATTENTION_BACKENDS = ("torch", "triton")
# How K/V are stored: "model" in the model's dtype (bf16 on CUDA); "fp8_e4m3" as e4m3 codes with an
# fp32 scale per (page, KV head) (gpu_kernels/kv_fp8.py): half the bytes in host memory, over PCIe
# and in a dense GPU cache
KV_FORMATS = ("model", "fp8_e4m3")
# the modes that store fp8 K/V (mage's and quest's resident caches and summaries read 16-bit keys)
FP8_KV_MODES = ("dense", "herald")
UNMASKING_SCHEDULES = ("threshold", "fixed")
PROMPT_ATTENTION = ("causal", "block_causal")
ROUTER_SCORES = ("softmax", "sigmoid")
MOE_ARCHITECTURES = ("qwen3_moe", "llada2_moe")
# config.json keys that only a mixture-of-experts checkpoint states
MOE_KEYS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size")


def read_json_file(file: Path, required: bool = True) -> dict[str, Any]:
    """A checkpoint's JSON file as a dict, every problem named with the file's path and what to do.

    required=False: a file that does not exist reads as {} (optional files such as
    generation_config.json); one that exists but does not parse is refused all the same, since
    skipping it would silently drop what it says (eos ids, the mask token)."""
    file = Path(file)
    if not file.is_file():
        if not required:
            return {}
        raise FileNotFoundError(f"{file} does not exist: the checkpoint directory is incomplete; download or "
                                "save the checkpoint again")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{file} is not UTF-8 text (byte {err.start}): it is damaged or not a JSON file; "
                         "replace it with the checkpoint's original") from err
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{file} is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}; fix the "
                         "file or replace it with the checkpoint's original") from err
    if not isinstance(data, dict):
        raise ValueError(f"{file} holds a JSON {type(data).__name__}, not an object ({{...}}); replace it with the "
                         "checkpoint's original")
    return data


# config.json fields that must be whole numbers, and the least each may be (null: not stated).
# int() would accept "256" or 256.7 and fail on null with a message naming no field: checked first.
CONFIG_INTEGER_FIELDS = {
    "vocab_size": 1, "hidden_size": 1, "intermediate_size": 1, "num_hidden_layers": 1, "num_attention_heads": 1,
    "num_key_value_heads": 1, "head_dim": 1, "max_position_embeddings": 1, "block_size": 1, "block_length": 1,
    "bd_size": 1, "mask_token_id": 0,
}


def check_integer_fields(cfg: dict[str, Any], file: Path) -> None:
    """Refuse a config field that is not a whole number in its range, naming the file and the field."""
    for key, least in CONFIG_INTEGER_FIELDS.items():
        value = cfg.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{file}: {key}={value!r} must be an integer >= {least}; correct it to the value "
                             "the model was trained with")
    for key in ("eos_token_id", "pad_token_id", "bos_token_id"):
        value = cfg.get(key)
        ids = value if isinstance(value, list) else [value]
        if any(v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0) for v in ids):
            raise ValueError(f"{file}: {key}={value!r} must be a token id (an integer >= 0), a list of them, or null")


def _id_list(value: Any) -> list[int]:
    """A token id field as config files write it: one id, a list of ids, or null."""
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, list) else [value])]


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding settings as a checkpoint states them (HF `rope_scaling` / `rope_parameters`)."""

    theta: float = 10000.0
    rope_type: str = "default"  # default | linear | yarn | llama3
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    # yarn
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> "RopeConfig":
        params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        rope_type = params.get("rope_type", params.get("type", "default")) or "default"
        known = {"default", "linear", "yarn", "llama3"}
        if rope_type not in known:
            key = "rope_parameters" if cfg.get("rope_parameters") else "rope_scaling"
            raise ValueError(
                f"rope type {rope_type!r} is not supported (config.json {key}); supported: {sorted(known)}. "
                f"Set {key} to one of them (null for plain RoPE) if that is how the model was trained, "
                "or add the type to runtime/model.py."
            )
        get = params.get
        factor = get("factor")
        original = get("original_max_position_embeddings")
        if factor is None and rope_type == "yarn" and original:
            # transformers' reading of a YaRN config that states only the original context
            factor = cfg.get("max_position_embeddings", original) / original
        return cls(
            theta=theta,
            rope_type=rope_type,
            factor=float(factor or 1.0),
            original_max_position_embeddings=original,
            beta_fast=float(get("beta_fast") or 32.0),
            beta_slow=float(get("beta_slow") or 1.0),
            mscale=get("mscale"),
            mscale_all_dim=get("mscale_all_dim"),
            attention_factor=get("attention_factor"),
            truncate=bool(get("truncate", True)),
            low_freq_factor=float(get("low_freq_factor", 1.0)),
            high_freq_factor=float(get("high_freq_factor", 4.0)),
        )


@dataclass(frozen=True)
class MoeConfig:
    """A mixture-of-experts MLP as a checkpoint states it (Qwen3-MoE's and LLaDA2.0's keys).

    Each token's router scores every expert (softmax, Qwen3-MoE; sigmoid, LLaDA2.0), picks
    `experts_per_token` of them (within the `groups_per_token` best of `num_groups` expert groups
    when grouped, ranking by score + the expert bias), and sums their SwiGLU MLPs weighted by the
    chosen scores (renormalised to sum 1 when `normalize_weights`, then times `routed_scaling`);
    `num_shared_experts` always-on experts (one MLP of that many experts' width) are added.
    """

    num_experts: int
    experts_per_token: int
    expert_intermediate_size: int
    moe_layers: tuple[int, ...]  # the layers whose MLP is the mixture; the others are dense
    score: str = "softmax"  # softmax | sigmoid
    normalize_weights: bool = False
    num_groups: int = 1
    groups_per_token: int = 1
    routed_scaling: float = 1.0
    num_shared_experts: int = 0
    expert_bias: bool = False  # a per-expert bias added to the scores for the choice only (LLaDA2.0)

    def __post_init__(self) -> None:
        if self.score not in ROUTER_SCORES:
            raise ValueError(f"config.json score_function={self.score!r}; supported: {ROUTER_SCORES}")
        if not 1 <= self.experts_per_token <= self.num_experts:
            raise ValueError(f"config.json num_experts_per_tok={self.experts_per_token} must be in "
                             f"[1, num_experts={self.num_experts}]")
        if self.expert_intermediate_size < 1:
            raise ValueError(f"config.json moe_intermediate_size={self.expert_intermediate_size} must be >= 1")
        if self.num_groups < 1 or self.num_experts % self.num_groups:
            raise ValueError(f"config.json n_group={self.num_groups} must divide num_experts={self.num_experts}")
        if not 1 <= self.groups_per_token <= self.num_groups:
            raise ValueError(f"config.json topk_group={self.groups_per_token} must be in [1, n_group={self.num_groups}]")
        reachable = self.groups_per_token * self.num_experts // self.num_groups
        if self.experts_per_token > reachable:
            raise ValueError(f"config.json num_experts_per_tok={self.experts_per_token} exceeds the "
                             f"{reachable} experts of topk_group={self.groups_per_token} groups: raise topk_group")
        if self.num_shared_experts < 0:
            raise ValueError(f"config.json num_shared_experts={self.num_shared_experts} must be >= 0")

    @property
    def shared_intermediate_size(self) -> int:
        return self.expert_intermediate_size * self.num_shared_experts

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], architecture: str, num_layers: int) -> "MoeConfig":
        """The MoE settings of a qwen3_moe or llada2_moe config.json (keys as the hub files write them)."""
        missing = [k for k in MOE_KEYS if cfg.get(k) is None]
        if missing:
            raise ValueError(f"config.json describes a {architecture} mixture-of-experts model but lacks {missing}")
        experts = int(cfg["num_experts"])
        if architecture == "llada2_moe":
            # LLaDA2.0's layers from first_k_dense_replace on are MoE; its router is sigmoid, grouped,
            # renormalised when it picks more than one expert, scaled, with an expert bias
            first_dense = int(cfg.get("first_k_dense_replace", 0))
            layers = tuple(range(first_dense, num_layers))
            score = str(cfg.get("score_function", "sigmoid"))
            top_k = int(cfg["num_experts_per_tok"])
            return cls(experts, top_k, int(cfg["moe_intermediate_size"]), layers, score=score,
                       normalize_weights=top_k > 1, num_groups=int(cfg.get("n_group") or 1),
                       groups_per_token=int(cfg.get("topk_group") or 1),
                       routed_scaling=float(cfg.get("routed_scaling_factor", 1.0)),
                       num_shared_experts=int(cfg.get("num_shared_experts") or 0), expert_bias=True)
        # Qwen3-MoE: layer i is sparse unless listed in mlp_only_layers, every decoder_sparse_step-th
        step = int(cfg.get("decoder_sparse_step", 1))
        if step < 1:
            raise ValueError(f"config.json decoder_sparse_step={step} must be >= 1")
        dense_only = {int(i) for i in cfg.get("mlp_only_layers") or []}
        bad = sorted(i for i in dense_only if not 0 <= i < num_layers)
        if bad:
            raise ValueError(f"config.json mlp_only_layers names layers {bad} outside the model's {num_layers}")
        layers = tuple(i for i in range(num_layers) if i not in dense_only and (i + 1) % step == 0)
        return cls(experts, int(cfg["num_experts_per_tok"]), int(cfg["moe_intermediate_size"]), layers,
                   normalize_weights=bool(cfg.get("norm_topk_prob", False)))


@dataclass(frozen=True)
class ModelConfig:
    """The architecture of a checkpoint (Qwen2, Qwen3, Qwen3-MoE, LLaDA2.0), parsed from its config.json."""

    architecture: Literal["qwen2", "qwen3", "qwen3_moe", "llada2_moe"]
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = field(default_factory=RopeConfig)
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2 has q/k/v biases
    qk_norm: bool = False  # Qwen3 normalises q and k per head
    # Block-diffusion settings a checkpoint may carry (None: not stated).
    mask_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    block_size: int | None = None
    torch_dtype: str | None = None
    family: str | None = None  # runtime/families.py; None: the plain family of `architecture`
    moe: MoeConfig | None = None  # None: every layer's MLP is dense
    rotary_dim: int | None = None  # leading head dims RoPE rotates (LLaDA2.0: half); None: all
    output_bias: bool | None = None  # o_proj's bias; None: the architecture's rule (`has_output_bias`)

    def __post_init__(self) -> None:
        if self.rotary_dim is not None and not (0 < self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0):
            raise ValueError(f"rotary_dim={self.rotary_dim} must be even and in (0, head_dim={self.head_dim}]")
        if (self.moe is not None) != (self.architecture in MOE_ARCHITECTURES):
            raise ValueError(f"architecture {self.architecture!r} "
                             + ("needs MoE settings" if self.moe is None else "has no mixture-of-experts MLP"))

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def rope_dim(self) -> int:
        """Head dims rotated by RoPE (the rest pass through)."""
        return self.rotary_dim or self.head_dim

    @property
    def has_output_bias(self) -> bool:
        # Qwen2 never biases o_proj; Qwen3's attention_bias covers all four projections
        if self.output_bias is not None:
            return self.output_bias
        return self.attention_bias and self.architecture in ("qwen3", "qwen3_moe")

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe is not None and layer in self.moe.moe_layers

    @property
    def family_defaults(self) -> Family:
        """The family's published decoding defaults (for what the checkpoint leaves unsaid)."""
        return family_by_name(self.family or self.architecture)

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> "ModelConfig":
        family = detect_family(cfg)  # refuses an unknown model_type naming every supported family
        arch = family.architecture
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in cfg]
        if missing:
            raise ValueError(f"config.json lacks required fields {missing}")
        num_heads = int(cfg["num_attention_heads"])
        num_kv_heads = int(cfg.get("num_key_value_heads") or num_heads)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_attention_heads={num_heads} is not a multiple of num_key_value_heads={num_kv_heads}")
        head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // num_heads)
        eos_ids = tuple(_id_list(cfg.get("eos_token_id")))
        block = cfg.get("block_size", cfg.get("block_length", cfg.get("bd_size")))
        num_layers = int(cfg["num_hidden_layers"])
        moe = None
        if arch in MOE_ARCHITECTURES:
            moe = MoeConfig.from_hf(cfg, arch, num_layers)
        elif int(cfg.get("num_experts") or 0) > 0:
            raise ValueError(f"config.json sets num_experts={cfg['num_experts']}, but model_type="
                             f"{cfg.get('model_type')!r} ({family.name}) is a dense model: name the MoE family "
                             "(model_type qwen3_moe, sdar_moe or llada2_moe) or remove the MoE keys")
        partial = cfg.get("partial_rotary_factor", (cfg.get("rope_parameters") or {}).get("partial_rotary_factor"))
        rotary_dim = int(head_dim * float(partial)) if partial not in (None, 1, 1.0) else None
        llada2 = arch == "llada2_moe"
        return cls(
            architecture=arch,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 32768)),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope=RopeConfig.from_hf(cfg),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("use_qkv_bias", False) if llada2 else cfg.get("attention_bias", arch == "qwen2")),
            qk_norm=bool(cfg.get("use_qk_norm", True)) if llada2 else arch in ("qwen3", "qwen3_moe"),
            mask_token_id=cfg.get("mask_token_id"),
            eos_token_ids=eos_ids,
            block_size=int(block) if block else None,
            torch_dtype=cfg.get("torch_dtype", cfg.get("dtype")),
            family=family.name,
            moe=moe,
            rotary_dim=rotary_dim,
            output_bias=bool(cfg.get("use_bias", True)) if llada2 else None,
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{path} has no config.json: pass a local Hugging Face model directory")
        cfg = read_json_file(cfg_file)
        check_integer_fields(cfg, cfg_file)
        gen_file = path / "generation_config.json"
        gen = read_json_file(gen_file, required=False)
        check_integer_fields(gen, gen_file)
        try:
            if gen:
                for key in ("mask_token_id", "block_size", "block_length"):
                    if key in gen and key not in cfg:
                        cfg[key] = gen[key]
                # chat checkpoints list their end-of-turn token (<|im_end|>) only here: stop at both files' eos
                eos = [e for source in (cfg, gen) for e in _id_list(source.get("eos_token_id"))]
                if eos:
                    cfg["eos_token_id"] = list(dict.fromkeys(eos))
            return cls.from_hf(cfg)
        except (ValueError, TypeError) as err:
            # a field of the wrong type (a string or null where a number belongs) fails deep in the
            # parse: name the files it came from, which the parse itself does not know
            files = f"{cfg_file}" + (f" (with {gen_file})" if gen else "")
            raise ValueError(f"{files}: {err}") from err


@dataclass(frozen=True)
class SparseConfig:
    """How the sparse modes (mage, quest, herald) choose the context a block attends to.

    The budget is per (layer, KV head) and counts the context tokens chosen by score (pages x page
    size); the forced ones come on top of it: sinks, the local window and the last, partial page,
    and the block's own K/V.
    """

    budget_fraction: float = 0.05  # share of the context ...
    budget_tokens: int | None = None  # ... or, when set, a fixed count instead
    page_size: int = 16  # tokens per KV page (selection unit, transfer unit)
    granularity: str = "page"  # page | token (token: mage only, MAGE's token-level top-k)
    # mean: block-mean over B positions and the GQA group (MAGE) | center: the centre [MASK] position,
    # mean over its GQA group (HERALD) | positions: one query per block position (GQA-group mean), a
    # token scoring the max over them. None: positions for herald, whose step 0 attends only to what
    # it selects; mean for mage (its step 0 is exact, and its kernel scores the block mean in that pass)
    query: str | None = None
    # herald's selection source: cpu | gpu-compact | split | gpu-exact (step 0 exact over the host store;
    # mage's step 0 is always exact on its resident KV)
    source: str = "gpu-compact"
    sink_tokens: int = 16
    local_window: int = 64
    dense_layers: int = 2  # the first layers stay exact (MAGE and Quest keep two; herald holds theirs on the GPU)
    compact_bits: int = 4  # gpu-compact key copy: 4 or 8 bits, per-group scales
    compact_group: int = 32  # elements per scale (capped at head_dim)
    split_cpu_fraction: float = 0.5  # split source: the oldest share of pages the CPU scans
    check_residency: bool = False  # assert before every sparse attention that its pages are resident
    # herald: select and fetch the next block's pages from this block's draft, beside the block's steps.
    # None: on with CUDA, where a side stream hides it; off on the CPU, where it would run in line
    # (`for_device` resolves it; the engine does so once, and the modes and the planner need it resolved)
    lookahead: bool | None = None
    measure_draft_recall: bool = False  # herald + lookahead: also select at step 0 and report the overlap
    # herald + lookahead on CUDA: each layer's gather on a stream of its own, so that it overlaps the
    # next layers' selection instead of following it (the side pass takes ~max, not the sum)
    lookahead_gather_stream: bool = True
    # herald + lookahead: the most programs (SMs) its gathers hold beside the block's steps; each one
    # is an SM the passes lose while the transfer runs. None: offload.page_fetcher.DEFAULT_FETCH_PROGRAMS
    lookahead_fetch_programs: int | None = None
    # herald, at a step 0 that selects by scanning (lookahead off, or a block the lookahead did not
    # prepare): "next-layer" scores layer l's selection queries against layer l+1's keys as well, and
    # fetches those pages on the gather stream while layer l attends (SparDA's training-free forecast).
    # "learned": the queries first pass through that layer's projection (checkpoint's forecast.safetensors,
    # training/forecast.py). Layer l+1 still attends to its own exact selection; the forecast only
    # decides what moves early.
    forecast: str = "off"
    # herald's host KV store on 2 MiB transparent huge pages where the OS grants them (offload/host_store.py)
    host_huge_pages: bool = True
    # herald: False launches every gather with its units as holes, so no byte crosses PCIe while
    # every selection, diff and launch stays the same. A timing reference only (tokens are wrong):
    # block time with and without it is the transfer time a user feels (benchmarks.throughput)
    move_pages: bool = True

    def selection_query(self, mode: str) -> str:
        """The selection query `mode` ("herald" or "mage") uses: `query`, or the mode's default."""
        if self.query is not None:
            return self.query
        return "positions" if mode == "herald" else "mean"

    def for_device(self, device: torch.device) -> "SparseConfig":
        """This configuration with the device-dependent defaults decided (the lookahead)."""
        if self.lookahead is not None:
            return self
        # gpu-exact selects from step 0's exact pass, which the lookahead's pass does not run
        return replace(self, lookahead=device.type == "cuda" and self.source != "gpu-exact")

    def lookahead_resolved(self) -> bool:
        """The lookahead setting of a configuration `for_device` resolved."""
        if self.lookahead is None:
            raise ValueError("SparseConfig.lookahead=None means 'by device': resolve it with for_device(device) "
                             "first (the Engine does)")
        return self.lookahead

    def check_dense_layers(self, num_layers: int) -> None:
        """Refuse more exact layers than the model has."""
        if self.dense_layers > num_layers:
            raise ValueError(f"dense_layers={self.dense_layers} exceeds the model's {num_layers} layers")

    def __post_init__(self) -> None:
        if not 0.0 < self.budget_fraction <= 1.0:
            raise ValueError(f"budget_fraction={self.budget_fraction} must be in (0, 1]; 0 selects nothing")
        if self.budget_tokens is not None and self.budget_tokens < 1:
            raise ValueError(f"budget_tokens={self.budget_tokens} must be >= 1")
        if self.page_size < 1 or self.page_size & (self.page_size - 1):
            raise ValueError(f"page_size={self.page_size} must be a power of two (the kernels tile by it)")
        for name, value, allowed in (("granularity", self.granularity, GRANULARITIES),
                                     ("query", self.query or "mean", SELECTION_QUERIES),
                                     ("source", self.source, SELECTION_SOURCES),
                                     ("forecast", self.forecast, FORECASTS)):
            if value not in allowed:
                raise ValueError(f"{name}={value!r}; choose one of {allowed}")
        if self.sink_tokens < 0 or self.local_window < 0:
            raise ValueError(f"sink_tokens={self.sink_tokens} and local_window={self.local_window} must be >= 0")
        if self.dense_layers < 0:
            raise ValueError(f"dense_layers={self.dense_layers} must be >= 0")
        if self.compact_bits not in (4, 8):
            raise ValueError(f"compact_bits={self.compact_bits}; choose 4 or 8")
        if self.lookahead_fetch_programs is not None and self.lookahead_fetch_programs < 1:
            raise ValueError(f"lookahead_fetch_programs={self.lookahead_fetch_programs} must be >= 1 "
                             "(None: the page fetcher's default)")
        if not 0.0 <= self.split_cpu_fraction <= 1.0:
            raise ValueError(f"split_cpu_fraction={self.split_cpu_fraction} must be in [0, 1]")

    def budget_pages(self, context_tokens: int) -> int:
        """Pages to select for a context of `context_tokens` (all of them at most)."""
        pages = -(-context_tokens // self.page_size)
        tokens = (self.budget_tokens if self.budget_tokens is not None
                  else self.budget_fraction * context_tokens)
        return min(pages, max(1, -(-int(round(tokens)) // self.page_size)))


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs from its user. `None` means: take it from the checkpoint."""

    model_path: str
    mode: str = "dense"
    attention_backend: str = "auto"  # auto (triton on CUDA, torch on CPU) | torch | triton
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16 | float16 | float64
    # Decoding. None: the checkpoint's setting, else its family's default (runtime/families.py)
    block_size: int | None = None
    denoising_steps: int | None = None  # None: the family's, else block_size steps (one token per step at worst)
    unmasking: str | None = None  # threshold (Fast-dLLM v2 / SDAR dynamic) | fixed (SDAR static)
    confidence_threshold: float | None = None
    decoding: str | None = None  # the decoding rule: sdar | fast_dllm_v2 (token shift, sub-blocks)
    sub_block_size: int | None = None  # fast_dllm_v2: positions unmasked left to right at a time
    prompt_attention: str | None = None  # causal | block_causal
    mask_token_id: int | None = None
    stop_token_ids: tuple[int, ...] | None = None  # None: every eos of config, generation config and tokenizer
    chat_template: str | None = None  # a .jinja file used instead of the checkpoint's chat template
    # Prompt text is plain text: "<|endoftext|>" or "<|MASK|>" written in it stays those characters,
    # so a user's document cannot end the prompt or inject a mask. True reads such text as the
    # control tokens (the mask token is refused either way). A chat template's own markers are
    # always control tokens, its messages' contents plain text unless this is True.
    parse_special_tokens: bool = False
    skip_special_tokens: bool = True  # result text without special tokens (result.tokens keep them)
    max_batch_size: int = 8
    prefill_chunk_size: int = 2048
    progress: bool = True
    cuda_graphs: bool = True  # replay denoising passes from CUDA graphs (CUDA + triton backend only)
    # CUDA: one QKV and one gate/up GEMM per layer and Triton kernels for RMSNorm (+ residual),
    # q/k norm + RoPE and SiLU*mul (gpu_kernels/fused_layer.py) instead of ~60 small torch kernels
    fused_layers: bool = True
    # CUDA: run the passes on a high-priority stream, so that herald's lookahead (its side stream
    # has the lowest priority) only takes the SMs they leave idle instead of slowing every step
    stream_priority: bool = True
    sparse: SparseConfig = field(default_factory=SparseConfig)  # mage, quest, herald
    # GPU memory the engine may use in all, weights included (None: whatever is free); e.g. 80 to
    # plan batches on a larger card as on an 80 GB one, or to leave room for other processes
    gpu_memory_gib: float | None = None
    # ranks the model is split over (runtime/parallel.py; launch with torchrun). None: every process
    # of the torchrun launch (1 without one); 1: no split, one engine per process even under torchrun
    tensor_parallel_size: int | None = None
    # how the KV cache is stored (KV_FORMATS): "model" (the model's dtype) or "fp8_e4m3" (e4m3 pages,
    # per-(page, KV head) scales): dense keeps the fp8 cache on the GPU, herald in pinned host memory
    kv_format: str = "model"

    def __post_init__(self) -> None:
        if self.kv_format not in KV_FORMATS:
            raise ValueError(f"kv_format={self.kv_format!r}; choose one of {KV_FORMATS}")
        if self.kv_format == "fp8_e4m3" and self.mode not in FP8_KV_MODES:
            raise ValueError(f"kv_format='fp8_e4m3' is not available in mode={self.mode!r}: its resident cache and "
                             f"selection read 16-bit keys; use mode in {FP8_KV_MODES} or kv_format='model'")
        if self.kv_format == "fp8_e4m3" and self.mode == "herald" and self.sparse.source != "gpu-compact":
            raise ValueError(f"kv_format='fp8_e4m3' with herald needs SparseConfig(source='gpu-compact'): the "
                             f"numba scan of source={self.sparse.source!r} reads 16-bit host keys; set "
                             "source='gpu-compact' or kv_format='model'")
        if self.tensor_parallel_size is not None and self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size={self.tensor_parallel_size} must be >= 1 (None: torchrun's world)")
        if self.mode not in ATTENTION_MODES:
            raise ValueError(f"mode={self.mode!r}; choose one of {ATTENTION_MODES}")
        if self.attention_backend not in ("auto", *ATTENTION_BACKENDS):
            raise ValueError(f"attention_backend={self.attention_backend!r}; choose auto or one of {ATTENTION_BACKENDS}")
        for name, value, allowed in (("unmasking", self.unmasking, UNMASKING_SCHEDULES),
                                     ("decoding", self.decoding, DECODING_RULES),
                                     ("prompt_attention", self.prompt_attention, PROMPT_ATTENTION)):
            if value is not None and value not in allowed:
                raise ValueError(f"{name}={value!r}; choose one of {allowed}")
        if self.confidence_threshold is not None and not 0.0 < self.confidence_threshold <= 1.0:
            raise ValueError(f"confidence_threshold={self.confidence_threshold} must be in (0, 1]")
        for name in ("block_size", "denoising_steps", "sub_block_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}={value} must be >= 1")
        for name in ("parse_special_tokens", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be True or False")
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size={self.max_batch_size} must be >= 1")
        if self.gpu_memory_gib is not None and self.gpu_memory_gib <= 0:
            raise ValueError(f"gpu_memory_gib={self.gpu_memory_gib} must be > 0 (None: no cap)")

    def for_device(self, device: torch.device) -> "EngineConfig":
        """This configuration with its device-dependent defaults decided (`SparseConfig.for_device`)."""
        return replace(self, sparse=self.sparse.for_device(device))

    def with_(self, **changes: Any) -> "EngineConfig":
        return replace(self, **changes)
